"""The client side of ``hpclaunch jupyter``: submit, find the server, tunnel, verify, serve, end.

A :class:`Session` owns its whole life: ``with cluster.jupyter() as s: s.serve()`` from Python behaves
like the CLI (the tunnel stays up until Ctrl-C, a stop signal or the job's end; then the job is
cancelled unless kept, and the local record removed). Every wait polls through
:class:`~hpclaunch.polling.Poller`; nothing sleeps a fixed time.
"""

from __future__ import annotations

import contextlib
import getpass
import http.client
import shlex
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..config import Profile, TunnelMode, choice
from ..console import no_interrupts
from ..errors import (
    CannotRun,
    HpclaunchError,
    JupyterError,
    ParameterError,
    TransportError,
    WaitTimeout,
)
from ..job import Job, LogReader, log_tail
from ..params import whole_number
from ..polling import Backoff, Poller, StartWatch
from ..states import JobInfo, Phase
from ..transport import relay
from . import records
from .banner import ServerLocation, find_server
from .token import new_token

if TYPE_CHECKING:
    from ..submission import Submitter
    from ..transport.base import Forward, Transport

JOB_PREFIX = "hpclaunch-jupyter"
TOKEN_FILE = "jupyter.token"  # noqa: S105 - a file name, not a secret
#: The page each front end opens at (Notebook 7's file browser is /tree; a bare server has only /).
APP_PATHS = {"lab": "/lab", "notebook": "/tree", "server": "/"}

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
    tunnel: TunnelMode | str | None = None  # None: the profile's
    #: Wait for our template's readiness marker (False for a site's own script, whose banner we parse).
    expect_marker: bool = True

    def __post_init__(self) -> None:
        # Checked like job parameters: several of these are written into the job script.
        if self.app not in APP_PATHS:
            raise ParameterError(f"app must be one of {', '.join(APP_PATHS)}, got {self.app!r}")
        whole_number(0)("idle_timeout", self.idle_timeout)
        whole_number(1, 86400)("startup_timeout", self.startup_timeout)
        whole_number(0, 65535)("local_port", self.local_port)
        for name in ("server_timeout", "queue_timeout"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not value > 0):
                raise ParameterError(f"{name}: must be a positive number of seconds, got {value!r}")
        if self.tunnel is not None:
            object.__setattr__(self, "tunnel", choice(TunnelMode, "tunnel", self.tunnel))

    def resolved(self, profile: Profile) -> JupyterOptions:
        """These options with the profile's tunnel mode where none was given: decided once."""
        return self if self.tunnel is not None else replace(self, tunnel=profile.tunnel)

    @property
    def via_node(self) -> bool:
        return self.tunnel is TunnelMode.NODE


