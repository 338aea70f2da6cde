"""A submitit executor configured from an hpclaunch profile, for running Python functions as jobs.

submitit pickles the function into a folder, runs ``sbatch`` *on this machine*, and the job unpickles it
from the same folder on a compute node. So it needs a local ``sbatch`` and a filesystem shared with the
nodes: a login node, not a laptop. Over SSH, :func:`make_executor` says so and points to what works
there instead (``Cluster.submit`` / ``Cluster.submit_array`` with a script).

submitit is imported here only, when an executor is asked for: ``hpclaunch --help`` never loads it.
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, ParameterError, SlurmError
from .params import parse_time

if TYPE_CHECKING:
    from submitit.core.core import Executor

    from .submission import Submitter

#: hpclaunch parameters that submitit decides itself (it writes the logs next to its pickles).
_OWNED_BY_SUBMITIT = ("output", "error")


def time_minutes(limit: str) -> int | None:
    """A validated time limit (``01:30:00``, ``1-00:00:00``) in whole minutes, rounded up; None for
    ``UNLIMITED``/``INFINITE``."""
    if limit.upper() in ("UNLIMITED", "INFINITE"):
        return None
    return max(1, math.ceil(parse_time(limit) / 60))


def setup_lines(job: Mapping[str, Any]) -> list[str]:
    """The environment set-up of an hpclaunch job as shell lines (modules, conda, venv, setup)."""
    lines = [f"module load {shlex.quote(m)}" for m in job.get("modules") or ()]
    if job.get("conda_env"):
        lines.append(f"conda activate {shlex.quote(str(job['conda_env']))}")
    if job.get("venv"):
        venv = os.path.expanduser(str(job["venv"]))
        lines.append(f"source {shlex.quote(venv)}/bin/activate")
    lines += list(job.get("setup") or ())
    return lines


def sbatch_options_as_parameters(options: Sequence[str]) -> dict[str, Any]:
    """``["--exclusive", "--mail-type=END"]`` -> submitit's ``additional_parameters``
    ``{"exclusive": True, "mail_type": "END"}``."""
    out: dict[str, Any] = {}
    for option in options:
        if not option.startswith("--") or len(option) < 3:
            raise ParameterError(
                f"sbatch_options: {option!r} cannot be passed to submitit",
                hint="use the long form, e.g. --exclusive or --mail-type=END",
            )
        key, eq, value = option[2:].partition("=")
        out[key.replace("-", "_")] = value if eq else True
    return out


def slurm_parameters(job: Mapping[str, Any]) -> dict[str, Any]:
    """Resolved hpclaunch job parameters as ``submitit.SlurmExecutor.update_parameters`` keywords."""
    params: dict[str, Any] = {
        "job_name": job["job_name"],
        "nodes": job["nodes"],
        "ntasks_per_node": job["ntasks_per_node"],
        "cpus_per_task": job["cpus_per_task"],
    }
    for key in ("partition", "account", "qos", "mem", "constraint"):
        if job.get(key):
            params[key] = job[key]
    additional = sbatch_options_as_parameters(job.get("sbatch_options") or ())
    minutes = time_minutes(job["time"])
    if minutes is None:
        additional["time"] = job["time"]
    else:
        params["time"] = minutes
    if job.get("gpus"):
        kind = f"{job['gpu_type']}:" if job.get("gpu_type") else ""
        params["gres"] = f"gpu:{kind}{job['gpus']}"
    lines = setup_lines(job)
    if lines:
        params["setup"] = lines
    if additional:
        params["additional_parameters"] = additional
    return params


def local_parameters(job: Mapping[str, Any]) -> dict[str, Any]:
    """The same, for ``submitit.LocalExecutor`` (the ``local`` profile: one process on this machine)."""
    params: dict[str, Any] = {"tasks_per_node": job["ntasks_per_node"], "nodes": 1}
    minutes = time_minutes(job["time"])
    if minutes is not None:
        params["timeout_min"] = minutes
    lines = setup_lines(job)
    if lines:
        params["setup"] = lines
    return params


def make_executor(
    cluster: Submitter,
    *,
    folder: str | os.PathLike[str] | None = None,
    python: str | None = None,
    **params: Any,
) -> Executor:
    """See :meth:`hpclaunch.cluster.Cluster.executor`."""
    profile = cluster.profile
    if cluster.is_remote:
        raise ConfigError(
            f"cluster.executor() cannot work over SSH (profile {profile.name!r} reaches {profile.host}): "
            "submitit runs sbatch on this machine and hands the function to the job as a pickle in a "
            "folder that this machine and the compute nodes must share",
            hint="run the script on the login node with a profile without `host`, or use "
            "cluster.submit(...) / cluster.submit_array(...), which work over SSH",
        )
    for key in _OWNED_BY_SUBMITIT:
        if params.get(key) is not None or params.get(key.replace("_", "-")) is not None:
            raise ParameterError(
                f"executor(): {key} is chosen by submitit (logs go next to its pickles in the folder)",
                hint="pass folder=... to choose where",
            )
    job = cluster.resolve_job(params, default_name="hpclaunch-submitit", source="executor()")
    if folder is None:
        base = Path(os.path.expanduser(profile.workdir)) / "submitit" / "%j"
    else:
        base = Path(os.path.expanduser(os.fspath(folder)))
    # The part before any %j is made now, private to the user: pickles may hold data and credentials.
    fixed = Path(*base.parts[: _first_pattern(base)])
    fixed.mkdir(parents=True, exist_ok=True, mode=0o700)

    import submitit  # late: heavy, and only needed here

    executor: Executor
    if cluster.capabilities.runs_here:
        executor = submitit.LocalExecutor(folder=base, python=python)
        executor.update_parameters(**local_parameters(job))
        return executor
    if shutil.which("sbatch") is None:
        raise SlurmError(
            "cluster.executor() needs sbatch on this machine, and it is not on PATH",
            hint="run this on a Slurm login node, or use the `local` profile",
        )
    executor = submitit.SlurmExecutor(folder=base, python=python)
    executor.update_parameters(**slurm_parameters(job))
    return executor


def _first_pattern(path: Path) -> int:
    """How many leading parts of ``path`` hold no ``%`` pattern (``%j``, ``%t``)."""
    for index, part in enumerate(path.parts):
        if "%" in part:
            return index
    return len(path.parts)
