"""`hpclaunch submit/status/logs/cancel` over SSH as hpcuser against the real dev cluster."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from hpclaunch.cluster import Cluster

from .conftest import hpclaunch_argv, run_hpclaunch

# A ~/.bash_profile that prints on every login is in place for all of these: it must change nothing.
pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("talking_login")]


def test_submit_completes_and_output_is_read_back(cli_env: dict[str, str]) -> None:
    result = run_hpclaunch(
        cli_env, "submit", "run", "--follow", "--", "bash", "-c", "echo hello from $(whoami)"
    )
    assert result.returncode == 0, result.stderr
    assert "hello from hpcuser" in result.stdout
    job_id = result.stdout.splitlines()[0]
    status = run_hpclaunch(cli_env, "status", job_id, "--json")
    assert json.loads(status.stdout)[0]["state"] == "COMPLETED"
    logs = run_hpclaunch(cli_env, "logs", job_id)
    assert "hello from hpcuser" in logs.stdout


def test_two_node_job_runs_on_both_nodes(cluster: Cluster) -> None:
    job = cluster.submit("run", command=["srun", "bash", "-c", "echo on-$SLURMD_NODENAME"], nodes=2)
    assert job.wait(timeout=60).state.value == "COMPLETED"
    out = job.logs()
    assert "on-node1" in out and "on-node2" in out


def test_gpu_job_sees_cuda_visible_devices(cluster: Cluster) -> None:
    job = cluster.submit("run", command=["bash", "-c", "echo CVD=${CUDA_VISIBLE_DEVICES:-unset}"], gpus=1)
    assert job.wait(timeout=60).state.value == "COMPLETED"
    assert "CVD=0" in job.logs()


def test_cancel_ends_a_running_job(cli_env: dict[str, str], cluster: Cluster) -> None:
    job = cluster.submit("run", command=["sleep", "300"])
    deadline = time.monotonic() + 30
    while job.info().state.value != "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    result = run_hpclaunch(cli_env, "cancel", job.id)
    assert result.returncode == 0, result.stderr
    assert job.wait(timeout=30).state.value == "CANCELLED"


def test_cancel_of_a_job_that_does_not_exist_fails(cli_env: dict[str, str], cluster: Cluster) -> None:
    # First landing: "cancelled job 99999", exit 0 (plain scancel is silent about unknown ids).
    job = cluster.submit("run", command=["sleep", "300"])
    try:
        result = run_hpclaunch(cli_env, "cancel", "99999", job.id)
        assert result.returncode != 0
        assert "no such job: 99999 (the others were cancelled)" in result.stderr
        assert f"cancelled job {job.id}" in result.stderr and "cancelled job 99999" not in result.stderr
        assert "Traceback" not in result.stderr
        assert job.wait(timeout=30).state.value == "CANCELLED"
    finally:
        job.cancel()


def test_fetch_brings_back_a_custom_output_file(
    cli_env: dict[str, str], cluster: Cluster, tmp_path: Path
) -> None:
    # First landing: fetch looked only for slurm-<id>.out and missed the job's own --output.
    job = cluster.train(
        "mnist_lenet5",
        ["--dataset", "synthetic", "--epochs", "1"],
        output="~/hpclaunch/custom-%j.log",
    )
    assert job.wait(timeout=300).state.value == "COMPLETED", job.logs()
    result = run_hpclaunch(cli_env, "fetch", job.id, str(tmp_path / "results"))
    assert result.returncode == 0, result.stderr
    log = tmp_path / "results" / f"custom-{job.id}.log"
    assert log.is_file() and "hpclaunch: training run" in log.read_text()
    assert (tmp_path / "results" / "metrics.csv").is_file()


def test_logs_follow_streams_lines_as_written(cli_env: dict[str, str], cluster: Cluster) -> None:
    script = "for i in 1 2 3 4; do echo line-$i; sleep 1; done"
    job = cluster.submit("run", command=["bash", "-c", script])
    proc = subprocess.Popen(
        hpclaunch_argv("logs", "-f", job.id), env=cli_env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    seen: list[tuple[str, float]] = []
    for line in proc.stdout:
        if line.startswith("line-"):
            seen.append((line.strip(), time.monotonic()))
    assert proc.wait(timeout=60) == 0
    assert [s for s, _ in seen] == ["line-1", "line-2", "line-3", "line-4"]
    # Streamed, not dumped at the end: the lines arrived spread over the job's run.
    assert seen[-1][1] - seen[0][1] > 1.5


def test_script_submission_with_flag_overrides(cluster: Cluster, tmp_path: Path) -> None:
    script = tmp_path / "mine.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --time=5\necho script-ran-with-$SLURM_CPUS_PER_TASK\n")
    job = cluster.submit(str(script), cpus_per_task=2)
    assert job.wait(timeout=60).state.value == "COMPLETED"
    assert "script-ran-with-2" in job.logs()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["submit", "run", "--partition", "nope", "--", "true"], "there is no partition 'nope'"),
        (["submit", "run", "--no-preflight", "--partition", "nope", "--", "true"], "invalid partition"),
        (["--port", "2299", "submit", "run", "--", "true"], "connection refused"),
    ],
)
def test_cluster_side_bad_input_is_one_line(cli_env: dict[str, str], args: list[str], needle: str) -> None:
    result = run_hpclaunch(cli_env, *args)
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1 and needle in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_wrong_key_is_one_line(cli_env: dict[str, str], tmp_path: Path, dev_cluster: object) -> None:
    key = tmp_path / "wrong_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    config = tmp_path / "config.toml"
    config.write_text(
        '[clusters.dev]\nhost = "127.0.0.1"\nport = 2222\nuser = "hpcuser"\n'
        f'identity_file = "{key}"\nssh_config = "{tmp_path / "empty_ssh_config"}"\n'
    )
    config.chmod(0o600)
    (tmp_path / "empty_ssh_config").write_text(
        f"Host *\n  UserKnownHostsFile {dev_cluster.known_hosts}\n  IdentitiesOnly yes\n"
    )
    env = {**cli_env, "HPCLAUNCH_CONFIG": str(config), "SSH_AUTH_SOCK": ""}
    result = run_hpclaunch(env, "-p", "dev", "submit", "run", "--", "true")
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "refused every key" in result.stderr


def test_api_jupyter_session_and_close(cluster: Cluster) -> None:
    import requests

    session = cluster.jupyter()
    try:
        assert session.url.startswith(f"http://127.0.0.1:{session.local_port}/lab?token=")
        headers = {"Authorization": f"token {session.token}"}
        assert requests.get(f"{session.api_url}/api/status", headers=headers, timeout=10).status_code == 200
    finally:
        session.close()
    assert session.job.wait(timeout=30).state.value == "CANCELLED"
