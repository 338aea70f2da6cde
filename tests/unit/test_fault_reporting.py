"""How a job that ended badly is reported, from real ``scontrol`` records captured on the dev cluster.

tests/cluster/test_faults.py makes these ends happen for real; this runs the same reporting path without
a cluster (and covers OUT_OF_MEMORY where a cluster cannot enforce memory).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hpclaunch.cli.follow import follow_job
from hpclaunch.errors import JobFailed
from hpclaunch.job import Job
from hpclaunch.slurm import parse
from hpclaunch.states import JobInfo, Phase

DATA = Path(__file__).resolve().parents[1] / "data" / "slurm"


class _EndedScheduler:
    """The scheduler calls a :class:`~hpclaunch.job.Job` makes, for a job that has ended."""

    def __init__(self, info: JobInfo) -> None:
        self._info = info
        self.cancelled = False

    def info(self, job_id: str) -> JobInfo:
        return self._info

    def wait(self, job_ids: list[str], **_: object) -> dict[str, JobInfo]:
        return {self._info.job_id: self._info}

    def cancel(self, job_id: str) -> None:
        self.cancelled = True


class _LogFile:
    """One job log, read the ways a Job reads it (whole, or from an offset)."""

    def __init__(self, log: str) -> None:
        self.data = log.encode()

    def read_text(self, path: str) -> str:
        return self.data.decode()

    def read_bytes(self, path: str, *, offset: int = 0, limit: int | None = None) -> bytes:
        return self.data[offset : None if limit is None else offset + limit]


class _Host:
    def __init__(self, info: JobInfo, log: str) -> None:
        self.scheduler = _EndedScheduler(info)
        self.transport = _LogFile(log)


def _EndedJob(info: JobInfo, log: str) -> Job:
    return Job(_Host(info, log), info.job_id, output="/home/u/slurm.out")  # type: ignore[arg-type]


def _record(name: str) -> JobInfo:
    (info,) = parse.parse_scontrol_jobs((DATA / f"scontrol_{name}.txt").read_text())
    return info


@pytest.mark.parametrize(
    ("name", "line"),
    [
        ("out_of_memory", "OUT_OF_MEMORY (OutOfMemory)"),
        ("node_fail", "NODE_FAIL (NodeDown)"),
        ("timeout", "TIMEOUT (TimeLimit)"),
        ("failed", "FAILED (NonZeroExitCode) exit 3"),
        ("cancelled", "CANCELLED"),
    ],
)
def test_a_bad_end_is_one_line_with_state_reason_and_the_log_tail(name: str, line: str) -> None:
    info = _record(name)
    assert info.phase is Phase.FAILED
    log = "hpclaunch: job started\n" + "\n".join(f"step {i}" for i in range(40)) + "\nthe last words\n"
    job = _EndedJob(info, log)
    with pytest.raises(JobFailed) as caught:
        follow_job(job, stream=False, owner=True)
    err = caught.value
    assert err.one_line().startswith(f"job {info.job_id} {line}")
    assert "\n" not in err.one_line()
    assert err.details is not None
    assert err.details.startswith("last lines of the job's log:")
    assert "the last words" in err.details and "step 39" in err.details
    assert "step 1\n" not in err.details  # only the tail
    assert err.exit_code != 0
    assert not job.cluster.scheduler.cancelled  # type: ignore[attr-defined]  # it had ended already


def test_out_of_memory_shows_slurms_oom_note_from_the_log() -> None:
    info = _record("out_of_memory")
    job = _EndedJob(info, (DATA / "job_out_of_memory.log").read_text())
    with pytest.raises(JobFailed) as caught:
        follow_job(job, stream=False, owner=True)
    assert caught.value.details is not None
    assert "oom-kill event" in caught.value.details


def test_a_streamed_log_is_not_repeated_in_the_error(capsys: pytest.CaptureFixture[str]) -> None:
    job = _EndedJob(_record("node_fail"), "on-the-failing-node\n")
    with pytest.raises(JobFailed) as caught:
        follow_job(job, stream=True, owner=True)
    assert "on-the-failing-node" in capsys.readouterr().out
    assert caught.value.details is None
    assert "NODE_FAIL" in caught.value.one_line()
