"""hpclaunch: JupyterLab tunnels and GPU training jobs on Slurm, from a login node or a laptop.

The public API is importable from here; heavy modules load only when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    CommandError,
    ConfigError,
    ConnectionFailed,
    HostKeyError,
    HpclaunchError,
    JobFailed,
    JupyterError,
    ParameterError,
    SlurmError,
    SubmissionRejected,
    TemplateError,
    TransportError,
    WaitTimeout,
)

if TYPE_CHECKING:
    from .array import ArrayJob
    from .cluster import Cluster
    from .job import Job
    from .jupyter.session import JupyterOptions, Session
    from .states import JobInfo, JobState
    from .train import TrainOptions

_LAZY = {
    "ArrayJob": ("hpclaunch.array", "ArrayJob"),
    "Cluster": ("hpclaunch.cluster", "Cluster"),
    "Job": ("hpclaunch.job", "Job"),
    "JobInfo": ("hpclaunch.states", "JobInfo"),
    "JobState": ("hpclaunch.states", "JobState"),
    "JupyterOptions": ("hpclaunch.jupyter.session", "JupyterOptions"),
    "Session": ("hpclaunch.jupyter.session", "Session"),
    "TrainOptions": ("hpclaunch.train", "TrainOptions"),
}


def _version() -> str:
    """Written once, in pyproject.toml. Read on first use: importlib.metadata costs ~20 ms to import,
    a tenth of a warm ``hpclaunch status``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hpclaunch")
    except PackageNotFoundError:  # pragma: no cover - run from a tree that was never installed
        return "0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        return _version()
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'hpclaunch' has no attribute {name!r}")


__all__ = [
    "ArrayJob",
    "Cluster",
    "CommandError",
    "ConfigError",
    "ConnectionFailed",
    "HostKeyError",
    "HpclaunchError",
    "Job",
    "JobFailed",
    "JobInfo",
    "JobState",
    "JupyterError",
    "JupyterOptions",
    "ParameterError",
    "Session",
    "SlurmError",
    "SubmissionRejected",
    "TemplateError",
    "TrainOptions",
    "TransportError",
    "WaitTimeout",
    "__version__",
]
