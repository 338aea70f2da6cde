"""clean: which run directories go (finished notebook and plain runs), which stay (queued jobs', training
results, not yet submitted, not hpclaunch's), listed by the real `find` of the remote path or by Python."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpclaunch.cluster import Cluster
from hpclaunch.config import Profile
from hpclaunch.errors import ParameterError

OLD = time.time() - 3 * 86400  # three days ago


def make_run(base: Path, name: str, files: dict[str, str], *, mtime: float | None = OLD) -> Path:
    run = base / name
    for rel, text in files.items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text(text)
    if mtime is not None:
        for path in [run, *run.rglob("*")]:
            os.utime(path, (mtime, mtime))
    return run


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Cluster, Path]]:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    base = tmp_path / "runs"
    make_run(base, "hpclaunch-jupyter-20260101-120000-aaaaaa", {"jupyter.token": "t", "slurm-1.out": "x"})
    make_run(
        base, "hpclaunch-run-20260101-120000-bbbbbb", {"job.sbatch": "#!/bin/bash\n", "slurm-2.out": "y"}
    )
    make_run(
        base,
        "hpclaunch-train-mnist_lenet5-20260101-120000-cccccc",
        {"code/mnist_lenet5.py": "", "metrics.csv": "epoch\n", "slurm-3.out": "z"},
    )
    make_run(base, "hpclaunch-run-20260101-120000-dddddd", {"job.sbatch": ""}, mtime=None)  # being submitted
    make_run(base, "my-data", {"keep.txt": "not hpclaunch's"})
    with Cluster(Profile(name="t", scheduler="local", workdir=str(base))) as cluster:
        yield cluster, base


@pytest.fixture(params=["find", "python"])
def listing(request: pytest.FixtureRequest, work: tuple[Cluster, Path]) -> tuple[Cluster, Path]:
    """The remote path (GNU find through `sh -c`, run here) and the local one must agree."""
    cluster, base = work
    cluster.transport.is_remote = request.param == "find"
    return cluster, base


def names(dirs: object) -> list[str]:
    return sorted(Path(d.path).name for d in dirs)  # type: ignore[attr-defined]


def test_finished_notebook_and_plain_runs_go_training_results_and_others_stay(
    listing: tuple[Cluster, Path],
) -> None:
    cluster, base = listing
    plan = cluster.clean(dry_run=True)
    assert names(plan.remove) == [
        "hpclaunch-jupyter-20260101-120000-aaaaaa",
        "hpclaunch-run-20260101-120000-bbbbbb",
    ]
    assert [d.kind for d in sorted(plan.remove, key=lambda d: d.path)] == ["notebook", "plain"]
    assert (plan.files, plan.bytes) == (4, 1 + 1 + len("#!/bin/bash\n") + 1)
    assert names(plan.results) == ["hpclaunch-train-mnist_lenet5-20260101-120000-cccccc"]
    assert names(plan.recent) == ["hpclaunch-run-20260101-120000-dddddd"]
    assert len(list(base.iterdir())) == 5  # a dry run removes nothing

    done = cluster.clean(results=True)
    assert len(done.remove) == 3
    assert sorted(p.name for p in base.iterdir()) == ["hpclaunch-run-20260101-120000-dddddd", "my-data"]


def test_older_than_keeps_what_changed_recently(work: tuple[Cluster, Path]) -> None:
    cluster, _ = work
    assert cluster.clean(older_than=7 * 86400, dry_run=True).remove == ()
    assert len(cluster.clean(older_than=86400, dry_run=True).remove) == 2


def test_a_queued_jobs_directory_is_never_touched(work: tuple[Cluster, Path]) -> None:
    cluster, _ = work
    job = cluster.submit("run", command=["sleep", "60"])
    try:
        assert job.run_dir is not None
        os.utime(job.run_dir, (OLD, OLD))
        for path in Path(job.run_dir).iterdir():
            os.utime(path, (OLD, OLD))
        plan = cluster.clean()
        assert job.run_dir in [d.path for d in plan.live]
        assert Path(job.run_dir).is_dir()
    finally:
        job.cancel()


def test_only_run_directories_directly_under_the_workdir_can_be_removed(work: tuple[Cluster, Path]) -> None:
    cluster, base = work
    for bad in ["/etc", str(base), str(base / "a" / "b"), str(base / "..")]:
        with pytest.raises(ParameterError, match="refusing to delete"):
            cluster.remove_run_dirs([str(base / "hpclaunch-run-20260101-120000-bbbbbb"), bad])
    assert (base / "hpclaunch-run-20260101-120000-bbbbbb").is_dir()  # refused all, removed none


def test_cli_lists_what_it_would_free(work: tuple[Cluster, Path], tmp_path: Path) -> None:
    _, base = work
    config = tmp_path / "config.toml"
    config.write_text(f'[clusters.t]\nscheduler = "local"\nworkdir = "{base}"\n')
    config.chmod(0o600)
    env = {**os.environ, "HPCLAUNCH_CONFIG": str(config), "XDG_STATE_HOME": str(tmp_path / "state")}

    def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "hpclaunch", *args]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)

    result = run_cli("clean", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split()) == [
        str(base / "hpclaunch-jupyter-20260101-120000-aaaaaa"),
        str(base / "hpclaunch-run-20260101-120000-bbbbbb"),
    ]
    assert "would free 2 run directories: 4 files" in result.stderr
    assert "1 training results (--results removes them)" in result.stderr
    bad = run_cli("clean", "--older-than", "a week")
    assert bad.returncode == 2 and "is not an age" in bad.stderr
