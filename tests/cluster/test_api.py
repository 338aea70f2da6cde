"""The Python API on the dev cluster: many jobs over one connection, job arrays, submitit, reattaching."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpclaunch import ArrayJob, Cluster, HpclaunchError
from hpclaunch.config import Profile
from hpclaunch.slurm.client import SlurmClient
from hpclaunch.transport.openssh import OpenSSHTransport
from hpclaunch.transport.ssh import SSHTransport

pytestmark = pytest.mark.cluster


class RoundCounter:
    """Counts poll rounds of a SlurmClient wait: exactly one sleep between two rounds."""

    def __init__(self, client: SlurmClient) -> None:
        self.sleeps = 0
        self._inner = client._sleep
        client._sleep = self

    def __call__(self, seconds: float) -> None:
        self.sleeps += 1
        self._inner(seconds)


def ssh_transport(cluster: Cluster) -> SSHTransport | OpenSSHTransport:
    transport = cluster.transport
    assert isinstance(transport, (SSHTransport, OpenSSHTransport))
    return transport


@pytest.fixture
def cleanup(cluster: Cluster) -> Iterator[list[str]]:
    """Run directories to delete after the test, in one command."""
    dirs: list[str] = []
    yield dirs
    if dirs:
        cluster.transport.run(["rm", "-rf", "--", *dirs], timeout=120, check=False)


def test_hundred_jobs_one_handshake_one_squeue_per_poll(cluster: Cluster, cleanup: list[str]) -> None:
    transport = ssh_transport(cluster)
    client = cluster.scheduler
    assert isinstance(client, SlurmClient)
    started = time.monotonic()
    jobs = [cluster.submit("run", command=["true"], time="5m", job_name="hl-many") for _ in range(100)]
    submitted = time.monotonic() - started
    cleanup.extend(job.run_dir for job in jobs if job.run_dir)
    rounds = RoundCounter(client)
    squeue_before = transport.command_counts["squeue"]

    infos = cluster.wait(jobs, timeout=180)

    polls = rounds.sleeps + 1
    squeue_calls = transport.command_counts["squeue"] - squeue_before
    assert {info.state.value for info in infos.values()} == {"COMPLETED"}, [
        i.describe() for i in infos.values() if i.state.value != "COMPLETED"
    ]
    assert len(infos) == 100
    # One login at most: none when an OpenSSH master kept from an earlier command is reused.
    assert transport.connections_opened <= 1
    assert transport.command_counts["sbatch"] == 100
    assert 1 <= squeue_calls <= polls, (squeue_calls, polls)
    # Batched, not per job: a handful of polls for 100 jobs.
    assert polls < 20, polls
    print(f"100 jobs: submitted in {submitted:.1f} s, {polls} polls, {squeue_calls} squeue calls")


def test_array_of_twenty_tasks_each_with_its_own_parameters(cluster: Cluster, cleanup: list[str]) -> None:
    transport = ssh_transport(cluster)
    # 11 tasks: the dev cluster's MaxArraySize, the most that still make ONE array.
    params = [{"lr": 10 ** -(i / 4), "seed": i, "tag": f"it's task {i} $HOME"} for i in range(11)]
    code = (
        "import os, sys, json; "
        "print('RESULT', json.dumps([sys.argv[1:], os.environ['HPCLAUNCH_PARAM_SEED']]))"
    )
    array = cluster.submit_array(
        params,
        command=["python3", "-c", code, "--lr={lr}", "{tag}"],
        time="5m",
        job_name="hl-array",
    )
    assert isinstance(array, ArrayJob)
    assert array.run_dir is not None
    cleanup.append(array.run_dir)
    assert len(array) == 11 and transport.command_counts["sbatch"] == 1
    assert array.task_ids == [f"{array.id}_{i}" for i in range(11)]

    before = dict(transport.command_counts)
    states = array.states()
    assert transport.command_counts["squeue"] - before.get("squeue", 0) == 1
    # (Submitting read `scontrol show config` once, for MaxArraySize; the states need no scontrol.)
    assert sum(transport.command_counts[c] - before.get(c, 0) for c in ("scontrol", "sacct")) == 0
    assert [info.job_id for info in states] == array.task_ids

    infos = array.wait(timeout=120)
    assert [info.state.value for info in infos] == ["COMPLETED"] * 11, [i.describe() for i in infos]
    for index, (task, log) in enumerate(zip(params, array.logs(), strict=True)):
        line = next(line for line in log.splitlines() if line.startswith("RESULT "))
        argv, seed = json.loads(line[len("RESULT ") :])
        assert argv == [f"--lr={task['lr']!r}", task["tag"]], index
        assert seed == str(index)

    # The parameter files are private to the user.
    listing = transport.run(
        ["stat", "-c", "%a %n", f"{array.run_dir}/params.jsonl", f"{array.run_dir}/params.sh"]
    )
    assert [line.split()[0] for line in listing.stdout.splitlines()] == ["600", "600"]
    lines = transport.read_text(f"{array.run_dir}/params.jsonl").splitlines()
    assert [json.loads(line) for line in lines] == params


def test_array_throttle_and_cancel(cluster: Cluster, cleanup: list[str]) -> None:
    array = cluster.submit_array([{"i": i} for i in range(4)], command=["sleep", "60"], max_concurrent=1)
    assert array.run_dir is not None
    cleanup.append(array.run_dir)
    deadline = time.monotonic() + 30
    while not any(info.state.value == "RUNNING" for info in array.states()):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    states = [info.state.value for info in array.states()]
    assert states.count("RUNNING") == 1 and states.count("PENDING") == 3, states
    array.cancel()
    infos = array.wait(timeout=60)
    assert {info.state.value for info in infos} == {"CANCELLED"}


def test_executor_runs_a_function_and_returns_its_result(dev_cluster: object, tmp_path: Path) -> None:
    # submitit calls sbatch on this machine, so this runs as the local user against the local Slurm;
    # the job uses this same python (sys.executable), which has submitit and cloudpickle.
    profile = Profile(name="here", workdir=str(tmp_path), job={"partition": "debug"})

    def multiply(x: int, y: int) -> tuple[int, str | None]:
        import os

        return x * y, os.environ.get("SLURM_JOB_ID")

    with Cluster(profile) as here:
        executor = here.executor(time="5m", job_name="hl-submitit")
        job = executor.submit(multiply, 6, 7)
        value, job_id = job.result()
        assert value == 42 and job_id == str(job.job_id)
        # The result is written before the job ends: hpclaunch can wait for the job itself.
        assert here.job(job.job_id).wait(timeout=60).state.value == "COMPLETED"
    assert (tmp_path / "submitit" / str(job.job_id)).is_dir()


def test_reattach_from_a_second_process(cluster: Cluster, dev_config: Path, cleanup: list[str]) -> None:
    job = cluster.submit("run", command=["sleep", "4"], job_name="hl-reattach")
    assert job.run_dir is not None
    cleanup.append(job.run_dir)
    deadline = time.monotonic() + 30
    while job.info().state.value != "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert job.id in {j.id for j in cluster.jobs("hl-reattach")}

    script = textwrap.dedent(
        """
        import json, sys, time
        from hpclaunch import Cluster
        with Cluster("dev", config=sys.argv[1]) as cluster:
            job = cluster.job(sys.argv[2])
            before = job.state
            started = time.monotonic()
            info = job.wait(timeout=60)
            print(json.dumps([before, info.state.value, time.monotonic() - started, job.logs()]))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(dev_config), job.id],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    before, after, waited, logs = json.loads(result.stdout)
    assert before == "RUNNING" and after == "COMPLETED"
    assert waited > 0.5  # it really waited for the running job
    assert f"job {job.id}" in logs


def test_reattach_to_an_array(cluster: Cluster, dev_config: Path, cleanup: list[str]) -> None:
    params = [{"n": i, "word": f"w{i}"} for i in range(3)]
    array = cluster.submit_array(params, command=["bash", "-c", 'sleep 1; echo "got $0"', "{word}"])
    assert array.run_dir is not None
    cleanup.append(array.run_dir)
    with Cluster("dev", config=dev_config) as other:
        again = other.array(array.id)
        assert again.task_ids == array.task_ids and again.params == params
        assert again.run_dir == array.run_dir
        assert [info.state.value for info in again.wait(timeout=60)] == ["COMPLETED"] * 3
        assert [log.splitlines()[-1] for log in again.logs()] == ["got w0", "got w1", "got w2"]
        with pytest.raises(HpclaunchError, match="one task of an array"):
            other.array(array.task_ids[0])
