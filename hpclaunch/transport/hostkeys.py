"""Known-hosts checking the way OpenSSH does it, with ``StrictHostKeyChecking=accept-new`` as opt-in.

- A key found in a known_hosts file: accepted.
- An unknown host: refused with its fingerprint and how to opt in; with the opt-in, recorded in the
  user known_hosts file (created 0600, its directory 0700) and accepted.
- A key that differs from a recorded one (or a revoked key): always refused, never recorded.

Parsed here rather than with ``paramiko.HostKeys`` because that skips ``@revoked`` markers, wildcard
patterns and keys of types paramiko cannot load, and it cannot tell "changed" from "unknown" once
keys of several types are recorded. Never ``paramiko.AutoAddPolicy``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hpclaunch.errors import HostKeyError

log = logging.getLogger(__name__)

ENV_ACCEPT_NEW = "HPCLAUNCH_ACCEPT_NEW_HOST_KEY"
DEFAULT_USER_FILES = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
DEFAULT_SYSTEM_FILES = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
OPT_IN = (
    "if the fingerprint is right, connect once with --accept-new-host-key, "
    "or set accept_new_host_key = true in the profile, or HPCLAUNCH_ACCEPT_NEW_HOST_KEY=1"
)


def accept_new_from_env() -> bool:
    return os.environ.get(ENV_ACCEPT_NEW, "").strip().lower() in ("1", "true", "yes", "on")


def fingerprint(blob: bytes) -> str:
    """``SHA256:<base64 without padding>``, exactly as ``ssh-keygen -l`` prints it."""
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")
    return f"SHA256:{digest}"


def host_key_name(host: str, port: int) -> str:
    """The name known_hosts files use: ``host`` on port 22, ``[host]:port`` otherwise."""
    return host if port == 22 else f"[{host}]:{port}"


def hash_name(name: str, salt: bytes | None = None) -> str:
    """OpenSSH's ``HashKnownHosts`` form: ``|1|base64(salt)|base64(HMAC-SHA1(salt, name))``."""
    salt = salt if salt is not None else os.urandom(20)
    mac = hmac.new(salt, name.encode("utf-8"), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(mac).decode()}"


def _pattern_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("|1|"):
        parts = pattern.split("|")
        if len(parts) != 4:
            return False
        try:
            salt = base64.b64decode(parts[2], validate=True)
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(hash_name(name, salt), pattern)
    # OpenSSH patterns know only '*' and '?' ('[' is literal, as in "[host]:port"), case-insensitive.
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, name, flags=re.IGNORECASE | re.DOTALL) is not None


def _patterns_match(patterns: Sequence[str], name: str) -> bool:
    """A comma list of patterns matches when one positive pattern does and no negated one does."""
    matched = False
    for pattern in patterns:
        if pattern.startswith("!"):
            if _pattern_matches(pattern[1:], name):
                return False
        elif _pattern_matches(pattern, name):
            matched = True
    return matched


@dataclass(frozen=True)
class KnownKey:
    """One line of a known_hosts file."""

    patterns: tuple[str, ...]
    key_type: str
    blob: bytes
    marker: str | None  # "@revoked", "@cert-authority" or None
    path: str
    lineno: int

    @property
    def where(self) -> str:
        return f"{self.path}:{self.lineno}"


def parse_known_hosts(text: str, path: str = "<text>") -> list[KnownKey]:
    """Parse known_hosts lines; malformed lines are skipped, as OpenSSH does."""
    keys: list[KnownKey] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        marker = None
        if fields[0].startswith("@"):
            marker, fields = fields[0], fields[1:]
        if len(fields) < 3:
            continue
        try:
            blob = base64.b64decode(fields[2], validate=True)
        except (binascii.Error, ValueError):
            continue
        keys.append(KnownKey(tuple(fields[0].split(",")), fields[1], blob, marker, path, lineno))
    return keys


def _expand(path: str) -> str:
    return os.path.expanduser(os.path.expandvars(path))


def _rsa_family(key_type: str) -> set[str]:
    """The names under which an RSA key may be negotiated."""
    if key_type == "ssh-rsa":
        return {"ssh-rsa", "rsa-sha2-256", "rsa-sha2-512"}
    return {key_type}


