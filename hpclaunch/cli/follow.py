"""Following a job to its end: shared by ``submit --follow``, ``train --follow`` and ``logs -f``."""

from __future__ import annotations

import contextlib
import sys

from ..console import no_interrupts, say
from ..errors import HpclaunchError, JobFailed
from ..job import Job

LOG_TAIL_LINES = 15


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
            info = job.wait()
    except KeyboardInterrupt:
        if owner:
            with no_interrupts(), contextlib.suppress(HpclaunchError):
                job.cancel()
            say(f"\ncancelled job {job.id} (use --keep to leave it running)")
        else:
            say(f"\nstopped following; job {job.id} keeps running")
        raise
    if info.state.value != "COMPLETED":
        # The streamed log is already on screen; after a silent wait, show its end.
        raise JobFailed(f"job {info.describe()}", details=None if stream else log_tail(job))
    say(f"job {info.describe()}")


def log_tail(job: Job, lines: int = LOG_TAIL_LINES, *, token: str | None = None) -> str | None:
    """The last lines of a job's output, for an error report, with ``token`` (a secret) masked;
    None when it cannot be read."""
    from ..jupyter.token import redact

    try:
        text = job.logs()
    except HpclaunchError:
        return None
    tail = [redact(line, token) for line in text.splitlines() if line.strip()][-lines:]
    return "last lines of the job's log:\n" + ("\n".join("  " + t for t in tail) if tail else "  (empty)")