@dataclass
class Session:
    """A running notebook reached through a local port. ``close()`` ends the tunnel (and the job)."""

    cluster: Submitter
    job: Job
    location: ServerLocation
    token: str = field(repr=False)
    local_port: int
    options: JupyterOptions
    _tunnel: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)

    @property
    def url(self) -> str:
        """The browser URL of the chosen front end, token included: show it only to the user."""
        return f"{self.api_url}{APP_PATHS[self.options.app]}?token={self.token}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.local_port}{self.location.base_url.rstrip('/')}"

    @property
    def ssh_command(self) -> str:
        """The same tunnel with the user's own OpenSSH (for the tunnel mode this session uses)."""
        return ssh_command(
            self.cluster.profile, self.location, self.local_port, via_node=self.options.via_node
        )

    def check(self, timeout: float = 10.0) -> int:
        """An authenticated ``GET /api/status`` through the tunnel; returns the HTTP status."""
        return wait_for_http(self.local_port, self.location.base_url, self.token, timeout=timeout)

    def serve(
        self,
        *,
        keep: bool = False,
        record: bool = True,
        on_ready: Callable[[Session], None] | None = None,
        check_every: float = 2.0,
        give_up_after: float = 120.0,
    ) -> None:
        """Keep the tunnel until Ctrl-C (or TERM/HUP in the CLI) or the job's end, then clean up.

        ``on_ready`` is called once the session is up (the CLI prints the URL there). On an
        interrupt the job is cancelled unless ``keep``; the interrupt is not re-raised. Raises
        JupyterError when the job ended by itself, or when the cluster could not be reached for
        ``give_up_after`` seconds (the error names the cause; the job may still run).
        """
        ended: JobInfo | None = None
        details: str | None = None
        try:  # from the first line on: a Ctrl-C anywhere here still cleans up
            if record:
                records.add(
                    job_id=self.job.id,
                    profile=self.cluster.profile.name,
                    host=self.cluster.profile.host,
                    run_dir=self.job.run_dir,
                    node=self.location.host,
                    port=self.location.port,
                )
            if on_ready is not None:
                on_ready(self)
            ended = self._watch(check_every, give_up_after)
        except KeyboardInterrupt:
            pass
        finally:
            # Also on any other error: close the tunnel, and cancel the job unless it is kept.
            with no_interrupts():
                with contextlib.suppress(HpclaunchError):
                    self.close(cancel=not keep and ended is None)
                if ended is not None:
                    details = self.job.log_tail(secret=self.token)  # before its directory goes
                if ended is not None or not keep:
                    # The job is over: its run directory (token, log) would only count against a quota.
                    remove_notebook_dir(self.cluster, self.job.run_dir)
                if record and (ended is not None or not keep):
                    with contextlib.suppress(OSError):
                        records.remove(self.job.id, self.cluster.profile.name)
        if ended is not None:
            raise JupyterError(f"notebook job {ended.describe()} ended", details=details)

    def _watch(self, check_every: float, give_up_after: float) -> JobInfo:
        """Poll the job until it ends; a cluster that stays unreachable is an error, not a hang."""
        failing_since: float | None = None
        for _ in Poller(Backoff(check_every, check_every, jitter=0.1)):
            try:
                info = self.job.info()
            except HpclaunchError as err:
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since >= give_up_after:
                    raise JupyterError(
                        f"lost the connection to the cluster for {now - failing_since:.0f} s: "
                        + err.one_line(),
                        hint=f"job {self.job.id} may still be running: check with `hpclaunch sessions`, "
                        f"end it with `hpclaunch stop {self.job.id}`",
                    ) from None
                continue  # the transport reconnects on the next call
            failing_since = None
            if info.is_terminal:
                return info
        raise AssertionError("unreachable: the poller has no deadline")

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
    cluster: Submitter,
    options: JupyterOptions,
    params: dict[str, Any],
    *,
    status: Status = lambda _msg: None,
) -> Session:
    """Submit a notebook job and return a verified session; on any failure the job is cancelled."""
    options = options.resolved(cluster.profile)
    relay.ensure_port_free(options.local_port, option="--local-port")  # before the queue, not after it
    job_params = cluster.resolve_job(params, default_name=JOB_PREFIX)
    token = new_token()
    run_dir = cluster.new_run_dir(job_params["job_name"])
    # Rendered before anything is written: a bad value leaves no run directory and no token file.
    prepared = cluster.prepare(
        "jupyter", job_params, run_dir=run_dir, context=template_context(cluster, options, run_dir)
    )
    # The token file is read verbatim by jupyter_server: no newline.
    job = cluster.submit_prepared(prepared, texts={TOKEN_FILE: token})
    status(f"submitted job {job.id}")
    with job.cancelled_on_failure():  # Ctrl-C or an error before the user got a URL
        location = wait_for_server(job, options, status=status, token=token)
        return connect(cluster, job, location, token, options, status=status)


def remove_notebook_dir(cluster: Submitter, run_dir: str | None) -> bool:
    """Delete a notebook's run directory (one holding its token file; anything else is left alone).
    Returns whether it was removed; a failure is not an error (``hpclaunch clean`` catches up)."""
    if not run_dir:
        return False
    try:
        if not cluster.transport.exists(f"{run_dir}/{TOKEN_FILE}"):
            return False
        cluster.remove_run_dir(run_dir)
    except HpclaunchError:
        return False
    return True


