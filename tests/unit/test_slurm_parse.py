"""The Slurm parsers on output captured from the real dev cluster (tests/data/slurm, see capture.py),
and SlurmClient's batching, retry and fallback logic over a scripted fake transport."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path

import pytest

from hpclaunch.errors import JobNotFound, SlurmError, SlurmUnavailable, SubmissionRejected, WaitTimeout
from hpclaunch.slurm import parse
from hpclaunch.slurm.client import RetryPolicy, SlurmClient
from hpclaunch.states import JobInfo, JobState, Phase
from hpclaunch.transport.base import CommandResult, CommandRunner

DATA = Path(__file__).resolve().parent.parent / "data" / "slurm"


def data(name: str) -> str:
    return (DATA / name).read_text()


JOBS: dict[str, str] = dict(line.split("=", 1) for line in data("jobs.txt").splitlines() if line)


def by_id(records: Sequence[JobInfo]) -> dict[str, JobInfo]:
    return {record.job_id: record for record in records}


# --- states ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "state"),
    [
        ("RUNNING", JobState.RUNNING),
        ("CANCELLED by 1000", JobState.CANCELLED),
        ("CANCELLED+", JobState.CANCELLED),
        ("cancelled", JobState.CANCELLED),
        ("PD", JobState.PENDING),
        ("CG", JobState.COMPLETING),
        ("OOM", JobState.OUT_OF_MEMORY),
        ("RUNNING,COMPLETING", JobState.RUNNING),
        ("OUT_OF_MEMORY", JobState.OUT_OF_MEMORY),
        ("", JobState.UNKNOWN),
        ("SOMETHING_NEW", JobState.UNKNOWN),
    ],
)
def test_state_parse(text: str, state: JobState) -> None:
    assert JobState.parse(text) is state


def test_every_state_has_a_phase_and_only_done_or_failed_are_terminal() -> None:
    for state in JobState:
        assert isinstance(state.phase, Phase)
        assert state.is_terminal == (state.phase in (Phase.DONE, Phase.FAILED))
    assert JobState.COMPLETED.phase is Phase.DONE
    assert JobState.TIMEOUT.phase is Phase.FAILED
    assert not JobState.COMPLETING.is_terminal  # the exit code is not final yet
    assert not JobState.UNKNOWN.is_terminal  # unknown means keep waiting, never "failed"


# --- sbatch -----------------------------------------------------------------------------------------


def test_sbatch_parsable_captured() -> None:
    for kind, job_id in JOBS.items():
        assert parse.parse_sbatch(data(f"sbatch_{kind}.txt")) == (job_id, None)


def test_sbatch_parsable_cluster_and_notices() -> None:
    assert parse.parse_sbatch("123;cluster2\n") == ("123", "cluster2")
    assert parse.parse_sbatch("NOTICE: your account is low on hours\n456\n") == ("456", None)
    with pytest.raises(SlurmError, match="no job id"):
        parse.parse_sbatch("Submitted batch job 12\n")  # without --parsable


def test_sbatch_rejections_are_permanent_and_quoted() -> None:
    text = data("sbatch_invalid_partition.stderr.txt")
    assert parse.classify_error(text) == "permanent"
    assert "sbatch: error: invalid partition specified: nope" in parse.slurm_message(text)
    assert parse.classify_error(data("sbatch_too_many_gpus.stderr.txt")) == "permanent"


# --- squeue -----------------------------------------------------------------------------------------


def test_squeue_format_is_delimited_and_name_last() -> None:
    argv = parse.squeue_argv(["1", "2"])
    assert argv[:4] == ["squeue", "--noheader", "--states=all", "--jobs=1,2"]
    assert argv[-1].endswith(f"Name:{parse.DELIM}")
    assert "--me" in parse.squeue_argv()
    assert "--user=bob" in parse.squeue_argv(user="bob")
    assert not any(a.startswith(("--me", "--user", "--jobs")) for a in parse.squeue_argv(everyone=True))


def test_squeue_captured_states() -> None:
    jobs = by_id(parse.parse_squeue(data("squeue_all.txt")))
    completed = jobs[JOBS["completed"]]
    assert completed.state is JobState.COMPLETED and completed.exit_code == 0
    assert completed.name == "cap completed" and completed.node_list == "node1"
    assert completed.stdout_path == f"/tmp/hpclaunch-capture/slurm-{JOBS['completed']}.out"
    assert completed.source == "squeue" and completed.partition == "debug" and completed.user == "root"

    failed = jobs[JOBS["failed"]]
    assert (failed.state, failed.exit_code, failed.signal, failed.reason) == (
        JobState.FAILED,
        3,
        None,
        "NonZeroExitCode",
    )
    signaled = jobs[JOBS["signaled"]]
    assert (signaled.exit_code, signaled.signal) == (0, 9)
    cancelled = jobs[JOBS["cancelled"]]
    assert (cancelled.state, cancelled.signal) == (JobState.CANCELLED, 15)

    running = jobs[JOBS["running"]]
    assert running.state is JobState.RUNNING and running.phase is Phase.RUNNING
    assert running.time_limit == 30 * 60 and running.elapsed == 8
    assert running.exit_code is None  # squeue prints 0 for a running job; that means nothing yet

    assert jobs[JOBS["held"]].pending_reason == "JobHeldUser"
    assert jobs[JOBS["dependency"]].pending_reason == "Dependency"
    assert jobs[JOBS["resources"]].pending_reason == "Resources"
    begin = jobs[JOBS["begin"]]
    assert begin.state is JobState.PENDING and begin.estimated_start is not None
    assert begin.submit_time is not None and (begin.estimated_start - begin.submit_time).seconds == 3600
    assert begin.node_list is None

    assert jobs[JOBS["two_node"]].node_list == "node[1-2]"
    assert jobs[JOBS["gres"]].state is JobState.COMPLETED


def test_squeue_captured_arrays() -> None:
    jobs = by_id(parse.parse_squeue(data("squeue_all.txt")))
    array = JOBS["array"]
    tasks = [j for j in jobs.values() if j.array_job_id == array]
    assert sorted(t.array_task_id or "" for t in tasks) == ["1", "2", "3"]
    assert all(t.job_id == f"{array}_{t.array_task_id}" for t in tasks)
    # squeue's default output name for array tasks is wrong (slurm-<raw id>.out): not trusted
    assert all(t.stdout_path is None for t in tasks)
    throttled = JOBS["array_throttled"]
    rest = jobs[f"{throttled}_[6-9%1]"]
    assert rest.state is JobState.PENDING and rest.array_task_id == "6-9%1"
    assert rest.pending_reason == "JobArrayTaskLimit"
    assert jobs[f"{throttled}_5"].state is JobState.RUNNING


def test_squeue_name_holding_the_delimiter_survives_and_patterns_expand() -> None:
    job = by_id(parse.parse_squeue(data("squeue_all.txt")))[JOBS["pipe_name"]]
    assert job.name == "odd|#|name with spaces"
    # squeue prints custom-%x-%j.out unexpanded; expanded it matches what scontrol reports
    scontrol = parse.parse_scontrol_jobs(data("scontrol_pipe_name.txt"))[0]
    assert (
        job.stdout_path
        == scontrol.stdout_path
        == (f"/tmp/hpclaunch-capture/custom-odd|#|name with spaces-{JOBS['pipe_name']}.out")
    )


def test_squeue_timeout_captured() -> None:
    (job,) = parse.parse_squeue(data("squeue_timeout.txt"))
    assert job.state is JobState.TIMEOUT and job.reason == "TimeLimit" and job.signal == 15
    assert job.time_limit == 60 and job.elapsed is not None and job.elapsed > 60


def test_squeue_unknown_ids_captured() -> None:
    # one unknown id among known ones: squeue just leaves it out...
    assert [j.job_id for j in parse.parse_squeue(data("squeue_one_unknown_among_known.txt"))] == [
        JOBS["completed"]
    ]
    # ...a single unknown id is an error
    assert parse.classify_error(data("squeue_single_unknown.stderr.txt")) == "invalid_job"


def test_squeue_skips_lines_that_do_not_fit() -> None:
    assert parse.parse_squeue("garbage\n\n1|#|2\n") == []


# --- scontrol ---------------------------------------------------------------------------------------


def test_scontrol_record_keeps_spaces_and_odd_keys() -> None:
    line = data("scontrol_pipe_name.txt").splitlines()[0]
    rec = parse.parse_scontrol_record(line)
    assert rec["JobName"] == "odd|#|name with spaces"
    assert rec["UserId"] == "root(0)"
    assert rec["AllocNode:Sid"].startswith("localhost:")
    assert rec["CPUs/Task"] == "1"
    assert rec["NtasksPerN:B:S:C"] == "0:0:*:*"
    assert rec["Power"] == ""
    assert rec["TRES"].startswith("cpu=1,mem=200M")
    synthetic = (
        "JobId=5 JobName=x Reason=ReqNodeNotAvail, UnavailableNodes:node1 Command=/a b --lr=0.1 Power="
    )
    rec = parse.parse_scontrol_record(synthetic)
    assert rec["Reason"] == "ReqNodeNotAvail, UnavailableNodes:node1"
    assert rec["Command"] == "/a b --lr=0.1"


@pytest.mark.parametrize("kind", sorted(JOBS))
def test_scontrol_agrees_with_squeue(kind: str) -> None:
    records = parse.parse_scontrol_jobs(data(f"scontrol_{kind}.txt"))
    assert records and all(r.source == "scontrol" for r in records)
    squeue = by_id(parse.parse_squeue(data("squeue_all.txt")))
    if kind == "timeout":  # captured after the limit passed
        squeue = by_id(parse.parse_squeue(data("squeue_timeout.txt")))
    for record in records:
        other = squeue[record.job_id]
        assert record.state is other.state, record.job_id
        assert (record.name, record.node_list, record.submit_time) == (
            other.name,
            other.node_list,
            other.submit_time,
        )
        assert record.user == "root"
        assert record.stdout_path and "%" not in record.stdout_path
        if record.is_terminal:
            assert (record.exit_code, record.signal) == (other.exit_code, other.signal)


def test_scontrol_arrays_expand_outputs_and_bracket_pending_rest() -> None:
    array = JOBS["array"]
    tasks = by_id(parse.parse_scontrol_jobs(data("scontrol_array.txt")))
    assert sorted(tasks) == [f"{array}_1", f"{array}_2", f"{array}_3"]
    assert tasks[f"{array}_2"].stdout_path == f"/tmp/hpclaunch-capture/slurm-{array}_2.out"
    assert tasks[f"{array}_3"].raw_job_id == array  # the last task reuses the array's own id
    throttled = JOBS["array_throttled"]
    ids = sorted(by_id(parse.parse_scontrol_jobs(data("scontrol_array_throttled.txt"))))
    assert ids == [f"{throttled}_5", f"{throttled}_[6-9%1]"]


def test_scontrol_all_and_unknown() -> None:
    records = parse.parse_scontrol_jobs(data("scontrol_all.txt"))
    assert {JOBS["completed"], JOBS["running"]} <= {r.job_id for r in records}
    assert parse.classify_error(data("scontrol_unknown.stderr.txt")) == "invalid_job"
    assert parse.parse_scontrol_jobs("") == []


# --- sacct ------------------------------------------------------------------------------------------

# Not captured: the dev cluster has no slurmdbd. The shape follows sacct_argv's --parsable2 output
# on Slurm 22.05 (allocation lines, plus a step line sacct prints without -X, which must be ignored).
SACCT_SAMPLE = (
    "7|#|7|#|COMPLETED|#|None|#|node1|#|2024-05-01T10:00:01|#|2024-05-01T10:00:00|#|00:00:05|#|"
    "01:00:00|#|0:0|#|debug|#|alice|#|/home/alice|#|train|#|\n"
    "8|#|8|#|CANCELLED by 1000|#|None|#|node2|#|2024-05-01T10:00:02|#|2024-05-01T10:00:00|#|"
    "00:01:00|#|UNLIMITED|#|0:15|#|debug|#|alice|#|/home/alice|#|nb|#|\n"
    "8.batch|#|8.batch|#|CANCELLED|#||#|node2|#|2024-05-01T10:00:02|#|2024-05-01T10:00:02|#|"
    "00:01:00|#||#|0:15|#||#||#||#|batch|#|\n"
    "9_2|#|11|#|FAILED|#|NonZeroExitCode|#|node1|#|2024-05-01T10:00:03|#|2024-05-01T10:00:00|#|"
    "1-02:03:04|#|2-00:00:00|#|2:0|#|debug|#|alice|#|/home/alice|#|arr|#|\n"
    "10|#|10|#|PENDING|#|Priority|#|None assigned|#|Unknown|#|2024-05-01T10:00:00|#|00:00:00|#|"
    "01:00:00|#|0:0|#|debug|#|alice|#|/home/alice|#|later|#|\n"
)


def test_sacct_sample() -> None:
    jobs = by_id(parse.parse_sacct(SACCT_SAMPLE))
    assert sorted(jobs) == ["10", "7", "8", "9_2"]
    assert jobs["7"].state is JobState.COMPLETED and jobs["7"].elapsed == 5 and jobs["7"].time_limit == 3600
    assert jobs["8"].state is JobState.CANCELLED and jobs["8"].signal == 15
    failed = jobs["9_2"]
    assert (failed.exit_code, failed.array_job_id, failed.array_task_id, failed.raw_job_id) == (
        2,
        "9",
        "2",
        "11",
    )
    assert failed.elapsed == ((1 * 24 + 2) * 60 + 3) * 60 + 4 and failed.time_limit == 2 * 86400
    assert jobs["10"].start_time is None and jobs["10"].exit_code is None
    assert parse.accounting_disabled(data("sacct.stderr.txt"))


# --- values and ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0:08", 8),
        ("1:28", 88),
        ("30:00", 1800),
        ("01:00:00", 3600),
        ("2-00:00:00", 172800),
        ("1-02", 93600),
        ("45", 2700),
        ("UNLIMITED", None),
        ("INVALID", None),
        ("N/A", None),
    ],
)
def test_parse_duration(text: str, seconds: int | None) -> None:
    assert parse.parse_duration(text) == seconds


def test_parse_times_and_exit_codes() -> None:
    assert parse.parse_time("2026-11-27T07:32:35") == datetime(2026, 11, 27, 7, 32, 35)
    assert parse.parse_time("N/A") is None and parse.parse_time("Unknown") is None
    assert parse.parse_exit_code("3:0") == (3, None)
    assert parse.parse_exit_code("0:9") == (0, 9)
    assert parse.parse_wait_status("768") == (3, None)
    assert parse.parse_wait_status("15") == (0, 15)


def test_job_ids() -> None:
    assert parse.split_job_id("123") == ("123", None)
    assert parse.split_job_id("123_4") == ("123", "4")
    assert parse.split_job_id("123_[5-9]") == ("123", "[5-9]")
    assert parse.is_job_id("123+0") and parse.is_job_id("123.batch")
    assert not parse.is_job_id("12;rm -rf /") and not parse.is_job_id("--all")
    assert parse.expand_task_range("[5-9%2]") == [5, 6, 7, 8, 9]
    assert parse.expand_task_range("1,3,10-14:2") == [1, 3, 10, 12, 14]


def test_filename_patterns() -> None:
    values = {"j": "42", "x": "train", "u": "alice", "N": "node1"}
    assert parse.expand_filename_pattern("%x-%j.out", values) == "train-42.out"
    assert parse.expand_filename_pattern("%u/%N/%5j %% done", values) == "alice/node1/00042 % done"
    assert parse.expand_filename_pattern("%t.out", values) is None  # unknown token: ask scontrol
    assert parse.expand_filename_pattern("a\\%j", values) == "a%j"  # a backslash turns expansion off


@pytest.mark.parametrize(
    "message",
    [
        "squeue: error: slurm_load_jobs error: Socket timed out on send/recv operation",
        "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)",
        "scontrol: error: Resource temporarily unavailable",
        "squeue: error: Slurm backup controller in standby mode",
        "slurm_load_jobs error: Zero Bytes were transmitted or received",
        "squeue: error: slurm_persist_conn_open_without_init: failed to open persistent connection: "
        "Connection refused",
    ],
)
def test_transient_errors(message: str) -> None:
    assert parse.classify_error(message) == "transient"


# --- SlurmClient over a scripted fake transport -----------------------------------------------------

Handler = Callable[[list[str], "str | bytes | None"], "tuple[int, str, str] | CommandResult"]


class FakeTransport(CommandRunner):
    """Answers commands from a handler and records them; never runs anything.

    Only the role SlurmClient uses: commands, no files, no forwards.
    """

    def __init__(self, handler: Handler) -> None:
        super().__init__()
        self.handler = handler
        self.calls: list[tuple[list[str], str | bytes | None, Mapping[str, str] | None]] = []

    @property
    def description(self) -> str:
        return "the fake cluster"

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: str | bytes | None = None,
        timeout: float | None = 60.0,
        check: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> CommandResult:
        self._count_command(argv)
        self.calls.append((list(argv), stdin, env))
        answer = self.handler(list(argv), stdin)
        if isinstance(answer, CommandResult):
            return answer
        code, out, err = answer
        assert not check, "SlurmClient decides about failures itself"
        return CommandResult(tuple(argv), code, out, err)

    def home(self) -> str:
        return "/home/alice"


class FakeClock:
    """Time that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