class HostKeyChecker:
    """Checks a server's key against known_hosts files and, when allowed, records new ones."""

    def __init__(
        self,
        user_files: Sequence[str] | None = None,
        system_files: Sequence[str] | None = None,
        *,
        accept_new: bool = False,
        hash_new_entries: bool = False,
    ) -> None:
        self.user_files = [_expand(p) for p in (user_files if user_files is not None else DEFAULT_USER_FILES)]
        self.system_files = [
            _expand(p) for p in (system_files if system_files is not None else DEFAULT_SYSTEM_FILES)
        ]
        self.accept_new = accept_new
        self.hash_new_entries = hash_new_entries
        self._keys: list[KnownKey] | None = None

    def keys(self) -> list[KnownKey]:
        if self._keys is None:
            self._keys = []
            for path in [*self.user_files, *self.system_files]:
                self._keys.extend(self._load(path))
        return self._keys

    @staticmethod
    def _load(path: str) -> list[KnownKey]:
        if path in ("none", os.devnull):
            return []
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                return parse_known_hosts(fh.read(), path)
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.warning("cannot read known hosts file %s: %s", path, exc)
            return []

    def known_for(self, name: str) -> list[KnownKey]:
        return [k for k in self.keys() if k.marker is None and _patterns_match(k.patterns, name)]

    def preferred_key_types(self, name: str, available: Iterable[str]) -> list[str]:
        """Put the key types we already know for ``name`` first, so the server shows us one of those.

        Without this a server with several host keys may present a type we have not recorded, and a
        known host would look unknown (OpenSSH orders HostKeyAlgorithms the same way).
        """
        known: set[str] = set()
        for key in self.known_for(name):
            known |= _rsa_family(key.key_type)
        offered = list(available)
        return [t for t in offered if t in known] + [t for t in offered if t not in known]

    def check(self, name: str, key_type: str, blob: bytes) -> None:
        """Accept, record (opt-in) or refuse the key the server presented for ``name``.

        ``name`` is :func:`host_key_name` of the HostKeyAlias or HostName and port.
        """
        fp = fingerprint(blob)
        for key in self.keys():
            if key.marker == "@revoked" and key.blob == blob and _patterns_match(key.patterns, name):
                raise HostKeyError(
                    f"REFUSING {name}: its {key_type} host key {fp} is marked @revoked in {key.where}",
                    hint="the cluster's administrators must replace that key",
                )
        known = self.known_for(name)
        if any(k.blob == blob for k in known):
            return
        same_type = [k for k in known if k.key_type == key_type]
        if known:
            old = (same_type or known)[0]
            recorded = "records" if same_type else "records only another type of key:"
            raise HostKeyError(
                f"WARNING: THE HOST KEY FOR {name} HAS CHANGED, refusing to connect "
                f"(someone could be intercepting the connection): the server sent {key_type} {fp}, "
                f"but {old.where} {recorded} {old.key_type} {fingerprint(old.blob)}",
                hint="if the cluster's key really changed (ask its administrators), remove the old entry "
                f"with `ssh-keygen -R '{name}' -f {old.path}` and connect again",
            )
        if not self.accept_new:
            places = " or ".join(self.user_files[:1] + self.system_files[:1]) or "any known_hosts file"
            raise HostKeyError(
                f"host key for {name} is not known: {key_type} {fp} (not in {places}); refusing to connect",
                hint=OPT_IN,
            )
        self.record(name, key_type, blob)

    def record(self, name: str, key_type: str, blob: bytes) -> None:
        """Append the key to the first user known_hosts file (made 0600, its directory 0700)."""
        if not self.user_files or self.user_files[0] in ("none", os.devnull):
            log.warning("accepted new host key for %s without recording it (no user known_hosts)", name)
            return
        path = self.user_files[0]
        entry_name = hash_name(name) if self.hash_new_entries else name
        line = f"{entry_name} {key_type} {base64.b64encode(blob).decode('ascii')}\n"
        directory = os.path.dirname(path) or "."
        try:
            if not os.path.isdir(directory):
                os.makedirs(directory, mode=0o700, exist_ok=True)
                os.chmod(directory, 0o700)
            # Do not glue our line onto a last line that lacks its newline.
            with contextlib.suppress(OSError), open(path, "rb") as existing:
                existing.seek(-1, os.SEEK_END)
                if existing.read(1) != b"\n":
                    line = "\n" + line
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "ab") as fh:
                fh.write(line.encode("ascii"))
        except OSError as exc:
            raise HostKeyError(
                f"cannot record the host key of {name} in {path}: {exc.strerror or exc}",
                hint="check that file's permissions",
            ) from exc
        log.warning("recorded new host key for %s (%s %s) in %s", name, key_type, fingerprint(blob), path)
        if self._keys is not None:
            self._keys.append(KnownKey((entry_name,), key_type, blob, None, path, -1))
