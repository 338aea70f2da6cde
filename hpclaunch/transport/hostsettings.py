"""Host settings: ``~/.ssh/config`` and explicit overrides -> one resolved record per hop.

Honoured (through ``paramiko.SSHConfig``): HostName, User, Port, IdentityFile, IdentitiesOnly,
ProxyJump (each hop resolved through the same config), ProxyCommand, UserKnownHostsFile,
GlobalKnownHostsFile, HostKeyAlias, HashKnownHosts, StrictHostKeyChecking (``accept-new`` opts in),
ServerAliveInterval and ConnectTimeout.
"""

from __future__ import annotations

import getpass
import logging
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from hpclaunch.errors import ConfigError, ConnectionFailed
from hpclaunch.transport.hostkeys import DEFAULT_SYSTEM_FILES, DEFAULT_USER_FILES, host_key_name

if TYPE_CHECKING:
    import paramiko

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "~/.ssh/config"
SYSTEM_CONFIG = "/etc/ssh/ssh_config"
DEFAULT_KEEPALIVE = 30
DEFAULT_CONNECT_TIMEOUT = 15.0
#: Tried, like OpenSSH, only when no IdentityFile is configured at all.
DEFAULT_IDENTITY_FILES = ("~/.ssh/id_rsa", "~/.ssh/id_ecdsa", "~/.ssh/id_ed25519")
MAX_HOPS = 8


@dataclass(frozen=True)
class HostSettings:
    """Everything needed to reach one host, after ``~/.ssh/config`` and explicit overrides."""

    alias: str
    hostname: str
    port: int
    user: str
    identity_files: tuple[str, ...]
    identities_only: bool = False
    #: Jump hosts as written (``[user@]host[:port]``), outermost first.
    proxy_jump: tuple[str, ...] = ()
    proxy_command: str | None = None
    user_known_hosts: tuple[str, ...] = DEFAULT_USER_FILES
    global_known_hosts: tuple[str, ...] = DEFAULT_SYSTEM_FILES
    host_key_alias: str | None = None
    hash_known_hosts: bool = False
    accept_new_in_config: bool = False
    keepalive: int = DEFAULT_KEEPALIVE
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT

    @property
    def target(self) -> str:
        """``user@host[:port]`` for messages."""
        port = "" if self.port == 22 else f":{self.port}"
        return f"{self.user}@{self.hostname}{port}"

    @property
    def host_key_name(self) -> str:
        return host_key_name(self.host_key_alias or self.hostname, self.port)


def load_ssh_config(path: str | None = None) -> paramiko.SSHConfig:
    """The given config file, or ``~/.ssh/config`` then ``/etc/ssh/ssh_config`` like OpenSSH.

    The first value found wins, so parsing the user file first gives it priority.
    """
    import paramiko

    config = paramiko.SSHConfig()
    if path is not None:
        expanded = os.path.expanduser(path)
        try:
            with open(expanded, encoding="utf-8") as fh:
                config.parse(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read ssh config {path}: {exc.strerror or exc}") from exc
        except Exception as exc:
            raise ConfigError(f"cannot parse ssh config {path}: {exc}") from exc
        return config
    for candidate, required in ((DEFAULT_CONFIG, True), (SYSTEM_CONFIG, False)):
        expanded = os.path.expanduser(candidate)
        if not os.path.isfile(expanded):
            continue
        try:
            with open(expanded, encoding="utf-8") as fh:
                config.parse(fh)
        except Exception as exc:
            if required:
                raise ConfigError(f"cannot parse ssh config {candidate}: {exc}") from exc
            log.debug("ignoring unreadable %s: %s", candidate, exc)
    return config


def _as_int(value: str | None, default: int, key: str) -> int:
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"ssh config: {key} must be a number, not {value!r}") from None


def _yes(value: str | None) -> bool:
    return (value or "").strip().lower() in ("yes", "true", "on")


def _paths(value: str | None, default: Sequence[str]) -> tuple[str, ...]:
    if value is None:
        return tuple(default)
    if value.strip().lower() == "none":
        return ()
    return tuple(shlex.split(value))


