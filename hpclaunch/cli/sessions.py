"""``hpclaunch sessions`` and ``stop``: what hpclaunch keeps running for you (notebooks from ``jupyter``,
allocations from ``code``), listed and ended by job id."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from ..console import say
from .context import AppContext

if TYPE_CHECKING:
    from ..job import Job

NOTEBOOK = "notebook"
CODE = "code"


def _kind(job: Job, entries: set[str]) -> str | None:
    """A notebook, a VS Code allocation (by its default job name, or the Host entry it holds), or None."""
    from ..jupyter.session import JOB_PREFIX as NOTEBOOK_PREFIX
    from ..node.hold import JOB_PREFIX as CODE_PREFIX

    name = job.name or ""
    if name.startswith(CODE_PREFIX) or job.id in entries:
        return CODE
    if name.startswith(NOTEBOOK_PREFIX):
        return NOTEBOOK
    return None


@click.command("sessions")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def command(app_ctx: AppContext, as_json: bool) -> None:
    """List your running notebooks and VS Code allocations (from Slurm and this machine's records).

    Records of notebooks that have ended are removed on the way.
    """
    import json

    from ..jupyter import records
    from ..jupyter.session import forget_ended
    from ..node import sshentry

    cluster = app_ctx.cluster()
    everything = cluster.jobs()  # all of them: a session may have been given another --job-name
    entries = set(sshentry.job_ids())
    known = {r["job_id"]: r for r in records.load() if r.get("profile") == cluster.profile.name}
    forget_ended(cluster, everything)  # ended notebooks: their run directories and records go
    # Entries are not per profile (job ids of two clusters can collide): only list, never remove, here.
    live = {job.id for job in everything if job.last_info is None or not job.last_info.is_terminal}
    rows: list[dict[str, Any]] = []
    for job in everything:
        kind = _kind(job, entries)
        if kind is None or job.id not in live:
            continue
        info = job.last_info
        record = known.get(job.id, {})
        rows.append(
            {
                "job_id": job.id,
                "kind": kind,
                "state": info.state.value if info else "?",
                "node": (info.node_list if info else None) or record.get("node"),
                "host_entry": sshentry.alias(job.id) if job.id in entries else None,
                "started_here": bool(record) or job.id in entries,
                "run_dir": record.get("run_dir") or (info.work_dir if info else None),
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        say("no running sessions; start one with: hpclaunch jupyter, or hpclaunch code")
        return
    for row in rows:
        where = (
            f"ssh {row['host_entry']}"
            if row["host_entry"]
            else ("(started here)" if row["started_here"] else "")
        )
        click.echo(
            f"{row['job_id']:>10}  {row['kind']:<9} {row['state']:<10} {row['node'] or '-':<12} {where}"
        )


@click.command("stop", epilog="Example:\n\n  hpclaunch stop 1234")
@click.argument("job_ids", nargs=-1, required=True)
@click.pass_obj
def stop(app_ctx: AppContext, job_ids: tuple[str, ...]) -> None:
    """End the sessions JOB_IDS: notebooks (job and run directory) and VS Code allocations (job and
    Host entry)."""
    from ..jupyter.session import stop as stop_notebook
    from ..node import hold, sshentry

    cluster = app_ctx.cluster()
    for job_id in job_ids:
        sshentry.check_job_id(job_id)
        if sshentry.has_entry(job_id):
            ended = hold.stop(cluster, job_id)
            state = f"job {job_id} {ended.already_ended()}" if ended else f"stopped job {job_id}"
            say(f"{state}; removed Host {sshentry.alias(job_id)}")
        else:
            ended = stop_notebook(cluster, job_id)
            say(
                f"notebook job {job_id} {ended.already_ended()}"
                if ended
                else f"stopped notebook job {job_id}"
            )
