"""A new user's first hour on the dev cluster (issue 24): mistyped ids, forgotten jobs, the queue listing."""

from __future__ import annotations

import dataclasses
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from hpclaunch import jobrecords
from hpclaunch.cluster import Cluster
from hpclaunch.errors import JobNotFound
from hpclaunch.job import Job
from hpclaunch.polling import Backoff, Poller
from hpclaunch.states import JobState

from .conftest import hpclaunch_argv, profile_env, run_hpclaunch

if TYPE_CHECKING:
    from conftest import DevCluster

pytestmark = pytest.mark.cluster

#: Far above any id the dev cluster hands out in a CI run.
NOBODYS_JOB = "9999999"


@pytest.mark.parametrize(
    "args",
    [("logs", "-f", NOBODYS_JOB), ("logs", NOBODYS_JOB), ("status", NOBODYS_JOB), ("fetch", NOBODYS_JOB)],
    ids=lambda a: " ".join(a[:2]),
)
def test_a_mistyped_id_is_no_such_job_within_seconds(cli_env: dict[str, str], args: tuple[str, ...]) -> None:
    # First landing: `logs -f 9999999` printed nothing and waited for Ctrl-C.
    started = time.monotonic()
    result = run_hpclaunch(cli_env, *args, timeout=60)
    assert result.returncode != 0
    assert f"no such job: {NOBODYS_JOB}" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 2
    assert time.monotonic() - started < 30


def test_the_api_wait_on_a_mistyped_id_raises_at_once(cluster: Cluster) -> None:
    started = time.monotonic()
    with pytest.raises(JobNotFound, match=f"no such job: {NOBODYS_JOB}"):
        cluster.job(NOBODYS_JOB).wait(timeout=120)
    assert time.monotonic() - started < 30


