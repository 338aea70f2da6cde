"""The one way hpclaunch waits: a deadline and exponential backoff with jitter.

Every wait in the library (the queue, a job's log, a notebook's server, the tunnel's first answer,
the serve loop) is a ``for`` over a :class:`Poller`, so none can spin, sleep a fixed time or hang.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from hpclaunch.errors import JobNotFound, WaitTimeout
from hpclaunch.states import JobInfo

#: Called with a job's new info whenever its state, reason or estimated start changes during a wait.
UpdateCallback = Callable[[JobInfo], None]

#: How long a passing reason (``states.PASSING_REASONS``) must last before a wait calls it final.
PASSING_REASON_S = 30.0


class StartWatch:
    """One wait's view of when a pending job can never start: at once for a reason that cannot clear,
    after ``grace`` seconds of the same answer for one that can also pass (nodes that a restarted
    controller has not heard from yet look exactly like drained ones)."""

    def __init__(self, grace: float = PASSING_REASON_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.grace, self._clock = grace, clock
        self._since: dict[str, float] = {}

    def cannot_start(self, info: JobInfo) -> str | None:
        """What to change, once it is final; None while the job may still start."""
        advice = info.cannot_start
        if advice is None or not info.may_pass:
            self._since.pop(info.job_id, None)
            return advice
        first = self._since.setdefault(info.job_id, self._clock())
        return advice if self._clock() - first >= self.grace else None

    def settled(self, info: JobInfo) -> bool:
        """Nothing more will happen by waiting: ended, or pending for a reason that is final."""
        return info.is_terminal or self.cannot_start(info) is not None


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: ``initial``, growing by ``factor`` up to ``maximum``, each
    +-``jitter``."""

    initial: float = 0.2
    maximum: float = 15.0
    factor: float = 2.0
    jitter: float = 0.2  # a fraction of the delay, so many clients do not poll in lockstep

    def delays(self, rng: Callable[[], float] = random.random) -> Iterator[float]:
        """An endless series of delays in seconds."""
        delay = self.initial
        while True:
            yield max(0.0, delay * (1.0 + self.jitter * (2.0 * rng() - 1.0)))
            delay = min(delay * self.factor, max(self.maximum, self.initial))


@dataclass(frozen=True)
class PollBudget:
    """How often a site lets clients ask the scheduler: every wait's first delay is at least
    ``minimum`` seconds and its backoff stops at ``maximum`` (a profile's ``poll_min``/``poll_max``).

    Waiting on any number of jobs is one batched query per interval, so the load a client puts on the
    controller does not grow with its jobs; the ceiling bounds it over a long wait (Slurm's own
    documentation warns against running squeue in tight loops from scripts).
    """

    minimum: float = 0.2
    maximum: float = 30.0

    def backoff(self, poll: float | None = None, max_poll: float | None = None) -> Backoff:
        """The backoff of one wait: the caller's wishes, within the budget."""
        first = max(self.minimum, poll if poll is not None else self.minimum)
        ceiling = min(self.maximum, max_poll if max_poll is not None else self.maximum)
        return Backoff(initial=min(first, ceiling), maximum=max(ceiling, min(first, ceiling)), factor=1.5)


class Poller:
    """Rounds of a wait: iterate, check, ``return``/``break`` when done.

    The first round starts at once; each later one after the next backoff delay (never past the
    deadline). When a round would start at or after the deadline, ``on_timeout(waited)`` is raised.
    ``progress()`` (something changed) starts the backoff again from its initial delay.

    >>> poller = Poller(Backoff(0.05, 1.0), timeout=30)  # doctest: +SKIP
    >>> for _ in poller:  # doctest: +SKIP
    ...     if ready():
    ...         break
    """

    def __init__(
        self,
        backoff: Backoff = Backoff(),
        *,
        timeout: float | None = None,
        on_timeout: Callable[[float], BaseException] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.backoff = backoff
        self.timeout = timeout
        self._on_timeout = on_timeout or (lambda waited: WaitTimeout(f"gave up after {waited:.0f} s"))
        self._sleep = sleep
        self._clock = clock
        self._rng = rng
        self._delays = backoff.delays(rng)
        self.start = clock()
        self.deadline = None if timeout is None else self.start + timeout

    @property
    def elapsed(self) -> float:
        return self._clock() - self.start

    def progress(self) -> None:
        """Something changed: poll again soon (the backoff restarts from its initial delay)."""
        self._delays = self.backoff.delays(self._rng)

    def __iter__(self) -> Iterator[float]:
        """Yields the seconds waited so far, once per round."""
        yield 0.0
        while True:
            now = self._clock()
            if self.deadline is not None and now >= self.deadline:
                raise self._on_timeout(now - self.start)
            delay = next(self._delays)
            if self.deadline is not None:
                delay = min(delay, max(0.0, self.deadline - now))
            self._sleep(delay)
            yield self._clock() - self.start


def wait_for(
    states: Callable[[list[str]], Mapping[str, JobInfo]],
    job_ids: Iterable[str],
    *,
    timeout: float | None = None,
    backoff: Backoff | None = None,
    on_update: UpdateCallback | None = None,
    what: str = "job",
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    rng: Callable[[], float] = random.random,
    unknown_grace: float | None = None,
) -> dict[str, JobInfo]:
    """Poll ``states`` (one batched query per round) until every id is settled (ended, or pending
    for a reason that cannot clear: see ``JobInfo.cannot_start``) or the deadline passes.

    UNKNOWN is never terminal: a controller that does not answer means "keep waiting", not "failed".
    An id that every source answered for and none knew (``JobInfo.not_found``) for ``unknown_grace``
    seconds raises JobNotFound (0: at once, for an id nobody submitted; None: never).
    """
    ids = list(dict.fromkeys(job_ids))
    last: dict[str, JobInfo] = {}
    first_missing: dict[str, float] = {}
    done: set[str] = set()
    watch = StartWatch(clock=clock)

    def waiting() -> list[str]:
        return [job_id for job_id in ids if job_id not in done]

    poller = Poller(
        backoff or PollBudget().backoff(),
        timeout=timeout,
        on_timeout=lambda waited: _timeout_error(what, ids, waiting(), last, waited),
        sleep=sleep,
        clock=clock,
        rng=rng,
    )
    for _ in poller:
        pending = waiting()
        if not pending:
            break
        current = states(pending)
        for job_id in pending:
            info = current.get(job_id)
            if info is None:
                continue
            now = clock()
            if not info.not_found:
                first_missing.pop(job_id, None)
            elif unknown_grace is not None and now - first_missing.setdefault(job_id, now) >= unknown_grace:
                raise JobNotFound(
                    f"no such job: {job_id} ({info.reason})",
                    hint="check the id with `hpclaunch status`",
                )
            before = last.get(job_id)
            last[job_id] = info
            if watch.settled(info):
                done.add(job_id)
            if on_update is not None and (before is None or _news(before) != _news(info)):
                on_update(info)
        if not waiting():
            break
    return {job_id: last[job_id] for job_id in ids}


def _news(info: JobInfo) -> tuple[object, ...]:
    """What a waiting user is told about when it changes (a refreshed estimate included)."""
    return info.state, info.reason, info.estimated_start


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