def make_client(handler: Handler, deadline: float = 30.0) -> tuple[SlurmClient, FakeTransport, FakeClock]:
    transport = FakeTransport(handler)
    clock = FakeClock()
    client = SlurmClient(
        transport, retry=RetryPolicy(deadline=deadline), sleep=clock.sleep, clock=clock, rng=lambda: 0.5
    )
    return client, transport, clock


def squeue_line(job_id: str, state: str = "RUNNING", name: str = "job", reason: str = "None") -> str:
    """One line in the exact shape of the captured squeue output."""
    line = data("squeue_all.txt").splitlines()[0]
    fields = parse.split_fields(line, len(parse.SQUEUE_FIELDS))
    assert fields is not None
    row = dict(zip(parse.SQUEUE_FIELDS, fields, strict=True))
    row.update(JobArrayID=job_id, JobID=job_id, ArrayJobID=job_id, State=state, Name=name, Reason=reason)
    row["exit_code"] = "0"
    return "".join(row[f] + parse.DELIM for f in parse.SQUEUE_FIELDS) + "\n"


def requested_ids(argv: Sequence[str]) -> list[str]:
    for arg in argv:
        if arg.startswith("--jobs="):
            return arg.split("=", 1)[1].split(",")
    return []


def test_fifty_jobs_are_one_squeue_call() -> None:
    ids = [str(1000 + i) for i in range(50)]

    def handler(argv: list[str], stdin: object) -> tuple[int, str, str]:
        assert argv[0] == "squeue"
        return 0, "".join(squeue_line(i) for i in requested_ids(argv)), ""

    client, transport, _ = make_client(handler)
    states = client.states(ids)
    assert list(states) == ids and all(s.state is JobState.RUNNING for s in states.values())
    assert transport.command_counts == {"squeue": 1}
    # queries run with a fixed time format, whatever the user's SLURM_TIME_FORMAT says
    assert transport.calls[0][2] == {"SLURM_TIME_FORMAT": "standard"}


