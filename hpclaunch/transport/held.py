"""The paramiko transport kept between CLI commands: requests go to a connection holder (:mod:`.holder`).

``HeldTransport`` is what ``connect()`` gives a paramiko profile with ``session_idle`` > 0. It never
imports paramiko: each call is one request over the holder's unix socket (a few hundred microseconds),
so a CLI command on a profile with a running holder starts as fast as one on the OpenSSH master.

- No holder (or a dead one: its socket refuses, or it does not answer within :data:`PING_TIMEOUT`):
  the first request starts one, under a per-profile lock so two commands start one, not two. The
  holder logs in; its keyboard-interactive prompts come back here and are asked on our terminal (or
  our ``prompter``), so MFA is answered once, in the foreground, and then not again for the session.
- A holder whose SSH connection is lost answers "lost" before doing anything: a new holder logs in
  (with prompts) and the request is sent again. One that dies while a command runs is reported, not
  retried (the command may have run); file requests are idempotent and are retried once.
- Files: ``put``/``get`` pass local *paths*: the holder is the same user on the same machine.
- Forwards: the holder listens on 127.0.0.1 itself and reports the port; the forward lasts as long as
  our request's connection, and its counters (accepted, failures, last error) are streamed back.
- ``run_attached`` (``hpclaunch shell``/``proxy``) joins *our* terminal to the command, which a socket
  request cannot do: it uses a connection of its own (a second login).

The holder needs unix sockets and a way to learn a peer's uid (Linux, macOS, the BSDs); elsewhere
(Windows) ``connect()`` keeps the per-command login.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from hpclaunch.errors import ConnectionFailed, HpclaunchWarning, TransportError
from hpclaunch.transport import holdwire, runtime
from hpclaunch.transport.base import (
    CommandResult,
    Forward,
    ForwardStatus,
    Transport,
    as_bytes,
    check_argv,
    short_command,
)
from hpclaunch.transport.holdwire import Closed, Message, WireError
from hpclaunch.transport.hostsettings import Resolver

if TYPE_CHECKING:
    from hpclaunch.transport.ssh import SSHTransport
    from hpclaunch.transport.sshauth import Prompter

log = logging.getLogger(__name__)

#: A holder that accepts but does not answer "info" within this long is stale (stopped, wedged).
PING_TIMEOUT = 5.0
#: A login with a human answering MFA may take this long.
LOGIN_TIMEOUT = 300.0
#: Requests that change nothing twice: safe to send again after a holder died mid-way.
_IDEMPOTENT = frozenset({"read", "write", "exists", "makedirs", "remove", "home", "put", "get", "info"})


def supported() -> bool:
    """Whether a holder can run here (unix sockets with peer credentials)."""
    return holdwire.can_check_peers() and hasattr(os, "fork")


class HeldTransport(Transport):
    """The SSH transport through a per-profile connection holder; see the module docstring."""

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
        login_shell: bool = True,
        idle: int = 600,
        runtime_dir: str | None = None,
    ) -> None:
        """``idle``: seconds the holder stays up without a request (> 0)."""
        super().__init__()
        if isinstance(identity_file, str):
            identity_file = [identity_file]
        files = [os.path.abspath(os.path.expanduser(p)) for p in identity_file or ()]
        config = ssh_config_path and os.path.abspath(os.path.expanduser(ssh_config_path))
        known = known_hosts_file and os.path.abspath(os.path.expanduser(known_hosts_file))
        #: What the holder builds its SSHTransport from (and a direct connection, for run_attached).
        self.options: dict[str, Any] = {
            "host": host,
            "user": user,
            "port": port,
            "identity_file": files,
            "ssh_config_path": config,
            "accept_new_host_key": accept_new_host_key,
            "known_hosts_file": known,
            "connect_timeout": connect_timeout,
            "keepalive": keepalive,
            "login_shell": login_shell,
        }
        # Where and as whom, for messages: the same resolution the holder makes (no paramiko).
        self.settings = Resolver(
            config, identity_files=files, connect_timeout=connect_timeout, keepalive=keepalive
        ).host(host, user=user, port=port)
        self.idle = max(1, int(idle))
        self._prompter = prompter
        # One holder per distinct way of connecting (a different key or config is a different login).
        self.socket_path = runtime.socket_path("holder", repr(sorted(self.options.items())), runtime_dir)
        self.log_path = self.socket_path + ".log"
        self._pid: int | None = None  # the holder this process talks to, once it answered
        self._lock = threading.RLock()
        self._direct: SSHTransport | None = None
        # Who we are to the holder: the commands of one process share one login environment.
        self._session = secrets.token_hex(8)
        #: How many times a lost holder was replaced by this process.
        self.reconnects = 0
        self._seen = False

    @property
    def description(self) -> str:
        return self.settings.target

    # -- the holder -----------------------------------------------------------------------------------

    def _dial(self, timeout: float | None = None) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            return None
        return sock

    def info(self) -> Message | None:
        """The running holder's ``{pid, target, idle, connected, version}``; None when there is none."""
        sock = self._dial(PING_TIMEOUT)
        if sock is None:
            return None
        with sock:
            try:
                holdwire.send(sock, {"op": "info"})
                reply, _ = holdwire.recv(sock)
            except (OSError, WireError):
                return None  # accepts but does not answer: wedged or stopped
        return reply if reply.get("version") == holdwire.VERSION else None

    def holder_pid(self) -> int | None:
        found = self.info()
        return int(found["pid"]) if found and isinstance(found.get("pid"), int) else None

    #: Same meaning as the OpenSSH transport's: the process that holds the connection (and the forwards).
    master_pid = holder_pid

    @property
    def is_connected(self) -> bool:
        return self.info() is not None

    @contextlib.contextmanager
    def _start_lock(self) -> Iterator[None]:
        """Across processes: two commands that find no holder start one, not two."""
        import fcntl  # POSIX only, like the holder itself

        fd = os.open(self.socket_path + ".lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def connect(self) -> None:
        self._ensure()

    def _ensure(self, *, failed: bool = False) -> None:
        """A holder answers on the socket; started (and logged in) here when none does.

        ``failed``: the holder we used let us down (gone, lost its connection): take another process's
        replacement if one is already up, else start one.
        """
        bad = self._pid if failed else None
        if self._pid is not None and not failed:
            return
        with self._lock, self._start_lock():
            found = self.info()
            if found is None or not found.get("connected") or (failed and found.get("pid") == bad):
                self._replace(answering=found is not None)
            else:
                self._pid = int(found["pid"])
                self._seen = True

    def _replace(self, *, answering: bool) -> None:
        """End what is on the socket (stale, wedged, another version, lost) and start a new holder."""
        if answering:
            self._end_quietly()
        else:  # dead or wedged: asking it to exit would only wait for nothing
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
        lost = self._seen
        self._start()
        self._seen = True
        if lost:
            self.reconnects += 1
            log.info("reconnected to %s", self.description)

    def _end_quietly(self) -> None:
        sock = self._dial(PING_TIMEOUT)
        if sock is not None:
            with sock, contextlib.suppress(OSError, WireError):
                holdwire.send(sock, {"op": "exit"})
                holdwire.recv(sock)
        # A holder that did not answer keeps its listening socket but loses the path: it sees that and ends.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    def _start(self) -> None:
        """Start a holder and see it through its login, answering its prompts here."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fd = os.open(self.log_path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        try:
            child = subprocess.Popen(
                [sys.executable, "-m", "hpclaunch.transport.holder", str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=fd,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,  # no terminal: Ctrl-C in this command does not end the holder
            )
        except OSError as exc:
            ours.close()
            raise TransportError(f"cannot start the connection holder: {exc.strerror or exc}") from None
        finally:
            theirs.close()
            os.close(fd)
        child.wait()  # it forks at once: this is the short-lived parent
        with ours:
            ours.settimeout(LOGIN_TIMEOUT)
            try:
                holdwire.send(ours, {"options": self.options, "socket": self.socket_path, "idle": self.idle})
                while True:
                    reply, _ = holdwire.recv(ours)
                    if "prompt" in reply:
                        holdwire.send(ours, self._answer(reply["prompt"]))
                        continue
                    break
            except TimeoutError:
                raise ConnectionFailed(
                    f"cannot connect to {self.description}: no login within {LOGIN_TIMEOUT:g} s"
                ) from None
            except (OSError, WireError):
                raise ConnectionFailed(
                    f"the connection holder for {self.description} ended before logging in",
                    hint=f"see {self.log_path}",
                ) from None
        if "error" in reply:
            raise holdwire.error_from_wire(reply["error"])
        for text in reply.get("warnings") or ():
            warnings.warn(str(text), HpclaunchWarning, stacklevel=2)
        with self._count_lock:
            self.connections_opened += int(reply.get("logins") or 0)
        self._pid = int(reply["pid"])

    def _answer(self, prompt: Any) -> Message:
        """Our answers to one keyboard-interactive round (or why there are none)."""
        from hpclaunch.transport.sshauth import terminal_prompter

        ask = self._prompter or terminal_prompter
        try:
            prompts = [(str(text), bool(echo)) for text, echo in prompt["prompts"]]
            answers = ask(str(prompt["title"]), str(prompt["instructions"]), prompts)
        except Exception as exc:
            return {"error": holdwire.error_to_wire(exc)}
        return {"answers": [str(a) for a in answers]}

    def end_holder(self) -> bool:
        """Stop the holder (``hpclaunch disconnect``); True when one was running."""
        running = self.info() is not None
        self._end_quietly()
        self._pid = None
        return running

    def reconnect(self) -> None:
        """End the holder (alive or not) and log in again; raises ConnectionFailed on failure."""
        with self._lock:
            self._seen = True
            self._end_quietly()
            self._pid = None
            self._ensure()

    def close(self) -> None:
        # The holder is the point: it stays for the next command. Only a direct connection ends.
        direct, self._direct = self._direct, None
        if direct is not None:
            direct.close()

    # -- requests -------------------------------------------------------------------------------------

    def _request(
        self, message: Message, blob: bytes | None = None, *, what: str = ""
    ) -> tuple[Message, bytes | None]:
        """One request and its reply; a holder found gone or lost is replaced and asked again."""
        op = message["op"]
        message = {**message, "session": self._session}
        for attempt in (0, 1):
            self._ensure(failed=attempt > 0)
            sock = self._dial()
            if sock is None:
                if attempt == 0:
                    continue
                raise TransportError(f"the connection holder for {self.description} does not answer")
            with sock:
                try:
                    holdwire.send(sock, message, blob)
                except OSError:
                    if attempt == 0:
                        continue  # it never saw the request
                    raise TransportError(f"the connection holder for {self.description} went away") from None
                try:
                    reply, out = holdwire.recv(sock)
                except (OSError, WireError):
                    if attempt == 0 and op in _IDEMPOTENT:
                        continue
                    raise TransportError(
                        f"the connection holder for {self.description} ended during {what or op}; "
                        "it may or may not have finished",
                        hint="run the command again",
                    ) from None
            if reply.get("lost"):
                if attempt == 0:
                    continue  # the request never reached the server
                raise ConnectionFailed(f"the connection to {self.description} was lost")
            for text in reply.pop("warnings", None) or ():
                warnings.warn(str(text), HpclaunchWarning, stacklevel=3)
            if "error" in reply:
                raise holdwire.error_from_wire(reply["error"])
            return reply, out
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
        self._count_command(args)
        message = {
            "op": "run",
            "argv": args,
            "timeout": timeout,
            "check": check,
            "env": dict(env or {}) or None,
        }
        reply, _ = self._request(message, as_bytes(stdin), what=f"`{short_command(args)}`")
        return CommandResult(
            tuple(args), int(reply["returncode"]), str(reply["stdout"]), str(reply["stderr"])
        )

    def run_attached(self, argv: Sequence[str], *, tty: bool = False) -> int:
        # Our own terminal cannot travel over a request: this one command gets its own connection.
        from hpclaunch.transport.ssh import SSHTransport

        with self._lock:
            if self._direct is None:
                self._direct = SSHTransport(**self.options, prompter=self._prompter)
        code = self._direct.run_attached(argv, tty=tty)
        self.connections_opened += self._direct.connections_opened
        return code

    def read_bytes(self, path: str, *, offset: int = 0, limit: int | None = None) -> bytes:
        _, data = self._request({"op": "read", "path": path, "offset": offset, "limit": limit})
        return data or b""

    def write_bytes(self, path: str, data: bytes, *, mode: int = 0o600) -> None:
        self._request({"op": "write", "path": path, "mode": mode}, bytes(data))

    def exists(self, path: str) -> bool:
        reply, _ = self._request({"op": "exists", "path": path})
        return bool(reply["exists"])

    def makedirs(self, path: str, *, mode: int = 0o700) -> None:
        self._request({"op": "makedirs", "path": path, "mode": mode})

    def remove(self, path: str) -> None:
        self._request({"op": "remove", "path": path})

    def home(self) -> str:
        reply, _ = self._request({"op": "home"})
        return str(reply["home"])

    def put(self, local_path: str, remote_path: str, *, mode: int | None = None) -> None:
        self._request(
            {"op": "put", "local": os.path.abspath(local_path), "remote": remote_path, "mode": mode}
        )

    def get(self, remote_path: str, local_path: str) -> None:
        self._request({"op": "get", "remote": remote_path, "local": os.path.abspath(local_path)})

    # -- forwards -------------------------------------------------------------------------------------

    def forward(
        self, remote_host: str, remote_port: int, *, local_port: int = 0
    ) -> contextlib.AbstractContextManager[Forward]:
        return self._forward(remote_host, remote_port, local_port)

    @contextlib.contextmanager
    def _forward(self, host: str, port: int, local_port: int) -> Iterator[Forward]:
        sock, listening = self._open_forward(host, port, local_port)
        fwd = Forward(listening, host, port)
        stop = threading.Event()
        reader = threading.Thread(target=self._follow, args=(sock, fwd.status, stop), daemon=True)
        reader.start()
        try:
            yield fwd
        finally:
            stop.set()
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            reader.join(timeout=2)

    def _open_forward(self, host: str, port: int, local_port: int) -> tuple[socket.socket, int]:
        """The request's connection, which the forward lives as long as, and the port it listens on."""
        message = {"op": "forward", "host": host, "port": port, "local_port": local_port}
        for attempt in (0, 1):
            self._ensure(failed=attempt > 0)
            sock = self._dial()
            if sock is None:
                continue
            try:
                holdwire.send(sock, message)
                reply, _ = holdwire.recv(sock)
            except (OSError, WireError):
                sock.close()
                continue
            if reply.get("lost"):
                sock.close()
                continue
            if "error" in reply:
                sock.close()
                raise holdwire.error_from_wire(reply["error"])
            return sock, int(reply["port"])
        raise TransportError(f"the connection holder for {self.description} cannot open a forward")

    def _follow(self, sock: socket.socket, status: ForwardStatus, stop: threading.Event) -> None:
        """Copy the holder's counters into ours until the forward ends."""
        while not stop.is_set():
            try:
                update, _ = holdwire.recv(sock)
            except (Closed, OSError, WireError):
                if not stop.is_set():
                    with status._lock:
                        status.last_error = f"the connection holder for {self.description} ended"
                return
            with status._lock:
                status.accepted = int(update.get("accepted", status.accepted))
                status.open_failures = int(update.get("open_failures", status.open_failures))
                error = update.get("last_error")
                status.last_error = str(error) if error is not None else None
