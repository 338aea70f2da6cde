"""``hpclaunch jupyter`` and ``attach``: notebooks on compute nodes (``sessions``, ``stop``: sessions.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from ..console import StatusLine, say
from .context import AppContext
from .options import given, idle_timeout_option, job_options, preflight_option, use_preflight

if TYPE_CHECKING:
    from ..jupyter.session import Session
    from ..node.ports import PortSpec

_SESSION_OPTIONS = [
    click.option(
        "--app",
        type=click.Choice(["lab", "notebook", "server"]),
        default="lab",
        envvar="HPCLAUNCH_JUPYTER_APP",
        show_envvar=True,
        help="Which Jupyter front end to start.",
    ),
    click.option(
        "--tunnel",
        type=click.Choice(["direct", "node"]),
        default=None,
        envvar="HPCLAUNCH_TUNNEL",
        show_envvar=True,
        help="direct: login host forwards to node:port. node: jump into the node, Jupyter on its 127.0.0.1. "
        "[default: the profile's, else direct]",
    ),
    click.option(
        "--local-port",
        type=click.IntRange(0, 65535),
        default=0,
        envvar="HPCLAUNCH_LOCAL_PORT",
        show_envvar=True,
        help="Local port of the tunnel (0 = any free port).",
    ),
    click.option(
        "--server-timeout",
        type=click.FloatRange(min=1),
        default=300.0,
        envvar="HPCLAUNCH_SERVER_TIMEOUT",
        show_envvar=True,
        help="Seconds to wait for Jupyter once the job runs.",
    ),
    click.option("--open/--no-browser", "open_browser", default=False, help="Open the URL in a browser."),
]


def _session_options(func: Any) -> Any:
    for option in reversed(_SESSION_OPTIONS):
        func = option(func)
    return func


@click.command(
    "jupyter",
    epilog="""\b
Examples:
  hpclaunch jupyter                          # one notebook with the profile's defaults
  hpclaunch jupyter --gpus 1 --time 2h --open
  hpclaunch jupyter --keep                   # leave it running after Ctrl-C; reattach with `hpclaunch attach`
""",
)
@job_options()
@_session_options
@idle_timeout_option("Shut the server down (freeing the allocation) after this many idle seconds")
@click.option(
    "--queue-timeout",
    type=click.FloatRange(min=1),
    default=None,
    envvar="HPCLAUNCH_QUEUE_TIMEOUT",
    show_envvar=True,
    help="Give up (and cancel) if the job is still pending after this many seconds.",
)
@click.option("--keep", is_flag=True, help="Leave the job running when this command ends.")
@click.option(
    "--forward",
    "forward",
    multiple=True,
    metavar="PORT[:LOCAL_PORT]",
    help="Also tunnel this port of the notebook's node (TensorBoard: 6006); repeatable.",
)
@preflight_option
@click.pass_obj
def command(
    app_ctx: AppContext,
    /,
    app: str,
    tunnel: str | None,
    local_port: int,
    server_timeout: float,
    open_browser: bool,
    idle_timeout: int,
    queue_timeout: float | None,
    keep: bool,
    forward: tuple[str, ...],
    preflight: bool,
    **values: Any,
) -> None:
    """Start JupyterLab on a compute node and tunnel to it; Ctrl-C ends it."""
    from ..jupyter import session as jsession
    from ..node.ports import parse_specs

    extra = parse_specs(forward)  # checked before anything is submitted
    cluster = app_ctx.cluster()
    use_preflight(cluster, preflight)
    options = jsession.JupyterOptions(
        app=app,
        idle_timeout=idle_timeout,
        server_timeout=server_timeout,
        queue_timeout=queue_timeout,
        local_port=local_port,
        tunnel=tunnel,
    )
    with StatusLine() as line:
        sess = jsession.start(cluster, options, given(values), status=line.update)
    _serve(sess, keep=keep, open_browser=open_browser, record=True, extra=extra)


@click.command("attach", epilog="Example:\n\n  hpclaunch attach 1234 --open")
@click.argument("job_id")
@_session_options
@click.pass_obj
def attach(
    app_ctx: AppContext,
    job_id: str,
    app: str,
    tunnel: str | None,
    local_port: int,
    server_timeout: float,
    open_browser: bool,
) -> None:
    """Open the tunnel to the running notebook JOB_ID again (Ctrl-C detaches, the job keeps running)."""
    from ..jupyter import session as jsession

    cluster = app_ctx.cluster()
    options = jsession.JupyterOptions(
        app=app, server_timeout=server_timeout, local_port=local_port, tunnel=tunnel
    )
    with StatusLine() as line:
        sess = jsession.attach(cluster, job_id, options, status=line.update)
    _serve(sess, keep=True, open_browser=open_browser)


def _serve(
    sess: Session, *, keep: bool, open_browser: bool, record: bool = False, extra: Sequence[PortSpec] = ()
) -> None:
    """Show the URL and keep the session until Ctrl-C, TERM/HUP or the job's end (Session.serve)."""
    stack = contextlib.ExitStack()

    def ready(sess: Session) -> None:
        click.echo(sess.url)
        if extra:
            from ..node import ports

            # Through the same connection; a server started later in the notebook is reached once it listens.
            node = sess.location.host
            opened = stack.enter_context(ports.open_forwards(sess.cluster.transport, node, extra))
            for spec, fwd in zip(extra, opened, strict=True):
                click.echo(f"{ports.url(fwd)}  ->  {sess.location.host}:{spec.remote}")
        say(f"Jupyter is running in job {sess.job.id} on {sess.location.host}.")
        say(f"Same tunnel with OpenSSH: {sess.ssh_command}")
        say(
            "Press Ctrl-C to stop"
            + (" (the job keeps running)." if keep else " (the job will be cancelled).")
        )
        if open_browser:
            import webbrowser

            webbrowser.open(sess.url)

    with stack:
        sess.serve(keep=keep, record=record, on_ready=ready)
    if keep:
        say(f"tunnel closed; job {sess.job.id} keeps running: hpclaunch attach {sess.job.id}")
    else:
        say(f"cancelled job {sess.job.id}")
