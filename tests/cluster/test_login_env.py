"""Over SSH, commands run in the login shell's environment: what /etc/profile.d gives (scripts/dev-cluster
puts /opt/site-bin/hpclaunch-site-only on PATH only there), without what ~/.bash_profile prints, and with one
warning line, not a hang, when ~/.bash_profile is broken."""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from hpclaunch import config as config_mod
from hpclaunch.cluster import Cluster
from hpclaunch.errors import HpclaunchWarning
from hpclaunch.transport import loginenv
from hpclaunch.transport.runtime import ENV as RUNTIME_ENV

from .conftest import bash_profile, profile_env, run_hpclaunch

if TYPE_CHECKING:
    from conftest import DevCluster

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("talking_login")]

SITE_COMMAND = "hpclaunch-site-only"  # scripts/dev-cluster: SITE_COMMAND in SITE_BIN


@pytest.fixture(autouse=True)
def _fresh_masters(control_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test logs in anew (an OpenSSH master keeps the captured environment for later processes)."""
    monkeypatch.setenv(RUNTIME_ENV, control_dir)


@pytest.fixture
def plain_cluster(dev_config: Path) -> Iterator[Cluster]:
    """The dev profile with ``login_shell = false``."""
    profile = config_mod.load(dev_config).profile("dev")
    with Cluster(dataclasses.replace(profile, login_shell=False)) as c:
        yield c


def test_a_command_only_the_login_environment_has_runs(cluster: Cluster) -> None:
    transport = cluster.transport
    result = transport.run([SITE_COMMAND, "a b", "$HOME"])
    # Exactly its output: the three lines ~/.bash_profile prints never get here.
    assert result.stdout == "site-only command ran as hpcuser with: a b $HOME\n"
    for _ in range(5):
        transport.run(["true"])
    login_env = transport.login_env  # type: ignore[attr-defined]
    assert login_env.captures == 1  # one login shell for the connection, not one per command
    assert transport.command_counts == {SITE_COMMAND: 1, "true": 5}  # the capture is not a command


def test_without_the_login_shell_it_is_not_found(plain_cluster: Cluster) -> None:
    result = plain_cluster.transport.run([SITE_COMMAND], check=False)
    assert result.returncode == 127
    assert plain_cluster.transport.login_env.captures == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize(("login_shell", "found"), [("true", True), ("false", False)])
def test_jobs_inherit_the_login_environment_from_sbatch(
    dev_cluster: DevCluster, tmp_path: Path, login_shell: str, found: bool
) -> None:
    env = profile_env(dev_cluster, tmp_path, extra=f"login_shell = {login_shell}\n")
    result = run_hpclaunch(env, "submit", "run", "--follow", "--", SITE_COMMAND, "from-a-job")
    if found:
        assert result.returncode == 0, result.stderr
        assert "site-only command ran as hpcuser with: from-a-job" in result.stdout
        assert "Welcome to the hpclaunch dev cluster" not in result.stdout + result.stderr
    else:
        assert result.returncode != 0
        assert "command not found" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_a_hanging_login_shell_warns_and_commands_still_run(
    dev_cluster: DevCluster, dev_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loginenv, "CAPTURE_TIMEOUT", 1.0)
    with bash_profile(dev_cluster, "sleep 10\n"), Cluster("dev", config=dev_config) as cluster:
        with pytest.warns(HpclaunchWarning, match="did not print its environment within 1 s"):
            result = cluster.transport.run(["echo", "plain"])
        assert result.stdout == "plain\n"
        assert cluster.transport.run([SITE_COMMAND], check=False).returncode == 127  # the plain PATH
        assert cluster.transport.login_env.captures == 1  # type: ignore[attr-defined]


def test_a_failing_login_shell_is_one_warning_line_in_the_cli(
    dev_cluster: DevCluster, tmp_path: Path
) -> None:
    env = profile_env(dev_cluster, tmp_path)
    with bash_profile(dev_cluster, "echo 'bash_profile: line 1: oops' >&2; exit 1\n"):
        result = run_hpclaunch(env, "submit", "run", "--wait", "--", "true")
    assert result.returncode == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if line.startswith("hpclaunch: warning:")]
    assert len(warning) == 1, result.stderr
    assert "login shell" in warning[0] and "bash_profile: line 1: oops" in warning[0]
    assert "Traceback" not in result.stderr


def test_later_cli_commands_on_the_same_master_run_no_login_shell(
    dev_cluster: DevCluster, tmp_path: Path
) -> None:
    """The OpenSSH master outlives each command: the environment captured by the first waits (0600, in
    the private runtime directory) for the next, so a warm command costs one round trip, not two."""
    env = profile_env(dev_cluster, tmp_path, extra='transport = "openssh"\n')
    count = "$HOME/.hpclaunch-test-login-shells"
    with bash_profile(dev_cluster, f"echo run >> {count}\n"):
        for args in [("connect",), ("status",), ("status",), ("submit", "run", "--wait", "--", SITE_COMMAND)]:
            result = run_hpclaunch(env, *args)
            assert result.returncode == 0, (args, result.stderr)
        shells = subprocess.run(
            dev_cluster.ssh_argv(f"cat {count}; rm -f {count}"), capture_output=True, text=True, timeout=30
        )
    assert shells.stdout.split() == ["run"], shells.stdout  # one login shell for four commands
    saved = [n for n in os.listdir(os.environ[RUNTIME_ENV]) if n.endswith(".env")]
    assert len(saved) == 1
    assert stat.S_IMODE(os.stat(os.path.join(os.environ[RUNTIME_ENV], saved[0])).st_mode) == 0o600