def test_transient_then_success_retries_with_growing_backoff() -> None:
    answers = iter(
        [
            (1, "", "squeue: error: slurm_load_jobs error: Socket timed out on send/recv operation\n"),
            (1, "", "squeue: error: Unable to contact slurm controller (connect failure)\n"),
            (1, "", "squeue: error: Unable to contact slurm controller (connect failure)\n"),
            (0, squeue_line("5", "COMPLETED"), ""),
        ]
    )
    client, transport, clock = make_client(lambda argv, stdin: next(answers))
    assert client.info("5").state is JobState.COMPLETED
    assert transport.command_counts == {"squeue": 3 + 1}
    assert clock.sleeps == sorted(clock.sleeps) and clock.sleeps[0] < clock.sleeps[-1]


def test_controller_down_gives_unknown_never_failed() -> None:
    down = (1, "", "squeue: error: Unable to contact slurm controller (connect failure)\n")
    client, transport, clock = make_client(lambda argv, stdin: down, deadline=10.0)
    states = client.states(["5", "6"])
    assert {s.state for s in states.values()} == {JobState.UNKNOWN}
    assert "Unable to contact slurm controller" in (states["5"].reason or "")
    assert set(transport.command_counts) == {"squeue"}  # scontrol asks the same dead controller
    assert sum(clock.sleeps) <= 10.0 + 1e-9


