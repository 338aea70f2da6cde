"""Staging and submitting training runs: a bundled job from ``jobs/`` or the user's own script."""

from __future__ import annotations

import os
import posixpath
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CannotRun, HpclaunchError, ParameterError, TemplateError
from .params import gpus_beyond_a_node, reject_control_chars, whole_number
from .render import data_dir

if TYPE_CHECKING:
    from .job import Job
    from .submission import Submitter

#: Files a finished run leaves in its run directory, brought back by ``fetch``.
RESULT_FILES = ("metrics.csv", "plot.png", "model.pt", "checkpoint.pt")
#: Where a run's code is staged inside its run directory (it also marks the directory as a training run).
CODE_DIR = "code"


@dataclass(frozen=True)
class TrainOptions:
    #: Interpreter on the nodes; None: ``python3`` after the setup lines, or this very Python for the
    #: built-in ``local`` profile (whose jobs run here, where hpclaunch[train] is installed).
    python: str | None = None
    #: Seconds of warning (SIGUSR2) before the time limit, to checkpoint in.
    signal_lead: int = 90
    #: How often a run may requeue itself after the warning.
    max_requeues: int = 3

    def __post_init__(self) -> None:
        # Checked like job parameters: these values are written into the job script.
        whole_number(0, 65535)("signal_lead", self.signal_lead)
        whole_number(0, 1000)("max_requeues", self.max_requeues)
        if self.python is not None:
            reject_control_chars("python", str(self.python))


#: Modules in ``jobs/`` that the bundled jobs import; staged beside them, not runnable on their own.
SHARED_MODULES = ("hpctrain.py", "hpctrain_data.py", "hpctrain_dist.py", "hpctrain_io.py")


def bundled_jobs() -> dict[str, Path]:
    """Bundled job name -> script path (every ``jobs/*.py`` but the shared modules)."""
    directory = data_dir("jobs")
    return {
        p.stem: p
        for p in sorted(directory.glob("*.py"))
        if not p.name.startswith("_") and p.name not in SHARED_MODULES
    }


def resolve_script(name_or_path: str) -> tuple[Path, list[Path]]:
    """The script to run and every file to stage beside it (a bundled job brings its shared modules)."""
    jobs = bundled_jobs()
    if name_or_path in jobs:
        script = jobs[name_or_path]
        shared = [script.parent / name for name in SHARED_MODULES if (script.parent / name).is_file()]
        return script, [script, *shared]
    path = Path(name_or_path).expanduser()
    if path.suffix == ".py" or "/" in name_or_path:
        if not path.is_file():
            raise TemplateError.not_a_file("training script", path, hint="give a path to a .py file")
        return path, [path]
    raise TemplateError(
        f"unknown training job {name_or_path!r}",
        hint="bundled: " + ", ".join(jobs) + "; or give a path to your own .py script",
    )


def default_python(cluster: Submitter) -> str:
    """``python3`` as the setup lines leave it; where jobs run here, the Python running hpclaunch."""
    return sys.executable if cluster.capabilities.runs_here else "python3"


def train_defaults(cluster: Submitter, chosen: Mapping[str, Any]) -> dict[str, Any]:
    """One process per GPU, each with its share of the node's CPU cores (the built-in single core
    would starve it: the launch thread, NCCL's threads and the compiler share it), unless the user
    chose otherwise."""
    gpus = int(chosen.get("gpus") or 0)
    out: dict[str, Any] = {"ntasks_per_node": gpus or 1}
    if gpus and "cpus_per_task" not in chosen:
        share = cluster.scheduler.cpus_per_gpu(chosen.get("partition"))
        if share:
            out["cpus_per_task"] = share
    return out


def data_dir_arg(args: Sequence[str]) -> str | None:
    """The value of ``--data-dir`` among the script's arguments, if given."""
    for i, arg in enumerate(args):
        if arg == "--data-dir" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--data-dir="):
            return arg.split("=", 1)[1]
    return None


def submit(
    cluster: Submitter,
    job_or_script: str | os.PathLike[str],
    script_args: Sequence[str],
    params: Mapping[str, Any],
    options: TrainOptions = TrainOptions(),
) -> Job:
    """Check what can be checked, stage the code into a new run directory, and submit the run."""
    script, files = resolve_script(os.fspath(job_or_script))
    job = cluster.resolve_job(
        params,
        default_name=f"hpclaunch-train-{script.stem}",
        defaults=lambda chosen: train_defaults(cluster, chosen),
    )
    gpus = int(job.get("gpus") or 0)
    if gpus:
        have = cluster.scheduler.gpus_per_node(job.get("partition"))
        problem = gpus_beyond_a_node(gpus, have)
        if problem:
            raise CannotRun(problem)
    data = data_dir_arg(script_args)
    if data is not None and not cluster.transport.exists(cluster.transport.expand(data)):
        where = cluster.profile.host or "this machine"
        raise ParameterError(
            f"data directory {data} does not exist on {where}",
            hint="copy the dataset there first, or run with --dataset synthetic",
        )
    run_dir = cluster.new_run_dir(job["job_name"])
    context = {
        "train": {
            "script": posixpath.join(run_dir, CODE_DIR, script.name),
            "args": list(script_args),
            "python": options.python or default_python(cluster),
            "signal_lead": options.signal_lead,
            "max_requeues": options.max_requeues,
        }
    }
    prepared = cluster.prepare("train", job, run_dir=run_dir, context=context)
    return cluster.submit_prepared(prepared, files={path: f"{CODE_DIR}/{path.name}" for path in files})


def fetch(
    cluster: Submitter, job: Job, dest: str | os.PathLike[str], *, names: Sequence[str] = RESULT_FILES
) -> list[Path]:
    """Copy a run's results (and its log, wherever ``--output`` put it) into ``dest``; returns what
    was copied."""
    dest = Path(dest)
    info = job.info()
    run_dir = job.run_dir or info.work_dir
    if not run_dir:
        job.ensure_known(info)
        raise HpclaunchError(f"job {job.id}: its run directory is unknown (Slurm no longer lists it)")
    transport = cluster.transport
    dest.mkdir(parents=True, exist_ok=True)
    output = job.output_path_hint() or info.stdout_path or f"{run_dir}/slurm-{job.id}.out"
    remotes = [*(f"{run_dir}/{name}" for name in names), output]
    copied = []
    for remote in dict.fromkeys(remotes):
        name = posixpath.basename(remote)
        if transport.exists(remote):
            transport.get(remote, str(dest / name))
            copied.append(dest / name)
    if not copied:
        raise HpclaunchError(
            f"job {job.id}: nothing to fetch in {run_dir}", hint="has the run written results yet?"
        )
    return copied
