"""``hpclaunch logs``: a job's output."""

from __future__ import annotations

import sys

import click

from ..console import say
from ..states import Phase
from .context import AppContext
from .follow import follow_job


@click.command("logs", epilog="Examples:\n\n  hpclaunch logs 1234\n\n  hpclaunch logs -f 1234")
@click.argument("job_id")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output until the job ends.")
@click.pass_obj
def command(app: AppContext, job_id: str, follow: bool) -> None:
    """Print the output of JOB_ID."""
    job = app.cluster().job(job_id)
    info = job.info()
    job.ensure_known(info)
    if info.state.phase is Phase.PENDING:
        say(f"job {job.id} is pending ({info.reason or 'no reason given'}); no output yet")
    if follow:
        follow_job(job, stream=True)
    else:
        sys.stdout.write(job.logs())
