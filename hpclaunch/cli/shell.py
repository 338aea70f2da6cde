"""``hpclaunch shell``: a shell, or a command, as a step of a running job."""

from __future__ import annotations

import sys

import click

from .context import AppContext


@click.command(
    "shell",
    epilog="""\b
Examples:
  hpclaunch shell 1234                     # an interactive shell on the job's node
  hpclaunch shell 1234 -- nvidia-smi       # one command; its exit status is ours
""",
)
@click.argument("job_id")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def command(app: AppContext, job_id: str, command: tuple[str, ...]) -> None:
    """Run a shell (or COMMAND) inside the running job JOB_ID, on its first node.

    At a terminal it gets a real one (resizes, Ctrl-C to the remote program); in a script COMMAND runs
    without one and its output and exit status come back.
    """
    from ..node import shell as nshell
    from ..node import target as ntarget

    words = nshell.check_command(command)
    cluster = app.cluster()
    target = ntarget.running(cluster, job_id)
    pty = sys.stdin.isatty() and sys.stdout.isatty()
    code = nshell.run_in_job(cluster.transport, target, words, pty=pty)
    if code:
        # The remote status is ours (a signal's death is 128+N as shells report it; -1: none came).
        click.get_current_context().exit(code if 0 < code < 256 else 1)