def stop(cluster: Submitter, job_id: str) -> JobInfo | None:
    """End a notebook: cancel its job (unless it has ended), remove its run directory and this
    machine's record of it. The ended job's info, or None when it was cancelled."""
    job = cluster.job(job_id)
    record = next(
        (r for r in records.load() if r.get("job_id") == job.id and r.get("profile") == cluster.profile.name),
        {},
    )
    ended = job.cancel_unless_ended()
    run_dir = record.get("run_dir") or job.run_dir
    if not run_dir:
        with contextlib.suppress(HpclaunchError):
            run_dir = job.info().work_dir
    remove_notebook_dir(cluster, run_dir)
    records.remove(job.id, cluster.profile.name)
    return ended


def forget_ended(cluster: Submitter, jobs: list[Job]) -> list[str]:
    """Notebooks that ended (no longer queued, or in a final state): remove their run directories and
    this machine's records of them. ``jobs`` is the queue's listing of ALL the user's jobs (a record
    missing from it has ended); only directories holding a notebook's token file go. Returns the ids."""
    profile = cluster.profile.name
    queued = {j.id: j for j in jobs}
    ended: dict[str, str | None] = {
        j.id: j.last_info.work_dir for j in jobs if j.last_info is not None and j.last_info.is_terminal
    }
    for r in records.load():
        if r.get("profile") == profile and (r.get("job_id") not in queued or r.get("job_id") in ended):
            ended[str(r.get("job_id"))] = r.get("run_dir") or ended.get(str(r.get("job_id")))
    for job_id, run_dir in ended.items():
        remove_notebook_dir(cluster, run_dir)
        records.remove(job_id, profile)
    return sorted(ended)


def template_context(cluster: Submitter, options: JupyterOptions, run_dir: str) -> dict[str, Any]:
    """What ``templates/jupyter.sbatch.j2`` needs besides the job parameters (``options`` resolved)."""
    return {
        "jupyter": {
            "app": options.app,
            "bind": "loopback" if options.via_node else "node",
            "token_file": f"{run_dir}/{TOKEN_FILE}",
            "idle_timeout": options.idle_timeout,
            "root_dir": cluster.transport.expand(options.root_dir),
            "startup_timeout": options.startup_timeout,
        }
    }


