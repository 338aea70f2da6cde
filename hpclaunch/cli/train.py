"""``hpclaunch train`` and ``hpclaunch fetch``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..console import say
from .context import AppContext
from .follow import follow_job
from .options import given, job_options, preflight_option, use_preflight


@click.command(
    "train",
    epilog="""\b
Examples:
  hpclaunch train mnist_lenet5 --gpus 1 --time 30m --follow -- --data-dir ~/data/mnist --epochs 5
  hpclaunch train cifar10_resnet --nodes 2 --gpus 4 -- --data-dir /scratch/cifar-10-batches-py
  hpclaunch train ./my_train.py --gpus 2 -- --lr 0.1
Arguments after `--` go to the training script.
""",
)
@click.argument("job")
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED)
@job_options()
@click.option(
    "--python",
    default=None,
    envvar="HPCLAUNCH_PYTHON",
    show_envvar=True,
    help="Python interpreter on the nodes [default: python3 after the profile's setup lines; "
    "this Python for the local profile].",
)
@click.option(
    "--max-requeues",
    type=click.IntRange(0),
    default=3,
    envvar="HPCLAUNCH_MAX_REQUEUES",
    show_envvar=True,
    help="How often a run may checkpoint and requeue itself at the time limit.",
)
@click.option(
    "--signal-lead",
    type=click.IntRange(10),
    default=90,
    envvar="HPCLAUNCH_SIGNAL_LEAD",
    show_envvar=True,
    help="Seconds before the time limit at which Slurm warns the job.",
)
@click.option("--follow", "-f", is_flag=True, help="Stream the log until the run ends.")
@click.option("--keep", is_flag=True, help="With --follow: Ctrl-C stops following but leaves the run going.")
@preflight_option
@click.pass_obj
def command(
    app: AppContext,
    /,
    job: str,
    script_args: tuple[str, ...],
    python: str | None,
    max_requeues: int,
    signal_lead: int,
    follow: bool,
    keep: bool,
    preflight: bool,
    **values: Any,
) -> None:
    """Train JOB (a bundled job: mnist_lenet5, cifar10_resnet; or a path to your .py) on the allocated GPUs.

    The code is staged into a new run directory on the cluster; results (metrics.csv, plot.png,
    checkpoints) land there: bring them back with `hpclaunch fetch JOBID`.
    """
    from ..train import TrainOptions, submit

    cluster = app.cluster()
    use_preflight(cluster, preflight)
    options = TrainOptions(python=python, signal_lead=signal_lead, max_requeues=max_requeues)
    run = submit(cluster, job, script_args, given(values), options)
    click.echo(run.id)
    say(f"submitted training job {run.id} (run directory {run.run_dir})")
    if follow:
        follow_job(run, stream=True, owner=not keep)


@click.command("fetch", epilog="Example:\n\n  hpclaunch fetch 1234 ./results")
@click.argument("job_id")
@click.argument("dest", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.pass_obj
def fetch(app: AppContext, job_id: str, dest: Path | None) -> None:
    """Copy the metrics, plot, checkpoint and log of training job JOB_ID into DEST (default ./JOB_ID)."""
    from ..train import fetch as fetch_results

    cluster = app.cluster()
    for path in fetch_results(cluster, cluster.job(job_id), dest or Path(job_id)):
        click.echo(str(path))
