"""``hpclaunch status``: a table of job states, or JSON."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime
from enum import Enum
from typing import Any

import click

from ..console import say
from ..errors import JobNotFound
from ..params import format_time
from .context import AppContext

NO_ACTIVE_JOBS = "no active jobs (--all shows the ones that ended recently)"


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    return value


@click.command(
    "status",
    epilog="Examples:\n\n  hpclaunch status\n\n  hpclaunch status --all\n\n"
    "  hpclaunch status 1234 1235 --json",
)
@click.argument("job_ids", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "-a", "--all", "show_all", is_flag=True, help="Also the jobs that ended recently (after the active ones)."
)
@click.pass_obj
def command(app: AppContext, job_ids: tuple[str, ...], as_json: bool, show_all: bool) -> None:
    """Show the state of JOB_IDS (one scheduler call), or of your active jobs, by id."""
    cluster = app.cluster()
    unknown: list[str] = []
    if job_ids:
        found = cluster.states(list(job_ids))
        unknown = [j for j, info in found.items() if info.not_found and not cluster.job(j).recorded]
        infos = [info for job_id, info in found.items() if job_id not in unknown]
    else:
        infos = [info for job in cluster.jobs(finished=show_all) if (info := job.last_info) is not None]
    if as_json:
        records = [
            {**{k: _plain(v) for k, v in asdict(i).items()}, "cannot_start": i.cannot_start} for i in infos
        ]
        click.echo(json.dumps(records, indent=2))
        _refuse_unknown(unknown)
        return
    if not infos and not unknown:
        say("no recent jobs" if show_all else NO_ACTIVE_JOBS)
        return
    if not infos:
        _refuse_unknown(unknown)
    rows = [("JOBID", "STATE", "NAME", "NODES/REASON", "ELAPSED")]
    stuck = []
    for info in infos:
        where = info.node_list or (info.reason or "")
        if info.cannot_start:
            where += " (can never start)"
            stuck.append(info)
        elapsed = format_time(info.elapsed) if info.elapsed is not None else ""
        rows.append((info.job_id, info.state.value, info.name or "", where, elapsed))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    for info in stuck:
        say(f"job {info.job_id} can never start as asked ({info.reason}): {info.cannot_start}")
    _refuse_unknown(unknown)


def _refuse_unknown(unknown: list[str]) -> None:
    if unknown:
        raise JobNotFound(
            f"no such job: {', '.join(unknown)} (not known to Slurm, nor submitted by hpclaunch from here)",
            hint="check the id; `hpclaunch status` lists your active jobs",
        )