def test_fallback_to_scontrol_then_sacct_disabled_is_skipped_silently() -> None:
    done = data("scontrol_completed.txt")

    def handler(argv: list[str], stdin: object) -> tuple[int, str, str]:
        if argv[0] == "squeue":
            return 0, "", ""  # purged from squeue's view
        if argv[0] == "scontrol":
            if argv[-1] == JOBS["completed"]:
                return 0, done, ""
            return 1, "", data("scontrol_unknown.stderr.txt")
        if argv[0] == "sacct":
            return 1, "", data("sacct.stderr.txt")
        raise AssertionError(argv)

    client, transport, _ = make_client(handler)
    states = client.states([JOBS["completed"], "999999"])
    assert states[JOBS["completed"]].state is JobState.COMPLETED
    assert states[JOBS["completed"]].source == "scontrol"
    assert states["999999"].state is JobState.UNKNOWN and "not known" in (states["999999"].reason or "")
    assert transport.command_counts == {"squeue": 1, "scontrol": 2, "sacct": 1}
    assert client.accounting is False
    client.states(["999999"])
    assert transport.command_counts["sacct"] == 1  # never asked again


def test_sacct_answers_what_the_controller_forgot() -> None:
    def handler(argv: list[str], stdin: object) -> tuple[int, str, str]:
        if argv[0] == "squeue":
            return 1, "", data("squeue_single_unknown.stderr.txt")
        if argv[0] == "scontrol":
            return 1, "", data("scontrol_unknown.stderr.txt")
        return 0, SACCT_SAMPLE, ""

    client, transport, _ = make_client(handler)
    info = client.info("9_2")
    assert (info.state, info.source, info.exit_code) == (JobState.FAILED, "sacct", 2)
    assert transport.command_counts == {"squeue": 1, "scontrol": 1, "sacct": 1}


