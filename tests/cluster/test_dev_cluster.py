"""The dev cluster answers: both nodes usable, and hpcuser reaches Slurm through the loopback sshd."""

from __future__ import annotations

import shlex
import subprocess
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import DevCluster

pytestmark = pytest.mark.cluster


def _run(argv: list[str], timeout: float = 30) -> str:
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}: {proc.stderr.strip()}"
    return proc.stdout


def test_sinfo_shows_both_nodes_usable(dev_cluster: DevCluster) -> None:
    out = _run(["sinfo", "-h", "-N", "-p", dev_cluster.partition, "-o", "%N %t"])
    states = dict(line.split() for line in out.splitlines())
    assert set(states) == set(dev_cluster.nodes)
    # alloc: every CPU busy with someone's job, which is still a healthy node.
    assert all(state in {"idle", "mix", "alloc"} for state in states.values()), states


def test_hpcuser_runs_sinfo_over_ssh(dev_cluster: DevCluster) -> None:
    out = _run(dev_cluster.ssh_argv("id -un && sinfo -h -N -o '%N %P'"))
    user, *rows = out.splitlines()
    assert user == dev_cluster.user
    expected = {(node, f"{dev_cluster.partition}*") for node in dev_cluster.nodes}
    assert {tuple(row.split()) for row in rows} >= expected


def test_job_gets_a_fake_gpu_and_the_hpc_env(dev_cluster: DevCluster) -> None:
    modules = ("torch", "jupyterlab", "submitit", "numpy", "matplotlib")
    find = f"import importlib.util as u; print(all(u.find_spec(m) for m in {modules!r}))"
    script = (
        "srun -N1 -n1 -t 1 --gres=gpu:1 sh -c 'echo $CUDA_VISIBLE_DEVICES'"
        f" && /opt/hpc-env/bin/python -c {shlex.quote(find)}"
    )
    # The GPUs may be held by other tests' jobs for a while: wait up to a minute.
    out = _run(dev_cluster.ssh_argv(f"timeout 60 sh -c {shlex.quote(script)}"), timeout=70)
    assert out.split() == ["0", "True"]
