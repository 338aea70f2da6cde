"""How a job that ended badly is reported, from real ``scontrol`` records captured on the dev cluster.

tests/cluster/test_faults.py makes these ends happen for real; this runs the same reporting path without
a cluster (and covers OUT_OF_MEMORY where a cluster cannot enforce memory).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hpclaunch.cli.follow import follow_job
from hpclaunch.errors import JobFailed
from hpclaunch.slurm import parse
from hpclaunch.slurm.states import JobInfo, Phase

DATA = Path(__file__).resolve().parents[1] / "data" / "slurm"


class _EndedJob:
    """The part of :class:`hpclaunch.cluster.Job` that ``follow_job`` uses, for a job that has ended."""

    def __init__(self, info: JobInfo, log: str) -> None:
        self.id = info.job_id
        self._info = info
        self._log = log
        self.cancelled = False

    def info(self) -> JobInfo:
        return self._info

    def wait(self) -> JobInfo:
        return self._info

    def follow(self) -> Iterator[str]:
        yield self._log

    def logs(self) -> str:
        return self._log

    def cancel(self) -> None:
        self.cancelled = True


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
        follow_job(job, stream=False, owner=True)  # type: ignore[arg-type]
    err = caught.value
    assert err.one_line().startswith(f"job {info.job_id} {line}")
    assert "\n" not in err.one_line()
    assert err.details is not None
    assert err.details.startswith("last lines of the job's log:")
    assert "the last words" in err.details and "step 39" in err.details
    assert "step 1\n" not in err.details  # only the tail
    assert err.exit_code != 0
    assert not job.cancelled  # it had ended already


def test_out_of_memory_shows_slurms_oom_note_from_the_log() -> None:
    info = _record("out_of_memory")
    job = _EndedJob(info, (DATA / "job_out_of_memory.log").read_text())
    with pytest.raises(JobFailed) as caught:
        follow_job(job, stream=False, owner=True)  # type: ignore[arg-type]
    assert caught.value.details is not None
    assert "oom-kill event" in caught.value.details


def test_a_streamed_log_is_not_repeated_in_the_error(capsys: pytest.CaptureFixture[str]) -> None:
    job = _EndedJob(_record("node_fail"), "on-the-failing-node\n")
    with pytest.raises(JobFailed) as caught:
        follow_job(job, stream=True, owner=True)  # type: ignore[arg-type]
    assert "on-the-failing-node" in capsys.readouterr().out
    assert caught.value.details is None
    assert "NODE_FAIL" in caught.value.one_line()