def test_a_job_slurm_has_forgotten_is_found_in_hpclaunch_records(
    cli_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Slurm forgets a finished job after MinJobAge (10 min here, with no accounting): hpclaunch's own record
    # of what it submitted still says where the run directory and the log are. The forgotten job is a real
    # run's record under an id Slurm never gave out, so the test need not wait ten minutes.
    result = run_hpclaunch(cli_env, "submit", "run", "--wait", "--", "bash", "-c", "echo kept-in-the-record")
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.splitlines()[0]
    monkeypatch.setenv("XDG_STATE_HOME", cli_env["XDG_STATE_HOME"])  # the CLI's records, read here
    record = jobrecords.find("dev", job_id)
    assert record is not None and record.run_dir and record.output
    jobrecords.add(dataclasses.replace(record, job_id=NOBODYS_JOB))

    logs = run_hpclaunch(cli_env, "logs", NOBODYS_JOB)
    assert logs.returncode == 0, logs.stderr
    assert "kept-in-the-record" in logs.stdout
    follow = run_hpclaunch(cli_env, "logs", "-f", NOBODYS_JOB, timeout=60)
    assert follow.returncode == 0 and "kept-in-the-record" in follow.stdout, follow.stderr
    fetched = run_hpclaunch(cli_env, "fetch", NOBODYS_JOB, str(tmp_path / "back"))
    assert fetched.returncode == 0, fetched.stderr
    assert "kept-in-the-record" in (tmp_path / "back" / Path(record.output).name).read_text()


def test_status_lists_active_jobs_by_id_and_finished_ones_only_with_all(
    cli_env: dict[str, str], cluster: Cluster
) -> None:
    done = cluster.submit("run", command=["true"], job_name="hpclaunch-edge-done")
    done.wait(timeout=60)
    running = [
        cluster.submit("run", command=["sleep", "120"], job_name="hpclaunch-edge-run") for _ in range(2)
    ]
    try:
        shown = _table_ids(run_hpclaunch(cli_env, "status"))
        mine = [i for i in shown if i in {done.id, *(j.id for j in running)}]
        assert mine == sorted((j.id for j in running), key=int)
        everything = _table_ids(run_hpclaunch(cli_env, "status", "--all"))
        assert done.id in everything
        assert everything.index(done.id) > max(everything.index(j.id) for j in running)
        assert done.id not in [j.id for j in cluster.jobs()]
    finally:
        for job in running:
            job.cancel()


def _table_ids(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 0, result.stderr
    return [line.split()[0] for line in result.stdout.splitlines()[1:] if line.strip()]


# --- ending jobs, and the log of one that has not started ----------------------------------------------


def test_cancel_of_an_ended_job_says_how_it_ended(cli_env: dict[str, str], cluster: Cluster) -> None:
    # First landing: "cancelled job N" for a finished job, and "no such job" for a COMPLETED one.
    done = cluster.submit("run", command=["true"])
    assert done.wait(timeout=60).state is JobState.COMPLETED
    result = run_hpclaunch(cli_env, "cancel", done.id)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == f"job {done.id} already COMPLETED (exit 0)"

    sleeper = cluster.submit("run", command=["sleep", "300"])
    first = run_hpclaunch(cli_env, "cancel", sleeper.id)
    assert first.returncode == 0 and first.stderr.strip() == f"cancelled job {sleeper.id}", first.stderr
    sleeper.wait(timeout=60)
    again = run_hpclaunch(cli_env, "cancel", sleeper.id)
    assert again.returncode == 0 and again.stderr.strip() == f"job {sleeper.id} already CANCELLED", (
        again.stderr
    )


def test_logs_of_a_pending_job_says_it_is_pending_and_why(cli_env: dict[str, str], cluster: Cluster) -> None:
    job = cluster.submit("run", command=["echo", "ran"])
    try:
        cluster.transport.run(["scontrol", "hold", job.id])
        result = run_hpclaunch(cli_env, "logs", job.id)
        assert result.returncode == 0, result.stderr
        assert result.stdout == ""
        assert result.stderr.strip() == f"job {job.id} is pending (JobHeldUser); no output yet"
    finally:
        job.cancel()


# --- local ports --------------------------------------------------------------------------------------


@pytest.fixture
def listener() -> Iterator[int]:
    """A port on this machine that another program listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_jupyter_on_a_local_port_in_use_is_refused_before_sbatch(
    cli_env: dict[str, str], cluster: Cluster, listener: int
) -> None:
    # First landing: found after the job was queued and started, as ssh's "master forward request failed".
    before = {j.id for j in cluster.jobs(finished=True)}
    result = run_hpclaunch(cli_env, "jupyter", "--local-port", str(listener), timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port {listener} is in use on this machine" in lines[0], result.stderr
    assert "--local-port" in lines[0]
    assert {j.id for j in cluster.jobs(finished=True)} == before  # nothing was queued


@pytest.fixture
def web_job(cluster: Cluster) -> Iterator[tuple[Job, int]]:
    """A running job serving HTTP on a free port of its node: the job and that port."""
    pick = "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])"
    script = f'port=$(python3 -c "{pick}"); echo PORT=$port; cd /tmp && exec python3 -m http.server $port'
    job = cluster.submit("run", command=["bash", "-c", script])
    try:
        for _ in Poller(Backoff(0.1, 1.0), timeout=60):
            ports = [x.removeprefix("PORT=") for x in job.logs().splitlines() if x.startswith("PORT=")]
            if ports:
                break
        yield job, int(ports[0])
    finally:
        job.cancel()


@pytest.mark.parametrize("transport", ["openssh", "paramiko"])
def test_a_second_tunnel_on_a_used_local_port_is_refused_and_the_first_lives_on(
    dev_cluster: DevCluster, tmp_path: Path, web_job: tuple[Job, int], transport: str
) -> None:
    # First landing: the second `forward` "succeeded" through the shared connection, and on exit removed
    # the first one's forward.
    job, port = web_job
    env = profile_env(dev_cluster, tmp_path, extra=f'transport = "{transport}"\n')
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        local = sock.getsockname()[1]
    first = _forward(env, job.id, f"{port}:{local}")
    try:
        url = _first_url(first)
        assert url == f"http://127.0.0.1:{local}/"
        _get(url)
        taken = run_hpclaunch(env, "forward", job.id, f"{port}:{local}", timeout=60)
        assert taken.returncode != 0
        assert f"port {local} is in use on this machine" in taken.stderr, taken.stderr
        # Without LOCAL_PORT, the remote number when it is free here; the dev cluster's node is this
        # machine, where the server holds that number, so any free one.
        second = _forward(env, job.id, str(port))
        try:
            other = _first_url(second)
            assert other not in (url, f"http://127.0.0.1:{port}/")
            _get(other)
        finally:
            _interrupt(second)
        _get(url)  # the first session's tunnel is still there
    finally:
        _interrupt(first)


def _forward(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        hpclaunch_argv("forward", *args),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as with set -m
    )


def _first_url(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, proc.stderr.read() if proc.stderr else ""
    return line.split("  ->  ")[0].strip()


def _get(url: str) -> None:
    with urllib.request.urlopen(url, timeout=30) as answer:  # noqa: S310 - our own 127.0.0.1 URL
        assert answer.status == 200


def _interrupt(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    finally:
        proc.kill()
        proc.wait()


# --- one message for one mistake -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [("check", "run"), ("submit", "run"), ("jupyter", "--no-browser"), ("train", "mnist_lenet5")],
    ids=lambda c: c[0],
)
def test_more_gpus_than_a_node_has_is_one_precise_line_and_exit_4(
    cli_env: dict[str, str], cluster: Cluster, command: tuple[str, ...]
) -> None:
    # First landing: check/submit/jupyter said Slurm's "Requested node configuration is not available"
    # (exit 4), train "more than a node has here" (exit 2).
    before = {j.id for j in cluster.jobs(finished=True)}
    args = [*command, "--gpus", "3"] + (["--", "true"] if command[0] == "submit" else [])
    result = run_hpclaunch(cli_env, *args, timeout=60)
    assert result.returncode == 4, result.stderr
    assert result.stderr.strip().splitlines() == [
        "hpclaunch: error: --gpus 3 is more than a node has here (2 per node): use more --nodes instead"
    ]
    assert {j.id for j in cluster.jobs(finished=True)} == before


def test_code_refuses_a_folder_that_does_not_exist_before_queueing(
    cli_env: dict[str, str], cluster: Cluster
) -> None:
    # First landing: accepted, queued, and VS Code later opened nothing.
    before = {job.id for job in cluster.jobs()}
    result = run_hpclaunch(cli_env, "code", "--path", "/nonexistent/project", timeout=60)
    assert result.returncode == 2
    assert "/nonexistent/project does not exist on" in result.stderr, result.stderr
    assert {job.id for job in cluster.jobs()} == before


def test_submit_wait_says_how_the_job_ended_once(cli_env: dict[str, str]) -> None:
    result = run_hpclaunch(cli_env, "submit", "run", "--wait", "--", "true", timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("COMPLETED exit 0") == 1, result.stderr