def test_many_missing_ids_use_one_scontrol_call() -> None:
    ids = [str(i) for i in range(100, 110)]

    def handler(argv: list[str], stdin: object) -> tuple[int, str, str]:
        if argv[0] == "scontrol":
            assert argv == parse.scontrol_argv()  # every job at once, not ten calls
            return 0, data("scontrol_all.txt"), ""
        if argv[0] == "sacct":
            return 1, "", "Slurm accounting storage is disabled\n"
        return 0, "", ""

    client, transport, _ = make_client(handler)
    client.states(ids)
    assert transport.command_counts == {"squeue": 1, "scontrol": 1, "sacct": 1}


def test_squeue_refusing_a_list_with_one_unknown_id_falls_back_to_all_jobs() -> None:
    def handler(argv: list[str], stdin: object) -> tuple[int, str, str]:
        if requested_ids(argv):
            return 1, "", "slurm_load_jobs error: Invalid job id specified\n"  # older Slurm
        return 0, squeue_line("5") + squeue_line("7"), ""

    client, transport, _ = make_client(handler)
    states = client.states(["5", "6", "7"])
    assert states["5"].state is JobState.RUNNING and states["7"].state is JobState.RUNNING
    assert transport.command_counts["squeue"] == 2


def test_array_ids_match_tasks_and_summaries() -> None:
    client, _, _ = make_client(lambda argv, stdin: (0, data("squeue_all.txt"), ""))
    array, throttled = JOBS["array"], JOBS["array_throttled"]
    states = client.states([array, f"{array}_2", throttled, f"{throttled}_7", f"{throttled}_5"])
    assert states[array].state is JobState.COMPLETED  # all three tasks done
    assert states[f"{array}_2"].array_task_id == "2"
    assert states[throttled].state is JobState.RUNNING  # one task runs, the rest wait
    assert states[f"{throttled}_7"].state is JobState.PENDING
    assert states[f"{throttled}_5"].state is JobState.RUNNING


