"""`hpclaunch clean` and notebook run directories over SSH: home quotas count files as well as bytes."""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from hpclaunch.cluster import Cluster
from hpclaunch.config import Profile

from .conftest import HPC_ENV_SETUP, profile_env, run_hpclaunch
from .test_jupyter import start_jupyter, stop

if TYPE_CHECKING:
    from conftest import DevCluster

pytestmark = pytest.mark.cluster


@pytest.fixture
def clean_env(dev_cluster: DevCluster, tmp_path: Path) -> Iterator[tuple[dict[str, str], str]]:
    """A profile with a work directory of its own: other tests' runs on the shared cluster are not ours."""
    workdir = f"/home/{dev_cluster.user}/hpclaunch-clean-{uuid.uuid4().hex[:8]}"
    env = profile_env(dev_cluster, tmp_path, extra=f'workdir = "{workdir}"\nsetup = ["{HPC_ENV_SETUP}"]\n')
    yield env, workdir
    subprocess.run(dev_cluster.ssh_argv("rm", "-rf", workdir), timeout=60, check=False)


def remote(dev_cluster: DevCluster, command: str) -> str:
    result = subprocess.run(dev_cluster.ssh_argv(command), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def file_count(dev_cluster: DevCluster, workdir: str) -> int:
    return int(remote(dev_cluster, f"find {workdir} -type f | wc -l").strip())


def submitted_run_dir(stderr: str) -> str:
    match = re.search(r"\(run directory (\S+)\)", stderr)
    assert match, stderr
    return match.group(1)


def test_clean_removes_finished_runs_and_leaves_a_running_notebook(
    clean_env: tuple[dict[str, str], str], dev_cluster: DevCluster
) -> None:
    env, workdir = clean_env
    finished = []
    for word in ("one", "two"):
        result = run_hpclaunch(env, "submit", "run", "--wait", "--", "echo", word)
        assert result.returncode == 0, result.stderr
        finished.append(submitted_run_dir(result.stderr))
    notebook = start_jupyter(env)
    try:
        notebook_dir = remote(dev_cluster, f"ls -d {workdir}/hpclaunch-jupyter-*").split()
        assert len(notebook_dir) == 1
        before = file_count(dev_cluster, workdir)

        dry = run_hpclaunch(env, "clean", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert sorted(dry.stdout.split()) == sorted(finished)
        assert file_count(dev_cluster, workdir) == before
        summary = re.search(r"would free 2 run directories: (\d+) files", dry.stderr)
        assert summary, dry.stderr
        freed = int(summary.group(1))
        assert "1 of queued jobs" in dry.stderr

        done = run_hpclaunch(env, "clean")
        assert done.returncode == 0, done.stderr
        assert sorted(done.stdout.split()) == sorted(finished)
        assert file_count(dev_cluster, workdir) == before - freed
        left = remote(dev_cluster, f"ls {workdir}").split()
        assert [f"{workdir}/{name}" for name in left] == notebook_dir
    finally:
        assert stop(notebook) == 0
    # Ctrl-C ended the notebook: its run directory (token, log) went with it.
    assert remote(dev_cluster, f"ls {workdir}").split() == []


def test_stop_and_sessions_remove_the_run_directories_of_ended_notebooks(
    clean_env: tuple[dict[str, str], str], dev_cluster: DevCluster
) -> None:
    env, workdir = clean_env
    kept = start_jupyter(env, "--keep")
    assert stop(kept) == 0  # detached: the job and its directory stay
    assert len(remote(dev_cluster, f"ls {workdir}").split()) == 1
    result = run_hpclaunch(env, "stop", kept.job_id)
    assert result.returncode == 0, result.stderr
    assert remote(dev_cluster, f"ls {workdir}").split() == []

    ended = start_jupyter(env, "--keep")
    assert stop(ended) == 0
    subprocess.run(["scancel", ended.job_id], check=True, timeout=30)  # ended behind hpclaunch's back
    Cluster(Profile(name="root")).job(ended.job_id).wait(timeout=60)  # past COMPLETING, as Slurm says
    listing = run_hpclaunch(env, "sessions")
    assert listing.returncode == 0, listing.stderr
    assert remote(dev_cluster, f"ls {workdir}").split() == []
