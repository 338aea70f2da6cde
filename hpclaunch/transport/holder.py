"""The connection holder: a small per-profile background process that keeps one paramiko login alive
for the CLI commands that follow (the paramiko transport's ControlPersist).

Started by :class:`~hpclaunch.transport.held.HeldTransport` as ``python -m hpclaunch.transport.holder
FD``, where FD is one end of a socketpair. The process forks once at once (before any thread exists,
so the fork is safe; the CLI reaps the short-lived parent), reads its options from FD, and logs in
*there*, relaying every keyboard-interactive prompt back over FD to the CLI, which asks on its own
terminal: a paramiko connection cannot be handed from one process to another, and a fork after the
login would lose paramiko's transport thread. Then it binds a unix socket in the private runtime
directory (0600, in a 0700 directory), says "ready" and serves requests (:mod:`.holdwire`) from
processes of the same uid only (``SO_PEERCRED``), one thread per client connection.

It ends: after ``idle`` seconds without a client, when its SSH connection is lost (the next command
starts a new holder, which logs in again, with prompts, in the foreground), when asked (``hpclaunch
disconnect``), on SIGTERM, and when its socket path no longer leads to it (a replacement took over).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Sequence
from typing import Any

from hpclaunch.errors import ConnectionFailed, HpclaunchError, TransportError
from hpclaunch.transport import holdwire
from hpclaunch.transport.base import Forward
from hpclaunch.transport.holdwire import Closed, Message, WireError
from hpclaunch.transport.loginenv import LoginEnv
from hpclaunch.transport.ssh import SSHTransport

log = logging.getLogger(__name__)

#: How often the holder looks at its idle time, its connection and its socket.
TICK = 0.5
#: How often a forward's counters are sent to the client that holds it, when they changed.
FORWARD_STATUS_EVERY = 0.2
#: Client processes whose login environment is kept (each CLI command is one).
MAX_SESSIONS = 64
# Warnings raised while a request is served go back with its reply (to the user's terminal).
_THREAD_WARNINGS = threading.local()


def _show_warning(
    message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    sink = getattr(_THREAD_WARNINGS, "sink", None)
    if sink is not None:
        sink.append(str(message))
    else:
        log.warning("%s", message)


NO_PROMPTS = (
    "the connection was lost and logging in again needs an answer (a code or password), which a "
    "background holder cannot ask for"
)


class Holder:
    """One SSHTransport, served on a unix socket to processes of our own uid."""

    def __init__(self, transport: SSHTransport, path: str, idle: float) -> None:
        self.transport = transport
        self.path = path
        self.idle = idle
        self.listener: socket.socket | None = None
        self._inode: int | None = None
        self._active = 0
        self._last = time.monotonic()
        self._state = threading.Lock()
        self.stop = threading.Event()
        # One login environment per client process (its "session"), the most recent few kept.
        self._envs: collections.OrderedDict[str, LoginEnv] = collections.OrderedDict()

    # -- the socket ---------------------------------------------------------------------------------

    def bind(self) -> None:
        """Listen on ``path``: bound under a temporary name (0600 from the start), then renamed over."""
        tmp = f"{self.path}.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(tmp)
        finally:
            os.umask(old)
        os.chmod(tmp, 0o600)
        sock.listen(64)
        os.rename(tmp, self.path)
        self._inode = os.stat(self.path).st_ino
        sock.settimeout(TICK)
        self.listener = sock

    def _still_ours(self) -> bool:
        try:
            return os.stat(self.path).st_ino == self._inode
        except OSError:
            return False

    def serve(self) -> None:
        assert self.listener is not None
        try:
            while not self.stop.is_set():
                try:
                    conn, _ = self.listener.accept()
                except TimeoutError:
                    self._tick()
                    continue
                except OSError:
                    if self.stop.is_set():
                        break
                    raise
                if self.stop.is_set():
                    conn.close()
                    break
                if not holdwire.same_user(conn):
                    log.warning("refused a connection from another user")
                    conn.close()
                    continue
                conn.settimeout(None)
                with self._state:
                    self._active += 1
                threading.Thread(target=self._client, args=(conn,), daemon=True).start()
        finally:
            self.shutdown()

    def _tick(self) -> None:
        with self._state:
            idle = self._active == 0 and time.monotonic() - self._last >= self.idle
            busy = self._active > 0
        if idle:
            log.info("idle for %g s: ending", self.idle)
            self.stop.set()
        elif not self._still_ours():
            log.info("the socket %s is no longer ours: ending", self.path)
            self.stop.set()
        elif not busy and not self.transport.is_connected:
            log.info("the connection to %s is lost: ending", self.transport.description)
            self.stop.set()

    def shutdown(self) -> None:
        self.stop.set()
        if self._still_ours():
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        if self.listener is not None:
            self.listener.close()
        with contextlib.suppress(Exception):
            self.transport.close()

    # -- one client ---------------------------------------------------------------------------------

    def _client(self, conn: socket.socket) -> None:
        try:
            with conn:
                while not self.stop.is_set():
                    try:
                        message, blob = holdwire.recv(conn)
                    except (Closed, OSError):
                        return
                    if not self._answer(conn, message, blob):
                        return
        except (WireError, OSError) as exc:
            log.warning("client connection: %s", exc)
        finally:
            with self._state:
                self._active -= 1
                self._last = time.monotonic()

    def _answer(self, conn: socket.socket, message: Message, blob: bytes | None) -> bool:
        """Handle one request; False when the conversation is over."""
        op = message.get("op")
        if op == "info":
            holdwire.send(conn, self.info())
            return True
        if op == "exit":
            holdwire.send(conn, {"ok": True})
            self.stop.set()
            return False
        if not self.transport.is_connected:
            # Never reached the server: the client starts a new holder (a fresh login) and asks again.
            holdwire.send(conn, {"lost": True})
            self.stop.set()
            return False
        if op == "forward":
            self._forward(conn, message)
            return False
        caught = _THREAD_WARNINGS.sink = []
        try:
            with self.transport.using_login_env(self._env_of(message.get("session"))):
                reply, out = self._do(str(op), message, blob)
        except Exception as exc:  # every failure goes back as data, the holder lives on
            if not isinstance(exc, HpclaunchError):
                log.error("request %s failed:\n%s", op, traceback.format_exc())
            holdwire.send(conn, {"error": holdwire.error_to_wire(exc), "warnings": caught})
            return True
        finally:
            _THREAD_WARNINGS.sink = None
        holdwire.send(conn, {**reply, "warnings": caught}, out)
        return True

    def _env_of(self, session: object) -> LoginEnv:
        key = str(session)
        with self._state:
            env = self._envs.get(key)
            if env is None:
                base = self.transport.login_env
                env = self._envs[key] = LoginEnv(base.where, enabled=base.enabled, timeout=base.timeout)
                while len(self._envs) > MAX_SESSIONS:
                    self._envs.popitem(last=False)
            self._envs.move_to_end(key)
            return env

    def info(self) -> Message:
        return {
            "version": holdwire.VERSION,
            "pid": os.getpid(),
            "target": self.transport.description,
            "idle": self.idle,
            "connected": self.transport.is_connected,
        }

    def _do(self, op: str, m: Message, blob: bytes | None) -> tuple[Message, bytes | None]:
        t = self.transport
        if op == "run":
            result = t.run(
                list(m["argv"]),
                stdin=blob,
                timeout=m.get("timeout"),
                check=bool(m.get("check", True)),
                env=m.get("env"),
            )
            return {"returncode": result.returncode, "stdout": result.stdout, "stderr": result.stderr}, None
        if op == "read":
            return {}, t.read_bytes(str(m["path"]), offset=int(m.get("offset", 0)), limit=m.get("limit"))
        if op == "write":
            t.write_bytes(str(m["path"]), blob or b"", mode=int(m["mode"]))
            return {}, None
        if op == "exists":
            return {"exists": t.exists(str(m["path"]))}, None
        if op == "makedirs":
            t.makedirs(str(m["path"]), mode=int(m["mode"]))
            return {}, None
        if op == "remove":
            t.remove(str(m["path"]))
            return {}, None
        if op == "home":
            return {"home": t.home()}, None
        if op == "put":  # same machine, same user: the holder reads the local file itself
            mode = m.get("mode")
            t.put(str(m["local"]), str(m["remote"]), mode=None if mode is None else int(mode))
            return {}, None
        if op == "get":
            t.get(str(m["remote"]), str(m["local"]))
            return {}, None
        raise TransportError(f"the connection holder does not know the request {op!r}")

    def _forward(self, conn: socket.socket, m: Message) -> None:
        """Listen here (same machine) and forward; the forward lives as long as the client's connection."""
        try:
            cm = self.transport.forward(
                str(m["host"]), int(m["port"]), local_port=int(m.get("local_port", 0))
            )
            fwd = cm.__enter__()
        except Exception as exc:
            holdwire.send(conn, {"error": holdwire.error_to_wire(exc)})
            return
        try:
            holdwire.send(conn, {"port": fwd.local_port})
            self._report(conn, fwd)
        finally:
            with contextlib.suppress(Exception):
                cm.__exit__(None, None, None)

    def _report(self, conn: socket.socket, fwd: Forward) -> None:
        """Send the forward's counters when they change, until the client hangs up."""
        sent: tuple[int, int, str | None] | None = None
        conn.settimeout(FORWARD_STATUS_EVERY)
        while not self.stop.is_set():
            status = fwd.status
            now = (status.accepted, status.open_failures, status.last_error)
            if now != sent:
                holdwire.send(conn, {"accepted": now[0], "open_failures": now[1], "last_error": now[2]})
                sent = now
            try:
                if not conn.recv(1):
                    return  # the client closed the forward (or ended)
            except TimeoutError:
                continue
            except OSError:
                return


