"""The one interface every way of reaching the cluster implements.

All of sbatch, squeue, scontrol, scancel and sacct go through ``Transport.run`` with an argv list;
only the SSH transport turns it into a string, at its boundary, with ``shlex.join``.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from hpclaunch.errors import TransportError


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


class Transport(abc.ABC):
    """Run commands and touch files where Slurm lives: here, or at the far end of one SSH connection."""

    #: True when commands run on another machine (the local end of a tunnel is then this machine).
    is_remote: bool = False

    def __init__(self) -> None:
        #: How many commands ran, keyed by ``argv[0]`` (tests assert "one squeue call").
        self.command_counts: collections.Counter[str] = collections.Counter()
        #: SSH handshakes done (each hop of a ProxyJump counts); always 0 for the local transport.
        self.connections_opened: int = 0
        self._count_lock = threading.Lock()

    @property
    def commands_run(self) -> int:
        """Total number of commands run through this transport."""
        return sum(self.command_counts.values())

    def _count_command(self, argv: Sequence[str]) -> None:
        with self._count_lock:
            self.command_counts[argv[0]] += 1

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """Where commands run, for messages (``this machine`` or ``user@host``)."""

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
    def size(self, path: str) -> int | None:
        """The size of a file in bytes, or None when it does not exist."""

    @abc.abstractmethod
    def makedirs(self, path: str, *, mode: int = 0o700) -> None: ...

    @abc.abstractmethod
    def remove(self, path: str) -> None:
        """Remove a file; a missing file is not an error."""

    @abc.abstractmethod
    def home(self) -> str:
        """The home directory of the user commands run as."""

    @abc.abstractmethod
    def put(self, local_path: str, remote_path: str, *, mode: int | None = None) -> None:
        """Copy a local file to the transport's side."""

    @abc.abstractmethod
    def get(self, remote_path: str, local_path: str) -> None:
        """Copy a file from the transport's side to this machine."""

    @abc.abstractmethod
    def forward(
        self, remote_host: str, remote_port: int, *, local_port: int = 0
    ) -> contextlib.AbstractContextManager[Forward]:
        """Listen on 127.0.0.1:``local_port`` (0 = any free) and forward to ``remote_host:remote_port``.

        The listener is closed when the context exits, even on error.
        """

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

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def session(self) -> Iterator[Transport]:
        try:
            yield self
        finally:
            self.close()