def test_submit_passes_the_script_on_stdin() -> None:
    client, transport, _ = make_client(lambda argv, stdin: (0, "77\n", ""))
    script = "#!/bin/bash\necho 'hi; $(rm -rf ~)'\n"
    job_id = client.submit(script, sbatch_args=["-J", "a b"], workdir="/scratch/x", env={"FOO": "1"})
    assert job_id == "77"
    argv, stdin, env = transport.calls[0]
    assert argv == ["sbatch", "--parsable", "-J", "a b", "--chdir=/scratch/x"]
    assert stdin == script and env is not None and env["FOO"] == "1"


def test_submit_rejection_quotes_slurm() -> None:
    stderr = data("sbatch_invalid_partition.stderr.txt")
    client, transport, _ = make_client(lambda argv, stdin: (1, "", stderr))
    with pytest.raises(SubmissionRejected) as info:
        client.submit("#!/bin/bash\ntrue\n", sbatch_args=["-p", "nope"])
    assert "sbatch: error: invalid partition specified: nope" in str(info.value)
    assert transport.command_counts == {"sbatch": 1}  # no retry of a permanent error


def test_submit_retries_only_when_the_job_surely_was_not_queued() -> None:
    answers = iter([(1, "", "sbatch: error: Batch job submission failed: Unable to contact slurm controller"),
                    (0, "78\n", "")])  # fmt: skip
    client, transport, _ = make_client(lambda argv, stdin: next(answers))
    assert client.submit("#!/bin/bash\ntrue\n") == "78"
    assert transport.command_counts == {"sbatch": 2}

    timed_out = (1, "", "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation")
    client, transport, _ = make_client(lambda argv, stdin: timed_out)
    with pytest.raises(SlurmUnavailable) as info:
        client.submit("#!/bin/bash\ntrue\n")
    assert transport.command_counts == {"sbatch": 1}  # it may have been queued: do not submit twice
    assert "squeue" in (info.value.hint or "")


