"""``hpclaunch cancel``."""

from __future__ import annotations

import click

from ..console import say
from ..errors import JobNotFound
from .context import AppContext


@click.command("cancel", epilog="Example:\n\n  hpclaunch cancel 1234 1235")
@click.argument("job_ids", nargs=-1, required=True)
@click.pass_obj
def command(app: AppContext, job_ids: tuple[str, ...]) -> None:
    """Cancel the jobs JOB_IDS."""
    cluster = app.cluster()
    jobs = [cluster.job(job_id) for job_id in job_ids]  # every id checked before any is cancelled
    unknown: list[str] = []
    already_ended = 0
    for job in jobs:
        try:
            ended = job.cancel_unless_ended()
        except JobNotFound:
            unknown.append(job.id)
            continue
        already_ended += ended is not None
        say(f"job {job.id} {ended.already_ended()}" if ended else f"cancelled job {job.id}")
    if unknown:
        others = ""
        if len(unknown) < len(jobs):
            others = " (the others were cancelled)" if not already_ended else " (the others are ended)"
        raise JobNotFound(
            f"no such job: {', '.join(unknown)}{others}", hint="check the ids with `hpclaunch status`"
        )
