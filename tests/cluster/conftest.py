"""Fixtures for driving hpclaunch itself against the dev cluster as the unprivileged user."""

from __future__ import annotations

import contextlib
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

#: A ~/.bash_profile that prints three lines on every login (one shaped like our marker, one like a
#: variable), then does what the default login does. hpclaunch must not notice it.
TALKING_PROFILE = """# Written by tests/cluster/conftest.py; the previous one comes back after the tests.
echo "Welcome to the hpclaunch dev cluster. Quota: 97% of 50 GB used."
echo "PATH=/banner/is/not/a/path"
printf '%s\\n' "hpclaunch-env-0123 is not a marker; Submitted batch job 12345"
if [ -r ~/.profile ]; then . ~/.profile; fi
"""
#: Set to 1 to run every cluster test with TALKING_PROFILE in place.
TALKING_ENV = "HPCLAUNCH_TEST_TALKING_LOGIN"


@contextlib.contextmanager
def bash_profile(dev: DevCluster, text: str) -> Iterator[None]:
    """The cluster user's ~/.bash_profile is ``text`` inside the block; what was there comes back after."""

    def ssh(command: str, data: str | None = None) -> subprocess.CompletedProcess[str]:
        # A plain `ssh host cmd` is no login shell: it reads no ~/.bash_profile, whatever is in it.
        return subprocess.run(
            dev.ssh_argv(command), input=data or "", capture_output=True, text=True, timeout=30, check=False
        )

    old = ssh("test -e ~/.bash_profile && cat ~/.bash_profile")
    write = ssh("cat > ~/.bash_profile", text)
    assert write.returncode == 0, write.stderr
    try:
        yield
    finally:
        restore = (
            ssh("cat > ~/.bash_profile", old.stdout) if old.returncode == 0 else ssh("rm -f ~/.bash_profile")
        )
        assert restore.returncode == 0, restore.stderr


@pytest.fixture(scope="module")
def talking_login(dev_cluster: DevCluster) -> Iterator[None]:
    """TALKING_PROFILE in place for a whole test module (``pytestmark = usefixtures("talking_login")``)."""
    with bash_profile(dev_cluster, TALKING_PROFILE):
        yield


@pytest.fixture(scope="session", autouse=True)
def _talking_login_everywhere(request: pytest.FixtureRequest) -> Iterator[None]:
    if os.environ.get(TALKING_ENV) != "1":
        yield
        return
    with bash_profile(request.getfixturevalue("dev_cluster"), TALKING_PROFILE):
        yield


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