def test_cancel_of_a_finished_job_is_not_an_error() -> None:
    finished = (
        1,
        "",
        "scancel: error: Kill job error on job id 5: Job/step already completing or completed\n",
    )
    client, transport, _ = make_client(lambda argv, stdin: finished)
    client.cancel("5")
    client, transport, _ = make_client(lambda argv, stdin: (0, "", ""))
    client.cancel("5", signal="usr1", batch_only=True)
    assert transport.calls[0][0] == ["scancel", "--verbose", "--signal=USR1", "--batch", "5"]
    with pytest.raises(SlurmError):
        client.cancel("5", signal="-9; rm")
    with pytest.raises(SlurmError):
        client.cancel("--me")
    denied = (1, "", "scancel: error: Kill job error on job id 5: Access/permission denied\n")
    client, _, _ = make_client(lambda argv, stdin: denied)
    with pytest.raises(SlurmError, match="permission denied"):
        client.cancel("5")


def test_cancel_of_an_unknown_job_is_an_error() -> None:
    # Slurm 22.05, as captured on the dev cluster: `scancel -v 99999` exits 0 and says so on stderr only.
    unknown = (
        0,
        "",
        "scancel: Terminating job 99999\n"
        "scancel: error: Kill job error on job id 99999: Invalid job id specified\n",
    )
    client, _, _ = make_client(lambda argv, stdin: unknown)
    with pytest.raises(JobNotFound, match="no job 99999 is known"):
        client.cancel("99999")


