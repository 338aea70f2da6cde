"""``hpclaunch clean``: free the work directory of finished runs (home quotas count files and bytes)."""

from __future__ import annotations

import click

from ..console import say
from ..errors import ParameterError
from ..params import parse_time
from .context import AppContext


def _age(ctx: click.Context, param: click.Parameter, value: str | None) -> float:
    if value is None:
        return 0.0
    try:
        return float(parse_time(value))
    except ValueError:
        raise ParameterError(
            f"--older-than: {value!r} is not an age", hint="e.g. 7d, 12h, 90m, 30s"
        ) from None


def _size(n: int) -> str:
    amount = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024 or unit == "GiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    raise AssertionError("unreachable")


@click.command(
    "clean",
    epilog="""\b
Examples:
  hpclaunch clean --dry-run               # list what would go
  hpclaunch clean --older-than 7d
  hpclaunch clean --results               # training runs' metrics, plots and checkpoints too
""",
)
@click.option(
    "--older-than",
    callback=_age,
    metavar="AGE",
    help="Only runs untouched for this long, e.g. 7d, 12h, 90m. [default: any age]",
)
@click.option("--dry-run", "-n", is_flag=True, help="List what would be removed; remove nothing.")
@click.option("--results", is_flag=True, help="Remove finished training runs (their results) too.")
@click.pass_obj
def command(app: AppContext, older_than: float, dry_run: bool, results: bool) -> None:
    """Remove the run directories of finished notebook and plain jobs under the profile's workdir.

    A directory a pending or running job works in is never touched; training results are kept unless
    --results. Prints each directory removed (or, with --dry-run, to be removed) on stdout.
    """
    cluster = app.cluster()
    plan = cluster.clean(older_than=older_than, results=results, dry_run=dry_run)
    for d in plan.remove:
        click.echo(d.path)
    verb = "would free" if dry_run else "freed"
    say(
        f"{verb} {len(plan.remove)} run directories: {plan.files} files, {_size(plan.bytes)}"
        f" (kept: {len(plan.live)} of queued jobs, {len(plan.results)} training results"
        + ("" if results else " (--results removes them)")
        + f", {len(plan.recent)} too recent)"
    )
