"""``Host hpclaunch-JOB`` entries for OpenSSH clients (ssh, scp, rsync, VS Code Remote-SSH).

They live in a file of their own, ``~/.ssh/hpclaunch/config`` (``HPCLAUNCH_SSH_DIR`` moves
``~/.ssh``), with the pinned host keys beside it in ``known_hosts``; the user's ``~/.ssh/config``
gets one ``Include`` line at its top, added only with consent. Paths are written absolute: OpenSSH
resolves ``~`` against the passwd entry, which need not be ``$HOME``. Every change takes a lock and
rewrites the file atomically, so two sessions at once cannot lose each other's entries.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import NodeAccessError

SSH_DIR_ENV = "HPCLAUNCH_SSH_DIR"
ALIAS_PREFIX = "hpclaunch-"


def alias(job_id: str) -> str:
    return f"{ALIAS_PREFIX}{job_id}"


def ssh_dir() -> Path:
    return Path(os.environ.get(SSH_DIR_ENV) or "~/.ssh").expanduser().absolute()


@dataclass(frozen=True)
class Paths:
    base: Path  # ~/.ssh

    @property
    def folder(self) -> Path:
        return self.base / "hpclaunch"

    @property
    def config(self) -> Path:
        return self.folder / "config"

    @property
    def known_hosts(self) -> Path:
        return self.folder / "known_hosts"

    @property
    def user_config(self) -> Path:
        return self.base / "config"

    @property
    def include_line(self) -> str:
        return f"Include {self.config}"


def paths() -> Paths:
    return Paths(ssh_dir())


@dataclass(frozen=True)
class Entry:
    """What one job's ``Host`` block says."""

    job_id: str
    user: str
    host_name: str
    #: How to get there: a ProxyCommand (argv, run by ssh through /bin/sh) ...
    proxy_command: Sequence[str] = ()
    #: ... or a ProxyJump (jump mode with the default ssh config).
    proxy_jump: str | None = None
    port: int | None = None
    identity_files: Sequence[str] = ()
    #: Host keys to pin for the alias ("ssh-ed25519 AAAA..."), one per line of known_hosts.
    host_keys: Sequence[str] = ()

    def block(self, known_hosts: Path) -> str:
        name = alias(self.job_id)
        lines = [f"# hpclaunch job {self.job_id}: removed by `hpclaunch ssh-config {self.job_id} --remove`"]
        lines.append(f"Host {name}")
        lines.append(f"    HostName {self.host_name}")
        if self.port:
            lines.append(f"    Port {self.port}")
        lines.append(f"    User {self.user}")
        if self.proxy_command:
            # ssh expands %-tokens in ProxyCommand: a literal % is %%.
            lines.append(f"    ProxyCommand {shlex.join(self.proxy_command).replace('%', '%%')}")
        elif self.proxy_jump:
            lines.append(f"    ProxyJump {self.proxy_jump}")
        lines.append(f"    HostKeyAlias {name}")
        lines.append(f"    UserKnownHostsFile {_quote(str(known_hosts))}")
        lines.append("    GlobalKnownHostsFile /dev/null")
        lines.append("    StrictHostKeyChecking yes")  # the key is pinned; anything else is refused
        for identity in self.identity_files:
            lines.append(f"    IdentityFile {_quote(identity)}")
        if self.identity_files:
            lines.append("    IdentitiesOnly yes")
        lines.append("    ServerAliveInterval 30")
        return "\n".join(lines) + "\n"


def _quote(value: str) -> str:
    return f'"{value}"' if any(c.isspace() for c in value) else value


