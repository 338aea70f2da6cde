"""Fitting the site: software from Lmod modules (set up only through /etc/profile.d) and conda, over SSH.

The profile here has no setup lines and no venv: everything the jobs use comes from `--modules hpcenv`
(scripts/dev-cluster's module tree: /opt/hpc-env/bin on PATH, HPCENV_LOADED=1) or fails as it should.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests

from .conftest import profile_env, run_hpclaunch
from .test_jupyter import start_jupyter, stop

if TYPE_CHECKING:
    from conftest import DevCluster

pytestmark = pytest.mark.cluster


@pytest.fixture
def module_env(dev_cluster: DevCluster, tmp_path: Path) -> dict[str, str]:
    """The CLI against a profile without `setup` or `venv`: nothing on the nodes but what modules bring."""
    return profile_env(dev_cluster, tmp_path)


def test_the_module_system_exists_only_in_login_shells(dev_cluster: DevCluster) -> None:
    # The premise of this file: `ssh host cmd` (how hpclaunch runs sbatch) has no `module` function.
    import subprocess

    plain = subprocess.run(
        dev_cluster.ssh_argv("type module"), capture_output=True, text=True, timeout=30, check=False
    )
    assert plain.returncode != 0
    login = subprocess.run(
        dev_cluster.ssh_argv("bash -lc 'type -t module'"), capture_output=True, text=True, timeout=30
    )
    assert login.stdout.split()[-1:] == ["function"], login.stderr  # after any ~/.bash_profile banner


def test_submit_with_a_module_sees_its_environment(module_env: dict[str, str]) -> None:
    result = run_hpclaunch(
        module_env,
        "submit", "run", "--follow", "--modules", "hpcenv", "--",
        "bash", "-c", "echo HPCENV=$HPCENV_LOADED; command -v python",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "HPCENV=1" in result.stdout
    assert "/opt/hpc-env/bin/python" in result.stdout


@pytest.mark.parametrize(
    ("module", "message"),
    [
        ("broken", "broken: this module refuses to load"),  # its modulefile calls LmodError
        ("no-such-module/1.0", "no-such-module/1.0"),  # Lmod: "The following module(s) are unknown"
    ],
)
def test_a_module_that_fails_to_load_ends_the_job_with_lmods_message(
    module_env: dict[str, str], module: str, message: str
) -> None:
    result = run_hpclaunch(
        module_env,
        "submit", "run", "--wait", "--modules", module, "--",
        "bash", "-c", "echo COMMAND-RAN; sleep 300",
    )  # fmt: skip
    assert result.returncode != 0
    assert "FAILED" in result.stderr
    # The client's error quotes the log's end: Lmod's own message, not a later, unrelated failure.
    assert "Lmod has detected the following error" in result.stderr
    assert message in result.stderr
    assert "COMMAND-RAN" not in result.stderr
    assert "Traceback" not in result.stderr


def test_conda_env_on_a_node_without_conda_is_one_line(module_env: dict[str, str]) -> None:
    result = run_hpclaunch(
        module_env, "submit", "run", "--wait", "--conda-env", "torch", "--", "echo", "COMMAND-RAN"
    )
    assert result.returncode != 0
    # Quoted under the client's error line, as the end of the job's log.
    lines = [line.strip() for line in result.stderr.splitlines()]
    errors = [line for line in lines if line.startswith("hpclaunch: error: no conda")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("hpclaunch: error: no conda found on ")
    assert errors[0].endswith("cannot activate torch")
    assert "COMMAND-RAN" not in result.stderr


def test_jupyter_from_a_module_gives_a_working_url(module_env: dict[str, str]) -> None:
    run = start_jupyter(module_env, "--modules", "hpcenv")
    try:
        status = requests.get(
            f"{run.base}/api/status", headers={"Authorization": f"token {run.token}"}, timeout=30
        )
        assert status.status_code == 200
        assert requests.get(run.url, timeout=30).status_code == 200
    finally:
        assert stop(run) == 0


def test_train_from_a_module_completes(module_env: dict[str, str]) -> None:
    result = run_hpclaunch(
        module_env,
        "train", "mnist_lenet5", "--modules", "hpcenv", "--follow", "--",
        "--dataset", "synthetic", "--epochs", "1",
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert "COMPLETED" in result.stderr
