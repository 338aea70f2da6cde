"""Following a job to its end: shared by ``submit --follow`` and ``logs -f``."""

from __future__ import annotations

import sys

from ..cluster import Job
from ..console import say
from ..errors import JobFailed


def follow_job(job: Job, *, stream: bool = True) -> None:
    """Print the job's output as it grows (or just wait), then report how it ended.

    Raises JobFailed when the job did not complete, so the exit code tells scripts.
    """
    if stream:
        for chunk in job.follow():
            sys.stdout.write(chunk)
            sys.stdout.flush()
        info = job.info()
    else:
        info = job.wait()
    if info.state.value != "COMPLETED":
        raise JobFailed(f"job {info.describe()}")
    say(f"job {info.describe()}")
