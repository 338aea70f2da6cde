"""Know before you wait: partition limits, sbatch --test-only, reasons that cannot clear, the polling
budget. Parsers are fed output captured on the dev cluster (Slurm 22.05)."""

from __future__ import annotations

from datetime import datetime

import pytest

from hpclaunch.errors import CannotRun
from hpclaunch.polling import PASSING_REASON_S, PollBudget, StartWatch, wait_for
from hpclaunch.slurm.request import (
    Preflight,
    job_request,
    over_limits,
    parse_partitions,
    parse_test_only,
)
from hpclaunch.states import CANNOT_START, JobInfo, JobState, cannot_start_advice

PARTITIONS = parse_partitions(
    "PartitionName=debug AllowGroups=ALL AllowAccounts=ALL AllowQos=ALL AllocNodes=ALL Default=YES "
    "QoS=N/A DefaultTime=NONE MaxNodes=UNLIMITED MaxTime=UNLIMITED MinNodes=0 Nodes=node[1-2] "
    "State=UP TotalCPUs=32 TotalNodes=2\n"
    "PartitionName=short AllowGroups=ALL AllowAccounts=ALL AllowQos=normal AllocNodes=ALL Default=NO "
    "QoS=N/A DefaultTime=NONE MaxNodes=1 MaxTime=00:10:00 MinNodes=1 Nodes=node[1-2] State=UP "
    "TotalCPUs=32 TotalNodes=2\n"
)


def test_partitions_are_read_from_scontrol() -> None:
    debug, short = PARTITIONS["debug"], PARTITIONS["short"]
    assert debug.default and debug.total_nodes == 2 and debug.max_nodes is None and debug.max_time is None
    assert debug.allow_qos is None and short.allow_qos == ("normal",)
    assert short.max_nodes == 1 and short.max_time == 600 and not short.default


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nodes=5"], "partition debug has 2 nodes; asked for 5: give fewer --nodes"),
        (["-p", "short", "-N", "2"], "partition short allows 1 node; asked for 2"),
        (["-p", "short", "--time=20"], "partition short allows at most 00:10:00; asked for 00:20:00"),
        (["-p", "short", "--qos=nope"], "QOS 'nope' is not allowed in partition short (allowed: normal)"),
        (["-p", "gpu"], "there is no partition 'gpu' (partitions: debug, short)"),
    ],
)
def test_requests_over_the_limits_say_what_to_change(args: list[str], message: str) -> None:
    problem = over_limits(job_request("#!/bin/bash\ntrue\n", args), PARTITIONS)
    assert problem is not None and message in problem


def test_requests_within_the_limits_pass() -> None:
    script = "#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --time=2-00:00:00\ntrue\n"
    assert over_limits(job_request(script), PARTITIONS) is None
    assert (
        over_limits(job_request(script, ["-p", "short", "-N1", "-t", "5", "-q", "normal"]), PARTITIONS)
        is None
    )


def test_test_only_answer_is_parsed() -> None:
    text = (
        "sbatch: Job 494 to start at 2026-12-01T22:22:29 using 1 processors on nodes node1 "
        "in partition debug\n"
    )
    found = parse_test_only(text)
    assert found == Preflight(datetime(2026, 12, 1, 22, 22, 29), "node1", "debug")
    assert parse_test_only("allocation failure: Requested node configuration is not available") is None


def test_the_estimate_reads_like_a_person_would_say_it() -> None:
    now = datetime(2026, 12, 1, 13, 0)
    assert Preflight(datetime(2026, 12, 1, 13, 0, 20), "node1", "debug").describe(now) == (
        "starts now on node1 (partition debug)"
    )
    assert (
        Preflight(datetime(2026, 12, 1, 14, 2), "gpu[3-4]", None).describe(now)
        == "starts about 14:02 on gpu[3-4]"
    )
    assert (
        Preflight(datetime(2026, 12, 3, 9, 30), None, None).describe(now) == "starts about 2026-12-03 09:30"
    )


HOPELESS = ["PartitionNodeLimit", "PartitionTimeLimit", "QOSMaxWallDurationPerJobLimit", "InvalidAccount",
            "InvalidQOS", "BadConstraints"]  # fmt: skip
CLEARING = ["Priority", "Resources", "QOSGrpGRES", "BeginTime", "Dependency", "JobArrayTaskLimit",
            "PartitionDown", "PartitionConfig", "ReqNodeNotAvail", None]  # fmt: skip


@pytest.mark.parametrize("reason", HOPELESS)
def test_reasons_that_cannot_clear_have_advice(reason: str) -> None:
    info = JobInfo("7", JobState.PENDING, "squeue", reason=reason)
    assert info.cannot_start == CANNOT_START[reason] and StartWatch().settled(info) and not info.is_terminal


@pytest.mark.parametrize("reason", CLEARING)
def test_reasons_that_clear_keep_waiting(reason: str | None) -> None:
    info = JobInfo("7", JobState.PENDING, "squeue", reason=reason)
    assert info.cannot_start is None and not StartWatch().settled(info)


def test_unavailable_nodes_cannot_start_but_only_while_pending() -> None:
    reason = "ReqNodeNotAvail, UnavailableNodes:node2"
    assert cannot_start_advice(reason) is not None
    assert JobInfo("7", JobState.RUNNING, "squeue", reason=reason).cannot_start is None