# -- start-up ---------------------------------------------------------------------------------------


def _relay_prompter(channel: socket.socket) -> Any:
    """A Prompter that asks the CLI that started us, over the start-up channel."""

    def ask(title: str, instructions: str, prompts: Sequence[tuple[str, bool]]) -> Sequence[str]:
        holdwire.send(
            channel,
            {"prompt": {"title": title, "instructions": instructions, "prompts": [list(p) for p in prompts]}},
        )
        try:
            reply, _ = holdwire.recv(channel)
        except (WireError, OSError):
            raise ConnectionFailed("the command that started the login went away") from None
        answers = reply.get("answers")
        if not isinstance(answers, list):
            raise holdwire.error_from_wire(reply.get("error"))
        return [str(a) for a in answers]

    return ask


def _no_prompts(title: str, instructions: str, prompts: Sequence[tuple[str, bool]]) -> Sequence[str]:
    if not prompts:
        return []
    raise ConnectionFailed(NO_PROMPTS, hint="the next command logs in again and asks")


def start(channel: socket.socket) -> Holder | None:
    """Read the options, log in, bind; tell the CLI "ready" (or the error). None when it failed."""
    try:
        message, _ = holdwire.recv(channel)
        options = dict(message["options"])
        path = str(message["socket"])
        idle = float(message["idle"])
    except (WireError, OSError, KeyError, TypeError, ValueError) as exc:
        log.error("bad start message: %s", exc)
        return None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            transport = SSHTransport(**options, prompter=_relay_prompter(channel))
            transport.connect()
            transport.auth._prompter = _no_prompts  # nobody to ask from now on
            holder = Holder(transport, path, idle)
            holder.bind()
    except Exception as exc:
        if not isinstance(exc, HpclaunchError):
            log.error("start-up failed:\n%s", traceback.format_exc())
        with contextlib.suppress(OSError):
            holdwire.send(channel, {"error": holdwire.error_to_wire(exc)})
        return None
    ready = {
        "ready": True,
        "pid": os.getpid(),
        "logins": transport.connections_opened,
        "warnings": [str(w.message) for w in caught],
    }
    try:
        holdwire.send(channel, ready)
    except OSError:  # the CLI went away during the login: nobody knows we exist
        holder.shutdown()
        return None
    return holder


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m hpclaunch.transport.holder FD (started by hpclaunch itself)", file=sys.stderr)
        return 2
    fd = int(args[0])
    # Fork before any thread exists; the CLI reaps the parent at once, so the holder is nobody's zombie.
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s holder %(process)d: %(message)s")
    channel = socket.socket(fileno=fd)
    holder = start(channel)
    channel.close()
    if holder is None:
        return 1
    signal.signal(signal.SIGTERM, lambda *_: holder.stop.set())
    warnings.simplefilter("always")
    warnings.showwarning = _show_warning
    log.info("holding %s on %s (idle %g s)", holder.transport.description, holder.path, holder.idle)
    holder.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
