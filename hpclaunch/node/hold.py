"""A job that only holds an allocation, for VS Code (``hpclaunch code``) and other tools that join it.

:func:`start` submits and waits until it runs; :meth:`Hold.serve` writes the ssh entry, keeps it
until Ctrl-C (TERM/HUP in the CLI) or the job's end, then removes the entry and ends the job.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import NodeAccess
from ..console import no_interrupts
from ..errors import CannotRun, HpclaunchError, JobNotFound, NodeAccessError, WaitTimeout
from ..polling import Backoff, Poller, StartWatch
from ..states import JobInfo, JobState, Phase
from . import access, sshentry
from .target import NodeTarget, running, while_running

if TYPE_CHECKING:
    from ..job import Job
    from ..submission import Submitter

JOB_PREFIX = "hpclaunch-code"
Status = Callable[[str], None]


def start(
    cluster: Submitter,
    params: dict[str, Any],
    *,
    status: Status = lambda _msg: None,
    queue_timeout: float | None = None,
) -> Job:
    """Submit the holding job and wait until it runs; cancelled again on any failure or Ctrl-C."""
    job_params = cluster.resolve_job(params, default_name=JOB_PREFIX)
    job = cluster.submit_prepared(cluster.prepare("hold", job_params))
    status(f"submitted job {job.id}")
    with job.cancelled_on_failure():
        wait_running(job, status=status, queue_timeout=queue_timeout)
    return job


def wait_running(job: Job, *, status: Status, queue_timeout: float | None = None) -> JobInfo:
    """Poll (with backoff) until the job runs; an error when it ends first or can never start."""
    watch = StartWatch()
    for waited in Poller(Backoff(initial=0.2, maximum=5.0, factor=1.5)):
        info = job.info()
        if info.phase is Phase.RUNNING and info.node_list:
            return info
        if info.is_terminal:
            raise NodeAccessError(f"job {info.describe()} ended before it ran", details=job.log_tail())
        if watch.cannot_start(info) is not None:
            raise CannotRun(f"job {job.id} can never start as asked ({info.reason}): {info.cannot_start}")
        if queue_timeout is not None and waited > queue_timeout:
            raise WaitTimeout(f"job {job.id} still pending after {queue_timeout:.0f} s ({info.reason})")
        status(info.describe())
    raise AssertionError("unreachable: the poller has no deadline")


@dataclass
class Hold:
    """A running holding job reachable as ``Host hpclaunch-JOB``."""

    cluster: Submitter
    job: Job
    path: str = "~"
    mode: NodeAccess | None = None
    global_options: Sequence[str] = ()
    target: NodeTarget | None = field(default=None, init=False)

    @property
    def alias(self) -> str:
        return sshentry.alias(self.job.id)

    @property
    def remote_path(self) -> str:
        return self.cluster.transport.expand(self.path)

    @property
    def code_argv(self) -> list[str]:
        """The VS Code command that opens the folder on the node."""
        return ["code", "--remote", f"ssh-remote+{self.alias}", self.remote_path]

    def serve(
        self,
        *,
        on_ready: Callable[[Hold], None] | None = None,
        keep: bool = False,
        idle_timeout: float = 0,
        every: float = 5.0,
    ) -> str:
        """Write the entry, call ``on_ready``, wait for Ctrl-C, the job's end or ``idle_timeout``
        seconds with no tool in the job; then remove the entry and cancel the job, except that
        ``keep`` leaves both after Ctrl-C (for ``hpclaunch stop``). Returns why it ended (``"stopped"``,
        ``"kept"``, ``"idle"``); raises NodeAccessError when the job ended by itself."""
        ended: JobInfo | None = None
        why = "stopped"
        try:  # from the first line on: a Ctrl-C anywhere here still cleans up
            self.target = running(self.cluster, self.job.id)
            access.grant(self.cluster, self.target, global_options=self.global_options, mode=self.mode)
            if on_ready is not None:
                on_ready(self)
            if idle_timeout > 0:
                ended = self._watch_activity(idle_timeout, every)
                why = "idle" if ended is None else why
            else:
                ended = while_running(self.cluster, self.job.id, every=every)
        except KeyboardInterrupt:
            why = "kept" if keep else why
        finally:
            with no_interrupts():
                if why != "kept":
                    with contextlib.suppress(HpclaunchError, OSError):
                        access.revoke(self.cluster, self.job.id)
                    if ended is None:
                        with contextlib.suppress(HpclaunchError):
                            self.job.cancel()
        if ended is not None:
            raise NodeAccessError(f"job {ended.describe()} ended; removed Host {self.alias}")
        return why

    def _watch_activity(self, idle_timeout: float, every: float) -> JobInfo | None:
        """Block while the job runs and a tool (an ssh session, a shell: each a job step) joined it
        within the last ``idle_timeout`` seconds; the job's info if it ended, None once idle."""
        scheduler = self.cluster.scheduler
        last_active = time.monotonic()
        for _ in Poller(Backoff(every, every, jitter=0.1)):
            try:
                info = self.job.info()
                steps = scheduler.tool_steps(self.job.id)
            except JobNotFound:
                return JobInfo(job_id=self.job.id, state=JobState.UNKNOWN, source="gone")
            except HpclaunchError:
                last_active = time.monotonic()  # cannot tell: count it as use, never end on a guess
                continue
            if info.is_terminal:
                return info
            now = time.monotonic()
            if steps:
                last_active = now
            elif now - last_active >= idle_timeout:
                return None
        raise AssertionError("unreachable: the poller has no deadline")


def stop(cluster: Submitter, job_id: str) -> JobInfo | None:
    """End a kept holding job: remove its entry (and server files), cancel it unless it has ended.
    The ended job's info, or None when it was cancelled."""
    access.revoke(cluster, job_id)
    return cluster.job(job_id).cancel_unless_ended()
