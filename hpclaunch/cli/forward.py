"""``hpclaunch forward``: tunnels to ports of a running job's node."""

from __future__ import annotations

import sys

import click

from ..console import StatusLine, say
from ..errors import NodeAccessError
from .context import AppContext


@click.command(
    "forward",
    epilog="""\b
Examples:
  hpclaunch forward 1234 6006              # TensorBoard of job 1234 on local port 6006 if free
  hpclaunch forward 1234 8050:18050 8265   # node port 8050 on local 18050, and the Ray dashboard
""",
)
@click.argument("job_id")
@click.argument("ports", nargs=-1, required=True, metavar="REMOTE_PORT[:LOCAL_PORT]...")
@click.option(
    "--wait",
    "wait_timeout",
    type=click.FloatRange(min=0),
    default=60.0,
    envvar="HPCLAUNCH_FORWARD_WAIT",
    show_envvar=True,
    help="Seconds to wait for each port to start listening (probed with backoff); 0 = do not wait.",
)
@click.pass_obj
def command(app: AppContext, job_id: str, ports: tuple[str, ...], wait_timeout: float) -> None:
    """Tunnel local ports to PORTS on the node of the running job JOB_ID until Ctrl-C.

    Each of PORTS is the node's port, then optionally this machine's: REMOTE_PORT[:LOCAL_PORT] (the
    reverse of ssh -L's order). Without LOCAL_PORT the same number is used here when it is free, else
    any free port; a LOCAL_PORT in use (by another program or another tunnel) is refused."""
    from ..node import ports as nports
    from ..node import target as ntarget

    specs = nports.parse_specs(ports)  # every port checked before anything is asked of the cluster
    cluster = app.cluster()
    target = ntarget.running(cluster, job_id)
    transport = cluster.transport
    if wait_timeout:
        # On a pipe the retries are not news: only the outcome (the URLs, or one error line) is.
        with StatusLine(enabled=sys.stderr.isatty()) as line:
            nports.wait_all(transport, target.node, specs, timeout=wait_timeout, status=line.update)
    with nports.open_forwards(transport, target.node, specs) as forwards:
        try:
            for spec, fwd in zip(specs, forwards, strict=True):
                click.echo(f"{nports.url(fwd)}  ->  {target.node}:{spec.remote}")
            say(f"Forwarding {len(forwards)} port(s) of job {target.job_id}. Press Ctrl-C to stop.")
            ended = ntarget.while_running(cluster, target.job_id)
        except KeyboardInterrupt:  # Ctrl-C, TERM or HUP once the tunnels are open: they close on the way out
            ended = None
    if ended is not None:
        raise NodeAccessError(f"job {ended.describe()} ended; tunnels closed")
    say("tunnels closed")
