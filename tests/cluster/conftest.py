"""Fixtures for driving hpclaunch itself against the dev cluster as the unprivileged user."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import pytest

from hpclaunch.cluster import Cluster
from hpclaunch.transport.runtime import ENV as RUNTIME_ENV

if TYPE_CHECKING:
    from conftest import DevCluster

    from hpclaunch.transport.openssh import OpenSSHTransport
    from hpclaunch.transport.ssh import SSHTransport

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


def profile_env(
    dev: DevCluster,
    tmp_path: Path,
    *,
    extra: str = "",
    host: str | None = None,
    ssh_config: Path | None = None,
) -> dict[str, str]:
    """The CLI's environment for a profile `p` on the dev cluster (over SSH) with ``extra`` TOML lines,
    and this test's own local state; ``host``/``ssh_config``: another of the dev cluster's sshds."""
    path = tmp_path / "config.toml"
    path.write_text(
        f'default = "p"\n[clusters.p]\nhost = "{host or dev.ssh_alias}"\n'
        f'ssh_config = "{ssh_config or dev.ssh_config}"\npartition = "{dev.partition}"\n{extra}'
    )
    path.chmod(0o600)
    return {
        **os.environ,
        "HPCLAUNCH_CONFIG": str(path),
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "PYTHONUNBUFFERED": "1",
    }


# -- both SSH transports ----------------------------------------------------------------------------

#: What the transport tests hold: the paramiko transport or the OpenSSH one (same roles, same tests).
AnySSH = Union["SSHTransport", "OpenSSHTransport"]
MakeSSH = Callable[..., AnySSH]
#: Arguments only the paramiko transport takes (the OpenSSH one leaves them to ssh).
PARAMIKO_ONLY = ("openssh_config", "prompter", "allow_agent")


def end_masters(directory: str) -> None:
    """Stop every ControlMaster and connection holder whose socket is in ``directory`` (what a test
    left running)."""
    from hpclaunch.transport import holdwire

    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name.startswith("holder-") and stat.S_ISSOCK(os.lstat(path).st_mode):
            with contextlib.suppress(OSError, holdwire.WireError):
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.settimeout(5)
                    sock.connect(path)
                    holdwire.send(sock, {"op": "exit"})
                    holdwire.recv(sock)
        elif stat.S_ISSOCK(os.lstat(path).st_mode):
            subprocess.run(
                ["ssh", "-o", f"ControlPath={path}", "-O", "exit", "hpclaunch-test"],
                capture_output=True,
                timeout=30,
                check=False,
            )


@pytest.fixture(scope="session", autouse=True)
def _private_runtime_dir() -> Iterator[str]:
    """Masters the CLI starts during the tests live in a directory of their own, ended at the end."""
    directory = tempfile.mkdtemp(prefix="hcl-rt-", dir="/tmp")
    old = os.environ.get(RUNTIME_ENV)
    os.environ[RUNTIME_ENV] = directory
    try:
        yield directory
    finally:
        if old is None:
            os.environ.pop(RUNTIME_ENV, None)
        else:
            os.environ[RUNTIME_ENV] = old
        end_masters(directory)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def control_dir() -> Iterator[str]:
    """A short private directory for one test's ControlMaster sockets (unix paths are short)."""
    directory = tempfile.mkdtemp(prefix="hcl-", dir="/tmp")
    try:
        yield directory
    finally:
        end_masters(directory)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(params=["paramiko", "openssh"])
def ssh_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
def make_ssh(ssh_kind: str, control_dir: str) -> Iterator[MakeSSH]:
    """Builds the transport under test with the paramiko transport's arguments; closes them after."""
    from hpclaunch.transport.openssh import OpenSSHTransport
    from hpclaunch.transport.ssh import SSHTransport

    made: list[AnySSH] = []

    def make(host: str, **kwargs: Any) -> AnySSH:
        transport: AnySSH
        if ssh_kind == "openssh":
            for key in PARAMIKO_ONLY:
                kwargs.pop(key, None)
            transport = OpenSSHTransport(host, persist=0, control_dir=control_dir, **kwargs)
        else:
            transport = SSHTransport(host, **kwargs)
        made.append(transport)
        return transport

    yield make
    for transport in made:
        transport.close()
