"""The one submit path: parameters resolved once, path-like arguments, capabilities, training checks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from hpclaunch.cli import debug_requested
from hpclaunch.cluster import Cluster
from hpclaunch.config import Profile
from hpclaunch.errors import CannotRun, ParameterError
from hpclaunch.localsched import LocalScheduler
from hpclaunch.slurm.parse import parse_sinfo_gpus
from hpclaunch.train import TrainOptions


class RecordingScheduler:
    """Takes submissions without running them, and says how many GPUs a node has."""

    name = "fake"
    capabilities = LocalScheduler.capabilities

    def __init__(self, gpus_per_node: int | None) -> None:
        self._gpus = gpus_per_node
        self.scripts: list[str] = []

    def gpus_per_node(self, partition: str | None) -> int | None:
        return self._gpus

    def cpus_per_gpu(self, partition: str | None) -> int | None:
        return 4

    def submit(
        self,
        script_text: str,
        *,
        sbatch_args: Sequence[str] = (),
        workdir: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> str:
        self.scripts.append(script_text)
        return str(len(self.scripts))


def cluster_with(tmp_path: Path, scheduler: RecordingScheduler, **defaults: Any) -> Cluster:
    cluster = Cluster(Profile(name="t", scheduler="local", workdir=str(tmp_path / "runs")), **defaults)
    cluster._scheduler = scheduler  # type: ignore[assignment]
    return cluster


def test_train_takes_gpus_from_cluster_defaults(tmp_path: Path) -> None:
    # First landing: Cluster(gpus=4) was not seen by the per-node check, which then passed wrongly.
    cluster = cluster_with(tmp_path, RecordingScheduler(gpus_per_node=2), gpus=4)
    with pytest.raises(CannotRun, match=r"--gpus 4 is more than a node has here \(2 per node\)"):
        cluster.train("mnist_lenet5", ["--dataset", "synthetic"])
    assert not (tmp_path / "runs").exists()  # refused before anything was staged


def test_train_runs_one_task_per_gpu_of_the_cluster_defaults(tmp_path: Path) -> None:
    scheduler = RecordingScheduler(gpus_per_node=4)
    cluster = cluster_with(tmp_path, scheduler, gpus=2)
    job = cluster.train("mnist_lenet5", ["--dataset", "synthetic"])
    (script,) = scheduler.scripts
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --gres=gpu:2" in script
    assert "#SBATCH --cpus-per-task=4" in script  # each GPU process gets its share of the node's cores
    assert job.run_dir is not None and (Path(job.run_dir) / "code" / "mnist_lenet5.py").is_file()
    # The user's own choice of tasks still wins over the one-per-GPU default.
    cluster.train("mnist_lenet5", ["--dataset", "synthetic"], ntasks_per_node=1)
    assert "#SBATCH --ntasks-per-node=1" in scheduler.scripts[1]


def test_sinfo_without_gpus_is_unknown_not_zero() -> None:
    assert parse_sinfo_gpus("gpu:2\ngpu:a100:4(S:0-1)\n(null)\n") == 4
    assert parse_sinfo_gpus("(null)\n") is None  # a CPU partition, or a mistyped one
    assert parse_sinfo_gpus("") is None


def test_path_arguments_accept_os_pathlike(tmp_path: Path) -> None:
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\necho from-a-path-object\n")
    data = tmp_path / "extra.txt"
    data.write_text("staged\n")
    scheduler = RecordingScheduler(gpus_per_node=None)
    cluster = cluster_with(tmp_path, scheduler)
    cluster.submit(script)  # first landing: TypeError ('in <string>' requires string as left operand)
    assert "from-a-path-object" in scheduler.scripts[0]
    job = cluster.submit("run", command=["cat", "extra.txt"], files={data: "extra.txt"})
    assert job.run_dir is not None and (Path(job.run_dir) / "extra.txt").read_text() == "staged\n"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"signal_lead": "90; rm -rf ~"}, "signal_lead: expected a whole number"),
        ({"signal_lead": -5}, "signal_lead: must be at least 0"),
        ({"max_requeues": "3\nexit"}, "max_requeues: expected a whole number"),
        ({"python": "python3\nrm -rf ~"}, "python"),
    ],
)
def test_train_options_are_checked_like_job_parameters(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ParameterError, match=message):
        TrainOptions(**options)


def test_rendered_train_values_are_quoted(tmp_path: Path) -> None:
    scheduler = RecordingScheduler(gpus_per_node=None)
    cluster = cluster_with(tmp_path, scheduler)
    cluster.train("mnist_lenet5", options=TrainOptions(signal_lead=120, max_requeues=2))
    (script,) = scheduler.scripts
    assert "#SBATCH --signal=B:USR2@120" in script
    assert "max_requeues=2" in script and "{{" not in script


@pytest.mark.parametrize(
    ("args", "debug"),
    [
        (["--debug", "status"], True),
        (["-p", "x", "--debug", "status"], True),
        (["-p", "status", "--debug", "status"], True),  # a profile named like a command
        (["submit", "run", "--", "python", "app.py", "--debug"], False),  # the job's own flag
        (["train", "mnist_lenet5", "--", "--debug"], False),
        (["status"], False),
    ],
)
def test_debug_is_only_hpclaunchs_own_option(args: list[str], debug: bool) -> None:
    assert debug_requested(args) is debug
