"""What every backend offers (Slurm over a transport, or the built-in ``local`` one), and the shared wait.

Callers depend on :class:`Scheduler`, never on a concrete backend, so the same flow runs on a cluster
and on a laptop.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from hpclaunch.errors import WaitTimeout
from hpclaunch.slurm.states import JobInfo

if TYPE_CHECKING:
    from hpclaunch.transport.base import Transport

#: Called with a job's new info whenever its state or reason changes during a wait.
UpdateCallback = Callable[[JobInfo], None]


@runtime_checkable
class Scheduler(Protocol):
    """Submit, watch and cancel batch jobs. Implemented by SlurmClient and LocalScheduler."""

    #: ``slurm`` or ``local``, for messages.
    name: str

    @property
    def transport(self) -> Transport:
        """Where the jobs' files (output, work dirs) can be read."""
        ...

    def submit(
        self,
        script_text: str,
        *,
        sbatch_args: Sequence[str] = (),
        workdir: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> str:
        """Submit a job script given as text; return its job id."""
        ...

    def states(self, job_ids: Iterable[str]) -> dict[str, JobInfo]:
        """The current info of each id (UNKNOWN where it cannot be told), in as few queries as possible."""
        ...

    def info(self, job_id: str) -> JobInfo:
        """The current info of one job."""
        ...

    def cancel(self, job_id: str, *, signal: str | None = None, batch_only: bool = False) -> None:
        """End a job (or only signal it); a job that has already ended is not an error."""
        ...

    def wait(
        self,
        job_ids: Iterable[str],
        *,
        timeout: float | None = None,
        poll: float = 0.1,
        max_poll: float = 15.0,
        on_update: UpdateCallback | None = None,
    ) -> dict[str, JobInfo]:
        """Block until every job has ended; raise WaitTimeout at the deadline."""
        ...

    def output_path(self, job_id: str) -> str:
        """The job's standard output file, with ``%j`` and friends expanded."""
        ...

    def jobs(self, name_prefix: str | None = None, user: str | None = None) -> list[JobInfo]:
        """The user's jobs, optionally only those whose name starts with ``name_prefix``."""
        ...


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: ``initial``, doubling up to ``maximum``, each +-``jitter``."""

    initial: float = 0.2
    maximum: float = 15.0
    factor: float = 2.0
    jitter: float = 0.2  # a fraction of the delay, so many clients do not poll in lockstep

    def delays(self, rng: Callable[[], float] = random.random) -> Iterator[float]:
        """An endless series of delays in seconds."""
        delay = self.initial
        while True:
            yield max(0.0, delay * (1.0 + self.jitter * (2.0 * rng() - 1.0)))
            delay = min(delay * self.factor, self.maximum)


def wait_for(
    states: Callable[[list[str]], Mapping[str, JobInfo]],
    job_ids: Iterable[str],
    *,
    timeout: float | None = None,
    poll: float = 0.2,
    max_poll: float = 15.0,
    on_update: UpdateCallback | None = None,
    what: str = "job",
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    rng: Callable[[], float] = random.random,
) -> dict[str, JobInfo]:
    """Poll ``states`` (one batched query per round) until every id is terminal or the deadline passes.

    UNKNOWN is never terminal: a controller that does not answer means "keep waiting", not "failed".
    """
    ids = list(dict.fromkeys(job_ids))
    last: dict[str, JobInfo] = {}
    start = clock()
    deadline = None if timeout is None else start + timeout
    delays = Backoff(initial=poll, maximum=max(max_poll, poll), factor=1.5).delays(rng)
    while True:
        waiting = [job_id for job_id in ids if job_id not in last or not last[job_id].is_terminal]
        if not waiting:
            return {job_id: last[job_id] for job_id in ids}
        current = states(waiting)
        for job_id in waiting:
            info = current.get(job_id)
            if info is None:
                continue
            before = last.get(job_id)
            last[job_id] = info
            if on_update is not None and (
                before is None or (before.state, before.reason) != (info.state, info.reason)
            ):
                on_update(info)
        waiting = [job_id for job_id in ids if job_id not in last or not last[job_id].is_terminal]
        if not waiting:
            return {job_id: last[job_id] for job_id in ids}
        now = clock()
        if deadline is not None and now >= deadline:
            raise _timeout_error(what, ids, waiting, last, now - start)
        delay = next(delays)
        if deadline is not None:
            delay = min(delay, max(0.0, deadline - now))
        sleep(delay)


def _timeout_error(
    what: str, ids: list[str], waiting: list[str], last: Mapping[str, JobInfo], waited: float
) -> WaitTimeout:
    shown = ", ".join(last[j].describe() if j in last else f"{j} (no answer yet)" for j in waiting[:5])
    if len(waiting) > 5:
        shown += f", and {len(waiting) - 5} more"
    count = f"{len(waiting)} of {len(ids)} {what}s" if len(ids) > 1 else f"{what} {waiting[0]}"
    return WaitTimeout(
        f"{count} still not finished after {waited:.0f} s: {shown}",
        hint="wait longer (--timeout), or look at the job with `squeue -j` / its output file",
    )