def test_wait_polls_with_one_query_per_round_and_backs_off() -> None:
    script = iter(["PENDING", "PENDING", "RUNNING", "RUNNING", "COMPLETED"])

    def handler(argv: list[str], stdin: object) -> tuple[int, str, str]:
        state = next(script)
        return 0, "".join(squeue_line(i, state) for i in requested_ids(argv)), ""

    client, transport, clock = make_client(handler)
    updates: list[str] = []
    result = client.wait(["1", "2"], poll=0.2, max_poll=0.5, on_update=lambda i: updates.append(i.describe()))
    assert {r.state for r in result.values()} == {JobState.COMPLETED}
    assert transport.command_counts == {"squeue": 5}
    assert updates[:2] == ["1 PENDING", "2 PENDING"] and len(updates) == 6  # only changes are reported
    assert clock.sleeps[0] == pytest.approx(0.2) and max(clock.sleeps) == pytest.approx(0.5)


def test_wait_deadline_raises_a_clear_timeout() -> None:
    client, _, clock = make_client(
        lambda argv, stdin: (0, squeue_line("3", "PENDING", reason="Resources"), "")
    )
    with pytest.raises(WaitTimeout) as info:
        client.wait(["3"], timeout=5)
    assert "job 3 still not finished after 5 s: 3 PENDING (Resources)" in str(info.value)
    assert clock.now - 1000.0 == pytest.approx(5.0)


def test_wait_keeps_waiting_through_an_outage_but_not_forever_on_an_unknown_id() -> None:
    outage = iter([(1, "", "squeue: error: Socket timed out on send/recv operation")] * 3)

    def handler(argv: list[str], stdin: object) -> tuple[int, str, str]:
        with contextlib.suppress(StopIteration):
            return next(outage)
        return 0, squeue_line("4", "COMPLETED"), ""

    client, _, _ = make_client(handler, deadline=0.1)
    assert client.wait(["4"])["4"].state is JobState.COMPLETED

    def nothing(argv: list[str], stdin: object) -> tuple[int, str, str]:
        if argv[0] == "sacct":
            return 1, "", "Slurm accounting storage is disabled"
        return (0, "", "") if argv[0] == "squeue" else (1, "", "Invalid job id specified")

    client, _, _ = make_client(nothing)
    with pytest.raises(SlurmError, match=r"no such job: 12345 \(not known to squeue or scontrol"):
        client.wait(["12345"], unknown_grace=30)


def test_invalid_ids_are_refused_before_any_command() -> None:
    client, transport, _ = make_client(lambda argv, stdin: (0, "", ""))
    with pytest.raises(SlurmError):
        client.states(["1", "2,3"])
    assert transport.commands_run == 0


def test_tool_steps_are_the_numbered_steps_of_that_job() -> None:
    out = "123.batch\n123.extern\n123.0\n123.12\n1234.1\n123.interactive\n"
    assert parse.parse_tool_steps(out, "123") == ["123.0", "123.12"]
    assert parse.parse_tool_steps("", "123") == []
    assert parse.steps_argv("123")[:3] == ["squeue", "--noheader", "--steps"]