# --- the files -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(where: Paths) -> Iterator[None]:
    where.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(where.folder / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _without_block(text: str, job_id: str) -> str:
    """``text`` without the job's block (its comment line, Host line and indented lines)."""
    out: list[str] = []
    skipping = False
    name = alias(job_id)
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith(f"# hpclaunch job {job_id}:"):
            skipping = True
            continue
        if stripped.startswith("Host ") or stripped.startswith("# hpclaunch job "):
            skipping = stripped == f"Host {name}"
            if skipping:
                continue
        if not skipping:
            out.append(line)
    return "".join(out)


def _without_keys(text: str, job_id: str) -> str:
    name = alias(job_id)
    return "".join(line for line in text.splitlines(keepends=True) if line.split(" ", 1)[0] != name)


def write(entry: Entry, where: Paths | None = None) -> Paths:
    """Add (or replace) the job's block and its pinned host keys."""
    where = where or paths()
    with _locked(where):
        config = _without_block(_read(where.config), entry.job_id)
        _write(where.config, config + entry.block(where.known_hosts))
        keys = _without_keys(_read(where.known_hosts), entry.job_id)
        keys += "".join(f"{alias(entry.job_id)} {key.strip()}\n" for key in entry.host_keys)
        _write(where.known_hosts, keys)
    return where


def remove(job_id: str, where: Paths | None = None) -> bool:
    """Remove the job's block and keys; whether there was a block."""
    where = where or paths()
    with _locked(where):
        before = _read(where.config)
        after = _without_block(before, job_id)
        if after != before:
            _write(where.config, after)
        keys = _read(where.known_hosts)
        if _without_keys(keys, job_id) != keys:
            _write(where.known_hosts, _without_keys(keys, job_id))
    return after != before


def has_entry(job_id: str, where: Paths | None = None) -> bool:
    where = where or paths()
    return any(line.strip() == f"Host {alias(job_id)}" for line in _read(where.config).splitlines())


def job_ids(where: Paths | None = None) -> list[str]:
    """The jobs that have an entry, in file order."""
    where = where or paths()
    found = (re.match(r"# hpclaunch job (\S+):", line) for line in _read(where.config).splitlines())
    return [match.group(1) for match in found if match]


def include_present(where: Paths | None = None) -> bool:
    """Whether the user's ``~/.ssh/config`` already includes our file (by this exact path)."""
    where = where or paths()
    wanted = str(where.config)
    for line in _read(where.user_config).splitlines():
        words = line.strip().split()
        if len(words) >= 2 and words[0].lower() == "include" and wanted in words[1:]:
            return True
    return False


def add_include(where: Paths | None = None) -> Path:
    """Put the ``Include`` line at the top of ``~/.ssh/config`` (inside a Host block it would apply
    to that host only). Call only with the user's consent."""
    where = where or paths()
    if include_present(where):
        return where.user_config
    where.base.mkdir(mode=0o700, parents=True, exist_ok=True)
    before = _read(where.user_config)
    mode = where.user_config.stat().st_mode & 0o777 if where.user_config.exists() else 0o600
    text = f"# Added by hpclaunch (VS Code and ssh on your jobs' nodes)\n{where.include_line}\n\n{before}"
    _write(where.user_config, text)
    os.chmod(where.user_config, mode)
    return where.user_config


# --- what OpenSSH would use to log in to the login host ------------------------------------------

_KEY_LINE = re.compile(r"^(identityfile|certificatefile)\s+(.+)$")


def login_identities(host: str | None, ssh_config: str | None, identity_file: str | None) -> list[str]:
    """The key files OpenSSH would offer the login host (``ssh -G``), so the node gets the same ones.

    The profile's ``identity_file`` comes first; only files that exist are named.
    """
    found: list[str] = [os.path.expanduser(identity_file)] if identity_file else []
    if host and shutil.which("ssh"):
        argv = ["ssh", "-G", *(["-F", ssh_config] if ssh_config else []), host]
        try:
            text = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False).stdout
        except (OSError, subprocess.TimeoutExpired):
            text = ""
        for line in text.splitlines():
            match = _KEY_LINE.match(line.strip())
            if match and match.group(1) == "identityfile":
                found.append(os.path.expanduser(match.group(2).strip()))
    unique = list(dict.fromkeys(found))
    return [p for p in unique if os.path.isfile(p)]


def check_job_id(job_id: str) -> str:
    """A job id is written into file names and ssh config lines: digits and ``_`` only."""
    if not re.fullmatch(r"\d+(_\d+)?", job_id):
        raise NodeAccessError(f"{job_id!r} is not a job id")
    return job_id
