"""Reach the cluster over ONE paramiko connection to the login node.

The connection opens on first use and carries everything: commands (a new ``exec`` channel each),
files (one SFTP session), and port forwards (``direct-tcpip`` channels). A fresh login costs about
0.2 s and, with MFA, a human: so it is opened once and reused. TCP_NODELAY takes a command from 44 ms
to 2.7 ms (FACTS.md).

``~/.ssh/config`` is honoured through ``paramiko.SSHConfig``: HostName, User, Port, IdentityFile,
IdentitiesOnly, ProxyJump (each hop resolved through the same config), ProxyCommand,
UserKnownHostsFile, GlobalKnownHostsFile, HostKeyAlias, HashKnownHosts, StrictHostKeyChecking
(``accept-new`` opts in), ServerAliveInterval and ConnectTimeout.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import re
import secrets
import select
import shlex
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

from hpclaunch.errors import (
    CommandError,
    CommandTimeout,
    ConfigError,
    ConnectionFailed,
    HostKeyError,
    HpclaunchWarning,
    TransportError,
)
from hpclaunch.transport import relay
from hpclaunch.transport.base import CommandResult, Forward, PathNotFound, Transport
from hpclaunch.transport.hostkeys import (
    DEFAULT_SYSTEM_FILES,
    DEFAULT_USER_FILES,
    HostKeyChecker,
    accept_new_from_env,
    host_key_name,
)
from hpclaunch.transport.local import as_bytes, check_argv, decode, short_command

if TYPE_CHECKING:
    import paramiko

log = logging.getLogger(__name__)
# paramiko logs a refused channel at ERROR; with logging unconfigured that lands on stderr as stray lines
# next to our one-line errors (which carry the reason). An application's own handlers still get it.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

T = TypeVar("T")

#: Answers keyboard-interactive prompts: ``(title, instructions, [(prompt, echo), ...]) -> answers``.
Prompter = Callable[[str, str, Sequence[tuple[str, bool]]], Sequence[str]]

DEFAULT_CONFIG = "~/.ssh/config"
SYSTEM_CONFIG = "/etc/ssh/ssh_config"
DEFAULT_KEEPALIVE = 30
DEFAULT_CONNECT_TIMEOUT = 15.0
#: Tried, like OpenSSH, only when no IdentityFile is configured at all.
DEFAULT_IDENTITY_FILES = ("~/.ssh/id_rsa", "~/.ssh/id_ecdsa", "~/.ssh/id_ed25519")
MAX_HOPS = 8
#: A human typing a one-time code needs longer than paramiko's 30 s auth timeout.
INTERACTIVE_AUTH_TIMEOUT = 300.0
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


# -- settings ----------------------------------------------------------------------------------------


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


# -- prompting ---------------------------------------------------------------------------------------


def terminal_prompter(title: str, instructions: str, prompts: Sequence[tuple[str, bool]]) -> Sequence[str]:
    """Ask on the terminal: hidden input for secrets (``getpass``), visible for the rest."""
    if not prompts:
        return []
    if not sys.stdin or not sys.stdin.isatty():
        raise ConnectionFailed(
            "the server asks for keyboard-interactive input (a password or one-time code) "
            "and there is no terminal to ask on",
            hint="run the command once from a terminal, or use a key the server accepts on its own",
        )
    for text in (title, instructions):
        if text and text.strip():
            print(text.strip(), file=sys.stderr)
    answers = []
    for prompt, echo in prompts:
        if echo:
            sys.stderr.write(prompt)
            sys.stderr.flush()
            answers.append(sys.stdin.readline().rstrip("\n"))
        else:
            answers.append(getpass.getpass(prompt))
    return answers


# -- the connection ----------------------------------------------------------------------------------


class _Connection:
    """The authenticated paramiko transports of one login: jump hosts first, the target last."""

    def __init__(self, transports: list[paramiko.Transport]) -> None:
        self.transports = transports
        self.sftp: paramiko.SFTPClient | None = None
        self.home: str | None = None

    @property
    def target(self) -> paramiko.Transport:
        return self.transports[-1]

    def alive(self) -> bool:
        return all(t.is_active() for t in self.transports)

    def close(self) -> None:
        if self.sftp is not None:
            with contextlib.suppress(Exception):
                self.sftp.close()
        for transport in reversed(self.transports):
            with contextlib.suppress(Exception):
                transport.close()


def _warn_if_exposed(path: str) -> None:
    """OpenSSH refuses a private key file that others can read; we use it, but say how to fix it."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & 0o066:
        how = "readable" if mode & 0o044 else "writable"
        warnings.warn(
            f"SSH key {path} is {how} by other users; run: chmod 600 {path}", HpclaunchWarning, stacklevel=2
        )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


