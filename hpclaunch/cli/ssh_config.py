"""``hpclaunch ssh-config`` and ``hpclaunch proxy``: any SSH client (VS Code) on a job's node."""

from __future__ import annotations

import os
import signal
import sys

import click

from ..console import say
from .context import AppContext

ACCESS_OPTION = click.option(
    "--access",
    type=click.Choice(["step", "jump"]),
    default=None,
    envvar="HPCLAUNCH_NODE_ACCESS",
    show_envvar=True,
    help="step: an sshd of your own as a job step (no port on the node); jump: the node's own sshd "
    "through the login host. [default: the profile's node_access, else step]",
)
YES_OPTION = click.option(
    "--yes", "-y", is_flag=True, help="Add the Include line to ~/.ssh/config without asking."
)


def ensure_include(yes: bool) -> None:
    """One ``Include`` line in ``~/.ssh/config``, only with consent (a prompt, or --yes); never silently."""
    from ..node import sshentry

    where = sshentry.paths()
    if sshentry.include_present(where):
        return
    question = (
        f"Add `{where.include_line}` at the top of {where.user_config} so that ssh, scp and VS Code "
        "find hpclaunch's hosts?"
    )
    if yes or (sys.stdin.isatty() and click.confirm(question, default=True, err=True)):
        sshentry.add_include(where)
        say(f"added `{where.include_line}` to {where.user_config}")
    else:
        say(
            f"{where.user_config} does not include {where.config}: use `ssh -F {where.config} HOST`, "
            f"or add `{where.include_line}` at its top (or rerun with --yes)"
        )


def show_entry(job_id: str) -> None:
    from ..node import sshentry

    where = sshentry.paths()
    say(f"wrote Host {sshentry.alias(job_id)} to {where.config}; try: ssh {sshentry.alias(job_id)} hostname")


@click.command(
    "ssh-config",
    epilog="""\b
Examples:
  hpclaunch ssh-config 1234          # then: ssh hpclaunch-1234, or VS Code "Connect to Host"
  hpclaunch ssh-config 1234 --remove
""",
)
@click.argument("job_id")
@click.option("--remove", is_flag=True, help="Remove the job's entry (and its server files).")
@ACCESS_OPTION
@YES_OPTION
@click.pass_obj
def command(app: AppContext, job_id: str, remove: bool, access: str | None, yes: bool) -> None:
    """Write a `Host hpclaunch-JOB_ID` entry so any SSH client reaches the node of the running job."""
    from ..config import NodeAccess
    from ..node import access as naccess
    from ..node import sshentry
    from ..node import target as ntarget

    job_id = sshentry.check_job_id(job_id)
    cluster = app.cluster()
    if remove:
        found = naccess.revoke(cluster, job_id)
        name = sshentry.alias(job_id)
        say(f"removed Host {name}" if found else f"no Host {name} to remove")
        return
    target = ntarget.running(cluster, job_id)
    mode = NodeAccess(access) if access else None
    naccess.grant(cluster, target, global_options=app.global_argv(), mode=mode)
    click.echo(sshentry.alias(job_id))
    show_entry(job_id)
    ensure_include(yes)


@click.command("proxy")
@click.argument("job_id")
@click.pass_obj
def proxy(app: AppContext, job_id: str) -> None:
    """Relay stdin/stdout to the SSH server of job JOB_ID (the ProxyCommand of its ssh-config entry)."""
    from ..node import sshentry, stepsshd
    from ..node import target as ntarget

    job_id = sshentry.check_job_id(job_id)
    cluster = app.cluster()
    target = ntarget.running(cluster, job_id)
    argv = stepsshd.proxy_argv(cluster, target)
    # ssh ends its ProxyCommand with a signal once the session is over. Nothing here needs cleaning
    # up, and a KeyboardInterrupt raised inside paramiko (holding its locks) can hang the exit: leave
    # at once; the closed connection ends the step on the far side.
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _leave)
    code = cluster.transport.run_attached(argv, tty=False)
    if code:
        click.get_current_context().exit(code if 0 < code < 256 else 1)


def _leave(_signum: int, _frame: object) -> None:
    os._exit(0)
