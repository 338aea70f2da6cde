"""``hpclaunch check``: would this request run, and when? Nothing is queued."""

from __future__ import annotations

from typing import Any

import click

from .context import AppContext
from .options import given, job_options, parse_sets, set_option


@click.command(
    "check",
    epilog="""\b
Examples:
  hpclaunch check --nodes 2 --time 4h              # the plain `run` template
  hpclaunch check jupyter --gpus 1 --time 2h
  hpclaunch check ./my-job.sbatch --partition gpu
Exit status 0: it can run (the estimated start is printed); 4: it can never run as asked (the line
says what to change).
""",
)
@click.argument("template_or_script", default="run")
@click.argument("command", nargs=-1)
@job_options()
@set_option
@click.pass_obj
def command(
    app: AppContext,
    /,
    template_or_script: str,
    command: tuple[str, ...],
    variables: tuple[str, ...],
    **values: Any,
) -> None:
    """Ask Slurm whether TEMPLATE_OR_SCRIPT with these options could run, and when it would start.

    One `sbatch --test-only` with the very script that would be submitted, after a check of the
    partition's limits (which Slurm itself only applies once the job pends).
    """
    cluster = app.cluster()
    if template_or_script == "run" and not command:
        command = ("true",)  # the resources are what is checked; the command does not matter
    verdict = cluster.check(
        template_or_script, command=command, variables=parse_sets(variables), **given(values)
    )
    click.echo(f"ok: {verdict.describe()}")
