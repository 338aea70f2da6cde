"""`hpclaunch jupyter` end to end: real Slurm, real sshd as hpcuser, real JupyterLab, real tunnel."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests
import websocket

from .conftest import hpclaunch_argv, run_hpclaunch

if TYPE_CHECKING:
    from conftest import DevCluster

pytestmark = pytest.mark.cluster

START_TIMEOUT = 180


@dataclass
class Running:
    proc: subprocess.Popen[str]
    url: str
    job_id: str
    node: str
    remote_port: int
    stderr_lines: list[str]

    @property
    def local_port(self) -> int:
        match = re.match(r"http://127\.0\.0\.1:(\d+)/", self.url)
        assert match, self.url
        return int(match.group(1))

    @property
    def token(self) -> str:
        return self.url.split("token=", 1)[1]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.local_port}"


def _ignore_sigint() -> None:
    # What a background job of a non-interactive shell starts with (`cmd &` in a script, cron, nohup &).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def start_jupyter(
    env: dict[str, str], *args: str, prefix: tuple[str, ...] = (), sigint_ignored: bool = False
) -> Running:
    """Run `hpclaunch jupyter --no-browser` and read the URL (stdout) and the job (stderr).

    ``prefix`` runs it under another command (``nohup``); ``sigint_ignored`` starts it as a script's
    background job starts."""
    proc = subprocess.Popen(
        [*prefix, *hpclaunch_argv("jupyter", "--no-browser", *args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_ignore_sigint if sigint_ignored else None,
    )
    assert proc.stdout is not None and proc.stderr is not None
    url = proc.stdout.readline().strip()
    lines: list[str] = []
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("Same tunnel with OpenSSH"):
            break
    text = "".join(lines)
    if not url.startswith("http://"):
        proc.kill()
        raise AssertionError(f"no URL; stderr: {text}{proc.stderr.read()}")
    job = re.search(r"running in job (\S+) on (\S+?)\.", text)
    fwd = re.search(r"-L \d+:(\S+):(\d+)", text)
    assert job and fwd, text
    return Running(proc, url, job.group(1), job.group(2), int(fwd.group(2)), lines)


def stop(run: Running) -> int:
    run.proc.send_signal(signal.SIGINT)
    return run.proc.wait(timeout=30)


def squeue_has(job_id: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout
    return out.strip() not in ("", "COMPLETED", "CANCELLED")


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def run_code_in_kernel(base: str, token: str, code: str) -> str:
    """Start a kernel through the REST API, execute ``code`` over the websocket, return its stdout."""
    headers = {"Authorization": f"token {token}"}
    kernel = requests.post(
        f"{base}/api/kernels", headers=headers, json={"name": "python3"}, timeout=30
    ).json()
    ws_url = base.replace("http://", "ws://") + f"/api/kernels/{kernel['id']}/channels"
    ws = websocket.create_connection(ws_url, header=[f"Authorization: token {token}"], timeout=60)
    try:
        msg_id = uuid.uuid4().hex
        ws.send(
            json.dumps(
                {
                    "header": {
                        "msg_id": msg_id,
                        "msg_type": "execute_request",
                        "username": "t",
                        "session": "s",
                        "version": "5.3",
                    },
                    "parent_header": {},
                    "metadata": {},
                    "content": {
                        "code": code,
                        "silent": False,
                        "store_history": False,
                        "user_expressions": {},
                        "allow_stdin": False,
                    },
                    "channel": "shell",
                }
            )
        )
        out = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            msg = json.loads(ws.recv())
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                out += msg["content"]["text"]
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                return out
        raise AssertionError("kernel did not finish")
    finally:
        ws.close()
        requests.delete(f"{base}/api/kernels/{kernel['id']}", headers=headers, timeout=30)


@pytest.fixture
def notebook(cli_env: dict[str, str]) -> Iterator[Running]:
    run = start_jupyter(cli_env)
    yield run
    if run.proc.poll() is None:
        stop(run)
    subprocess.run(["scancel", run.job_id], check=False)


def test_notebook_url_token_kernel_and_secrecy(notebook: Running, dev_cluster: DevCluster) -> None:
    run = notebook
    ok = requests.get(f"{run.base}/api/status", headers={"Authorization": f"token {run.token}"}, timeout=10)
    assert ok.status_code == 200
    assert requests.get(f"{run.base}/api/status", timeout=10).status_code == 403
    assert (
        requests.get(
            f"{run.base}/api/status", headers={"Authorization": "token wrong"}, timeout=10
        ).status_code
        == 403
    )

    out = run_code_in_kernel(
        run.base, run.token, "import os\nprint(os.environ['SLURM_JOB_ID'], os.environ['SLURMD_NODENAME'])"
    )
    assert out.split() == [run.job_id, run.node]

    # The token is in no command line on the node...
    ps = subprocess.run(["ps", "-eww", "-o", "args="], capture_output=True, text=True, check=True).stdout
    assert run.token not in ps
    # ...not in what Slurm shows about the job...
    show = subprocess.run(["scontrol", "show", "job", run.job_id], capture_output=True, text=True).stdout
    assert run.job_id in show and run.token not in show
    # ...not in the job output...
    work_dir = re.search(r"WorkDir=(\S+)", show)
    assert work_dir
    output = Path(work_dir.group(1)) / f"slurm-{run.job_id}.out"
    assert output.is_file() and run.token not in output.read_text()
    # ...and every file holding it is private to the user.
    holders = subprocess.run(
        ["grep", "-rlsF", run.token, "/home/hpcuser", "/tmp", "/var/spool/slurmd", "/dev/shm"],
        capture_output=True,
        text=True,
    ).stdout.split()
    assert holders, "the token file itself should be found"
    for path in holders:
        mode = os.stat(path).st_mode
        assert mode & 0o077 == 0, f"{path} is readable by others: {oct(mode)}"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_sigint_cancels_job_and_frees_port(cli_env: dict[str, str], sig: signal.Signals) -> None:
    """Ctrl-C, `kill` and a closed terminal all end the session cleanly."""
    run = start_jupyter(cli_env)
    assert squeue_has(run.job_id)
    t0 = time.monotonic()
    run.proc.send_signal(sig)
    assert run.proc.wait(timeout=30) == 0
    while squeue_has(run.job_id):
        assert time.monotonic() - t0 < 5, "job still in the queue 5 s after Ctrl-C"
        time.sleep(0.1)
    assert port_is_free(run.local_port)
    assert "cancelled job" in run.proc.stderr.read() if run.proc.stderr else True


@pytest.mark.parametrize("launch", ["background", "nohup"])
def test_sigterm_ends_a_background_session(cli_env: dict[str, str], launch: str) -> None:
    """Started with SIGINT ignored (a script's `cmd &`, `nohup cmd &`), `kill PID` still cancels the job."""
    prefix = ("nohup",) if launch == "nohup" else ()
    run = start_jupyter(cli_env, prefix=prefix, sigint_ignored=True)
    try:
        assert squeue_has(run.job_id)
        t0 = time.monotonic()
        run.proc.send_signal(signal.SIGTERM)
        assert run.proc.wait(timeout=30) == 0
        while squeue_has(run.job_id):
            assert time.monotonic() - t0 < 5, "job still in the queue 5 s after SIGTERM"
            time.sleep(0.1)
        assert port_is_free(run.local_port)
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
        subprocess.run(["scancel", run.job_id], check=False)


def test_keep_then_attach_from_second_process(cli_env: dict[str, str]) -> None:
    run = start_jupyter(cli_env, "--keep")
    try:
        assert stop(run) == 0
        time.sleep(0.5)
        assert squeue_has(run.job_id), "--keep must leave the job running"
        sessions = run_hpclaunch(cli_env, "sessions", "--json")
        assert run.job_id in {row["job_id"] for row in json.loads(sessions.stdout)}
        again = subprocess.Popen(
            hpclaunch_argv("attach", run.job_id),
            env=cli_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert again.stdout is not None
        url = again.stdout.readline().strip()
        assert url.split("token=", 1)[1] == run.token
        port = int(re.match(r"http://127\.0\.0\.1:(\d+)/", url).group(1))  # type: ignore[union-attr]
        status = requests.get(
            f"http://127.0.0.1:{port}/api/status", headers={"Authorization": f"token {run.token}"}, timeout=10
        )
        assert status.status_code == 200
        again.send_signal(signal.SIGINT)
        assert again.wait(timeout=30) == 0
        assert squeue_has(run.job_id), "attach detaches on Ctrl-C; the job keeps running"
        assert run_hpclaunch(cli_env, "stop", run.job_id).returncode == 0
    finally:
        subprocess.run(["scancel", run.job_id], check=False)


def test_job_failing_before_jupyter_is_reported_fast(cli_env: dict[str, str]) -> None:
    t0 = time.monotonic()
    result = run_hpclaunch(
        cli_env, "jupyter", "--no-browser", "--setup", "echo setting-up; exit 3", timeout=60
    )
    elapsed = time.monotonic() - t0
    assert result.returncode != 0
    assert "ended before Jupyter started" in result.stderr and "setting-up" in result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < 30


def test_ten_concurrent_sessions_get_distinct_ports(cli_env: dict[str, str]) -> None:
    # Five on each node (Slurm would pack them all on node1 otherwise).
    procs = [
        subprocess.Popen(
            hpclaunch_argv("jupyter", "--no-browser", "--sbatch-options", f"--nodelist=node{1 + i % 2}"),
            env=cli_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(10)
    ]
    runs: list[Running] = []
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stderr is not None
            url = proc.stdout.readline().strip()
            err = ""
            while "Same tunnel with OpenSSH" not in err:
                line = proc.stderr.readline()
                if not line:
                    break
                err += line
            job = re.search(r"running in job (\S+) on (\S+?)\.", err)
            fwd = re.search(r"-L \d+:(\S+):(\d+)", err)
            assert url.startswith("http://") and job and fwd, err
            runs.append(Running(proc, url, job.group(1), job.group(2), int(fwd.group(2)), []))
        endpoints = {(r.node, r.remote_port) for r in runs}
        assert len({r.remote_port for r in runs}) == 10  # one machine under both nodes: ports must differ
        assert len(endpoints) == 10
        assert {r.node for r in runs} == {"node1", "node2"}
        for r in runs:
            ok = requests.get(
                f"{r.base}/api/status", headers={"Authorization": f"token {r.token}"}, timeout=10
            )
            assert ok.status_code == 200
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for r in runs:
            subprocess.run(["scancel", r.job_id], check=False)


def test_tunnel_survives_a_dropped_connection(notebook: Running) -> None:
    run = notebook
    headers = {"Authorization": f"token {run.token}"}
    assert requests.get(f"{run.base}/api/status", headers=headers, timeout=10).status_code == 200
    # Kill the sshd process serving our session (it runs as hpcuser); the listener of root stays.
    subprocess.run(["pkill", "-KILL", "-u", "hpcuser", "-x", "sshd"], check=False)
    deadline = time.monotonic() + 30
    while True:
        try:
            if requests.get(f"{run.base}/api/status", headers=headers, timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, "the tunnel did not come back on the same local port"
        time.sleep(0.2)
    assert run.proc.poll() is None
