"""Slurm's job states, folded into five named phases, and the one record every query returns."""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime


class Phase(str, enum.Enum):
    """What a caller waits on: a job is pending, running, done, failed, or we cannot tell."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    UNKNOWN = "unknown"


class JobState(str, enum.Enum):
    """A Slurm job state (``squeue %T``, ``scontrol JobState=``, ``sacct State``)."""

    PENDING = "PENDING"
    CONFIGURING = "CONFIGURING"
    REQUEUED = "REQUEUED"
    REQUEUE_HOLD = "REQUEUE_HOLD"
    REQUEUE_FED = "REQUEUE_FED"
    RUNNING = "RUNNING"
    COMPLETING = "COMPLETING"
    SUSPENDED = "SUSPENDED"
    STOPPED = "STOPPED"
    RESIZING = "RESIZING"
    SIGNALING = "SIGNALING"
    STAGE_OUT = "STAGE_OUT"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    NODE_FAIL = "NODE_FAIL"
    PREEMPTED = "PREEMPTED"
    BOOT_FAIL = "BOOT_FAIL"
    DEADLINE = "DEADLINE"
    REVOKED = "REVOKED"
    SPECIAL_EXIT = "SPECIAL_EXIT"
    UNKNOWN = "UNKNOWN"

    @property
    def phase(self) -> Phase:
        """The named phase this state belongs to."""
        return _PHASES[self]

    @property
    def is_terminal(self) -> bool:
        """True when the job will not change state again without someone acting on it."""
        return self.phase in (Phase.DONE, Phase.FAILED)

    @classmethod
    def parse(cls, text: str) -> JobState:
        """Read a state as any Slurm command prints it; anything unrecognised is UNKNOWN.

        Handles ``CANCELLED by 1000``, sacct's truncation mark ``CANCELLED+``, compact codes
        (``PD``, ``R``, ``CD``) and flag lists such as ``RUNNING,COMPLETING`` (the base state wins).
        """
        word = text.strip().upper()
        if not word:
            return cls.UNKNOWN
        word = re.split(r"[\s,+]", word, maxsplit=1)[0]
        if word in _COMPACT:
            return _COMPACT[word]
        try:
            return cls(word)
        except ValueError:
            return cls.UNKNOWN


_PHASES: dict[JobState, Phase] = {
    JobState.PENDING: Phase.PENDING,
    JobState.CONFIGURING: Phase.PENDING,  # nodes booting: the job has not started its script yet
    JobState.REQUEUED: Phase.PENDING,
    JobState.REQUEUE_HOLD: Phase.PENDING,
    JobState.REQUEUE_FED: Phase.PENDING,
    JobState.RUNNING: Phase.RUNNING,
    JobState.COMPLETING: Phase.RUNNING,  # the exit code is not final until the epilog is done
    JobState.SUSPENDED: Phase.RUNNING,  # holds its allocation and will resume
    JobState.STOPPED: Phase.RUNNING,
    JobState.RESIZING: Phase.RUNNING,
    JobState.SIGNALING: Phase.RUNNING,
    JobState.STAGE_OUT: Phase.RUNNING,
    JobState.COMPLETED: Phase.DONE,
    JobState.FAILED: Phase.FAILED,
    JobState.CANCELLED: Phase.FAILED,
    JobState.TIMEOUT: Phase.FAILED,
    JobState.OUT_OF_MEMORY: Phase.FAILED,
    JobState.NODE_FAIL: Phase.FAILED,
    JobState.PREEMPTED: Phase.FAILED,
    JobState.BOOT_FAIL: Phase.FAILED,
    JobState.DEADLINE: Phase.FAILED,
    JobState.REVOKED: Phase.FAILED,
    JobState.SPECIAL_EXIT: Phase.FAILED,
    JobState.UNKNOWN: Phase.UNKNOWN,
}

_COMPACT: dict[str, JobState] = {
    "PD": JobState.PENDING,
    "CF": JobState.CONFIGURING,
    "RQ": JobState.REQUEUED,
    "RH": JobState.REQUEUE_HOLD,
    "RF": JobState.REQUEUE_FED,
    "R": JobState.RUNNING,
    "CG": JobState.COMPLETING,
    "S": JobState.SUSPENDED,
    "ST": JobState.STOPPED,
    "RS": JobState.RESIZING,
    "SI": JobState.SIGNALING,
    "SO": JobState.STAGE_OUT,
    "CD": JobState.COMPLETED,
    "F": JobState.FAILED,
    "CA": JobState.CANCELLED,
    "TO": JobState.TIMEOUT,
    "OOM": JobState.OUT_OF_MEMORY,
    "NF": JobState.NODE_FAIL,
    "PR": JobState.PREEMPTED,
    "BF": JobState.BOOT_FAIL,
    "DL": JobState.DEADLINE,
    "RV": JobState.REVOKED,
    "SE": JobState.SPECIAL_EXIT,
}


#: Pending reasons that will not clear by waiting, with what to change. Reasons not listed here
#: (Priority, Resources, QOSGrpGRES, BeginTime, Dependency, JobArrayTaskLimit, PartitionDown, ...)
#: clear by themselves. PartitionConfig ("not available now") is not listed: Slurm 22.05 shows it for a
#: moment before PartitionTimeLimit, and it can clear.
CANNOT_START: Mapping[str, str] = {
    "PartitionNodeLimit": "the partition has fewer nodes (or a lower node limit) than asked for: ask for "
    "fewer --nodes or use another --partition",
    "PartitionTimeLimit": "the partition's time limit is shorter than asked for: ask for less --time or "
    "use another --partition",
    "AccountNotAllowed": "this account may not use the partition: use another --account or --partition",
    "QOSNotAllowed": "this QOS may not be used in the partition: use another --qos or --partition",
    "InvalidAccount": "the account is not valid for you: check --account with `sacctmgr show assoc "
    "user=$USER`",
    "InvalidQOS": "the QOS is not valid for you: check --qos with `sacctmgr show assoc user=$USER`",
    "QOSMaxWallDurationPerJobLimit": "the QOS allows less time than asked for: ask for less --time or "
    "use another --qos",
    "QOSMaxNodePerJobLimit": "the QOS allows fewer nodes than asked for: ask for fewer --nodes",
    "QOSMaxGRESPerJob": "the QOS allows fewer GPUs than asked for: ask for fewer --gpus",
    "QOSMaxCpuPerJobLimit": "the QOS allows fewer CPUs than asked for: ask for fewer --cpus-per-task",
    "AssocMaxWallDurationPerJobLimit": "your association allows less time than asked for: ask for less "
    "--time",
    "AssocMaxNodesPerJobLimit": "your association allows fewer nodes than asked for: ask for fewer --nodes",
    "BadConstraints": "no node has the features asked for: check --constraint against `sinfo -o %f`",
    "ReqNodeNotAvail": "the nodes asked for are down or drained: ask for other nodes, or none",
}


#: Reasons that also show for a while that passes: a controller that has just restarted names every node
#: as unavailable until its slurmd registers again (seconds), and so does a node that briefly stops
#: answering. A wait counts them only once they have lasted (see ``polling.StartWatch``).
PASSING_REASONS = frozenset({"ReqNodeNotAvail"})


def reason_word(reason: str | None) -> str:
    """The reason without its details: ``ReqNodeNotAvail, UnavailableNodes:node1`` is ``ReqNodeNotAvail``."""
    return (reason or "").split(",", 1)[0].strip()


def cannot_start_advice(reason: str | None) -> str | None:
    """What to change when ``reason`` (squeue's ``%r``) means the job can never start; else None.

    ``ReqNodeNotAvail`` counts only when Slurm names the unavailable nodes (down, drained, reserved).
    """
    if not reason:
        return None
    word = reason_word(reason)
    if word == "ReqNodeNotAvail" and "UnavailableNodes:" not in reason:
        return None
    return CANNOT_START.get(word)


#: ``JobInfo.source`` of an id that every source answered for and none knew.
NOT_FOUND = "none"


@dataclass(frozen=True)
class JobInfo:
    """What one query learned about one job. Times are naive local datetimes as Slurm prints them."""

    job_id: str
    state: JobState
    source: str  # 'squeue' | 'scontrol' | 'sacct' | 'local' | NOT_FOUND
    name: str | None = None
    reason: str | None = None
    node_list: str | None = None
    start_time: datetime | None = None  # for a pending job: Slurm's estimate, when it has one
    submit_time: datetime | None = None
    elapsed: int | None = None  # seconds
    time_limit: int | None = None  # seconds; None when unlimited or unknown
    exit_code: int | None = None
    signal: int | None = None
    work_dir: str | None = None
    stdout_path: str | None = None
    stderr_path: str | None = None
    array_job_id: str | None = None
    array_task_id: str | None = None
    restart_count: int = 0
    raw_job_id: str | None = None  # the unique numeric id, which differs from job_id for array tasks
    partition: str | None = None
    user: str | None = None

    @property
    def not_found(self) -> bool:
        """Every source answered and none knew the id (a typo, or a job forgotten long ago)."""
        return self.source == NOT_FOUND

    @property
    def phase(self) -> Phase:
        """The named phase of :attr:`state`."""
        return self.state.phase

    @property
    def is_terminal(self) -> bool:
        """True when the job has finished, one way or another."""
        return self.state.is_terminal

    @property
    def pending_reason(self) -> str | None:
        """Why Slurm has not started the job yet (``Resources``, ``Priority``...), or None."""
        return self.reason if self.state.phase is Phase.PENDING else None

    @property
    def cannot_start(self) -> str | None:
        """For a pending job that Slurm will never start as asked: what to change (else None)."""
        return cannot_start_advice(self.reason) if self.state.phase is Phase.PENDING else None

    @property
    def may_pass(self) -> bool:
        """The reason it cannot start can also be a passing one (see ``PASSING_REASONS``)."""
        return reason_word(self.reason) in PASSING_REASONS

    @property
    def estimated_start(self) -> datetime | None:
        """Slurm's estimate of when a pending job will start, when it has made one."""
        return self.start_time if self.state.phase is Phase.PENDING else None

    def waiting_line(self) -> str:
        """What a user waiting on the job wants to read: ``job 124 pending (Priority), estimated start
        2026-12-01 14:02`` while it waits, else :meth:`describe`."""
        if self.state.phase is not Phase.PENDING:
            return f"job {self.describe()}"
        text = f"job {self.job_id} pending"
        if self.reason:
            text += f" ({self.reason})"
        if self.estimated_start:
            text += f", estimated start {self.estimated_start:%Y-%m-%d %H:%M}"
        return text

    def already_ended(self) -> str:
        """What to say when asked to end a job that has: ``already COMPLETED (exit 0)``."""
        if self.not_found:
            return "already ended (Slurm no longer lists it)"
        # A cancelled or timed-out job's exit code is Slurm's, not the program's: not worth a word.
        told = self.exit_code is not None and self.state in (JobState.COMPLETED, JobState.FAILED)
        exit_code = f" (exit {self.exit_code})" if told else ""
        return f"already {self.state.value}{exit_code}"

    def describe(self) -> str:
        """A short human line: ``123 RUNNING on node1`` or ``124 PENDING (Resources)``."""
        text = f"{self.job_id} {self.state.value}"
        if self.state.phase is Phase.RUNNING and self.node_list:
            text += f" on {self.node_list}"
        if self.reason:
            text += f" ({self.reason})"
        if self.is_terminal and self.exit_code is not None:
            text += f" exit {self.exit_code}"
            if self.signal:
                text += f" signal {self.signal}"
        return text
