"""Fixtures for driving hpclaunch itself against the dev cluster as the unprivileged user."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from hpclaunch.cluster import Cluster

if TYPE_CHECKING:
    from conftest import DevCluster

#: The environment the cluster user's jobs activate (torch, jupyterlab); made by scripts/dev-cluster.
HPC_ENV_SETUP = "source /opt/hpc-env/bin/activate"


@pytest.fixture(scope="session")
def dev_config(dev_cluster: DevCluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config file whose default profile `dev` reaches the dev cluster over SSH as hpcuser."""
    path = tmp_path_factory.mktemp("config") / "config.toml"
    path.write_text(
        f"""default = "dev"
[clusters.dev]
host = "{dev_cluster.ssh_alias}"
ssh_config = "{dev_cluster.ssh_config}"
partition = "{dev_cluster.partition}"
setup = ["{HPC_ENV_SETUP}"]
"""
    )
    path.chmod(0o600)
    return path


@pytest.fixture
def cli_env(dev_config: Path, tmp_path: Path) -> dict[str, str]:
    """Environment for running the `hpclaunch` CLI against the dev profile, with its own local state."""
    return {
        **os.environ,
        "HPCLAUNCH_CONFIG": str(dev_config),
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture
def cluster(dev_config: Path) -> Iterator[Cluster]:
    """A `Cluster` on the dev profile: one SSH connection as hpcuser."""
    with Cluster("dev", config=dev_config) as c:
        yield c


def hpclaunch_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "hpclaunch", *args]


def run_hpclaunch(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(hpclaunch_argv(*args), env=env, capture_output=True, text=True, timeout=timeout)


def profile_env(dev: DevCluster, tmp_path: Path, *, extra: str = "") -> dict[str, str]:
    """The CLI's environment for a profile `p` on the dev cluster (over SSH) with ``extra`` TOML lines,
    and this test's own local state."""
    path = tmp_path / "config.toml"
    path.write_text(
        f'default = "p"\n[clusters.p]\nhost = "{dev.ssh_alias}"\nssh_config = "{dev.ssh_config}"\n'
        f'partition = "{dev.partition}"\n{extra}'
    )
    path.chmod(0o600)
    return {
        **os.environ,
        "HPCLAUNCH_CONFIG": str(path),
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "PYTHONUNBUFFERED": "1",
    }
