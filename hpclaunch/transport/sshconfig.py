"""OpenSSH client configuration, evaluated for one host: ``ssh -G``, or the same rules in Python.

Both give :data:`Options`: lower-case keyword -> values in the order found, like ``ssh -G`` prints
them (one ``key value`` a line). ``ssh -G`` is OpenSSH's own evaluation (Include, Match, tokens,
Canonicalize*, defaults) in about 10 ms; the Python evaluator is for machines without OpenSSH and
handles ``Host``, ``Match host/originalhost/user/localuser/exec/all/final`` and ``Include`` (globs;
relative paths against ``~/.ssh`` for user files and ``/etc/ssh`` for the system file, as OpenSSH
does, even for a file given with ``-F``). It leaves defaults to the caller.
"""

from __future__ import annotations

import fnmatch
import getpass
import glob
import os
import shlex
import socket
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from hpclaunch.errors import ConfigError

Options = dict[str, list[str]]

USER_DIR = "~/.ssh"
SYSTEM_DIR = "/etc/ssh"
MAX_INCLUDE_DEPTH = 16
#: Keywords whose every occurrence counts; for all others the first value wins.
MULTI = frozenset(
    {
        "identityfile",
        "certificatefile",
        "localforward",
        "remoteforward",
        "dynamicforward",
        "sendenv",
        "setenv",
    }
)
#: OpenSSH's keys tried when no IdentityFile is configured (``ssh -G`` then lists exactly these).
OPENSSH_DEFAULT_IDENTITIES = (
    "~/.ssh/id_rsa",
    "~/.ssh/id_ecdsa",
    "~/.ssh/id_ecdsa_sk",
    "~/.ssh/id_ed25519",
    "~/.ssh/id_ed25519_sk",
    "~/.ssh/id_xmss",
    "~/.ssh/id_dsa",
)


def parse_ssh_g(text: str) -> Options:
    """``ssh -G`` output -> Options (pure)."""
    options: Options = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key:
            options.setdefault(key.lower(), []).append(value.strip())
    return options


def openssh_options(
    ssh: str, host: str, config_path: str | None, *, user: str | None = None, port: int | None = None
) -> Options:
    """Ask OpenSSH (``ssh -G``) for the settings of ``host``; a bad config is a ConfigError."""
    if host.startswith("-"):
        raise ConfigError(f"not a host name: {host!r}")
    argv = [ssh, "-G"]
    if config_path is not None:
        argv += ["-F", os.path.expanduser(config_path)]
    if user:
        argv += ["-l", user]
    if port:
        argv += ["-p", str(port)]
    argv.append(host)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"cannot evaluate the ssh config with `{shlex.join(argv)}`: {exc}") from None
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("Pseudo-terminal")]
        why = "; ".join(lines[:2]) or f"exit code {proc.returncode}"
        raise ConfigError(f"ssh config {config_path or '~/.ssh/config'}: {why}")
    return parse_ssh_g(proc.stdout)


# -- the Python evaluator ------------------------------------------------------------------------------


def _pattern_list_matches(patterns: Sequence[str], name: str) -> bool:
    """OpenSSH pattern lists: one positive pattern must match and no negated one (``!pat``)."""
    matched = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern[1:] if negated else pattern
        # OpenSSH patterns know only '*' and '?'; '[' is literal.
        if fnmatch.fnmatchcase(name.lower(), body.lower().replace("[", "[[]")):
            if negated:
                return False
            matched = True
    return matched


@dataclass
class _Context:
    """What Match and tokens see while one host is evaluated."""

    original_host: str
    user: str | None
    port: int | None
    local_user: str = field(default_factory=getpass.getuser)
    options: Options = field(default_factory=dict)

    @property
    def hostname(self) -> str:
        configured = self.options.get("hostname")
        return expand_tokens(configured[0], self) if configured else self.original_host

    @property
    def remote_user(self) -> str:
        return self.user or (self.options.get("user") or [self.local_user])[0]

    @property
    def remote_port(self) -> int:
        if self.port:
            return self.port
        configured = self.options.get("port")
        return int(configured[0]) if configured and configured[0].isdigit() else 22


def substitute(value: str, table: Mapping[str, str]) -> str:
    """Replace ``%x`` tokens by ``table[x]``, left to right (``%%`` is a literal ``%``)."""
    out: list[str] = []
    i = 0
    while i < len(value):
        if value[i] == "%" and i + 1 < len(value) and value[i + 1] in table:
            out.append(table[value[i + 1]])
            i += 2
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def expand_tokens(value: str, ctx: _Context) -> str:
    """OpenSSH's ``%`` tokens that make sense without a connection: %h %n %p %r %u %d %l %L %i %%."""
    local = socket.gethostname()
    hostname = ctx.original_host if "hostname" not in ctx.options else ctx.options["hostname"][0]
    table = {
        "%": "%",
        "h": hostname.replace("%h", ctx.original_host),
        "n": ctx.original_host,
        "p": str(ctx.remote_port),
        "r": ctx.remote_user,
        "u": ctx.local_user,
        "d": os.path.expanduser("~"),
        "l": local,
        "L": local.split(".")[0],
        "i": str(os.getuid()) if hasattr(os, "getuid") else "",
    }
    return substitute(value, table)


