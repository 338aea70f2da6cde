"""``hpclaunch render``: print a rendered job script."""

from __future__ import annotations

from typing import Any

import click

from .context import AppContext
from .options import given, job_options, parse_sets, set_option


@click.command(
    "render",
    epilog="""\b
Examples:
  hpclaunch render run -- python train.py --epochs 3
  hpclaunch render run --gpus 2 --time 4h --partition gpu -- nvidia-smi
  hpclaunch --template-dir ~/my-templates render mytemplate --set dataset=/scratch/data
""",
)
@click.argument("template")
@click.argument("command", nargs=-1)
@job_options()
@set_option
@click.option(
    "--run-dir", metavar="DIR", help="Run directory to render with (default: a new one under the workdir)."
)
@click.pass_obj
def command(
    app: AppContext,
    /,
    template: str,
    command: tuple[str, ...],
    variables: tuple[str, ...],
    run_dir: str | None,
    **values: Any,
) -> None:
    """Print the job script TEMPLATE renders to; nothing is submitted.

    Arguments after TEMPLATE (put them after `--`) are the command the `run` template runs.
    """
    cluster = app.cluster()
    script = cluster.render(
        template, command=command, variables=parse_sets(variables), run_dir=run_dir, **given(values)
    )
    click.echo(script, nl=False)
