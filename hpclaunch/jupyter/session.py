"""The client side of ``hpclaunch jupyter``: submit, find the server, tunnel, verify, hand back a URL.

Every wait here has a deadline and polls with backoff; nothing sleeps a fixed time.
"""

from __future__ import annotations

import codecs
import contextlib
import getpass
import http.client
import shlex
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..console import no_interrupts
from ..errors import HpclaunchError, JupyterError, TransportError, WaitTimeout
from ..params import validate_params
from ..slurm.states import JobInfo, Phase
from .banner import ServerLocation, find_server
from .token import new_token, redact

if TYPE_CHECKING:
    from ..cluster import Cluster
    from ..job import Job
    from ..transport.base import Forward, Transport

JOB_PREFIX = "hpclaunch-jupyter"
TOKEN_FILE = "jupyter.token"  # noqa: S105 - a file name, not a secret
LOG_TAIL_LINES = 15

Status = Callable[[str], None]


@dataclass(frozen=True)
class JupyterOptions:
    """How to start and reach the notebook (the job's resources are ordinary job parameters)."""

    app: str = "lab"
    idle_timeout: int = 0
    root_dir: str = "~"
    startup_timeout: int = 120
    server_timeout: float = 300.0
    queue_timeout: float | None = None
    local_port: int = 0
    tunnel: str | None = None  # None: the profile's
    #: Wait for our template's readiness marker (False for a site's own script, whose banner we parse).
    expect_marker: bool = True


@dataclass
class Session:
    """A running notebook reached through a local port. ``close()`` ends the tunnel (and the job)."""

    cluster: Cluster
    job: Job
    location: ServerLocation
    token: str = field(repr=False)
    local_port: int
    ssh_command: str
    _tunnel: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)

    @property
    def url(self) -> str:
        """The browser URL, token included: show it only to the user."""
        return (
            f"http://127.0.0.1:{self.local_port}{self.location.base_url.rstrip('/')}/lab?token={self.token}"
        )

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.local_port}{self.location.base_url.rstrip('/')}"

    def check(self, timeout: float = 10.0) -> int:
        """An authenticated ``GET /api/status`` through the tunnel; returns the HTTP status."""
        return wait_for_http(self.local_port, self.location.base_url, self.token, timeout=timeout)

    def close(self, *, cancel: bool = True) -> None:
        """Close the tunnel; cancel the job too unless ``cancel`` is False."""
        try:
            self._tunnel.close()
        finally:
            if cancel:
                self.job.cancel()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start(
    cluster: Cluster,
    options: JupyterOptions,
    params: dict[str, Any],
    *,
    status: Status = lambda _msg: None,
) -> Session:
    """Submit a notebook job and return a verified session; on any failure the job is cancelled."""
    params = validate_params(params)  # a bad value is refused before a run directory and token exist
    params.setdefault("job_name", JOB_PREFIX)
    token = new_token()
    transport = cluster.transport
    run_dir = cluster.new_run_dir(params["job_name"])
    transport.makedirs(run_dir, mode=0o700)
    token_path = f"{run_dir}/{TOKEN_FILE}"
    with cluster.removed_on_error(run_dir):
        transport.write_text(token_path, token, mode=0o600)  # read verbatim by jupyter_server: no newline
    context = template_context(cluster, options, token_path)
    job = cluster.submit_prepared("jupyter", run_dir=run_dir, context=context, params=params)
    status(f"submitted job {job.id}")
    try:
        location = wait_for_server(job, options, status=status, token=token)
        return connect(cluster, job, location, token, options, status=status)
    except BaseException:
        # Ctrl-C or an error before the user got a URL: leave nothing behind.
        with no_interrupts(), contextlib.suppress(HpclaunchError):
            job.cancel()
        raise


def template_context(cluster: Cluster, options: JupyterOptions, token_path: str) -> dict[str, Any]:
    """What ``templates/jupyter.sbatch.j2`` needs besides the job parameters."""
    tunnel = options.tunnel or cluster.profile.tunnel
    return {
        "jupyter": {
            "app": options.app,
            "bind": "loopback" if tunnel == "node" else "node",
            "token_file": token_path,
            "idle_timeout": options.idle_timeout,
            "root_dir": cluster.transport.expand(options.root_dir),
            "startup_timeout": options.startup_timeout,
        }
    }


