"""A submitted job: its state, waiting for it, its output (also while it grows), cancelling it.

Jobs come from :class:`hpclaunch.submission.Submitter` (and so from ``Cluster``: ``submit``, ``job``,
``jobs``) and reach the cluster through it: one connection, one scheduler.
"""

from __future__ import annotations

import codecs
import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

from .console import no_interrupts, redact
from .errors import HpclaunchError, Interrupted, JobNotFound
from .polling import Backoff, Poller, StartWatch
from .transport.base import PathNotFound

if TYPE_CHECKING:
    from .scheduler import Scheduler
    from .states import JobInfo
    from .transport.base import FileStore

#: How many lines of a job's log an error report shows.
LOG_TAIL_LINES = 15


class JobHost(Protocol):
    """What a job needs of the cluster it runs on (a ``Submitter``, a ``Cluster``, or a test fake)."""

    @property
    def scheduler(self) -> Scheduler: ...

    @property
    def transport(self) -> FileStore: ...


class LogReader:
    """Reads a growing file from where it left off, in bounded chunks, decoding UTF-8 across them.

    A file that does not exist yet reads as empty (one round trip, no ``exists()`` first); any other
    error (a connection, a permission) is raised, never mistaken for "not written yet".
    """

    def __init__(self, files: FileStore, path: str | None = None, *, chunk: int = 1 << 16) -> None:
        self.files = files
        self.path = path
        self.chunk = chunk
        self.offset = 0
        # A character split across two chunks must not turn into two replacement characters.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def chunks(self) -> Iterator[str]:
        """The text written since the last read, one bounded chunk at a time."""
        if self.path is None:
            return
        while True:
            try:
                data = self.files.read_bytes(self.path, offset=self.offset, limit=self.chunk)
            except PathNotFound:
                return
            if not data:
                return
            self.offset += len(data)
            text = self._decoder.decode(data)
            if text:
                yield text
            if len(data) < self.chunk:
                return

    def read_new(self) -> str:
        """Everything written since the last read."""
        return "".join(self.chunks())

    def finish(self) -> str:
        """What the decoder still holds (an incomplete character at the very end)."""
        return self._decoder.decode(b"", final=True)


def log_tail(text: str, lines: int = LOG_TAIL_LINES, *, secret: str | None = None) -> str:
    """The last non-empty lines of a log for an error report, with ``secret`` masked."""
    tail = [redact(line, secret) for line in text.splitlines() if line.strip()][-lines:]
    return "last lines of the job's log:\n" + ("\n".join("  " + t for t in tail) if tail else "  (empty)")