def test_a_wait_ends_on_a_job_that_can_never_start() -> None:
    answers = iter(["Priority", "Priority", "PartitionTimeLimit"])
    calls: list[list[str]] = []

    def states(ids: list[str]) -> dict[str, JobInfo]:
        calls.append(ids)
        return {i: JobInfo(i, JobState.PENDING, "squeue", reason=next(answers)) for i in ids}

    final = wait_for(states, ["7"], sleep=lambda _s: None)
    assert final["7"].cannot_start is not None and len(calls) == 3


def test_the_polling_budget_bounds_every_wait() -> None:
    budget = PollBudget(minimum=1.0, maximum=5.0)
    assert budget.backoff(0.1, 60).initial == 1.0 and budget.backoff(0.1, 60).maximum == 5.0
    assert budget.backoff().initial == 1.0 and budget.backoff(None, 2.0).maximum == 2.0
    # 1,000 jobs: one batched query a round, and the interval reaches the ceiling.
    ids = [str(i) for i in range(1000)]
    slept: list[float] = []
    rounds: list[int] = []

    def states(asked: list[str]) -> dict[str, JobInfo]:
        rounds.append(len(asked))
        done = len(rounds) >= 12
        state = JobState.COMPLETED if done else JobState.PENDING
        return {i: JobInfo(i, state, "squeue", reason="Priority") for i in asked}

    wait_for(states, ids, backoff=budget.backoff(), sleep=slept.append, rng=lambda: 0.5)
    assert rounds == [1000] * 12
    assert max(slept) == pytest.approx(5.0) and slept[-1] == pytest.approx(5.0)


def test_cannot_run_is_a_submission_refusal() -> None:
    err = CannotRun("partition debug has 2 nodes; asked for 5: give fewer --nodes")
    assert err.exit_code == 4 and "\n" not in err.one_line()


def test_a_refreshed_estimate_is_news_while_waiting() -> None:
    estimates = iter(
        [datetime(2026, 12, 1, 14, 2), datetime(2026, 12, 1, 14, 2), datetime(2026, 12, 1, 14, 40)]
    )
    rounds = iter([JobState.PENDING, JobState.PENDING, JobState.PENDING, JobState.COMPLETED])

    def states(ids: list[str]) -> dict[str, JobInfo]:
        state = next(rounds)
        start = next(estimates) if state is JobState.PENDING else None
        return {i: JobInfo(i, state, "squeue", reason="Priority", start_time=start) for i in ids}

    told: list[str] = []
    wait_for(states, ["9"], on_update=lambda info: told.append(info.waiting_line()), sleep=lambda _s: None)
    assert told == [
        "job 9 pending (Priority), estimated start 2026-12-01 14:02",
        "job 9 pending (Priority), estimated start 2026-12-01 14:40",
        "job 9 COMPLETED (Priority)",
    ]


class _FakeTime:
    """A clock that only sleeping moves."""

    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 1.0)


NODES_AWAY = "ReqNodeNotAvail, UnavailableNodes:node1"


def test_nodes_a_restarted_controller_has_not_heard_from_yet_do_not_end_the_wait() -> None:
    # Right after slurmctld restarts, a job for node1 reads ReqNodeNotAvail until node1's slurmd
    # registers again; then it runs and completes.
    t = _FakeTime()
    answers = iter([NODES_AWAY] * 5 + ["RUNNING", "COMPLETED"])

    def states(ids: list[str]) -> dict[str, JobInfo]:
        a = next(answers)
        if a in ("RUNNING", "COMPLETED"):
            return {i: JobInfo(i, JobState(a), "squeue") for i in ids}
        return {i: JobInfo(i, JobState.PENDING, "squeue", reason=a) for i in ids}

    final = wait_for(states, ["7"], sleep=t.sleep, clock=t.clock)
    assert final["7"].state is JobState.COMPLETED and t.now < PASSING_REASON_S


def test_nodes_that_stay_unavailable_end_the_wait_after_the_grace() -> None:
    t = _FakeTime()

    def states(ids: list[str]) -> dict[str, JobInfo]:
        return {i: JobInfo(i, JobState.PENDING, "squeue", reason=NODES_AWAY) for i in ids}

    final = wait_for(states, ["7"], sleep=t.sleep, clock=t.clock)
    assert final["7"].cannot_start == CANNOT_START["ReqNodeNotAvail"]
    assert PASSING_REASON_S <= t.now < PASSING_REASON_S + 20


def test_start_watch_is_immediate_for_reasons_that_cannot_pass_and_restarts_when_the_reason_goes() -> None:
    t = _FakeTime()
    watch = StartWatch(grace=30, clock=t.clock)
    hopeless = JobInfo("7", JobState.PENDING, "squeue", reason="PartitionTimeLimit")
    away = JobInfo("8", JobState.PENDING, "squeue", reason=NODES_AWAY)
    back = JobInfo("8", JobState.PENDING, "squeue", reason="Resources")
    assert watch.cannot_start(hopeless) == CANNOT_START["PartitionTimeLimit"]
    assert watch.cannot_start(away) is None
    t.now = 20
    assert watch.cannot_start(back) is None  # the nodes came back: the count starts again
    t.now = 40
    assert watch.cannot_start(away) is None and not watch.settled(away)
    t.now = 71
    assert watch.cannot_start(away) == CANNOT_START["ReqNodeNotAvail"] and watch.settled(away)
