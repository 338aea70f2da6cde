"""What every backend offers (Slurm over a transport, or the built-in ``local`` one), and the shared wait.

Callers depend on :class:`Scheduler`, never on a concrete backend, so the same flow runs on a cluster
and on a laptop.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from hpclaunch.polling import UpdateCallback
from hpclaunch.states import JobInfo

if TYPE_CHECKING:
    from hpclaunch.slurm.request import Preflight

__all__ = ["ArrayTask", "Capabilities", "Scheduler", "UpdateCallback"]


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, so features ask instead of testing its name."""

    #: ``sbatch --array``: one job id, many tasks (else :meth:`Scheduler.submit_array` runs one job a task).
    arrays: bool
    #: One call ends every task of an array.
    cancel_array: bool
    #: Jobs run with this very Python and filesystem (the built-in ``local`` backend).
    runs_here: bool


@dataclass(frozen=True)
class ArrayTask:
    """One submitted task: its job id, and the ``%A``/``%a`` its output file name is made of."""

    job_id: str
    array_id: str
    index: int


@runtime_checkable
class Scheduler(Protocol):
    """Submit, watch and cancel batch jobs. Implemented by SlurmClient and LocalScheduler."""

    #: ``slurm`` or ``local``, for messages.
    name: str
    capabilities: Capabilities

    def submit(
        self,
        script_text: str,
        *,
        sbatch_args: Sequence[str] = (),
        workdir: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> str:
        """Submit a job script given as text; return its job id."""
        ...

    def submit_array(
        self, script_text: str, *, count: int, workdir: str, max_concurrent: int | None = None
    ) -> list[ArrayTask]:
        """Run the script as ``count`` array tasks (each sees ``SLURM_ARRAY_TASK_ID`` and
        ``HPCLAUNCH_TASK_OFFSET``, whose sum is its index); returns them in task order. Slurm splits a
        sweep larger than ``MaxArraySize`` into several arrays, with ``max_concurrent`` held across
        them; a backend without arrays starts one job per task."""
        ...

    def check(
        self, script_text: str, *, sbatch_args: Sequence[str] = (), workdir: str | None = None
    ) -> Preflight:
        """Whether and when the job could start, queueing nothing; raises CannotRun with what to change."""
        ...

    def max_array_size(self) -> int | None:
        """Task ids of one array must stay below this; None when there is no known limit."""
        ...

    def cpus_per_gpu(self, partition: str | None) -> int | None:
        """CPU cores per GPU on the partition's GPU nodes, for one process per GPU; None if unknown."""
        ...

    def gpus_per_node(self, partition: str | None) -> int | None:
        """The most GPUs any node of ``partition`` has; None when it cannot be told."""
        ...

    def states(self, job_ids: Iterable[str]) -> dict[str, JobInfo]:
        """The current info of each id (UNKNOWN where it cannot be told), in as few queries as possible."""
        ...

    def info(self, job_id: str) -> JobInfo:
        """The current info of one job."""
        ...

    def cancel(self, job_id: str, *, signal: str | None = None, batch_only: bool = False) -> None:
        """End a job (or only signal it); a job that has already ended is not an error."""
        ...

    def tool_steps(self, job_id: str) -> list[str]:
        """The steps that tools started in a running job (``srun``: shells, ssh sessions); the job's own
        batch script is not one."""
        ...

    def wait(
        self,
        job_ids: Iterable[str],
        *,
        timeout: float | None = None,
        poll: float | None = None,
        max_poll: float | None = None,
        on_update: UpdateCallback | None = None,
        unknown_grace: float | None = 120.0,
    ) -> dict[str, JobInfo]:
        """Block until every job has settled (ended, or pending for a reason that cannot clear),
        polling within the budget (``poll``/``max_poll`` are wishes inside it); WaitTimeout at the
        deadline; JobNotFound for an id that no source has known for ``unknown_grace`` seconds."""
        ...

    def output_path(self, job_id: str) -> str:
        """The job's standard output file, with ``%j`` and friends expanded."""
        ...

    def jobs(self, name_prefix: str | None = None, user: str | None = None) -> list[JobInfo]:
        """The user's jobs, optionally only those whose name starts with ``name_prefix``."""
        ...
