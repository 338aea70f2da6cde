"""``hpclaunch code``: VS Code on a compute node, inside an allocation that this command holds."""

from __future__ import annotations

from typing import Any

import click

from ..console import StatusLine, say
from .context import AppContext
from .options import given, job_options, preflight_option, use_preflight
from .ssh_config import ACCESS_OPTION, YES_OPTION, ensure_include


@click.command(
    "code",
    epilog="""\b
Examples:
  hpclaunch code --gpus 1 --time 4h --path ~/project --open
  hpclaunch code --no-browser        # print the `code --remote ...` command instead of running it
""",
)
@job_options()
@click.option("--path", "path", default="~", show_default=True, help="Folder to open on the node.")
@click.option(
    "--open/--no-browser", "open_code", default=False, help="Run `code --remote ...` (VS Code on PATH)."
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
    use_preflight(cluster, preflight)
    with StatusLine() as line:
        job = hold.start(cluster, given(values), status=line.update)
    session = hold.Hold(
        cluster,
        job,
        path=path,
        mode=NodeAccess(access) if access else None,
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
        say("Press Ctrl-C to end the job and remove the entry.")
        if open_code:
            import subprocess

            try:
                subprocess.Popen(h.code_argv)
            except OSError as exc:
                say(f"cannot run VS Code's `code`: {exc.strerror or exc}; run the command above yourself")

    session.serve(on_ready=ready)
    say(f"cancelled job {job.id}; removed Host {session.alias}")
