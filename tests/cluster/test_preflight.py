"""Know before you wait, on the dev cluster: impossible requests refused before anything is queued,
an estimated start for feasible ones, jobs that can never start ended with the reason, arrays split at
the site's MaxArraySize, and a polling budget that holds for 1,000 jobs.

The dev cluster has a second partition `short` (MaxTime 10 minutes, MaxNodes 1, AllowQos normal) and
MaxArraySize=11 (scripts/dev-cluster).
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpclaunch import Cluster
from hpclaunch.errors import CannotRun
from hpclaunch.slurm.client import SlurmClient
from hpclaunch.transport.openssh import OpenSSHTransport
from hpclaunch.transport.ssh import SSHTransport

from .conftest import hpclaunch_argv, run_hpclaunch

pytestmark = pytest.mark.cluster


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def jobs_named(name: str) -> list[str]:
    out = subprocess.run(
        ["squeue", "-h", "--states=all", "--name", name, "-o", "%i"], capture_output=True, text=True
    ).stdout
    return out.split()


def in_queue(job_id: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout
    return out.strip() not in ("", "COMPLETED", "CANCELLED")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--nodes", "5"], "partition debug has 2 nodes; asked for 5: give fewer --nodes"),
        (["--partition", "short", "--time", "20"], "partition short allows at most 00:10:00"),
        (
            ["--partition", "short", "--time", "5", "--qos", "nope"],
            "QOS 'nope' is not allowed in partition short",
        ),
        (["--gpus", "1", "--gpu-type", "h100"], "Slurm refuses the request"),
    ],
)
def test_impossible_requests_are_refused_before_anything_is_queued(
    cli_env: dict[str, str], args: list[str], says: str
) -> None:
    name = unique("hl-preflight")
    started = time.monotonic()
    result = run_hpclaunch(cli_env, "submit", "run", "--job-name", name, *args, "--", "hostname")
    elapsed = time.monotonic() - started
    assert result.returncode == 4, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("hpclaunch: error: ") and says in line, result.stderr
    assert not result.stdout.strip() and "Traceback" not in result.stderr
    assert jobs_named(name) == []  # nothing queued, not even for a moment that squeue could see
    print(f"refused in {elapsed:.2f} s: {line}")


def test_check_tells_without_queueing(cli_env: dict[str, str]) -> None:
    name = unique("hl-check")
    ok = run_hpclaunch(cli_env, "check", "--job-name", name, "--nodes", "2")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ok: starts ") and "node" in ok.stdout
    refused = run_hpclaunch(cli_env, "check", "--job-name", name, "--nodes", "3")
    assert refused.returncode == 4 and "asked for 3" in refused.stderr
    assert jobs_named(name) == []


def test_a_feasible_request_shows_its_estimated_start_before_it_is_submitted(cli_env: dict[str, str]) -> None:
    result = run_hpclaunch(cli_env, "submit", "run", "--wait", "--", "hostname")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    estimate = next(i for i, line in enumerate(lines) if line.startswith("preflight: starts "))
    submitted = next(i for i, line in enumerate(lines) if line.startswith("submitted job "))
    assert estimate < submitted, result.stderr
    assert "on node" in lines[estimate] and "(partition debug)" in lines[estimate]


def test_the_api_check_raises_with_what_to_change(cluster: Cluster) -> None:
    assert cluster.check("run", command=["true"], nodes=2).start is not None
    with pytest.raises(CannotRun, match="asked for 5"):
        cluster.check("run", command=["true"], nodes=5)


def test_a_job_that_can_never_start_ends_the_wait(cli_env: dict[str, str]) -> None:
    # Without the preflight the job is queued, pends with PartitionTimeLimit, and the wait sees it.
    name = unique("hl-stuck")
    result = run_hpclaunch(
        cli_env, "submit", "run", "--no-preflight", "--wait", "--job-name", name,
        "--partition", "short", "--time", "20", "--", "hostname", timeout=60,
    )  # fmt: skip
    assert result.returncode == 4, result.stderr
    assert "can never start as asked (PartitionTimeLimit)" in result.stderr
    assert "less --time" in result.stderr and "Traceback" not in result.stderr
    job_id = result.stdout.split()[0]
    deadline = time.monotonic() + 10
    while in_queue(job_id):
        assert time.monotonic() < deadline, "the stuck job was not cancelled"
        time.sleep(0.2)


@pytest.fixture
def short_partition() -> Iterator[None]:
    yield
    subprocess.run(["scontrol", "update", "PartitionName=short", "MaxTime=10"], check=True)


@pytest.mark.parametrize("command", ["submit", "jupyter"])
def test_a_job_made_impossible_while_it_waits_is_ended_with_the_reason(
    cli_env: dict[str, str], short_partition: None, command: str
) -> None:
    name = unique("hl-madestuck")
    held = ["--partition", "short", "--time", "5", "--job-name", name, "--sbatch-options=--hold"]
    argv = (
        ["submit", "run", "--wait", *held, "--", "hostname"]
        if command == "submit"
        else ["jupyter", "--no-browser", *held]
    )
    proc = subprocess.Popen(
        hpclaunch_argv(*argv),
        env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (ids := jobs_named(name)):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        (job_id,) = ids
        # While it waits, the admin shortens the partition's limit below the job's time.
        subprocess.run(["scontrol", "update", "PartitionName=short", "MaxTime=2"], check=True)
        subprocess.run(["scontrol", "release", job_id], check=True)
        _out, err = proc.communicate(timeout=30)
        assert proc.returncode == 4, err
        assert "can never start as asked (PartitionTimeLimit)" in err and "Traceback" not in err
        deadline = time.monotonic() + 10
        while in_queue(job_id):
            assert time.monotonic() < deadline, "the stuck job was not cancelled"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
        for job_id in jobs_named(name):
            subprocess.run(["scancel", job_id], check=False)


def test_a_sweep_larger_than_max_array_size_runs_as_several_arrays(cluster: Cluster) -> None:
    transport = cluster.transport
    assert isinstance(transport, (SSHTransport, OpenSSHTransport))
    params = [{"n": i, "word": f"w{i}"} for i in range(25)]
    sbatch_before = transport.command_counts["sbatch"]
    sweep = cluster.submit_array(
        params, command=["bash", "-c", 'echo "task $0 index $HPCLAUNCH_TASK_INDEX"', "{word}"]
    )
    try:
        assert transport.command_counts["sbatch"] - sbatch_before == 3  # 11 + 11 + 3
        assert len(sweep.parts) == 3 and len(sweep) == 25 and len(set(sweep.task_ids)) == 25
        squeue_before = transport.command_counts["squeue"]
        states = sweep.states()
        assert transport.command_counts["squeue"] - squeue_before == 1 and len(states) == 25
        infos = sweep.wait(timeout=180)
        assert {i.state.value for i in infos} == {"COMPLETED"}, [i.describe() for i in infos]
        for index, log in enumerate(sweep.logs()):
            assert f"task w{index} index {index}" in log, (index, log)
        again = cluster.array(sweep.id)
        assert again.task_ids == sweep.task_ids and again.params == sweep.params
    finally:
        sweep.cancel()
        if sweep.run_dir:
            transport.run(["rm", "-rf", "--", sweep.run_dir], check=False)


def test_cancel_ends_every_part_of_a_split_sweep(cluster: Cluster) -> None:
    sweep = cluster.submit_array([{"i": i} for i in range(25)], command=["sleep", "120"], max_concurrent=2)
    try:
        assert len(sweep.parts) == 3
        sweep.cancel()
        deadline = time.monotonic() + 20
        while any(not info.is_terminal for info in sweep.states()):
            assert time.monotonic() < deadline, [i.describe() for i in sweep.states() if not i.is_terminal]
            time.sleep(0.5)
    finally:
        sweep.cancel()


def test_max_concurrent_holds_across_the_parts(cluster: Cluster) -> None:
    sweep = cluster.submit_array([{"i": i} for i in range(14)], command=["sleep", "3"], max_concurrent=2)
    try:
        most = 0
        deadline = time.monotonic() + 240
        while True:
            states = [info.state.value for info in sweep.states()]
            most = max(most, states.count("RUNNING"))
            if all(s in ("COMPLETED", "FAILED", "CANCELLED") for s in states):
                break
            assert time.monotonic() < deadline, states
            time.sleep(0.3)
        assert states == ["COMPLETED"] * 14
        assert 1 <= most <= 2, most
    finally:
        sweep.cancel()


def test_waiting_on_a_thousand_jobs_is_one_squeue_per_interval(dev_config: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(dev_config.read_text() + "poll_min = 0.2\npoll_max = 1.0\n")
    config.chmod(0o600)
    with Cluster("dev", config=config) as cluster:
        transport = cluster.transport
        assert isinstance(transport, (SSHTransport, OpenSSHTransport))
        client = cluster.scheduler
        assert isinstance(client, SlurmClient)
        sweep = cluster.submit_array(
            [{"i": i} for i in range(1000)], command=["true"], sbatch_options=["--hold"]
        )
        try:
            assert len(sweep) == 1000
            slept: list[float] = []
            inner = client._sleep

            def recording_sleep(seconds: float) -> None:
                slept.append(seconds)
                inner(seconds)

            client._sleep = recording_sleep
            before = dict(transport.command_counts)
            with pytest.raises(Exception, match="still not finished"):
                sweep.wait(timeout=8)
            squeue = transport.command_counts["squeue"] - before.get("squeue", 0)
            other = sum(transport.command_counts[c] - before.get(c, 0) for c in ("scontrol", "sacct"))
            assert squeue == len(slept) + 1 or squeue == len(slept), (squeue, len(slept))
            assert other == 0
            assert max(slept) == pytest.approx(1.0, rel=0.25) and slept[-2] == pytest.approx(1.0, rel=0.25)
            print(f"1000 jobs: {squeue} squeue calls in 8 s, intervals {[round(s, 2) for s in slept]}")
        finally:
            sweep.cancel()
            if sweep.run_dir:
                transport.run(["rm", "-rf", "--", sweep.run_dir], check=False)


def test_status_marks_a_job_that_can_never_start(cli_env: dict[str, str], cluster: Cluster) -> None:
    name = unique("hl-mark")
    job = cluster.submit("run", command=["hostname"], partition="short", time="20", job_name=name)
    try:
        deadline = time.monotonic() + 20
        while job.info().reason != "PartitionTimeLimit":
            assert time.monotonic() < deadline, job.info().describe()
            time.sleep(0.3)
        info = job.wait(timeout=30)  # returns at once, marked
        assert info.cannot_start is not None and not info.is_terminal
        status = run_hpclaunch(cli_env, "status", job.id, "--json")
        (row,) = json.loads(status.stdout)
        assert row["cannot_start"] and "less --time" in row["cannot_start"]
        table = run_hpclaunch(cli_env, "status", job.id)
        assert "(can never start)" in table.stdout and "can never start as asked" in table.stderr
    finally:
        job.cancel()
