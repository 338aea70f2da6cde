"""``hpclaunch cancel``."""

from __future__ import annotations

import click

from ..console import say
from .context import AppContext


@click.command("cancel", epilog="Example:\n\n  hpclaunch cancel 1234 1235")
@click.argument("job_ids", nargs=-1, required=True)
@click.pass_obj
def command(app: AppContext, job_ids: tuple[str, ...]) -> None:
    """Cancel the jobs JOB_IDS."""
    cluster = app.cluster()
    jobs = [cluster.job(job_id) for job_id in job_ids]  # every id checked before any is cancelled
    for job in jobs:
        job.cancel()
        say(f"cancelled job {job.id}")
