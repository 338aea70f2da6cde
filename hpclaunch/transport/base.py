"""The interface every way of reaching the cluster implements, split into the roles callers need.

- :class:`CommandRunner`: ``run(argv)`` (sbatch, squeue, scontrol, scancel, sacct all go through it)
- :class:`FileStore`: read, write, exists, makedirs, remove, put, get
- :class:`Forwarder`: ``forward`` a local port to a host:port seen from the far side
- :class:`Transport`: all three, what the local and SSH transports implement

A test fake subclasses only the role it plays. argv stays a list until the SSH boundary, where it
becomes a string once, with ``shlex.join``; the argv helpers below are shared by both transports.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import shlex
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from hpclaunch.errors import TransportError

_E = TypeVar("_E", bound="Endpoint")


def check_argv(argv: Sequence[str]) -> list[str]:
    """Refuse what is not a non-empty list of strings (a bare string would be split per character)."""
    if isinstance(argv, (str, bytes)):
        raise TypeError("argv must be a list of strings, not one string")
    args = list(argv)
    if not args:
        raise ValueError("argv is empty")
    for arg in args:
        if not isinstance(arg, str):
            raise TypeError(f"argv items must be str, got {type(arg).__name__}: {arg!r}")
        if "\0" in arg:
            raise ValueError(f"argv item contains a NUL byte: {arg!r}")
    return args


def as_bytes(data: str | bytes | None) -> bytes | None:
    return data.encode("utf-8") if isinstance(data, str) else data


def decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def short_command(argv: Sequence[str]) -> str:
    """The command for messages, cut so a huge argv does not flood a terminal."""
    text = shlex.join(argv)
    return text if len(text) <= 120 else text[:117] + "..."


def reason(exc: BaseException) -> str:
    """An exception as the short tail of a one-line message (``connection refused``)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


class PathNotFound(TransportError, FileNotFoundError):
    """A file or directory does not exist on the transport's side.

    Also a ``FileNotFoundError``, so ``except FileNotFoundError`` works the same for both transports.
    """

    def __init__(self, path: str, where: str) -> None:
        TransportError.__init__(self, f"no such file on {where}: {path}")
        self.filename = path


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


@dataclass
class ForwardStatus:
    """Live counters of a forward, for messages ("not reachable yet") and tests."""

    #: Clients accepted on the local port.
    accepted: int = 0
    #: Clients whose far-side connection could not be opened (e.g. nothing listens there yet).
    open_failures: int = 0
    #: The last problem seen (a failed open, a dropped connection), as one line; None when none.
    last_error: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)


@dataclass(frozen=True)
class Forward:
    """A local listening port that forwards to ``remote_host:remote_port`` as seen from the far end."""

    local_port: int
    remote_host: str
    remote_port: int
    status: ForwardStatus = field(default_factory=ForwardStatus, compare=False, repr=False)


