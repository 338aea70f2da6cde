"""A submitted job: its state, waiting for it, its output (also while it grows), cancelling it.

Jobs come from :class:`hpclaunch.cluster.Cluster` (``submit``, ``job``, ``jobs``) and talk to the
cluster through it: one connection, one scheduler.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from .errors import HpclaunchError
from .transport.base import PathNotFound

if TYPE_CHECKING:
    from .cluster import Cluster
    from .slurm.states import JobInfo


class Job:
    """A submitted job: ask its state, wait for it, read its output, cancel it."""

    def __init__(
        self,
        cluster: Cluster,
        job_id: str,
        *,
        run_dir: str | None = None,
        name: str | None = None,
        info: JobInfo | None = None,
        output: str | None = None,
    ) -> None:
        self.cluster = cluster
        self.id = job_id
        self.run_dir = run_dir
        self.name = name
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
        """Block until the job ends; raises WaitTimeout after ``timeout`` seconds."""
        infos = self.cluster.scheduler.wait([self.id], timeout=timeout, on_update=on_update)
        self._last = infos[self.id]
        return self._last

    def cancel(self) -> None:
        self.cluster.scheduler.cancel(self.id)

    def output_path(self) -> str:
        """Where the job's output goes (known without asking Slurm when we chose it)."""
        if self._output is None:
            self._output = self.cluster.scheduler.output_path(self.id)
        return self._output

    def output_path_hint(self) -> str | None:
        """The output path when known without a scheduler call."""
        return self._output

    def logs(self) -> str:
        """The job's output so far."""
        path = self.output_path()
        if not self.cluster.transport.exists(path):
            return ""
        return self.cluster.transport.read_text(path)

    def follow(self, *, poll: float = 0.25, max_poll: float = 2.0, chunk: int = 1 << 16) -> Iterator[str]:
        """Yield the job's output as it is written, until the job has ended and all is read.

        Reads in bounded chunks from an offset, so a 100 MB log costs no more memory than a small one.
        """
        transport = self.cluster.transport
        offset = 0
        path: str | None = None
        delay = poll
        # A character split across two chunks must not turn into two replacement characters.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while True:
            ended = self.info().is_terminal
            if path is None:
                try:
                    path = self.output_path()
                except HpclaunchError:
                    path = None
            grew = False
            if path is not None:
                while True:
                    try:
                        data = transport.read_bytes(path, offset=offset, limit=chunk)
                    except PathNotFound:  # not written yet: one round trip, not an exists() and a read
                        data = b""
                    if not data:
                        break
                    offset += len(data)
                    grew = True
                    yield decoder.decode(data)
                    if len(data) < chunk:
                        break
            if ended and not grew:
                tail = decoder.decode(b"", final=True)
                if tail:
                    yield tail
                return
            delay = poll if grew else min(max_poll, delay * 1.5)
            if not ended:
                time.sleep(delay)

    def __repr__(self) -> str:
        return f"Job({self.id!r}, name={self.name!r})"
