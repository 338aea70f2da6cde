"""One login for a working session: successive CLI commands on one profile share one SSH login, with
each transport (the OpenSSH master; paramiko's connection holder).

Counted where it happens: each login is one ``Accepted publickey for hpcuser`` line in the dev sshd's
log (scripts/dev-cluster: /var/log/hpclaunch-dev-sshd.log, LogLevel INFO).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from hpclaunch.cli.status import NO_ACTIVE_JOBS
from tests.cluster.conftest import end_masters, profile_env, run_hpclaunch

if TYPE_CHECKING:
    from conftest import DevCluster

pytestmark = pytest.mark.cluster

SSHD_LOG = Path("/var/log/hpclaunch-dev-sshd.log")
LOGIN = "Accepted publickey for hpcuser"


def logins() -> int:
    return SSHD_LOG.read_text(errors="replace").count(LOGIN)


#: What `config show` says of an open kept connection, per transport.
OPEN = {"openssh": "open: ssh master pid", "paramiko": "open: connection holder pid"}
#: A second unprivileged user, made here when missing, for "another user is refused".
OTHER_USER = "hpcother"


@pytest.fixture(params=["openssh", "paramiko"])
def session_env(
    dev_cluster: DevCluster, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[dict[str, str]]:
    """The CLI on a profile of each transport, with a runtime directory (and so a master) of its own."""
    runtime = tempfile.mkdtemp(prefix="hcl-s-", dir="/tmp")
    env = profile_env(dev_cluster, tmp_path, extra=f'transport = "{request.param}"\n')
    env["HPCLAUNCH_TEST_KIND"] = request.param
    env.pop("HPCLAUNCH_TRANSPORT", None)  # the test's transport, whatever the suite runs with
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
    kind = session_env["HPCLAUNCH_TEST_KIND"]
    assert f"client: {kind}" in outputs[7] and OPEN[kind] in outputs[7], outputs[7]
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
    import signal

    assert run_hpclaunch(session_env, "connect").returncode == 0
    runtime = session_env["HPCLAUNCH_RUNTIME_DIR"]
    shown = run_hpclaunch(session_env, "config", "show").stdout
    pid = int(re.search(r"(?:master|holder) pid (\d+)", shown).group(1))  # type: ignore[union-attr]
    os.kill(pid, signal.SIGKILL)  # leaves its socket file behind: a stale master
    assert any(_is_socket(os.path.join(runtime, name)) for name in os.listdir(runtime))
    again = run_hpclaunch(session_env, "status")
    assert again.returncode == 0, again.stderr
    # Nothing about the stale master: only status's own line for an empty queue.
    assert again.stderr.strip() in ("", NO_ACTIVE_JOBS), again.stderr
    shown = run_hpclaunch(session_env, "config", "show").stdout
    assert OPEN[session_env["HPCLAUNCH_TEST_KIND"]] in shown and f"pid {pid} " not in shown, shown


def _is_socket(path: str) -> bool:
    import stat

    return stat.S_ISSOCK(os.lstat(path).st_mode)


def test_runtime_directory_and_socket_are_private(session_env: dict[str, str]) -> None:
    import stat

    assert run_hpclaunch(session_env, "connect").returncode == 0
    runtime = session_env["HPCLAUNCH_RUNTIME_DIR"]
    assert stat.S_IMODE(os.stat(runtime).st_mode) == 0o700
    sockets = [n for n in os.listdir(runtime) if stat.S_ISSOCK(os.lstat(os.path.join(runtime, n)).st_mode)]
    assert len(sockets) == 1
    assert stat.S_IMODE(os.lstat(os.path.join(runtime, sockets[0])).st_mode) == 0o600
    assert os.lstat(runtime).st_uid == os.getuid()
    assert os.lstat(os.path.join(runtime, sockets[0])).st_uid == os.getuid()


# -- another user -----------------------------------------------------------------------------------

#: Run as the other user (by /usr/bin/python3, nothing of ours): ask the holder for its info; prints
#: "denied" (cannot reach the socket), "refused" (reached it, no answer) or what the holder said.
_ASK_AS_OTHER = """
import json, socket, struct, sys
sock = socket.socket(socket.AF_UNIX)
sock.settimeout(10)
try:
    sock.connect(sys.argv[1])
except PermissionError:
    print("denied"); sys.exit()
body = json.dumps({"op": "info"}).encode()
try:
    sock.sendall(struct.pack(">I", len(body)) + body)
    head = sock.recv(4)
except OSError:
    head = b""
print(repr(head + sock.recv(4096)) if head else "refused")
"""


@pytest.fixture
def other_user() -> str:
    import pwd

    if os.getuid() != 0:
        pytest.skip("making and becoming a second user needs root")
    try:
        pwd.getpwnam(OTHER_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER_USER], check=True
        )
    return OTHER_USER


def _as_other(user: str, socket_path: str) -> str:
    argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "/usr/bin/python3", "-c"]
    done = subprocess.run([*argv, _ASK_AS_OTHER, socket_path], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_another_user_cannot_use_the_holder(dev_cluster: DevCluster, tmp_path: Path, other_user: str) -> None:
    import stat

    runtime = tempfile.mkdtemp(prefix="hcl-o-", dir="/tmp")
    env = profile_env(dev_cluster, tmp_path, extra='transport = "paramiko"\n')
    env["HPCLAUNCH_RUNTIME_DIR"] = runtime
    try:
        assert run_hpclaunch(env, "connect").returncode == 0
        (name,) = [
            n for n in os.listdir(runtime) if n.startswith("holder-") and _is_socket(os.path.join(runtime, n))
        ]
        path = os.path.join(runtime, name)
        # As made: the 0700 directory keeps the other user from even reaching the socket.
        assert _as_other(other_user, path) == "denied"
        # Opened up by mistake (a bad umask, a shared directory): the holder checks the peer's uid itself.
        os.chmod(runtime, 0o711)  # noqa: S103 - on purpose, put back below
        os.chmod(path, 0o666)  # noqa: S103 - on purpose, put back below
        assert _as_other(other_user, path) == "refused"
        os.chmod(runtime, 0o700)
        os.chmod(path, 0o600)
        # And it still serves us.
        shown = run_hpclaunch(env, "config", "show").stdout
        assert OPEN["paramiko"] in shown, shown
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    finally:
        end_masters(runtime)
        shutil.rmtree(runtime, ignore_errors=True)