def attach(
    cluster: Cluster, job_id: str, options: JupyterOptions, *, status: Status = lambda _msg: None
) -> Session:
    """Reach a running notebook job again, reading its token back from the 0600 file in its run directory."""
    job = cluster.job(job_id)
    info = job.info()
    if info.phase is not Phase.RUNNING:
        raise JupyterError(f"job {job_id} is {info.state.value}, not running", hint="see hpclaunch sessions")
    if not info.work_dir:
        raise JupyterError(f"job {job_id} has no known run directory; was it started by hpclaunch jupyter?")
    job.run_dir = info.work_dir
    try:
        token = cluster.transport.read_text(f"{info.work_dir}/{TOKEN_FILE}").strip()
    except TransportError:
        raise JupyterError(
            f"job {job_id} has no token file in {info.work_dir}",
            hint="only notebooks from hpclaunch jupyter can be attached",
        ) from None
    location = wait_for_server(job, options, status=status, token=token)
    return connect(cluster, job, location, token, options, status=status)


def wait_for_server(
    job: Job, options: JupyterOptions, *, status: Status, token: str | None = None
) -> ServerLocation:
    """Poll the queue and the job's output until the server's marker appears, within the deadlines.

    A log shown in an error has ``token`` masked.
    """
    transport = job.cluster.transport
    output = job.output_path_hint()
    start = time.monotonic()
    running_since: float | None = None
    log = _LogReader(transport)
    info = job.info()
    next_state_check = time.monotonic()
    delay = 0.05
    while True:
        now = time.monotonic()
        if now >= next_state_check:
            info = job.info()
            # While it runs only the log matters: ask Slurm about once a second, read the log often.
            next_state_check = now + (1.0 if info.phase is Phase.RUNNING else 0.0)
        if info.phase is Phase.RUNNING:
            running_since = running_since or now
            if output is None:
                output = job.output_path()
            text = log.read(output)
            location = find_server(text)
            # Our template announces readiness with its marker after the server answers; Jupyter's own
            # banner comes earlier and names the bind address, which may not be reachable from outside.
            if location is not None and (location.source == "marker" or not options.expect_marker):
                return location
            if now - running_since > options.server_timeout:
                raise JupyterError(
                    f"job {job.id} is running but Jupyter did not start "
                    f"within {options.server_timeout:.0f} s",
                    hint=f"the job is cancelled; its log is {output}",
                    details=_tail(text, token=token),
                )
            status(f"job {job.id} running on {info.node_list or '?'}, waiting for Jupyter")
            time.sleep(0.05)
            continue
        if info.is_terminal:
            text = _read(transport, output or _safe_output(job))
            raise JupyterError(
                f"job {info.describe()} ended before Jupyter started", details=_tail(text, token=token)
            )
        if info.phase is Phase.PENDING:
            if options.queue_timeout is not None and now - start > options.queue_timeout:
                raise WaitTimeout(
                    f"job {job.id} still pending after {options.queue_timeout:.0f} s "
                    f"({info.reason or 'no reason given'})",
                    hint="the job is cancelled; try a smaller request or a later time",
                )
            status(_pending_line(info))
        else:
            status(f"job {job.id}: {info.state.value}")
        time.sleep(delay)
        delay = min(0.5, delay * 1.4)


