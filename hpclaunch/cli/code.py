"""``hpclaunch code``: VS Code on a compute node, inside an allocation that this command holds."""

from __future__ import annotations

from typing import Any

import click

from ..console import StatusLine, say
from .context import AppContext
from .options import given, idle_timeout_option, job_options, preflight_option, use_preflight
from .ssh_config import ACCESS_OPTION, YES_OPTION, ensure_include


@click.command(
    "code",
    epilog="""\b
Examples:
  hpclaunch code --gpus 1 --time 4h --path ~/project --open
  hpclaunch code --no-browser        # print the `code --remote ...` command instead of running it
  hpclaunch code --idle-timeout 1800 # end the job 30 minutes after the last VS Code window closed
  hpclaunch code --keep              # Ctrl-C leaves job and entry; end them with `hpclaunch stop JOB`
""",
)
@job_options()
@click.option("--path", "path", default="~", show_default=True, help="Folder to open on the node.")
@click.option(
    "--open/--no-browser", "open_code", default=False, help="Run `code --remote ...` (VS Code on PATH)."
)
@idle_timeout_option("End the job after this many seconds with no session on the node (node_access = step)")
@click.option(
    "--keep", is_flag=True, help="On Ctrl-C leave the job and its Host entry (for `hpclaunch stop`)."
)
@ACCESS_OPTION
@YES_OPTION
@preflight_option
@click.pass_obj
def command(
    app: AppContext,
    /,
    path: str,
    open_code: bool,
    idle_timeout: int,
    keep: bool,
    access: str | None,
    yes: bool,
    preflight: bool,
    **values: Any,
) -> None:
    """Hold an allocation, let VS Code reach its node as Host hpclaunch-JOB; Ctrl-C ends both."""
    import shlex

    from ..config import NodeAccess
    from ..node import hold
    from ..params import reject_control_chars

    reject_control_chars("--path", path)
    cluster = app.cluster()
    mode = NodeAccess(access) if access else cluster.profile.node_access
    if idle_timeout and mode is not NodeAccess.STEP:
        # Through the node's own sshd, a session is no step of the job: nothing to see it by.
        raise click.UsageError(
            "--idle-timeout needs node_access = step (--access step): in jump mode "
            "sessions do not pass through the job"
        )
    folder = cluster.transport.expand(path)
    if not cluster.transport.exists(folder):  # before the queue wait, not after it in VS Code
        raise click.BadParameter(
            f"{folder} does not exist on {cluster.transport.description}", param_hint="--path"
        )
    use_preflight(cluster, preflight)
    with StatusLine() as line:
        job = hold.start(cluster, given(values), status=line.update)
    session = hold.Hold(
        cluster,
        job,
        path=path,
        mode=mode,
        global_options=app.global_argv(),
    )

    def ready(h: hold.Hold) -> None:
        ensure_include(yes)
        click.echo(shlex.join(h.code_argv))
        from ..node import sshentry

        say(
            f"Job {h.job.id} holds {h.target.node if h.target else '?'}; Host {h.alias} is in "
            f"{sshentry.paths().config}."
        )
        if keep:
            say(f"Press Ctrl-C to leave; the job and the entry stay until `hpclaunch stop {h.job.id}`.")
        else:
            say("Press Ctrl-C to end the job and remove the entry.")
        if idle_timeout:
            say(f"The job ends {idle_timeout} s after the last session on the node closes.")
        if open_code:
            import subprocess

            try:
                subprocess.Popen(h.code_argv)
            except OSError as exc:
                say(f"cannot run VS Code's `code`: {exc.strerror or exc}; run the command above yourself")

    why = session.serve(on_ready=ready, keep=keep, idle_timeout=idle_timeout)
    if why == "kept":
        say(f"job {job.id} keeps running with Host {session.alias}; end it with: hpclaunch stop {job.id}")
    elif why == "idle":
        say(f"no session for {idle_timeout} s: cancelled job {job.id}; removed Host {session.alias}")
    else:
        say(f"cancelled job {job.id}; removed Host {session.alias}")