class Job:
    """A submitted job: ask its state, wait for it, read its output, cancel it."""

    def __init__(
        self,
        cluster: JobHost,
        job_id: str,
        *,
        run_dir: str | None = None,
        name: str | None = None,
        info: JobInfo | None = None,
        output: str | None = None,
        recorded: bool = False,
    ) -> None:
        self.cluster = cluster
        self.id = job_id
        self.run_dir = run_dir
        self.name = name
        #: hpclaunch submitted this job (it is in the local job records): an id that the scheduler does
        #: not know is then a job it has forgotten, not a typo.
        self.recorded = recorded
        self._last: JobInfo | None = info
        self._output = output

    @property
    def last_info(self) -> JobInfo | None:
        """What the last query (or the listing that found this job) said, without asking again."""
        return self._last

    def info(self) -> JobInfo:
        """Fresh details from the scheduler (one call)."""
        self._last = self.cluster.scheduler.info(self.id)
        return self._last

    @property
    def state(self) -> str:
        return self.info().state.value

    def wait(
        self, timeout: float | None = None, on_update: Callable[[JobInfo], None] | None = None
    ) -> JobInfo:
        """Block until the job ends; raises WaitTimeout after ``timeout`` seconds.

        Returns early for a job that Slurm will never start as asked: its info is pending, with
        ``cannot_start`` saying what to change, so a script can decide (cancel, resubmit, report).
        Unavailable nodes count once Slurm has said so for 30 s: a controller that has just restarted
        says it of every node until they register again. An id that neither the scheduler nor
        hpclaunch's records know raises JobNotFound at once.
        """
        grace = 120.0 if self.recorded else 0.0
        scheduler = self.cluster.scheduler
        infos = scheduler.wait([self.id], timeout=timeout, on_update=on_update, unknown_grace=grace)
        self._last = infos[self.id]
        return self._last

    def cancel(self) -> None:
        self.cluster.scheduler.cancel(self.id)

    @contextlib.contextmanager
    def cancelled_on_failure(self) -> Iterator[None]:
        """Cancel the job if the block fails or is interrupted: nothing is left behind. An interrupt
        comes out as Interrupted, which says so ("cancelled job N")."""
        try:
            yield
        except BaseException as exc:
            with no_interrupts(), contextlib.suppress(HpclaunchError):
                self.cancel()
            if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, Interrupted):
                raise Interrupted(f"cancelled job {self.id}") from exc
            raise

    def cancel_unless_ended(self) -> JobInfo | None:
        """Cancel the job unless it has already ended: then nothing is sent and its info is returned
        (so callers say "already COMPLETED", not "cancelled"). JobNotFound for an id nobody knows."""
        info = self.info()
        self.ensure_known(info)
        if info.is_terminal or info.not_found:
            return info
        try:
            self.cancel()
        except JobNotFound:
            info = self.info()  # it ended between the two calls (scancel refuses a finished job)
            if info.is_terminal:
                return info
            raise
        return None

    def output_path(self) -> str:
        """Where the job's output goes (known without asking Slurm when we chose it)."""
        if self._output is None:
            try:
                self._output = self.cluster.scheduler.output_path(self.id)
            except HpclaunchError:
                self.ensure_known()
                raise
        return self._output

    def ensure_known(self, info: JobInfo | None = None) -> None:
        """JobNotFound when no source knows the id and hpclaunch did not submit it."""
        if self.recorded:
            return
        info = info or self.info()
        if info.not_found:
            raise JobNotFound(
                f"no such job: {self.id} ({info.reason})", hint="check the id with `hpclaunch status`"
            )

    def output_path_hint(self) -> str | None:
        """The output path when known without a scheduler call."""
        return self._output

    def logs(self) -> str:
        """The job's output so far."""
        path = self.output_path()
        try:
            return self.cluster.transport.read_text(path)
        except PathNotFound:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES, *, secret: str | None = None) -> str | None:
        """The end of the job's output for an error report (``secret`` masked); None if unreadable."""
        try:
            return log_tail(self.logs(), lines, secret=secret)
        except HpclaunchError:
            return None

    def follow(self, *, poll: float = 0.25, max_poll: float = 2.0, chunk: int = 1 << 16) -> Iterator[str]:
        """Yield the job's output as it is written, until the job has ended (or is pending for a reason
        that cannot clear: see ``last_info.cannot_start``) and all is read.

        Reads in bounded chunks from an offset, so a 100 MB log costs no more memory than a small one.
        """
        reader = LogReader(self.cluster.transport, self._output, chunk=chunk)
        poller = Poller(Backoff(initial=poll, maximum=max_poll, factor=1.5, jitter=0.0))
        watch = StartWatch()
        for _ in poller:
            info = self.info()
            self.ensure_known(info)
            # A recorded job that the scheduler has forgotten ended long ago: its log is complete.
            ended = watch.settled(info) or info.not_found
            if reader.path is None:
                try:
                    reader.path = self.output_path()
                except HpclaunchError:
                    pass
            grew = False
            for text in reader.chunks():
                grew = True
                yield text
            if ended and not grew:
                tail = reader.finish()
                if tail:
                    yield tail
                return
            if grew:
                poller.progress()

    def __repr__(self) -> str:
        return f"Job({self.id!r}, name={self.name!r})"
