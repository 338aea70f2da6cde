"""Following a job to its end: shared by ``submit --follow``, ``train --follow`` and ``logs -f``."""

from __future__ import annotations

import contextlib
import sys

from ..console import StatusLine, no_interrupts, say
from ..errors import CannotRun, HpclaunchError, JobFailed
from ..job import Job


def follow_job(job: Job, *, stream: bool = True, owner: bool = False) -> None:
    """Print the job's output as it grows (or just wait), then report how it ended.

    ``owner``: this command submitted the job, so Ctrl-C cancels it (nothing is left behind).
    Raises JobFailed when the job did not complete, so the exit code tells scripts.
    """
    try:
        if stream:
            for chunk in job.follow():
                sys.stdout.write(chunk)
                sys.stdout.flush()
            info = job.info()
        else:
            with StatusLine() as line:
                # The end is said once, below, not also as the status line's last update.
                info = job.wait(
                    on_update=lambda news: (
                        None if news.state.is_terminal else line.update(news.waiting_line())
                    )
                )
    except KeyboardInterrupt:
        if owner:
            with no_interrupts(), contextlib.suppress(HpclaunchError):
                job.cancel()
            say(f"\ncancelled job {job.id} (use --keep to leave it running)")
        else:
            say(f"\nstopped following; job {job.id} keeps running")
        raise
    if info.cannot_start is not None:
        kept = not owner
        if owner:
            with no_interrupts(), contextlib.suppress(HpclaunchError):
                job.cancel()
        raise CannotRun(
            f"job {job.id} can never start as asked ({info.reason}): {info.cannot_start}",
            hint=f"job {job.id} is left pending (--keep)" if kept else f"job {job.id} is cancelled",
        )
    if info.not_found:  # a job of hpclaunch's records that Slurm has forgotten (else follow raised)
        say(f"job {job.id} ended long ago: Slurm no longer says how")
        return
    if info.state.value != "COMPLETED":
        # The streamed log is already on screen; after a silent wait, show its end.
        raise JobFailed(f"job {info.describe()}", details=None if stream else job.log_tail())
    say(f"job {info.describe()}")
