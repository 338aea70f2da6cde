"""The Slurm client: job states, pure parsers of Slurm's output, and SlurmClient over a Transport."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hpclaunch.slurm.states import JobInfo, JobState, Phase

if TYPE_CHECKING:
    from hpclaunch.slurm.client import RetryPolicy, SlurmClient

__all__ = ["JobInfo", "JobState", "Phase", "RetryPolicy", "SlurmClient"]


def __getattr__(name: str) -> Any:
    # Imported late: the client pulls in the scheduler module, which itself needs states.
    if name in ("SlurmClient", "RetryPolicy"):
        from hpclaunch.slurm import client

        return getattr(client, name)
    raise AttributeError(name)