class SSHTransport(Transport):
    """One lazily opened SSH connection to the login node; see the module docstring."""

    is_remote = True

    def __init__(
        self,
        host: str,
        *,
        user: str | None = None,
        port: int | None = None,
        identity_file: str | Sequence[str] | None = None,
        ssh_config_path: str | None = None,
        accept_new_host_key: bool = False,
        known_hosts_file: str | None = None,
        connect_timeout: float | None = None,
        keepalive: int | None = None,
        prompter: Prompter | None = None,
        allow_agent: bool = True,
        proxy_jump: str | None = None,
    ) -> None:
        super().__init__()
        self._config = load_ssh_config(ssh_config_path)
        self._config_name = ssh_config_path or DEFAULT_CONFIG
        if isinstance(identity_file, str):
            identity_file = [identity_file]
        self._extra_identities = tuple(os.path.expanduser(p) for p in identity_file or ())
        self._connect_timeout = connect_timeout
        self._keepalive = keepalive
        self.settings = resolve(
            host,
            self._config,
            user=user,
            port=port,
            identity_files=self._extra_identities,
            connect_timeout=connect_timeout,
            keepalive=keepalive,
        )
        if proxy_jump:  # like `ssh -J`: wins over the config's ProxyJump for this host
            self.settings = replace(self.settings, proxy_jump=(proxy_jump,), proxy_command=None)
        self._accept_new = accept_new_host_key or accept_new_from_env()
        self._known_hosts_file = known_hosts_file
        self._prompter: Prompter = prompter or terminal_prompter
        self._allow_agent = allow_agent
        # One lock guards opening, replacing and closing the connection; SFTP has its own because
        # paramiko's SFTPClient is not safe for concurrent requests.
        self._lock = threading.RLock()
        self._sftp_lock = threading.RLock()
        self._conn: _Connection | None = None
        #: How many times a broken connection was replaced (by ``reconnect`` or transparently).
        self.reconnects = 0
        # A connection was lost and not yet replaced (a login may fail a few times in between).
        self._lost = False

    @property
    def description(self) -> str:
        return self.settings.target

    @property
    def is_connected(self) -> bool:
        conn = self._conn
        return conn is not None and conn.alive()

    # -- connection lifecycle -------------------------------------------------------------------

    def connect(self) -> None:
        self._ensure()

    def reconnect(self) -> None:
        """Drop the connection (alive or not) and log in again; raises ConnectionFailed on failure."""
        with self._lock:
            self._lost = self._lost or self._conn is not None
            self._drop()
            self._conn = self._open()
            if self._lost:
                self._lost = False
                self.reconnects += 1

    def close(self) -> None:
        with self._lock:
            self._drop()
            self._lost = False

    def _drop(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _ensure(self) -> _Connection:
        """The live connection; opened on first use, replaced when it has died."""
        conn = self._conn
        if conn is not None and conn.alive():
            return conn
        with self._lock:
            if self._conn is not None and self._conn.alive():
                return self._conn
            self._lost = self._lost or self._conn is not None
            self._drop()
            self._conn = self._open()
            if self._lost:
                self._lost = False
                self.reconnects += 1
                log.info("reconnected to %s", self.description)
            return self._conn

    def _retire(self, conn: _Connection) -> bool:
        """Forget ``conn`` if it is dead; True when a retry on a new connection makes sense."""
        if conn.alive():
            return False
        with self._lock:
            if self._conn is conn:
                self._drop()
                self._lost = True
        return True

    def _open(self) -> _Connection:
        chain: list[paramiko.Transport] = []
        try:
            self._dial(self.settings, chain, depth=0)
        except BaseException:
            for transport in reversed(chain):
                with contextlib.suppress(Exception):
                    transport.close()
            raise
        return _Connection(chain)

    def _hop_settings(self, spec: str, previous: tuple[str, ...]) -> HostSettings:
        try:
            user, host, port = parse_hop(spec)
        except ValueError:
            raise ConfigError(f"ssh config: cannot read ProxyJump host {spec!r}") from None
        settings = resolve(
            host,
            self._config,
            user=user,
            port=port,
            identity_files=self._extra_identities,
            connect_timeout=self._connect_timeout,
            keepalive=self._keepalive,
        )
        # "ProxyJump a,b": b is reached through a, whatever b's own config says.
        return replace(settings, proxy_jump=previous) if previous else settings

    def _dial(self, s: HostSettings, chain: list[paramiko.Transport], depth: int) -> paramiko.Transport:
        """Log in to ``s`` (through its jump hosts first); append each transport to ``chain``."""
        import paramiko

        if depth > MAX_HOPS:
            raise ConnectionFailed(
                f"cannot connect to {self.description}: more than {MAX_HOPS} ProxyJump hops",
                hint=f"a ProxyJump loop in {self._config_name}? (use patterns like `Host * !bastion`)",
            )
        sock: Any
        via = ""
        if s.proxy_jump:
            jump = self._hop_settings(s.proxy_jump[-1], s.proxy_jump[:-1])
            jump_transport = self._dial(jump, chain, depth + 1)
            via = f" via jump host {jump.target}"
            try:
                sock = jump_transport.open_channel(
                    "direct-tcpip", (s.hostname, s.port), ("127.0.0.1", 0), timeout=s.connect_timeout
                )
            except paramiko.ChannelException as exc:
                raise ConnectionFailed(
                    f"cannot connect to {s.target}{via}: the jump host could not reach it ({exc.text})",
                    hint=f"check HostName/Port of {s.alias} in {self._config_name}",
                ) from None
            except (paramiko.SSHException, EOFError, OSError) as exc:
                raise ConnectionFailed(
                    f"cannot connect to {s.target}{via}: {_reason(exc)}",
                ) from None
        elif s.proxy_command:
            via = " via ProxyCommand"
            try:
                sock = paramiko.ProxyCommand(s.proxy_command)
            except (paramiko.SSHException, OSError) as exc:
                raise ConnectionFailed(
                    f"cannot connect to {s.target}: ProxyCommand failed to start: {_reason(exc)}",
                    hint=f"check ProxyCommand of {s.alias} in {self._config_name}",
                ) from None
        else:
            sock = self._tcp_connect(s)
        transport = self._handshake(s, sock, via)
        chain.append(transport)
        return transport

    def _tcp_connect(self, s: HostSettings) -> socket.socket:
        where = f"cannot connect to {s.target}"
        check = f"check HostName/Port of {s.alias} in {self._config_name}"
        try:
            sock = socket.create_connection((s.hostname, s.port), timeout=s.connect_timeout)
        except socket.gaierror as exc:
            raise ConnectionFailed(
                f"{where}: cannot resolve host name {s.hostname!r} ({_reason(exc)})",
                hint=f"check HostName of {s.alias} in {self._config_name}, and your network/VPN",
            ) from None
        except ConnectionRefusedError:
            raise ConnectionFailed(f"{where}: connection refused", hint=f"is sshd running? {check}") from None
        except TimeoutError:
            raise ConnectionFailed(
                f"{where}: no answer within {s.connect_timeout:g} s",
                hint=f"is the host reachable (VPN, firewall)? {check}",
            ) from None
        except OSError as exc:
            raise ConnectionFailed(f"{where}: {_reason(exc)}", hint=check) from None
        # Nagle + delayed ACK cost ~40 ms per command (FACTS.md); keepalive notices dead links.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        return sock

    def _checker(self, s: HostSettings) -> HostKeyChecker:
        user_files = (self._known_hosts_file,) if self._known_hosts_file else s.user_known_hosts
        return HostKeyChecker(
            user_files,
            s.global_known_hosts,
            accept_new=self._accept_new or s.accept_new_in_config,
            hash_new_entries=s.hash_known_hosts,
        )

    def _handshake(self, s: HostSettings, sock: Any, via: str) -> paramiko.Transport:
        import paramiko

        transport = paramiko.Transport(sock)
        try:
            transport.banner_timeout = s.connect_timeout
            transport.handshake_timeout = s.connect_timeout
            checker = self._checker(s)
            options = transport.get_security_options()
            options.key_types = checker.preferred_key_types(s.host_key_name, options.key_types)
            try:
                transport.start_client(timeout=s.connect_timeout)
                # start_client returns quietly on timeout; this raises if the handshake is not done.
                key = transport.get_remote_server_key()
            except (paramiko.SSHException, EOFError, OSError) as exc:
                raise ConnectionFailed(
                    f"cannot connect to {s.target}{via}: the SSH handshake failed ({_reason(exc)})",
                    hint=f"is it an SSH server? check HostName/Port of {s.alias} in {self._config_name}",
                ) from None
            with self._count_lock:
                self.connections_opened += 1
            checker.check(s.host_key_name, key.get_name(), key.asbytes())
            self._authenticate(transport, s, via)
            if s.keepalive > 0:
                transport.set_keepalive(s.keepalive)
        except BaseException:
            transport.close()
            raise
        return transport

    # -- authentication ---------------------------------------------------------------------------

    def _authenticate(self, transport: paramiko.Transport, s: HostSettings, via: str) -> None:
        import paramiko

        where = f"cannot log in to {s.target}{via}"
        try:
            transport.auth_none(s.user)
            return  # the server wants nothing more (rare, but then we are done)
        except paramiko.BadAuthenticationType as exc:
            allowed = list(exc.allowed_types)
        except paramiko.AuthenticationException:
            allowed = ["publickey", "keyboard-interactive", "password"]
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise ConnectionFailed(f"{where}: the connection closed during login ({_reason(exc)})") from None

        problems: list[str] = []
        try:
            if "publickey" in allowed:
                next_methods = self._auth_publickey(transport, s, problems)
                if transport.is_authenticated():
                    return
                if next_methods:
                    allowed = next_methods  # partial success: the key was step one (MFA)
            else:
                problems.append(f"the server does not accept SSH keys (it allows: {', '.join(allowed)})")
            for method in ("keyboard-interactive", "password"):
                if method in allowed and not transport.is_authenticated():
                    allowed = self._auth_prompted(transport, s, method, problems) or allowed
            if transport.is_authenticated():
                return
        except HostKeyError:
            raise
        except ConnectionFailed as exc:
            # The prompter's own error (no terminal) says it best, with what else failed.
            raise ConnectionFailed(f"{where}: {'; '.join([*problems, exc.message])}", hint=exc.hint) from None
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise ConnectionFailed(f"{where}: the connection closed during login ({_reason(exc)})") from None
        raise ConnectionFailed(
            f"{where}: {'; '.join(problems) or 'the server refused every method we tried'}",
            hint=f"is your public key in ~/.ssh/authorized_keys on the cluster? "
            f"check User and IdentityFile of {s.alias} in {self._config_name}",
        )

    def _agent_keys(self) -> list[paramiko.PKey]:
        import paramiko

        if not self._allow_agent or not os.environ.get("SSH_AUTH_SOCK"):
            return []
        try:
            return list(paramiko.Agent().get_keys())
        except (paramiko.SSHException, OSError) as exc:
            log.debug("ssh-agent unavailable: %s", exc)
            return []

    @staticmethod
    def _public_blob(path: str) -> bytes | None:
        """The public key next to a private key file (``.pub``), to match it with agent keys."""
        import base64
        import binascii

        try:
            with open(path + ".pub", encoding="utf-8") as fh:
                fields = fh.read().split()
            return base64.b64decode(fields[1], validate=True) if len(fields) >= 2 else None
        except (OSError, binascii.Error, ValueError):
            return None

    def _auth_publickey(
        self, transport: paramiko.Transport, s: HostSettings, problems: list[str]
    ) -> list[str] | None:
        """Offer agent keys, then key files; None when no key worked, else the next methods."""
        import paramiko

        files = [f for f in s.identity_files if os.path.exists(f)]
        missing = [f for f in s.identity_files if not os.path.exists(f)]
        file_blobs = {f: self._public_blob(f) for f in files}
        agent_keys = self._agent_keys()
        if s.identities_only:
            wanted = {b for b in file_blobs.values() if b is not None}
            agent_keys = [k for k in agent_keys if k.asbytes() in wanted]
        tried_blobs: set[bytes] = set()
        offered: list[str] = []

        def offer(key: paramiko.PKey, label: str) -> list[str] | None:
            tried_blobs.add(key.asbytes())
            offered.append(label)
            try:
                return list(transport.auth_publickey(s.user, key))
            except paramiko.BadAuthenticationType:
                return None
            except paramiko.AuthenticationException:
                return None

        for key in agent_keys:
            result = offer(key, f"agent key {key.get_name()}")
            if transport.is_authenticated() or result:
                return result
        for path in files:
            blob = file_blobs[path]
            if blob is not None and blob in tried_blobs:
                continue  # the agent already offered this one
            _warn_if_exposed(path)
            try:
                key = paramiko.PKey.from_path(path)
            except (paramiko.PasswordRequiredException, TypeError) as exc:
                # cryptography raises TypeError for "encrypted but no password given".
                if isinstance(exc, TypeError) and "encrypted" not in str(exc) and "password" not in str(exc):
                    problems.append(f"cannot load key {path}: {exc}")
                    continue
                problems.append(
                    f"key {path} is protected by a passphrase and ssh-agent does not hold it "
                    f"(run `ssh-add {path}` first)"
                )
                continue
            except (paramiko.SSHException, ValueError, OSError) as exc:
                problems.append(f"cannot load key {path}: {_reason(exc)}")
                continue
            if key.asbytes() in tried_blobs:
                continue
            result = offer(key, path)
            if transport.is_authenticated() or result:
                return result
        if offered:
            problems.insert(0, f"the server refused every key offered ({', '.join(offered)})")
        elif not any("passphrase" in p for p in problems):
            places = ", ".join(missing) if missing else "none configured"
            problems.insert(0, f"no SSH key to offer (no ssh-agent keys; key files: {places})")
        return None

    def _auth_prompted(
        self, transport: paramiko.Transport, s: HostSettings, method: str, problems: list[str]
    ) -> list[str] | None:
        """keyboard-interactive or password through the prompter, once per login."""
        import paramiko

        failure: list[BaseException] = []

        def handler(title: str, instructions: str, prompts: Sequence[tuple[str, bool]]) -> list[str]:
            # Runs in paramiko's thread: keep our exception to re-raise it here, not in there.
            if failure:
                return ["" for _ in prompts]
            try:
                return list(self._prompter(title, instructions, list(prompts)))
            except BaseException as exc:
                failure.append(exc)
                return ["" for _ in prompts]

        saved_timeout = transport.auth_timeout
        transport.auth_timeout = INTERACTIVE_AUTH_TIMEOUT
        try:
            if method == "keyboard-interactive":
                result = transport.auth_interactive(s.user, handler)
            else:
                answers = handler("", "", [(f"{s.user}@{s.hostname}'s password: ", False)])
                if failure:
                    raise failure[0]
                result = transport.auth_password(s.user, answers[0], fallback=False)
        except paramiko.AuthenticationException:
            if failure:
                raise failure[0] from None
            problems.append(f"{method} login was refused")
            return None
        finally:
            transport.auth_timeout = saved_timeout
        if failure:
            raise failure[0]
        return list(result)

    # -- commands ---------------------------------------------------------------------------------

    def _session(self) -> tuple[_Connection, paramiko.Channel]:
        """A new session channel; when the connection turns out dead, log in again once."""
        import paramiko

        for attempt in (0, 1):
            conn = self._ensure()
            try:
                return conn, conn.target.open_session(timeout=self.settings.connect_timeout)
            except (paramiko.SSHException, EOFError, OSError) as exc:
                if attempt == 0 and self._retire(conn):
                    continue
                raise TransportError(
                    f"cannot open a session on {self.description}: {_reason(exc)}",
                    hint="the server may limit sessions per connection (MaxSessions)",
                ) from None
        raise AssertionError("unreachable")

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: str | bytes | None = None,
        timeout: float | None = 60.0,
        check: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> CommandResult:
        args = check_argv(argv)
        remote = list(args)
        if env:
            for name in env:
                if not _ENV_NAME.match(name):
                    raise ValueError(f"not an environment variable name: {name!r}")
            # sshd drops most variables sent with setenv (AcceptEnv), so set them with env(1).
            remote = ["env", *(f"{k}={v}" for k, v in env.items()), *args]
        # The one place argv becomes a string: the remote shell splits it back into these words.
        command = shlex.join(remote)
        self._count_command(args)
        deadline = None if timeout is None else time.monotonic() + timeout
        conn, chan = self._session()
        try:
            return self._exec(conn, chan, args, command, as_bytes(stdin), deadline, timeout, check)
        finally:
            chan.close()

    def _exec(
        self,
        conn: _Connection,
        chan: paramiko.Channel,
        args: list[str],
        command: str,
        data: bytes | None,
        deadline: float | None,
        timeout: float | None,
        check: bool,
    ) -> CommandResult:
        import paramiko

        try:
            chan.exec_command(command)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise TransportError(
                f"cannot start `{short_command(args)}` on {self.description}: {_reason(exc)}"
            ) from None
        writer: threading.Thread | None = None
        if data:
            # A thread feeds stdin so a command that answers before reading it all cannot deadlock us.
            writer = threading.Thread(target=self._feed, args=(chan, data), daemon=True)
            writer.start()
        else:
            chan.shutdown_write()  # like /dev/null: a command reading stdin sees EOF at once
        out: list[bytes] = []
        err: list[bytes] = []
        while True:
            eof = chan.eof_received or chan.closed
            while chan.recv_ready():
                out.append(chan.recv(relay.CHUNK))
            while chan.recv_stderr_ready():
                err.append(chan.recv_stderr(relay.CHUNK))
            if eof:
                break
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                self._kill(chan)
                raise self._timeout(args, timeout)
            # The channel's fileno is a pipe paramiko sets when stdout or stderr data (or EOF) lands.
            select.select([chan], [], [], wait)
        wait = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        if not chan.status_event.wait(wait):
            self._kill(chan)
            raise self._timeout(args, timeout)
        if writer is not None:
            writer.join(timeout=1)
        code = chan.recv_exit_status()
        if code == -1 and not conn.alive():
            raise TransportError(
                f"the connection to {self.description} broke while `{short_command(args)}` ran; "
                "it may or may not have finished",
                hint="run the command again once the connection is back",
            )
        result = CommandResult(tuple(args), code, decode(b"".join(out)), decode(b"".join(err)))
        if check and not result.ok:
            hint = None
            if code == 127:
                hint = (
                    f"is `{args[0]}` installed on {self.description} and on PATH for non-interactive logins?"
                )
            raise CommandError(args, code, result.stdout, result.stderr, hint=hint)
        return result

    @staticmethod
    def _feed(chan: paramiko.Channel, data: bytes) -> None:
        with contextlib.suppress(Exception):
            chan.sendall(data)
        with contextlib.suppress(Exception):
            chan.shutdown_write()

    @staticmethod
    def _kill(chan: paramiko.Channel) -> None:
        """Ask sshd to KILL the command (RFC 4254 "signal", OpenSSH >= 7.9); closing alone may not."""
        import paramiko
        from paramiko.common import cMSG_CHANNEL_REQUEST

        with contextlib.suppress(Exception):
            message = paramiko.Message()
            message.add_byte(cMSG_CHANNEL_REQUEST)
            message.add_int(chan.remote_chanid)
            message.add_string("signal")
            message.add_boolean(False)
            message.add_string("KILL")
            chan.transport._send_user_message(message)  # type: ignore[union-attr]

    def _timeout(self, args: list[str], timeout: float | None) -> CommandTimeout:
        return CommandTimeout(
            f"`{short_command(args)}` did not finish within {timeout or 0:g} s "
            f"on {self.description}; killed it",
        )

    # -- files ------------------------------------------------------------------------------------

    def _sftp(self, conn: _Connection) -> paramiko.SFTPClient:
        if conn.sftp is None:
            conn.sftp = conn.target.open_sftp_client()
            if conn.sftp is None:
                raise TransportError(f"cannot open SFTP on {self.description}")
        return conn.sftp

    def _files(self, what: str, path: str, op: Callable[[paramiko.SFTPClient], T]) -> T:
        """Run an SFTP operation; map errors to ours; retry once on a new connection if it died."""
        import paramiko

        for attempt in (0, 1):
            conn = self._ensure()
            try:
                with self._sftp_lock:
                    return op(self._sftp(conn))
            except FileNotFoundError:
                raise PathNotFound(path, self.description) from None
            except OSError as exc:
                if exc.errno is not None:
                    raise TransportError(
                        f"cannot {what} {path} on {self.description}: {_reason(exc)}"
                    ) from None
                failure: BaseException = exc
            except (paramiko.SSHException, EOFError) as exc:
                failure = exc
            # No errno: a protocol or connection problem. A dead connection earns one retry.
            if attempt == 0 and self._retire(conn):
                continue
            raise TransportError(f"cannot {what} {path} on {self.description}: {_reason(failure)}") from None
        raise AssertionError("unreachable")

    @staticmethod
    def _open_for_write(sftp: paramiko.SFTPClient, path: str, mode: int) -> paramiko.SFTPFile:
        """Create ``path`` with ``mode`` in the OPEN request itself, so it is never readable by others.

        ``SFTPClient.open`` sends no attributes (the file would start 0644 by the server's umask).
        """
        from paramiko.sftp import CMD_HANDLE, CMD_OPEN, SFTP_FLAG_CREATE, SFTP_FLAG_EXCL, SFTP_FLAG_WRITE
        from paramiko.sftp_attr import SFTPAttributes
        from paramiko.sftp_file import SFTPFile

        attrs = SFTPAttributes()
        attrs.st_mode = mode
        flags = SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_EXCL
        kind, msg = sftp._request(CMD_OPEN, path, flags, attrs)  # type: ignore[attr-defined]
        if kind != CMD_HANDLE:
            raise OSError(f"unexpected SFTP reply {kind} to open")
        handle = msg.get_binary()
        handle_file = SFTPFile(sftp, handle, "wb", -1)
        handle_file.set_pipelined(True)  # do not wait for each 32 KiB write's reply
        return handle_file

    def _write_atomic(
        self, sftp: paramiko.SFTPClient, target: str, mode: int, fill: Callable[[Any], None]
    ) -> None:
        tmp = f"{target}.tmp-{secrets.token_hex(6)}"
        try:
            with self._open_for_write(sftp, tmp, mode) as fh:
                fill(fh)
            sftp.chmod(tmp, mode)  # the server's umask may have cut bits the caller asked for
            try:
                sftp.posix_rename(tmp, target)
            except OSError as exc:
                if exc.errno is not None:
                    raise
                # Server without posix-rename: plain rename refuses to replace, so remove first.
                with contextlib.suppress(FileNotFoundError):
                    sftp.remove(target)
                sftp.rename(tmp, target)
        except BaseException:
            with contextlib.suppress(Exception):
                sftp.remove(tmp)
            raise

    def read_bytes(self, path: str, *, offset: int = 0, limit: int | None = None) -> bytes:
        target = self.expand(path)

        def op(sftp: paramiko.SFTPClient) -> bytes:
            with sftp.open(target, "rb") as fh:
                if offset:
                    fh.seek(offset)
                if limit is not None:
                    return fh.read(limit)
                size = fh.stat().st_size or 0
                if size - offset > 1 << 20:
                    fh.prefetch(size)  # many reads in flight instead of one round trip per 32 KiB
                return fh.read()

        return self._files("read", path, op)

    def write_bytes(self, path: str, data: bytes, *, mode: int = 0o600) -> None:
        target = self.expand(path)
        self._files(
            "write", path, lambda sftp: self._write_atomic(sftp, target, mode, lambda fh: fh.write(data))
        )

    def exists(self, path: str) -> bool:
        target = self.expand(path)

        def op(sftp: paramiko.SFTPClient) -> bool:
            try:
                sftp.lstat(target)
            except FileNotFoundError:
                return False
            return True

        return self._files("look at", path, op)

    def size(self, path: str) -> int | None:
        target = self.expand(path)

        def op(sftp: paramiko.SFTPClient) -> int | None:
            try:
                return sftp.stat(target).st_size
            except FileNotFoundError:
                return None

        return self._files("look at", path, op)

    def makedirs(self, path: str, *, mode: int = 0o700) -> None:
        target = self.expand(path)

        def op(sftp: paramiko.SFTPClient) -> None:
            missing: list[str] = []
            current = target.rstrip("/") or "/"
            while current not in ("", "/", "."):
                try:
                    sftp.stat(current)
                    break
                except FileNotFoundError:
                    missing.append(current)
                    current = os.path.dirname(current)
            for directory in reversed(missing):
                try:
                    sftp.mkdir(directory, mode)
                except OSError:
                    # Someone else made it meanwhile: fine; anything else shows on the next stat.
                    sftp.stat(directory)
                sftp.chmod(directory, mode)

        self._files("create directory", path, op)

    def remove(self, path: str) -> None:
        target = self.expand(path)

        def op(sftp: paramiko.SFTPClient) -> None:
            with contextlib.suppress(FileNotFoundError):
                sftp.remove(target)

        self._files("remove", path, op)

    def home(self) -> str:
        conn = self._ensure()
        if conn.home is None:
            conn.home = self._files("find the home directory", "~", lambda sftp: sftp.normalize("."))
        return conn.home

    def put(self, local_path: str, remote_path: str, *, mode: int | None = None) -> None:
        try:
            src = open(local_path, "rb")  # closed by the with below; opened first to fail early
        except FileNotFoundError:
            raise PathNotFound(local_path, "this machine") from None
        except OSError as exc:
            raise TransportError(f"cannot read {local_path}: {_reason(exc)}") from None
        target = self.expand(remote_path)
        with src:
            file_mode = mode if mode is not None else os.fstat(src.fileno()).st_mode & 0o7777

            def fill(fh: Any) -> None:
                src.seek(0)  # a retry starts over
                while chunk := src.read(relay.CHUNK):
                    fh.write(chunk)

            self._files("write", remote_path, lambda sftp: self._write_atomic(sftp, target, file_mode, fill))

    def get(self, remote_path: str, local_path: str) -> None:
        target = self.expand(remote_path)
        tmp = f"{local_path}.tmp-{secrets.token_hex(4)}"
        try:
            # Our own local file (0600 until complete), so local errors are not blamed on the far side.
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except OSError as exc:
            raise TransportError(f"cannot write {local_path} on this machine: {_reason(exc)}") from None
        try:
            with os.fdopen(fd, "wb") as fh:

                def op(sftp: paramiko.SFTPClient) -> None:
                    fh.seek(0)
                    fh.truncate()
                    sftp.getfo(target, fh)

                self._files("read", remote_path, op)
            os.replace(tmp, local_path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    # -- forwards ---------------------------------------------------------------------------------

    def forward(
        self, remote_host: str, remote_port: int, *, local_port: int = 0
    ) -> contextlib.AbstractContextManager[Forward]:
        return self._forward(remote_host, remote_port, local_port)

    @contextlib.contextmanager
    def _forward(self, host: str, port: int, local_port: int) -> Iterator[Forward]:
        with relay.serve(
            (host, port), lambda origin: self._open_direct(host, port, origin), local_port=local_port
        ) as fwd:
            yield fwd

    def _open_direct(self, host: str, port: int, origin: tuple[str, int]) -> relay.Stream:
        """A ``direct-tcpip`` channel on the current connection (so a reconnect is picked up)."""
        import paramiko

        for attempt in (0, 1):
            try:
                conn = self._ensure()
            except ConnectionFailed as exc:
                raise relay.UpstreamUnavailable(exc.one_line()) from None
            try:
                channel: relay.Stream = conn.target.open_channel(
                    "direct-tcpip", (host, port), origin, timeout=self.settings.connect_timeout
                )
                return channel
            except paramiko.ChannelException as exc:
                # Usually "Connect failed": nothing listens there (yet).
                raise relay.UpstreamUnavailable(
                    f"{self.description} cannot reach {host}:{port}: {exc.text}"
                ) from None
            except (paramiko.SSHException, EOFError, OSError) as exc:
                if attempt == 0 and self._retire(conn):
                    continue
                raise relay.UpstreamUnavailable(
                    f"cannot open a channel to {host}:{port} on {self.description}: {_reason(exc)}"
                ) from None
        raise AssertionError("unreachable")
