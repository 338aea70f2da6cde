"""A new user's first hour on the dev cluster (issue 24): mistyped ids, forgotten jobs, the queue listing."""

from __future__ import annotations

import dataclasses
import subprocess
import time
from pathlib import Path

import pytest

from hpclaunch import jobrecords
from hpclaunch.cluster import Cluster
from hpclaunch.errors import JobNotFound

from .conftest import run_hpclaunch

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
