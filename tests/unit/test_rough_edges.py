"""A new user's first hour (issue 24), on the built-in local backend: real processes, no Slurm."""

from __future__ import annotations

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