def resolve(
    host: str,
    config: paramiko.SSHConfig,
    *,
    user: str | None = None,
    port: int | None = None,
    identity_files: Sequence[str] = (),
    connect_timeout: float | None = None,
    keepalive: int | None = None,
) -> HostSettings:
    """Apply ``config`` to ``host`` (an alias or a host name); explicit arguments win over it."""
    opts = config.lookup(host)
    jumps = opts.get("proxyjump")
    command = opts.get("proxycommand")
    configured = list(opts.get("identityfile", []))
    # OpenSSH: -i files come before the config's; the defaults only when nothing is configured.
    files = [*identity_files, *configured] or list(DEFAULT_IDENTITY_FILES)
    timeout = connect_timeout
    if timeout is None:
        timeout = float(_as_int(opts.get("connecttimeout"), int(DEFAULT_CONNECT_TIMEOUT), "ConnectTimeout"))
    strict = (opts.get("stricthostkeychecking") or "").strip().lower()
    return HostSettings(
        alias=host,
        hostname=opts.get("hostname", host),
        port=port or _as_int(opts.get("port"), 22, "Port"),
        user=user or opts.get("user") or getpass.getuser(),
        identity_files=tuple(os.path.expanduser(f) for f in files),
        identities_only=_yes(opts.get("identitiesonly")),
        proxy_jump=() if not jumps or jumps.lower() == "none" else tuple(j.strip() for j in jumps.split(",")),
        proxy_command=None if not command or command.lower() == "none" else command,
        user_known_hosts=_paths(opts.get("userknownhostsfile"), DEFAULT_USER_FILES),
        global_known_hosts=_paths(opts.get("globalknownhostsfile"), DEFAULT_SYSTEM_FILES),
        host_key_alias=opts.get("hostkeyalias"),
        hash_known_hosts=_yes(opts.get("hashknownhosts")),
        # Whoever wrote accept-new (or no) for OpenSSH has opted in; a changed key is refused anyway.
        accept_new_in_config=strict in ("accept-new", "no", "off"),
        keepalive=keepalive
        if keepalive is not None
        else _as_int(opts.get("serveraliveinterval"), DEFAULT_KEEPALIVE, "ServerAliveInterval"),
        connect_timeout=timeout,
    )


def parse_hop(spec: str) -> tuple[str | None, str, int | None]:
    """``[ssh://][user@]host[:port]`` (host may be ``[v6]``) -> (user, host, port)."""
    rest = spec.removeprefix("ssh://")
    user = None
    if "@" in rest:
        user, rest = rest.rsplit("@", 1)
    port: int | None = None
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        if tail.startswith(":"):
            port = int(tail[1:])
    elif rest.count(":") == 1:
        host, port_text = rest.split(":")
        port = int(port_text)
    else:
        host = rest
    if not host:
        raise ConfigError(f"ssh config: cannot read ProxyJump host {spec!r}")
    return user, host, port


class Resolver:
    """Resolves the target and each of its jump hosts through one config and the same overrides."""

    def __init__(
        self,
        config_path: str | None = None,
        *,
        identity_files: Sequence[str] = (),
        connect_timeout: float | None = None,
        keepalive: int | None = None,
    ) -> None:
        self.config = load_ssh_config(config_path)
        #: The config file named in hints ("check HostName of X in ~/.ssh/config").
        self.config_name = config_path or DEFAULT_CONFIG
        self._identity_files = tuple(identity_files)
        self._connect_timeout = connect_timeout
        self._keepalive = keepalive

    def host(self, alias: str, *, user: str | None = None, port: int | None = None) -> HostSettings:
        return resolve(
            alias,
            self.config,
            user=user,
            port=port,
            identity_files=self._identity_files,
            connect_timeout=self._connect_timeout,
            keepalive=self._keepalive,
        )

    def hop(self, spec: str, previous: tuple[str, ...]) -> HostSettings:
        """A ProxyJump entry; ``previous`` are the hops before it in the same ProxyJump list."""
        try:
            user, host, port = parse_hop(spec)
        except ValueError:
            raise ConfigError(f"ssh config: cannot read ProxyJump host {spec!r}") from None
        settings = self.host(host, user=user, port=port)
        # "ProxyJump a,b": b is reached through a, whatever b's own config says.
        return replace(settings, proxy_jump=previous) if previous else settings

    def chain(self, target: HostSettings) -> list[HostSettings]:
        """Every hop to log in to, outermost first, ``target`` last; each after the first is reached
        through the one before it."""
        hops = [target]
        while hops[0].proxy_jump:
            if len(hops) > MAX_HOPS:
                raise ConnectionFailed(
                    f"cannot connect to {target.target}: more than {MAX_HOPS} ProxyJump hops",
                    hint=f"a ProxyJump loop in {self.config_name}? (use patterns like `Host * !bastion`)",
                )
            first = hops[0]
            hops.insert(0, self.hop(first.proxy_jump[-1], first.proxy_jump[:-1]))
        return hops
