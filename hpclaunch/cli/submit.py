"""``hpclaunch submit``: submit a template or a job script."""

from __future__ import annotations

from typing import Any

import click

from ..console import say
from .context import AppContext
from .follow import follow_job
from .options import given, job_options, parse_sets, preflight_option, set_option, use_preflight


@click.command(
    "submit",
    epilog="""\b
Examples:
  hpclaunch submit run --gpus 1 --time 30m -- python train.py
  hpclaunch submit run --nodes 2 -- srun hostname
  hpclaunch submit ./my-job.sbatch --partition gpu     # your own script; flags override its #SBATCH lines
  hpclaunch submit run --follow -- python -c 'print(42)'
""",
)
@click.argument("template_or_script")
@click.argument("command", nargs=-1)
@job_options()
@set_option
@click.option("--follow", "-f", is_flag=True, help="Stream the job's output until it ends.")
@click.option("--wait", is_flag=True, help="Wait until the job ends; exit non-zero if it failed.")
@click.option(
    "--keep", is_flag=True, help="With --follow/--wait: Ctrl-C stops waiting but leaves the job running."
)
@preflight_option
@click.pass_obj
def command(
    app: AppContext,
    /,
    template_or_script: str,
    command: tuple[str, ...],
    variables: tuple[str, ...],
    follow: bool,
    wait: bool,
    keep: bool,
    preflight: bool,
    **values: Any,
) -> None:
    """Submit TEMPLATE_OR_SCRIPT: a template name (see `hpclaunch templates`) or a script file.

    Prints the job id on stdout.
    """
    cluster = app.cluster()
    use_preflight(cluster, preflight)
    job = cluster.submit(
        template_or_script, command=command, variables=parse_sets(variables), **given(values)
    )
    click.echo(job.id)
    where = f" (run directory {job.run_dir})" if job.run_dir else ""
    say(f"submitted job {job.id}{where}")
    if follow or wait:
        follow_job(job, stream=follow, owner=not keep)
