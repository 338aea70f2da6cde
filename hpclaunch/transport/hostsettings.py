"""Host settings: the ssh config and explicit overrides -> one resolved record per hop.

The config is evaluated by OpenSSH itself (``ssh -G``) where an ``ssh`` binary exists, else by
:mod:`~hpclaunch.transport.sshconfig` in Python. Used: HostName, User, Port, IdentityFile,
CertificateFile, IdentitiesOnly, IdentityAgent, ProxyJump (each hop resolved the same way),
ProxyCommand, UserKnownHostsFile, GlobalKnownHostsFile, HostKeyAlias, HashKnownHosts,
StrictHostKeyChecking (``accept-new`` opts in), ServerAliveInterval, ConnectTimeout, and
GSSAPIAuthentication and PubkeyAuthentication (read to explain a refused login: paramiko has no GSSAPI).
"""

from __future__ import annotations

import getpass
import os
import shlex
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from hpclaunch.errors import ConfigError, ConnectionFailed
from hpclaunch.transport import sshconfig
from hpclaunch.transport.hostkeys import DEFAULT_SYSTEM_FILES, DEFAULT_USER_FILES, host_key_name
from hpclaunch.transport.sshconfig import Options, first

DEFAULT_CONFIG = "~/.ssh/config"
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
    #: CertificateFile entries (a ``KEY-cert.pub`` beside a key is found without them).
    certificate_files: tuple[str, ...] = ()
    #: IdentityAgent: None = ``$SSH_AUTH_SOCK``, ``"none"`` = no agent, else the agent's socket path.
    identity_agent: str | None = None
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
    #: GSSAPIAuthentication: the config asks for Kerberos logins (OpenSSH's default is no).
    gssapi_authentication: bool = False
    #: PubkeyAuthentication (OpenSSH's default is yes).
    pubkey_authentication: bool = True

    @property
    def target(self) -> str:
        """``user@host[:port]`` for messages."""
        port = "" if self.port == 22 else f":{self.port}"
        return f"{self.user}@{self.hostname}{port}"

    @property
    def host_key_name(self) -> str:
        return host_key_name(self.host_key_alias or self.hostname, self.port)


def _as_int(value: str | None, default: int, key: str) -> int:
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"ssh config: {key} must be a number, not {value!r}") from None


def _yes(value: str | None) -> bool:
    return (value or "").strip().lower() in ("yes", "true", "on")


def _no(value: str | None) -> bool:
    return (value or "").strip().lower() in ("no", "false", "off")


def _paths(value: str | None, default: Sequence[str]) -> tuple[str, ...]:
    if value is None:
        return tuple(os.path.expanduser(p) for p in default)
    if value.strip().lower() == "none":
        return ()
    return tuple(os.path.expanduser(p) for p in shlex.split(value))


def _proxy_command(value: str | None, hostname: str, port: int, user: str, alias: str) -> str | None:
    if not value or value.lower() == "none":
        return None
    # ssh -G prints ProxyCommand unexpanded; OpenSSH expands these when it runs it.
    table = {"%": "%", "h": hostname, "p": str(port), "r": user, "n": alias}
    return sshconfig.substitute(value, table)


def _identity_agent(value: str | None) -> str | None:
    if value is None or value == "SSH_AUTH_SOCK":
        return None
    if value.lower() == "none":
        return "none"
    if value.startswith("$"):
        return os.environ.get(value[1:]) or "none"
    return os.path.expanduser(value)


