"""``hpclaunch logs``: a job's output."""

from __future__ import annotations

import sys

import click

from .context import AppContext
from .follow import follow_job


@click.command("logs", epilog="Examples:\n\n  hpclaunch logs 1234\n\n  hpclaunch logs -f 1234")
@click.argument("job_id")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output until the job ends.")
@click.pass_obj
def command(app: AppContext, job_id: str, follow: bool) -> None:
    """Print the output of JOB_ID."""
    job = app.cluster().job(job_id)
    if follow:
        follow_job(job, stream=True)
    else:
        sys.stdout.write(job.logs())