def _split(line: str, where: str) -> tuple[str, list[str]] | None:
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    head, sep, rest = line.partition("=")
    if sep and " " not in head.strip() and "\t" not in head.strip():
        keyword, args = head.strip(), rest
    else:
        parts = line.split(None, 1)
        keyword, args = parts[0], parts[1] if len(parts) > 1 else ""
    try:
        return keyword.lower(), shlex.split(args, comments=True)
    except ValueError as exc:
        raise ConfigError(f"ssh config {where}: {exc}") from None


def _match(args: list[str], ctx: _Context, where: str) -> bool:
    """One ``Match`` line: every criterion (each may be negated with ``!``) must hold."""
    result = True
    i = 0
    while i < len(args):
        word = args[i].lower()
        negated = word.startswith("!")
        word = word.lstrip("!")
        if word in ("all", "final"):  # one pass only, so it is always the final one
            holds = True
            i += 1
        elif word == "canonical":
            holds = False  # no host name canonicalization here
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"ssh config {where}: Match {word} needs an argument")
            arg = args[i + 1]
            i += 2
            patterns = arg.split(",")
            if word == "host":
                holds = _pattern_list_matches(patterns, ctx.hostname)
            elif word == "originalhost":
                holds = _pattern_list_matches(patterns, ctx.original_host)
            elif word == "user":
                holds = _pattern_list_matches(patterns, ctx.remote_user)
            elif word == "localuser":
                holds = _pattern_list_matches(patterns, ctx.local_user)
            elif word == "exec":
                command = expand_tokens(arg, ctx)
                holds = subprocess.run(command, shell=True, capture_output=True, check=False).returncode == 0  # noqa: S602 - OpenSSH runs it with the shell too
            elif word in ("localnetwork", "tagged"):
                holds = False
            else:
                raise ConfigError(f"ssh config {where}: unsupported Match criterion {word!r}")
        result = result and (holds != negated)
    return result


def _read(path: str, ctx: _Context, base: str, active: bool, depth: int) -> None:
    if depth > MAX_INCLUDE_DEPTH:
        raise ConfigError(f"ssh config {path}: Include nested more than {MAX_INCLUDE_DEPTH} deep")
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read ssh config {path}: {exc.strerror or exc}") from None
    for lineno, raw in enumerate(lines, 1):
        where = f"{path}:{lineno}"
        parsed = _split(raw, where)
        if parsed is None:
            continue
        keyword, args = parsed
        if keyword == "host":
            active = _pattern_list_matches(args, ctx.original_host)
        elif keyword == "match":
            active = _match(args, ctx, where)
        elif keyword == "include":
            for pattern in args:
                full = os.path.expanduser(pattern)
                if not os.path.isabs(full):
                    full = os.path.join(os.path.expanduser(base), full)
                for included in sorted(glob.glob(full)):
                    # The included file starts in this block's state; its Host lines end with it.
                    _read(included, ctx, base, active, depth + 1)
        elif active and args:
            if keyword in MULTI:
                ctx.options.setdefault(keyword, []).append(" ".join(args))
            elif keyword not in ctx.options:
                ctx.options[keyword] = [" ".join(args)]


def python_options(
    host: str, config_path: str | None, *, user: str | None = None, port: int | None = None
) -> Options:
    """Evaluate the config for ``host`` without OpenSSH: ``config_path``, or the user then system file."""
    ctx = _Context(host, user, port)
    if config_path is not None:
        _read(os.path.expanduser(config_path), ctx, USER_DIR, True, 0)
    else:
        for path, base in ((USER_DIR + "/config", USER_DIR), (SYSTEM_DIR + "/ssh_config", SYSTEM_DIR)):
            if os.path.isfile(os.path.expanduser(path)):
                _read(os.path.expanduser(path), ctx, base, True, 0)
    options = ctx.options
    if "hostname" in options:
        options["hostname"] = [expand_tokens(options["hostname"][0], _Context(host, user, port))]
    for key in ("identityfile", "certificatefile", "identityagent", "userknownhostsfile"):
        if key in options:
            options[key] = [expand_tokens(v, ctx) for v in options[key]]
    return options


def first(options: Mapping[str, Sequence[str]], key: str) -> str | None:
    values = options.get(key)
    return values[0] if values else None