class Endpoint(abc.ABC):
    """The far side of every role: where it is, its home directory, and the connection's life."""

    #: True when commands run on another machine (the local end of a tunnel is then this machine).
    is_remote: bool = False

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """Where commands run, for messages (``this machine`` or ``user@host``)."""

    @abc.abstractmethod
    def home(self) -> str:
        """The home directory of the user commands run as."""

    def expand(self, path: str) -> str:
        """Expand a leading ``~`` against the far side's home directory."""
        if path == "~":
            return self.home()
        if path.startswith("~/"):
            return self.home().rstrip("/") + path[1:]
        return path

    def connect(self) -> None:  # noqa: B027 - optional hook
        """Open the connection now instead of on first use (to fail early); a no-op locally."""

    def reconnect(self) -> None:  # noqa: B027 - optional hook
        """Drop the connection and open a new one (after it broke); a no-op locally."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the connection, if any."""

    def __enter__(self: _E) -> _E:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CommandRunner(Endpoint):
    """Runs argv lists where Slurm lives (what ``SlurmClient`` needs)."""

    def __init__(self) -> None:
        #: How many commands ran, keyed by ``argv[0]`` (tests assert "one squeue call").
        self.command_counts: collections.Counter[str] = collections.Counter()
        self._count_lock = threading.Lock()

    @property
    def commands_run(self) -> int:
        """Total number of commands run through this transport."""
        return sum(self.command_counts.values())

    def _count_command(self, argv: Sequence[str]) -> None:
        with self._count_lock:
            self.command_counts[argv[0]] += 1

    @abc.abstractmethod
    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: str | bytes | None = None,
        timeout: float | None = 60.0,
        check: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> CommandResult:
        """Run ``argv`` (never through a shell on our side) and wait for it.

        ``env`` adds variables to the command's environment. With ``check`` a non-zero exit raises
        :class:`~hpclaunch.errors.CommandError`; running past ``timeout`` seconds kills the command and
        raises :class:`~hpclaunch.errors.CommandTimeout`. A missing executable is exit code 127.
        """

    def run_attached(self, argv: Sequence[str], *, tty: bool = False) -> int:
        """Run ``argv`` joined to this process's stdin, stdout and stderr until it ends; its exit status.

        Streams both ways (``hpclaunch shell``, ``hpclaunch proxy``), unlike :meth:`run`, which collects.
        With ``tty`` the command gets a pseudo-terminal sized like ours, our terminal goes raw (Ctrl-C
        reaches the remote program) and window resizes are passed on: what ``ssh -tt HOST CMD`` does.
        A transport that cannot do this says so; the default is that.
        """
        raise TransportError(f"cannot attach a terminal to a command on {self.description}")


class FileStore(Endpoint):
    """Files on the far side (run directories, scripts, logs); a leading ``~`` is its home."""

    @abc.abstractmethod
    def read_bytes(self, path: str, *, offset: int = 0, limit: int | None = None) -> bytes:
        """Read a file, or at most ``limit`` bytes of it from ``offset`` (for following a growing log).

        A missing file raises :class:`PathNotFound` (also a ``FileNotFoundError``).
        """

    def read_text(self, path: str) -> str:
        return self.read_bytes(path).decode("utf-8", errors="replace")

    @abc.abstractmethod
    def write_bytes(self, path: str, data: bytes, *, mode: int = 0o600) -> None:
        """Write a file atomically-enough with ``mode`` set before any content lands."""

    def write_text(self, path: str, text: str, *, mode: int = 0o600) -> None:
        self.write_bytes(path, text.encode("utf-8"), mode=mode)

    @abc.abstractmethod
    def exists(self, path: str) -> bool: ...

    @abc.abstractmethod
    def makedirs(self, path: str, *, mode: int = 0o700) -> None: ...

    @abc.abstractmethod
    def remove(self, path: str) -> None:
        """Remove a file; a missing file is not an error."""

    @abc.abstractmethod
    def put(self, local_path: str, remote_path: str, *, mode: int | None = None) -> None:
        """Copy a local file to the transport's side."""

    @abc.abstractmethod
    def get(self, remote_path: str, local_path: str) -> None:
        """Copy a file from the transport's side to this machine."""


class Forwarder(Endpoint):
    """Local ports that reach a host:port as seen from the far side (the notebook tunnel)."""

    @abc.abstractmethod
    def forward(
        self, remote_host: str, remote_port: int, *, local_port: int = 0
    ) -> contextlib.AbstractContextManager[Forward]:
        """Listen on 127.0.0.1:``local_port`` (0 = any free) and forward to ``remote_host:remote_port``.

        The listener is closed when the context exits, even on error.
        """


class Transport(CommandRunner, FileStore, Forwarder):
    """Run commands and touch files where Slurm lives: here, or at the far end of one SSH connection."""

    def __init__(self) -> None:
        super().__init__()
        #: SSH handshakes done (each hop of a ProxyJump counts); always 0 for the local transport.
        self.connections_opened: int = 0