class _LogReader:
    """Reads a growing job log from where it left off (the whole file is re-read by nobody)."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.offset = 0
        self.text = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def read(self, path: str) -> str:
        try:
            data = self.transport.read_bytes(path, offset=self.offset)
        except TransportError:  # not created yet
            return self.text
        self.offset += len(data)
        self.text += self._decoder.decode(data)
        return self.text


def connect(
    cluster: Cluster,
    job: Job,
    location: ServerLocation,
    token: str,
    options: JupyterOptions,
    *,
    status: Status,
) -> Session:
    """Open the tunnel (or, on a login node, reach the server directly) and check it with the token."""
    stack = contextlib.ExitStack()
    try:
        via, target_host = cluster.transport, location.host
        if (options.tunnel or cluster.profile.tunnel) == "node":
            # Jupyter listens on the node's 127.0.0.1: log in to the node through the login host.
            via = stack.enter_context(node_transport(cluster, location.host))
            via.connect()  # now: a refused login says why, instead of a silent tunnel until the timeout
            target_host = "127.0.0.1"
        forward: Forward = stack.enter_context(
            via.forward(target_host, location.port, local_port=options.local_port)
        )
        status(
            f"tunnel 127.0.0.1:{forward.local_port} -> {location.host}:{location.port}; checking the server"
        )
        session = Session(
            cluster=cluster,
            job=job,
            location=location,
            token=token,
            local_port=forward.local_port,
            ssh_command=ssh_command(cluster, location, forward.local_port),
            _tunnel=stack,
        )
        code = session.check(timeout=options.server_timeout)
        if code != 200:
            raise JupyterError(f"Jupyter answered {code} to the token; expected 200")
        return session
    except BaseException:
        stack.close()
        raise


def node_transport(cluster: Cluster, node: str) -> Transport:
    """An SSH login to a compute node, jumping through the login host when there is one."""
    from ..transport.ssh import SSHTransport

    profile = cluster.profile
    jump = None
    if profile.host:
        jump = f"{profile.user}@{profile.host}" if profile.user else profile.host
        if profile.port:
            jump += f":{profile.port}"
    return SSHTransport(
        node,
        user=profile.user,
        port=profile.node_ssh_port,
        identity_file=profile.identity_file,
        ssh_config_path=profile.ssh_config,
        accept_new_host_key=profile.accept_new_host_key,
        proxy_jump=jump,
    )


def ssh_command(cluster: Cluster, location: ServerLocation, local_port: int) -> str:
    """The OpenSSH command that gives the same tunnel, for a laptop user who prefers their own ssh."""
    profile = cluster.profile
    if profile.host:
        login = f"{profile.user}@{profile.host}" if profile.user else profile.host
        port = ["-p", str(profile.port)] if profile.port else []
    else:  # on the login node itself: the laptop connects to this machine
        login = f"{getpass.getuser()}@{socket.getfqdn()}"
        port = []
    if profile.tunnel == "node":
        jump = login + (f":{profile.port}" if profile.port else "")
        node_port = ["-p", str(profile.node_ssh_port)] if profile.node_ssh_port else []
        forward = f"{local_port}:127.0.0.1:{location.port}"
        return shlex.join(["ssh", "-N", "-J", jump, *node_port, "-L", forward, location.host])
    forward = f"{local_port}:{location.host}:{location.port}"
    return shlex.join(["ssh", "-N", *port, "-L", forward, login])


def wait_for_http(local_port: int, base_url: str, token: str, *, timeout: float) -> int:
    """Poll an authenticated ``GET /api/status`` until the server answers or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    path = base_url.rstrip("/") + "/api/status"
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", local_port, timeout=5)
            conn.request("GET", path, headers={"Authorization": f"token {token}"})
            code = conn.getresponse().status
            conn.close()
            return code
        except OSError as err:
            if time.monotonic() > deadline:
                raise JupyterError(f"no answer from Jupyter through the tunnel: {err}") from None
            time.sleep(delay)
            delay = min(0.5, delay * 1.5)


def _pending_line(info: JobInfo) -> str:
    text = f"job {info.job_id} pending"
    if info.reason:
        text += f" ({info.reason})"
    if info.estimated_start:
        text += f", estimated start {info.estimated_start:%Y-%m-%d %H:%M}"
    return text


def _read(transport: Any, path: str | None) -> str:
    if not path:
        return ""
    try:
        return str(transport.read_text(path)) if transport.exists(path) else ""
    except TransportError:
        return ""


def _safe_output(job: Job) -> str | None:
    try:
        return job.output_path()
    except HpclaunchError:
        return None


def _tail(text: str, lines: int = LOG_TAIL_LINES, *, token: str | None = None) -> str:
    tail = [redact(line, token) for line in text.splitlines() if line.strip()][-lines:]
    return "last lines of the job's log:\n" + (
        "\n".join("  " + line for line in tail) if tail else "  (empty)"
    )