def resolve(
    host: str,
    opts: Mapping[str, Sequence[str]],
    *,
    user: str | None = None,
    port: int | None = None,
    identity_files: Sequence[str] = (),
    connect_timeout: float | None = None,
    keepalive: int | None = None,
) -> HostSettings:
    """Settings for ``host`` from its evaluated config ``opts``; explicit arguments win over it."""
    jumps = first(opts, "proxyjump")
    configured = list(opts.get("identityfile", []))
    if tuple(configured) == sshconfig.OPENSSH_DEFAULT_IDENTITIES:
        configured = []  # what ssh -G lists when nothing is configured
    # `IdentityFile none` is configured, as no file at all (a Kerberos-only host has no key).
    explicit_none = bool(configured) and all(f.strip().lower() == "none" for f in configured)
    configured = [f for f in configured if f.strip().lower() != "none"]
    # OpenSSH: -i files come before the config's; the defaults only when nothing is configured.
    files = [*identity_files, *configured]
    if not files and not explicit_none:
        files = list(DEFAULT_IDENTITY_FILES)
    timeout = connect_timeout
    if timeout is None:
        text = first(opts, "connecttimeout")
        timeout = float(
            _as_int(None if text == "none" else text, int(DEFAULT_CONNECT_TIMEOUT), "ConnectTimeout")
        )
    if keepalive is None:
        # ssh -G prints 0 when unset; a long tunnel needs keepalives, so 0 from a config means ours.
        keepalive = _as_int(first(opts, "serveraliveinterval"), DEFAULT_KEEPALIVE, "ServerAliveInterval")
        keepalive = keepalive or DEFAULT_KEEPALIVE
    strict = (first(opts, "stricthostkeychecking") or "").strip().lower()
    hostname = first(opts, "hostname") or host
    the_port = port or _as_int(first(opts, "port"), 22, "Port")
    the_user = user or first(opts, "user") or getpass.getuser()
    return HostSettings(
        alias=host,
        hostname=hostname,
        port=the_port,
        user=the_user,
        identity_files=tuple(os.path.expanduser(f) for f in files),
        identities_only=_yes(first(opts, "identitiesonly")),
        certificate_files=tuple(os.path.expanduser(f) for f in opts.get("certificatefile", [])),
        identity_agent=_identity_agent(first(opts, "identityagent")),
        proxy_jump=() if not jumps or jumps.lower() == "none" else tuple(j.strip() for j in jumps.split(",")),
        proxy_command=_proxy_command(first(opts, "proxycommand"), hostname, the_port, the_user, host),
        user_known_hosts=_paths(first(opts, "userknownhostsfile"), DEFAULT_USER_FILES),
        global_known_hosts=_paths(first(opts, "globalknownhostsfile"), DEFAULT_SYSTEM_FILES),
        host_key_alias=first(opts, "hostkeyalias"),
        hash_known_hosts=_yes(first(opts, "hashknownhosts")),
        # Whoever wrote accept-new (or no) for OpenSSH has opted in; a changed key is refused anyway.
        accept_new_in_config=strict in ("accept-new", "no", "off", "false"),
        keepalive=keepalive,
        connect_timeout=timeout,
        gssapi_authentication=_yes(first(opts, "gssapiauthentication")),
        pubkey_authentication=not _no(first(opts, "pubkeyauthentication")),
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
        openssh: bool | None = None,
    ) -> None:
        if config_path is not None:
            try:  # fail here, with the file's name, rather than in the first ssh -G
                with open(os.path.expanduser(config_path), "rb"):
                    pass
            except OSError as exc:
                raise ConfigError(f"cannot read ssh config {config_path}: {exc.strerror or exc}") from None
        self.config_path = config_path
        #: The config file named in hints ("check HostName of X in ~/.ssh/config").
        self.config_name = config_path or DEFAULT_CONFIG
        #: The ``ssh`` binary that evaluates the config (None: the Python evaluator). ``openssh``:
        #: None = use it where installed, False = never, True = required.
        self.ssh = shutil.which("ssh") if openssh is not False else None
        if openssh and self.ssh is None:
            raise ConfigError("no OpenSSH client (`ssh`) on PATH to evaluate the ssh config")
        self._identity_files = tuple(identity_files)
        self._connect_timeout = connect_timeout
        self._keepalive = keepalive

    def options(self, alias: str, *, user: str | None = None, port: int | None = None) -> Options:
        """The evaluated config of ``alias`` (``ssh -G`` where available)."""
        if self.ssh is not None:
            return sshconfig.openssh_options(self.ssh, alias, self.config_path, user=user, port=port)
        return sshconfig.python_options(alias, self.config_path, user=user, port=port)

    def host(self, alias: str, *, user: str | None = None, port: int | None = None) -> HostSettings:
        return resolve(
            alias,
            self.options(alias, user=user, port=port),
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
