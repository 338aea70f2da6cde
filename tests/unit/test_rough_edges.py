"""A new user's first hour (issue 24), on the built-in local backend: real processes, no Slurm."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpclaunch import jobrecords
from hpclaunch.cluster import Cluster
from hpclaunch.config import Profile
from hpclaunch.errors import JobNotFound, ParameterError
from hpclaunch.polling import Backoff, wait_for
from hpclaunch.states import NOT_FOUND, JobInfo, JobState


@pytest.fixture
def local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))  # the local backend's jobs: this test's own
    monkeypatch.chdir(tmp_path)
    with Cluster(Profile(name="t", scheduler="local", workdir=str(tmp_path / "runs"))) as cluster:
        yield cluster
        for job in cluster.jobs():
            job.cancel()


def test_wait_on_an_id_nobody_knows_is_no_such_job_at_once(local: Cluster) -> None:
    started = time.monotonic()
    with pytest.raises(JobNotFound, match="no such job: 999999"):
        local.job("999999").wait(timeout=60)
    assert time.monotonic() - started < 5


def test_follow_of_an_id_nobody_knows_is_no_such_job(local: Cluster) -> None:
    with pytest.raises(JobNotFound, match="no such job: 999999"):
        list(local.job("999999").follow())
    with pytest.raises(JobNotFound, match="no such job"):
        local.job("999999").logs()


def test_wait_for_grace_counts_only_ids_that_every_source_missed() -> None:
    now = [0.0]
    answers = iter(
        [
            JobInfo("7", JobState.UNKNOWN, source=NOT_FOUND, reason="nobody knows"),
            JobInfo("7", JobState.UNKNOWN, source=NOT_FOUND, reason="nobody knows"),
        ]
    )

    def states(ids: list[str]) -> dict[str, JobInfo]:
        now[0] += 10
        return {"7": next(answers)}

    with pytest.raises(JobNotFound):
        wait_for(
            states,
            ["7"],
            backoff=Backoff(0.0, 0.0),
            unknown_grace=5,
            sleep=lambda s: None,
            clock=lambda: now[0],
        )


def test_submitted_jobs_are_recorded_and_found_again(local: Cluster) -> None:
    job = local.submit("run", command=["echo", "recorded"])
    job.wait(timeout=30)
    record = jobrecords.find("t", job.id)
    assert record is not None and record.run_dir == job.run_dir and record.output == job.output_path()
    again = local.job(job.id)
    assert again.recorded and again.run_dir == job.run_dir and "recorded" in again.logs()
    assert (jobrecords.records_path().stat().st_mode & 0o777) == 0o600


def test_a_command_given_as_a_string_is_refused(local: Cluster) -> None:
    with pytest.raises(ParameterError, match="list of arguments"):
        local.submit("run", command="echo hi")  # type: ignore[arg-type]
    assert local.jobs() == []


@pytest.mark.parametrize("template", ["hold", "jupyter"])
def test_a_command_for_a_template_that_takes_none_is_refused(local: Cluster, template: str) -> None:
    with pytest.raises(ParameterError, match=f"the '{template}' template takes no command"):
        local.render(template, command=["echo", "x"])


def test_jobs_lists_active_jobs_by_id_and_finished_only_when_asked(local: Cluster) -> None:
    done = local.submit("run", command=["true"])
    done.wait(timeout=30)
    running = [local.submit("run", command=["sleep", "60"]) for _ in range(2)]
    assert [j.id for j in local.jobs()] == sorted((j.id for j in running), key=int)
    everything = [j.id for j in local.jobs(finished=True)]
    assert everything[-1] == done.id and set(everything[:-1]) == {j.id for j in running}


# -- item 18: the small ones --------------------------------------------------------------------------


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hpclaunch", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_bare_hpclaunch_prints_its_help_not_an_error() -> None:
    # First landing: "hpclaunch: error: Usage: ..." on stderr, exit 2.
    result = _cli()
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: hpclaunch") and "error" not in result.stderr


def test_a_directory_given_as_a_job_script_is_named_a_directory(tmp_path: Path) -> None:
    result = _cli("submit", str(tmp_path), env={"XDG_STATE_HOME": str(tmp_path / "state")})
    assert result.returncode != 0
    assert f"job script {tmp_path} is a directory, not a file" in result.stderr, result.stderr
    trained = _cli("train", f"{tmp_path}/", env={"XDG_STATE_HOME": str(tmp_path / "state")})
    assert "is a directory, not a file" in trained.stderr, trained.stderr


@pytest.mark.parametrize(("raw", "seconds"), [("2h30m", 9000), ("1d12h", 129600), ("1h 30m 10s", 5410)])
def test_compound_human_times_are_accepted(raw: str, seconds: int) -> None:
    from hpclaunch.params import parse_time

    assert parse_time(raw) == seconds


def test_the_api_names_the_valid_keys_for_an_unknown_one(local: Cluster) -> None:
    with pytest.raises(ParameterError) as caught:
        local.submit("run", command=["true"], gpu=1)
    assert "did you mean 'gpus'?" in str(caught.value) and "valid ones: " in str(caught.value)


def test_the_hint_for_an_unknown_feature_reads_as_one_sentence() -> None:
    from hpclaunch.slurm.client import _refusal_hint

    assert "sinfo" in _refusal_hint("Invalid feature specification")
    assert "(" not in _refusal_hint("something new")  # it is shown in parentheses: none nested
