"""One login for a working session: successive CLI commands on one profile share one SSH login.

Counted where it happens: each login is one ``Accepted publickey for hpcuser`` line in the dev sshd's
log (scripts/dev-cluster: /var/log/hpclaunch-dev-sshd.log, LogLevel INFO).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.cluster.conftest import end_masters, profile_env, run_hpclaunch

if TYPE_CHECKING:
    from conftest import DevCluster

pytestmark = pytest.mark.cluster

SSHD_LOG = Path("/var/log/hpclaunch-dev-sshd.log")
LOGIN = "Accepted publickey for hpcuser"


def logins() -> int:
    return SSHD_LOG.read_text(errors="replace").count(LOGIN)


@pytest.fixture
def session_env(dev_cluster: DevCluster, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The CLI on an OpenSSH profile, with a runtime directory (and so a master) of its own."""
    runtime = tempfile.mkdtemp(prefix="hcl-s-", dir="/tmp")
    env = profile_env(dev_cluster, tmp_path, extra='transport = "openssh"\n')
    env["HPCLAUNCH_RUNTIME_DIR"] = runtime
    try:
        yield env
    finally:
        end_masters(runtime)
        shutil.rmtree(runtime, ignore_errors=True)


def test_ten_cli_commands_are_one_login(session_env: dict[str, str]) -> None:
    before = logins()
    steps: list[tuple[str, ...]] = [
        ("connect",),
        ("status",),
        ("submit", "run", "--", "sleep", "30"),
    ]
    outputs = []
    for args in steps:
        result = run_hpclaunch(session_env, *args)
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout + result.stderr)
    job_id = re.search(r"\b(\d+)\b", outputs[-1])
    assert job_id, outputs[-1]
    for args in [
        ("status", job_id.group(1)),
        ("status", "--json"),
        ("logs", job_id.group(1)),
        ("check", "run", "--", "true"),
        ("config", "show"),
        ("cancel", job_id.group(1)),
        ("status",),
    ]:
        result = run_hpclaunch(session_env, *args)
        assert result.returncode == 0, (args, result.stderr)
        outputs.append(result.stdout)
    assert "client: openssh" in outputs[7] and "open: ssh master pid" in outputs[7], outputs[7]
    assert logins() - before == 1


def test_disconnect_ends_it_and_the_next_command_logs_in_again(session_env: dict[str, str]) -> None:
    before = logins()
    assert run_hpclaunch(session_env, "status").returncode == 0
    ended = run_hpclaunch(session_env, "disconnect")
    assert ended.returncode == 0 and "disconnected" in ended.stderr, ended.stderr
    shown = run_hpclaunch(session_env, "config", "show").stdout
    assert "session: closed (the next command logs in" in shown, shown
    assert run_hpclaunch(session_env, "status").returncode == 0
    assert logins() - before == 2


def test_a_master_killed_hard_is_replaced_without_a_traceback(session_env: dict[str, str]) -> None:
    import os
    import signal

    assert run_hpclaunch(session_env, "connect").returncode == 0
    runtime = session_env["HPCLAUNCH_RUNTIME_DIR"]
    shown = run_hpclaunch(session_env, "config", "show").stdout
    pid = int(re.search(r"master pid (\d+)", shown).group(1))  # type: ignore[union-attr]
    os.kill(pid, signal.SIGKILL)  # leaves its socket file behind: a stale master
    assert any(name.startswith("ssh-") and not name.endswith(".lock") for name in os.listdir(runtime))
    again = run_hpclaunch(session_env, "status")
    assert again.returncode == 0, again.stderr
    assert "Traceback" not in again.stderr
    assert "open: ssh master pid" in run_hpclaunch(session_env, "config", "show").stdout


def test_runtime_directory_and_socket_are_private(session_env: dict[str, str]) -> None:
    import os
    import stat

    assert run_hpclaunch(session_env, "connect").returncode == 0
    runtime = session_env["HPCLAUNCH_RUNTIME_DIR"]
    assert stat.S_IMODE(os.stat(runtime).st_mode) == 0o700
    sockets = [n for n in os.listdir(runtime) if stat.S_ISSOCK(os.lstat(os.path.join(runtime, n)).st_mode)]
    assert len(sockets) == 1
    assert stat.S_IMODE(os.lstat(os.path.join(runtime, sockets[0])).st_mode) == 0o600
