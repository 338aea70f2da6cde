"""Staging and submitting training runs: a bundled job from ``jobs/`` or the user's own script."""

from __future__ import annotations

import posixpath
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import HpclaunchError, ParameterError, TemplateError
from .params import validate_params
from .render import data_dir

if TYPE_CHECKING:
    from .cluster import Cluster
    from .job import Job

#: Files a finished run leaves in its run directory, brought back by ``fetch``.
RESULT_FILES = ("metrics.csv", "plot.png", "model.pt", "checkpoint.pt")


@dataclass(frozen=True)
class TrainOptions:
    #: Interpreter on the nodes; None: ``python3`` after the setup lines, or this very Python for the
    #: built-in ``local`` profile (whose jobs run here, where hpclaunch[train] is installed).
    python: str | None = None
    signal_lead: int = 90
    max_requeues: int = 3


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
            raise TemplateError(f"training script {path} does not exist", hint="give a path to a .py file")
        return path, [path]
    raise TemplateError(
        f"unknown training job {name_or_path!r}",
        hint="bundled: " + ", ".join(jobs) + "; or give a path to your own .py script",
    )


def default_python(cluster: Cluster) -> str:
    """``python3`` as the setup lines leave it; for the ``local`` profile, the Python running hpclaunch."""
    return sys.executable if cluster.profile.scheduler == "local" else "python3"


def gpus_per_node(cluster: Cluster, partition: str | None) -> int | None:
    """The most GPUs any node of the partition has, from ``sinfo``; None when it cannot be told."""
    if cluster.profile.scheduler != "slurm":
        return None
    argv = ["sinfo", "-h", "-o", "%G"]
    if partition:
        argv += ["-p", partition]
    result = cluster.transport.run(argv, check=False, timeout=30)
    if not result.ok:
        return None
    best = 0
    for gres in result.stdout.split():
        for match in re.finditer(r"gpu(?::[^:,(]+)?:(\d+)", gres):
            best = max(best, int(match.group(1)))
    return best


def cpus_per_gpu(sinfo_cpus_gres: str) -> int | None:
    """CPU cores per GPU on the partition's tightest node type, from ``sinfo -h -o "%c %G"`` lines
    (``64 gpu:a100:4(S:0-1)``): the share of one training process per GPU. None: no GPU nodes."""
    share: int | None = None
    for line in sinfo_cpus_gres.splitlines():
        fields = line.split()
        if len(fields) < 2 or not fields[0].rstrip("+").isdigit():
            continue
        gpus = sum(int(m.group(1)) for m in re.finditer(r"gpu(?::[^:,(]+)?:(\d+)", fields[1]))
        if gpus:
            per = max(1, int(fields[0].rstrip("+")) // gpus)
            share = per if share is None else min(share, per)
    return share


def data_dir_arg(args: Sequence[str]) -> str | None:
    """The value of ``--data-dir`` among the script's arguments, if given."""
    for i, arg in enumerate(args):
        if arg == "--data-dir" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--data-dir="):
            return arg.split("=", 1)[1]
    return None


def submit(
    cluster: Cluster,
    job_or_script: str,
    script_args: Sequence[str],
    params: Mapping[str, Any],
    options: TrainOptions = TrainOptions(),
) -> Job:
    """Check what can be checked, stage the code into a new run directory, and submit the run."""
    script, files = resolve_script(job_or_script)
    params = validate_params(params)  # a bad value is refused before anything is staged
    params.setdefault("job_name", f"hpclaunch-train-{script.stem}")
    gpus = int(params.get("gpus") or cluster.profile.job.get("gpus") or 0)
    if gpus:
        have = gpus_per_node(cluster, params.get("partition") or cluster.profile.job.get("partition"))
        if have is not None and gpus > have:
            raise ParameterError(
                f"--gpus {gpus} is more than a node has here ({have} per node)",
                hint="use more --nodes instead",
            )
        params.setdefault("ntasks_per_node", gpus)  # one process per GPU
        if "cpus_per_task" not in params and "cpus_per_task" not in cluster.profile.job:
            # A node's CPUs shared out per GPU; the default of 1 would starve each training process.
            argv = ["sinfo", "-h", "-o", "%c %G"]
            partition = params.get("partition") or cluster.profile.job.get("partition")
            shape = cluster.transport.run([*argv, "-p", partition] if partition else argv, check=False)
            share = cpus_per_gpu(shape.stdout) if shape.ok else None
            if share:
                params["cpus_per_task"] = share
    data = data_dir_arg(script_args)
    if data is not None and not cluster.transport.exists(cluster.transport.expand(data)):
        where = cluster.profile.host or "this machine"
        raise ParameterError(
            f"data directory {data} does not exist on {where}",
            hint="copy the dataset there first, or run with --dataset synthetic",
        )
    run_dir = cluster.new_run_dir(params["job_name"])
    transport = cluster.transport
    transport.makedirs(run_dir, mode=0o700)
    with cluster.removed_on_error(run_dir):  # a failed copy leaves no half-staged run behind
        transport.makedirs(f"{run_dir}/code", mode=0o700)
        for path in files:
            transport.put(str(path), f"{run_dir}/code/{path.name}", mode=0o600)
    context = {
        "train": {
            "script": posixpath.join(run_dir, "code", script.name),
            "args": list(script_args),
            "python": options.python or default_python(cluster),
            "signal_lead": options.signal_lead,
            "max_requeues": options.max_requeues,
        }
    }
    return cluster.submit_prepared("train", run_dir=run_dir, context=context, params=params)


def fetch(cluster: Cluster, job: Job, dest: Path, *, names: Sequence[str] = RESULT_FILES) -> list[Path]:
    """Copy a run's results (and its log) into ``dest``; returns what was copied."""
    run_dir = job.run_dir or job.info().work_dir
    if not run_dir:
        raise HpclaunchError(f"job {job.id}: its run directory is unknown (Slurm no longer lists it)")
    transport = cluster.transport
    dest.mkdir(parents=True, exist_ok=True)
    wanted = [*names, f"slurm-{job.id}.out"]
    copied = []
    for name in wanted:
        remote = f"{run_dir}/{name}"
        if transport.exists(remote):
            transport.get(remote, str(dest / name))
            copied.append(dest / name)
    if not copied:
        raise HpclaunchError(
            f"job {job.id}: nothing to fetch in {run_dir}", hint="has the run written results yet?"
        )
    return copied
