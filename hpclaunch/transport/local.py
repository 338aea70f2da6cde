"""Run commands and touch files on this machine (on a login node, where sbatch is local)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence

from hpclaunch.errors import CommandError, CommandTimeout, TransportError
from hpclaunch.transport import relay
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


def _ignore_sigint() -> signal.Handlers | Callable[..., object] | int | None:
    """Ignore SIGINT in this process (main thread only); the previous handler, to put back."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, signal.SIG_IGN)


class LocalTransport(Transport):
    """Subprocesses and plain file calls; ``forward`` is a small relay kept for the same interface."""

    is_remote = False

    @property
    def description(self) -> str:
        return "this machine"

    # -- commands ----------------------------------------------------------------------------------

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
        full_env = {**os.environ, **env} if env else None
        try:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=full_env,
                # Its own process group, so a timeout kills whatever the command started too.
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            return self._failed_start(args, 127, "command not found", check, exc)
        except PermissionError as exc:
            return self._failed_start(args, 126, "permission denied", check, exc)
        except OSError as exc:
            return self._failed_start(args, 126, exc.strerror or str(exc), check, exc)
        try:
            out, err = proc.communicate(input=as_bytes(stdin), timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill_group(proc)
            raise CommandTimeout(
                f"`{short_command(args)}` did not finish within {timeout:g} s on this machine; killed it",
            ) from None
        except BaseException:
            # Ctrl-C or anything else: do not leave the command running behind us.
            self._kill_group(proc)
            raise
        result = CommandResult(tuple(args), proc.returncode, decode(out), decode(err))
        if check and not result.ok:
            raise CommandError(args, result.returncode, result.stdout, result.stderr)
        return result

    def run_attached(self, argv: Sequence[str], *, tty: bool = False) -> int:
        # Our stdio is inherited, so a terminal is already the command's own (``srun --pty`` uses it).
        args = check_argv(argv)
        self._count_command(args)
        try:
            proc = subprocess.Popen(args)
        except OSError as exc:
            raise CommandError(
                args, 127, "", str(exc), message=f"cannot run `{args[0]}` on this machine: {reason(exc)}"
            ) from None
        # Ctrl-C at a terminal reaches the command too (same process group): it decides what to do,
        # we keep waiting for its exit status. TERM/HUP still end us, and then the command.
        previous = _ignore_sigint()
        try:
            return proc.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def _failed_start(self, args: list[str], code: int, why: str, check: bool, exc: OSError) -> CommandResult:
        stderr = f"{args[0]}: {why}"
        if check:
            hint = "is it installed and on PATH?" if code == 127 else None
            raise CommandError(
                args, code, "", stderr, message=f"cannot run `{args[0]}` on this machine: {why}", hint=hint
            ) from exc
        return CommandResult(tuple(args), code, "", stderr)

    @staticmethod
    def _kill_group(proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            # A grandchild that left the group still holds our pipes: stop waiting for it.
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
            proc.wait(timeout=5)

    # -- files -------------------------------------------------------------------------------------

    def _path(self, path: str) -> str:
        return os.path.expanduser(path)

    def _os_error(self, path: str, exc: OSError) -> TransportError:
        if isinstance(exc, FileNotFoundError):
            return PathNotFound(path, self.description)
        return TransportError(f"cannot access {path} on this machine: {exc.strerror or exc}")

    def read_bytes(self, path: str, *, offset: int = 0, limit: int | None = None) -> bytes:
        try:
            with open(self._path(path), "rb") as fh:
                if offset:
                    fh.seek(offset)
                return fh.read() if limit is None else fh.read(limit)
        except OSError as exc:
            raise self._os_error(path, exc) from exc

    def _atomic_write(self, path: str, mode: int, fill: Callable[[int], None]) -> None:
        """Write through ``fill(fd)`` into a temporary file made with ``mode``, then rename it."""
        target = self._path(path)
        tmp = f"{target}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            # The mode is set when the file is made (and again past the umask) before any content.
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
            try:
                os.fchmod(fd, mode)
                fill(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise self._os_error(path, exc) from exc

    def write_bytes(self, path: str, data: bytes, *, mode: int = 0o600) -> None:
        def fill(fd: int) -> None:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]

        self._atomic_write(path, mode, fill)

    def exists(self, path: str) -> bool:
        return os.path.lexists(self._path(path))

    def makedirs(self, path: str, *, mode: int = 0o700) -> None:
        target = self._path(path)
        try:
            if not os.path.isdir(target):
                os.makedirs(target, mode=mode, exist_ok=True)
                os.chmod(target, mode)  # the umask may have cut bits off
        except OSError as exc:
            raise self._os_error(path, exc) from exc

    def remove(self, path: str) -> None:
        try:
            os.unlink(self._path(path))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._os_error(path, exc) from exc

    def home(self) -> str:
        return os.path.expanduser("~")

    def put(self, local_path: str, remote_path: str, *, mode: int | None = None) -> None:
        try:
            src = open(local_path, "rb")  # closed by the with below; opened first to fail early
        except OSError as exc:
            raise self._os_error(local_path, exc) from exc
        with src:
            if mode is None:
                mode = os.fstat(src.fileno()).st_mode & 0o7777

            def fill(fd: int) -> None:
                while chunk := src.read(relay.CHUNK):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]

            self._atomic_write(remote_path, mode, fill)

    def get(self, remote_path: str, local_path: str) -> None:
        try:
            shutil.copyfile(self._path(remote_path), local_path)
        except OSError as exc:
            raise self._os_error(remote_path, exc) from exc

    # -- forward -----------------------------------------------------------------------------------

    def forward(
        self, remote_host: str, remote_port: int, *, local_port: int = 0
    ) -> contextlib.AbstractContextManager[Forward]:
        return self._forward(remote_host, remote_port, local_port)

    @contextlib.contextmanager
    def _forward(self, host: str, port: int, local_port: int) -> Iterator[Forward]:
        def opener(origin: tuple[str, int]) -> relay.Stream:
            try:
                sock = socket.create_connection((host, port), timeout=10)
            except OSError as exc:
                raise relay.UpstreamUnavailable(
                    f"cannot connect to {host}:{port}: {exc.strerror or exc}"
                ) from exc
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock

        with relay.serve((host, port), opener, local_port=local_port) as fwd:
            yield fwd
