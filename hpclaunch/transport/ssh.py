"""Reach the cluster over ONE paramiko connection to the login node.

The connection opens on first use and carries everything: commands (a new ``exec`` channel each),
files (one SFTP session), and port forwards (``direct-tcpip`` channels). A fresh login costs about
0.2 s and, with MFA, a human: so it is opened once and reused. With TCP_NODELAY a command over the
open connection costs 2.7 ms instead of 44 ms (Nagle + delayed ACK, measured on loopback).

Where to connect and as whom comes from :mod:`~hpclaunch.transport.hostsettings` (one record per hop);
logging in from :mod:`~hpclaunch.transport.sshauth`; host keys from :mod:`~hpclaunch.transport.hostkeys`.

Longer than most modules on purpose: what is left is one connection's life (open, keepalive, lose,
reconnect under one lock) and the three roles that share it (commands, SFTP, forwards); each role is
a few methods that read and re-open the same connection state, so apart they would share private state.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import select
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

from hpclaunch.errors import CommandError, CommandTimeout, ConnectionFailed, TransportError
from hpclaunch.transport import relay, sftpio
from hpclaunch.transport.base import (
    CommandResult,
    Forward,
    PathNotFound,
    Transport,
    as_bytes,
    check_argv,
    decode,
    reason,
    short_command,
)
from hpclaunch.transport.hostkeys import accept_new_from_env
from hpclaunch.transport.hostsettings import Resolver
from hpclaunch.transport.loginenv import LoginEnv
from hpclaunch.transport.sshauth import Authenticator, Prompter
from hpclaunch.transport.sshlogin import Connection, Dialer

if TYPE_CHECKING:
    import paramiko

log = logging.getLogger(__name__)
# paramiko logs a refused channel at ERROR; with logging unconfigured that lands on stderr as stray lines
# next to our one-line errors (which carry the reason). An application's own handlers still get it.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

T = TypeVar("T")

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


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
        openssh_config: bool | None = None,
        login_shell: bool = True,
    ) -> None:
        """``openssh_config``: evaluate the ssh config with ``ssh -G`` (None: where installed);
        ``login_shell``: run commands in the login shell's environment (see :mod:`.loginenv`)."""
        super().__init__()
        if isinstance(identity_file, str):
            identity_file = [identity_file]
        self.resolver = Resolver(
            ssh_config_path,
            identity_files=[os.path.expanduser(p) for p in identity_file or ()],
            connect_timeout=connect_timeout,
            keepalive=keepalive,
            openssh=openssh_config,
        )
        self._config_name = self.resolver.config_name
        self.settings = self.resolver.host(host, user=user, port=port)
        if proxy_jump:  # like `ssh -J`: wins over the config's ProxyJump for this host
            self.settings = replace(self.settings, proxy_jump=(proxy_jump,), proxy_command=None)
        #: The login shell's environment, captured once per connection; commands run in it.
        self.login_env = LoginEnv(self.description, enabled=login_shell)
        # A connection holder serves many CLI processes: each gets a login environment of its own
        # (captured on its first command, like the OpenSSH transport's), set per request thread.
        self._thread_env = threading.local()
        #: Logs in on each hop (keys, agent, keyboard-interactive through ``prompter``).
        self.auth = Authenticator(prompter, allow_agent=allow_agent, config_name=self._config_name)
        self._dialer = Dialer(
            self.resolver,
            self.auth,
            accept_new_host_key=accept_new_host_key or accept_new_from_env(),
            known_hosts_file=known_hosts_file,
            on_handshake=self._count_handshake,
        )
        # One lock guards opening, replacing and closing the connection; SFTP has its own because
        # paramiko's SFTPClient is not safe for concurrent requests.
        self._lock = threading.RLock()
        self._sftp_lock = threading.RLock()
        self._conn: Connection | None = None
        #: How many times a broken connection was replaced (by ``reconnect`` or transparently).
        self.reconnects = 0
        # A connection was lost and not yet replaced (a login may fail a few times in between).
        self._lost = False

    def _login_env(self) -> LoginEnv:
        env: LoginEnv | None = getattr(self._thread_env, "env", None)
        return env if env is not None else self.login_env

    @contextlib.contextmanager
    def using_login_env(self, env: LoginEnv) -> Iterator[None]:
        """Commands run by this thread use ``env`` (one client of a connection holder)."""
        self._thread_env.env = env
        try:
            yield
        finally:
            self._thread_env.env = None

    def _count_handshake(self) -> None:
        with self._count_lock:
            self.connections_opened += 1

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

    def _ensure(self) -> Connection:
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

    def _retire(self, conn: Connection) -> bool:
        """Forget ``conn`` if it is dead; True when a retry on a new connection makes sense."""
        if conn.alive():
            return False
        with self._lock:
            if self._conn is conn:
                self._drop()
                self._lost = True
        return True

    def _open(self) -> Connection:
        return self._dialer.open(self.settings)

    # -- commands ---------------------------------------------------------------------------------

    def _session(self) -> tuple[Connection, paramiko.Channel]:
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
                    f"cannot open a session on {self.description}: {reason(exc)}",
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
        for name in env or ():
            if not _ENV_NAME.match(name):
                raise ValueError(f"not an environment variable name: {name!r}")
        self._count_command(args)
        conn, chan = self._session()
        try:
            # The one place argv becomes a string (the remote shell splits it back into these words),
            # in the login environment: the first command on a connection runs the login shell once.
            command = self._login_env().command(conn, args, env, self._run_raw)
            # The login shell has its own bound; the command gets its whole timeout.
            deadline = None if timeout is None else time.monotonic() + timeout
            return self._exec(conn, chan, args, command, as_bytes(stdin), deadline, timeout, check)
        finally:
            chan.close()

    def _run_raw(self, command: str, timeout: float) -> CommandResult:
        """``command`` exactly as given, not counted as a command: the login shell's capture."""
        conn, chan = self._session()
        try:
            argv = ["$SHELL", "-l"]  # for messages
            return self._exec(conn, chan, argv, command, None, time.monotonic() + timeout, timeout, False)
        finally:
            chan.close()

    def _exec(
        self,
        conn: Connection,
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
                f"cannot start `{short_command(args)}` on {self.description}: {reason(exc)}"
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
                shells = "login shells" if self._login_env().enabled else "non-interactive logins"
                hint = f"is `{args[0]}` installed on {self.description} and on PATH for {shells}?"
            raise CommandError(args, code, result.stdout, result.stderr, hint=hint)
        return result

    def run_attached(self, argv: Sequence[str], *, tty: bool = False) -> int:
        import paramiko

        from hpclaunch.transport import attach

        args = check_argv(argv)
        self._count_command(args)
        stdin, stdout, stderr = attach.stdio_fds()
        conn, chan = self._session()
        try:
            try:
                if tty:
                    columns, rows = attach.terminal_size(stdin)
                    chan.get_pty(term=os.environ.get("TERM", "xterm"), width=columns, height=rows)
                # In the login environment too: srun is often on PATH only through /etc/profile.d.
                chan.exec_command(self._login_env().command(conn, args, None, self._run_raw))
            except (paramiko.SSHException, EOFError, OSError) as exc:
                raise TransportError(
                    f"cannot start `{short_command(args)}` on {self.description}: {reason(exc)}"
                ) from None
            try:
                code = attach.pump(chan, tty=tty, stdin=stdin, stdout=stdout, stderr=stderr)
            except KeyboardInterrupt:
                # TERM, not KILL: srun passes it on to its step and exits, so nothing stays behind.
                self._signal(chan, "TERM")
                raise
            if code == -1 and not conn.alive():
                raise TransportError(f"the connection to {self.description} broke while `{args[0]}` ran")
            return code
        finally:
            chan.close()

    @staticmethod
    def _feed(chan: paramiko.Channel, data: bytes) -> None:
        with contextlib.suppress(Exception):
            chan.sendall(data)
        with contextlib.suppress(Exception):
            chan.shutdown_write()

    @classmethod
    def _kill(cls, chan: paramiko.Channel) -> None:
        """Ask sshd to KILL the command (RFC 4254 "signal", OpenSSH >= 7.9); closing alone may not."""
        cls._signal(chan, "KILL")

    @staticmethod
    def _signal(chan: paramiko.Channel, name: str) -> None:
        import paramiko
        from paramiko.common import cMSG_CHANNEL_REQUEST

        with contextlib.suppress(Exception):
            message = paramiko.Message()
            message.add_byte(cMSG_CHANNEL_REQUEST)
            message.add_int(chan.remote_chanid)
            message.add_string("signal")
            message.add_boolean(False)
            message.add_string(name)
            chan.transport._send_user_message(message)  # type: ignore[union-attr]

    def _timeout(self, args: list[str], timeout: float | None) -> CommandTimeout:
        return CommandTimeout(
            f"`{short_command(args)}` did not finish within {timeout or 0:g} s "
            f"on {self.description}; killed it",
        )

    # -- files ------------------------------------------------------------------------------------

    def _sftp(self, conn: Connection) -> paramiko.SFTPClient:
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
                        f"cannot {what} {path} on {self.description}: {reason(exc)}"
                    ) from None
                failure: BaseException = exc
            except (paramiko.SSHException, EOFError) as exc:
                failure = exc
            # No errno: a protocol or connection problem. A dead connection earns one retry.
            if attempt == 0 and self._retire(conn):
                continue
            raise TransportError(f"cannot {what} {path} on {self.description}: {reason(failure)}") from None
        raise AssertionError("unreachable")

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
            "write", path, lambda sftp: sftpio.write_atomic(sftp, target, mode, lambda fh: fh.write(data))
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

    def makedirs(self, path: str, *, mode: int = 0o700) -> None:
        target = self.expand(path)

        self._files("create directory", path, lambda sftp: sftpio.makedirs(sftp, target, mode))

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
            raise TransportError(f"cannot read {local_path}: {reason(exc)}") from None
        target = self.expand(remote_path)
        with src:
            file_mode = mode if mode is not None else os.fstat(src.fileno()).st_mode & 0o7777

            def fill(fh: Any) -> None:
                src.seek(0)  # a retry starts over
                while chunk := src.read(relay.CHUNK):
                    fh.write(chunk)

            self._files("write", remote_path, lambda sftp: sftpio.write_atomic(sftp, target, file_mode, fill))

    def get(self, remote_path: str, local_path: str) -> None:
        target = self.expand(remote_path)
        tmp = f"{local_path}.tmp-{secrets.token_hex(4)}"
        try:
            # Our own local file (0600 until complete), so local errors are not blamed on the far side.
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except OSError as exc:
            raise TransportError(f"cannot write {local_path} on this machine: {reason(exc)}") from None
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
                    f"cannot open a channel to {host}:{port} on {self.description}: {reason(exc)}"
                ) from None
        raise AssertionError("unreachable")
