"""Slurm's job states, folded into five named phases, and the one record every query returns."""

from __future__ import annotations

import enum
import re
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


@dataclass(frozen=True)
class JobInfo:
    """What one query learned about one job. Times are naive local datetimes as Slurm prints them."""

    job_id: str
    state: JobState
    source: str  # 'squeue' | 'scontrol' | 'sacct' | 'local'
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
    def estimated_start(self) -> datetime | None:
        """Slurm's estimate of when a pending job will start, when it has made one."""
        return self.start_time if self.state.phase is Phase.PENDING else None

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