def attach(
    cluster: Submitter, job_id: str, options: JupyterOptions, *, status: Status = lambda _msg: None
) -> Session:
    """Reach a running notebook job again, reading its token back from the 0600 file in its run directory."""
    options = options.resolved(cluster.profile)
    relay.ensure_port_free(options.local_port, option="--local-port")
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

    While the job runs the log is read every 50 ms and Slurm asked about once a second. A log shown
    in an error has ``token`` masked. Only a log that does not exist yet means "not written yet":
    any other error reading it (a permission, the connection) is raised at once.
    """
    reader = LogReader(job.cluster.transport, job.output_path_hint())
    text = ""
    running_since: float | None = None
    info = job.info()
    next_state_check = time.monotonic()
    watch = StartWatch()
    poller = Poller(Backoff(initial=0.05, maximum=0.5, factor=1.4, jitter=0.0))
    for waited in poller:
        now = time.monotonic()
        if now >= next_state_check:
            info = job.info()
            next_state_check = now + (1.0 if info.phase is Phase.RUNNING else 0.0)
        if info.phase is Phase.RUNNING:
            poller.progress()  # the log is what matters now: read it at the initial 50 ms
            running_since = running_since or now
            if reader.path is None:
                reader.path = job.output_path()
            text += reader.read_new()
            location = find_server(text)
            # Our template announces readiness with its marker after the server answers; Jupyter's own
            # banner comes earlier and names the bind address, which may not be reachable from outside.
            if location is not None and (location.source == "marker" or not options.expect_marker):
                return location
            if now - running_since > options.server_timeout:
                raise JupyterError(
                    f"job {job.id} is running but Jupyter did not start "
                    f"within {options.server_timeout:.0f} s",
                    hint=f"the job is cancelled; its log is {reader.path}",
                    details=log_tail(text, secret=token),
                )
            status(f"job {job.id} running on {info.node_list or '?'}, waiting for Jupyter")
            continue
        if info.is_terminal:
            raise JupyterError(
                f"job {info.describe()} ended before Jupyter started",
                details=job.log_tail(secret=token) or log_tail(text, secret=token),
            )
        if watch.cannot_start(info) is not None:
            raise CannotRun(
                f"job {job.id} can never start as asked ({info.reason}): {info.cannot_start}",
                hint="the job is cancelled",
            )
        if info.phase is Phase.PENDING:
            if options.queue_timeout is not None and waited > options.queue_timeout:
                raise WaitTimeout(
                    f"job {job.id} still pending after {options.queue_timeout:.0f} s "
                    f"({info.reason or 'no reason given'})",
                    hint="the job is cancelled; try a smaller request or a later time",
                )
            status(info.waiting_line())
        else:
            status(f"job {job.id}: {info.state.value}")
    raise AssertionError("unreachable: the poller has no deadline")


def connect(
    cluster: Submitter,
    job: Job,
    location: ServerLocation,
    token: str,
    options: JupyterOptions,
    *,
    status: Status,
) -> Session:
    """Open the tunnel (or, on a login node, reach the server directly) and check it with the token."""
    options = options.resolved(cluster.profile)
    stack = contextlib.ExitStack()
    try:
        via: Transport = cluster.transport
        target_host = location.host
        if options.via_node:
            # Jupyter listens on the node's 127.0.0.1: log in to the node through the login host.
            via = stack.enter_context(node_transport(cluster.profile, location.host))
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
            options=options,
            _tunnel=stack,
        )
        code = session.check(timeout=options.server_timeout)
        if code != 200:
            raise JupyterError(f"Jupyter answered {code} to the token; expected 200")
        return session
    except BaseException:
        stack.close()
        raise


def node_transport(profile: Profile, node: str) -> Transport:
    """An SSH login to a compute node, jumping through the login host when there is one."""
    from ..transport.ssh import SSHTransport

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
        login_shell=profile.login_shell,
    )


def ssh_command(profile: Profile, location: ServerLocation, local_port: int, *, via_node: bool) -> str:
    """The OpenSSH command that gives the same tunnel, for a laptop user who prefers their own ssh."""
    if profile.host:
        login = f"{profile.user}@{profile.host}" if profile.user else profile.host
        port = ["-p", str(profile.port)] if profile.port else []
    else:  # on the login node itself: the laptop connects to this machine
        login = f"{getpass.getuser()}@{socket.getfqdn()}"
        port = []
    if via_node:
        jump = login + (f":{profile.port}" if profile.port else "")
        node_port = ["-p", str(profile.node_ssh_port)] if profile.node_ssh_port else []
        forward = f"{local_port}:127.0.0.1:{location.port}"
        return shlex.join(["ssh", "-N", "-J", jump, *node_port, "-L", forward, location.host])
    forward = f"{local_port}:{location.host}:{location.port}"
    return shlex.join(["ssh", "-N", *port, "-L", forward, login])


def wait_for_http(local_port: int, base_url: str, token: str, *, timeout: float) -> int:
    """Poll an authenticated ``GET /api/status`` until the server answers or ``timeout`` passes."""
    path = base_url.rstrip("/") + "/api/status"
    last_error: list[OSError] = []

    def gave_up(waited: float) -> JupyterError:
        cause = f": {last_error[-1]}" if last_error else ""
        return JupyterError(f"no answer from Jupyter through the tunnel within {waited:.0f} s{cause}")

    for _ in Poller(Backoff(initial=0.02, maximum=0.5, factor=1.5), timeout=timeout, on_timeout=gave_up):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", local_port, timeout=5)
            conn.request("GET", path, headers={"Authorization": f"token {token}"})
            code = conn.getresponse().status
            conn.close()
            return code
        except OSError as err:
            last_error.append(err)
            del last_error[:-1]
    raise AssertionError("unreachable: the poller raises at its deadline")
