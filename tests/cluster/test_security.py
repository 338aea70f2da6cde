"""Security on the real dev cluster: who listens where, tunnel mode ``node`` end to end, and the
token kept out of everything the client prints but the URL.

Unit-level checks (token entropy, host-key policy, permission warnings) are in tests/unit/test_security.py;
the token's absence from argv, ``scontrol show job``, the job output and its file modes is checked in
tests/cluster/test_jupyter.py.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests

from hpclaunch.cli.status import NO_ACTIVE_JOBS
from hpclaunch.cluster import Cluster
from hpclaunch.config import Profile
from hpclaunch.errors import ConnectionFailed
from hpclaunch.jupyter import session as jsession
from hpclaunch.transport.ssh import SSHTransport

from .conftest import HPC_ENV_SETUP, hpclaunch_argv, run_hpclaunch

if TYPE_CHECKING:
    from conftest import DevCluster

pytestmark = pytest.mark.cluster

WILDCARD = ("0.0.0.0", "::", "*")  # noqa: S104 - what we look for, not a bind


@dataclass(frozen=True)
class Listener:
    addr: str
    port: int
    pids: tuple[int, ...]


def listeners() -> list[Listener]:
    """TCP listening sockets from ``ss -ltnpH`` (run as root: every process's)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True, timeout=30).stdout
    found = []
    for line in out.splitlines():
        local = line.split()[3]
        addr, _, port = local.rpartition(":")
        addr = addr.strip("[]").split("%")[0]
        found.append(Listener(addr, int(port), tuple(int(p) for p in re.findall(r"pid=(\d+)", line))))
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def check_no_wildcard_listener_of_ours() -> None:
    for sock in listeners():
        if sock.addr not in WILDCARD:
            continue
        for pid in sock.pids:
            cmd = cmdline(pid)
            assert pid != os.getpid(), f"this process listens on {sock}"
            assert not any(word in cmd for word in ("jupyter", "ipykernel", "hpclaunch")), (sock, cmd)


@pytest.fixture(scope="module")
def require_ss(dev_cluster: DevCluster) -> None:
    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2)")
    if os.geteuid() != 0:
        pytest.skip("ss shows other users' processes only to root")


def start_kernel(base: str, token: str) -> list[Listener]:
    """Start a kernel through the REST API; return its listening sockets once it has them."""
    headers = {"Authorization": f"token {token}"}
    kernel = requests.post(f"{base}/api/kernels", headers=headers, json={"name": "python3"}, timeout=60)
    assert kernel.status_code == 201, kernel.text
    kernel_id = kernel.json()["id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        # The kernel's command line names its connection file, kernel-<id>.json.
        socks = [s for s in listeners() if any(kernel_id in cmdline(pid) for pid in s.pids)]
        if socks:
            return socks
        time.sleep(0.2)
    raise AssertionError("the kernel opened no port within 60 s")


def test_listeners_are_loopback_or_the_nodes_address(cluster: Cluster, require_ss: None) -> None:
    """Tunnel mode ``direct``: the client's tunnel end on 127.0.0.1, Jupyter (and its kernels) on the
    node's own address (node1 and node2 are 127.0.0.1 here), nothing of ours on all interfaces."""
    session = cluster.jupyter()
    try:
        kernel = start_kernel(session.api_url, session.token)  # kernels open ports too
        assert all(s.addr == "127.0.0.1" for s in kernel), kernel
        socks = listeners()
        # The tunnel end is this process's (paramiko) or its ssh master's (OpenSSH).
        master_pid = getattr(cluster.transport, "master_pid", lambda: None)()
        ours = {os.getpid(), master_pid} - {None}
        mine = [s for s in socks if ours & set(s.pids)]
        assert any(s.port == session.local_port for s in mine), mine
        assert all(s.addr == "127.0.0.1" for s in mine), mine

        server = [s for s in socks if s.port == session.location.port]
        node_addr = socket.gethostbyname(session.location.host)
        assert server and all(s.addr == node_addr for s in server), (server, node_addr)
        assert any("jupyter" in cmdline(pid) for s in server for pid in s.pids), server
        check_no_wildcard_listener_of_ours()
    finally:
        session.close()
    assert not [s for s in listeners() if s.port == session.local_port], "the tunnel end is still open"


@pytest.fixture
def node_config(dev_cluster: DevCluster, tmp_path: Path) -> Path:
    """A profile with ``tunnel = "node"``: the client logs in to the node (the dev sshd, reached from the
    login host as node1:2222) and forwards to Jupyter on the node's 127.0.0.1."""
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text(
        "Host node1 node2\n"
        "    User hpcuser\n"
        f"    IdentityFile {dev_cluster.key_path}\n"
        f"    UserKnownHostsFile {dev_cluster.known_hosts}\n"
        "    GlobalKnownHostsFile /dev/null\n"
        "    HostKeyAlias 127.0.0.1\n"  # the nodes' sshd is the dev sshd, known as [127.0.0.1]:2222
        "    IdentitiesOnly yes\n"
        "    StrictHostKeyChecking yes\n"
        "    BatchMode yes\n\n" + dev_cluster.ssh_config.read_text()
    )
    config = tmp_path / "config.toml"
    config.write_text(
        f"""[clusters.nodes]
host = "{dev_cluster.ssh_alias}"
ssh_config = "{ssh_config}"
partition = "{dev_cluster.partition}"
setup = ["{HPC_ENV_SETUP}"]
tunnel = "node"
node_ssh_port = {dev_cluster.port}
"""
    )
    config.chmod(0o600)
    return config


def test_tunnel_mode_node_end_to_end(
    node_config: Path, require_ss: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[SSHTransport] = []
    real = jsession.node_transport

    def spy(profile: Profile, node: str) -> SSHTransport:
        transport = real(profile, node)
        assert isinstance(transport, SSHTransport)
        made.append(transport)
        return transport

    monkeypatch.setattr(jsession, "node_transport", spy)
    with Cluster("nodes", config=node_config) as cluster:
        session = cluster.jupyter()
        try:
            node = session.location.host
            assert node in ("node1", "node2")
            # The tunnel runs over a login to the node itself, through the login host.
            assert len(made) == 1 and made[0].is_connected
            assert made[0].settings.hostname == node and made[0].settings.proxy_jump == ("hpcdev",)
            assert made[0].settings.port == 2222

            assert requests.get(session.url, timeout=30).status_code == 200
            status = f"{session.api_url}/api/status"
            assert requests.get(status, timeout=10).status_code == 403
            headers = {"Authorization": f"token {session.token}"}
            assert requests.get(status, headers=headers, timeout=10).status_code == 200

            # Jupyter bound the node's loopback, as the rendered script says.
            assert session.job.run_dir is not None
            script = (Path(session.job.run_dir) / "job.sbatch").read_text()
            assert "\nbind_ip=127.0.0.1\n" in script
            server = [s for s in listeners() if s.port == session.location.port]
            assert server and all(s.addr == "127.0.0.1" for s in server), server
            check_no_wildcard_listener_of_ours()

            assert session.ssh_command == (
                f"ssh -N -J hpcdev -p 2222 -L {session.local_port}:127.0.0.1:{session.location.port} {node}"
            )
        finally:
            session.close()
    assert not made[0].is_connected, "closing the session logs out of the node"


def test_refused_node_login_fails_at_once_with_the_reason(node_config: Path) -> None:
    text = node_config.read_text().replace("node_ssh_port = 2222", "node_ssh_port = 1")
    node_config.write_text(text)
    said: list[str] = []
    t0 = time.monotonic()
    with Cluster("nodes", config=node_config) as cluster, pytest.raises(ConnectionFailed) as caught:
        cluster.jupyter(jsession.JupyterOptions(server_timeout=120), status=said.append)
    assert time.monotonic() - t0 < 60, "waited for the server timeout instead of failing on the login"
    message = caught.value.one_line()
    assert re.search(r"node[12]:1 via jump host", message), message
    job_id = said[0].split()[-1]
    state = subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30
    ).stdout.strip()
    assert state in ("", "CANCELLED", "COMPLETING"), f"job {job_id} left {state}"


# --- the token stays out of what the client prints ------------------------------------------------


@pytest.fixture
def jupyter_cli(cli_env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        hpclaunch_argv("jupyter", "--no-browser"),
        env=cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


def test_token_only_in_the_url_line(jupyter_cli: subprocess.Popen[str]) -> None:
    proc = jupyter_cli
    assert proc.stdout is not None and proc.stderr is not None
    url = proc.stdout.readline()
    assert url.startswith("http://127.0.0.1:") and "token=" in url, url
    token = url.strip().split("token=", 1)[1]
    err = ""
    while "Press Ctrl-C" not in err:
        line = proc.stderr.readline()
        assert line, err
        err += line
    job = re.search(r"running in job (\d+)", err)
    assert job, err
    proc.send_signal(signal.SIGINT)
    out, rest = proc.communicate(timeout=60)
    err += rest
    assert proc.returncode == 0, err
    assert token not in err, "the token leaked into the client's status lines"
    assert token not in out, "the token appears on stdout beyond the URL line"
    assert "cancelled job" in err


def test_job_log_shown_in_an_error_has_the_token_masked(cli_env: dict[str, str]) -> None:
    """A job that prints the token (read from its 0600 file) before failing: the log tail in the error
    shows *** instead."""
    result = run_hpclaunch(
        cli_env,
        "jupyter",
        "--no-browser",
        "--setup",
        "printf 'token is %s\\n' \"$(cat jupyter.token)\"; exit 3",
        timeout=120,
    )
    assert result.returncode != 0
    assert "ended before Jupyter started" in result.stderr, result.stderr
    assert "token is ***" in result.stderr, result.stderr
    assert result.stdout == ""
    assert not re.search(r"[0-9a-f]{64}", result.stderr), result.stderr


def test_key_file_readable_by_others_warns_once(
    cli_env: dict[str, str], dev_cluster: DevCluster, tmp_path: Path
) -> None:
    key = tmp_path / "id_ed25519"
    shutil.copyfile(dev_cluster.key_path, key)
    key.chmod(0o644)
    config = tmp_path / "config.toml"
    config.write_text(
        f'[clusters.dev]\nhost = "{dev_cluster.ssh_alias}"\nssh_config = "{dev_cluster.ssh_config}"\n'
        f'identity_file = "{key}"\n'
    )
    config.chmod(0o600)
    result = run_hpclaunch({**cli_env, "HPCLAUNCH_CONFIG": str(config)}, "-p", "dev", "status")
    assert result.returncode == 0, result.stderr
    # paramiko uses the key anyway; OpenSSH's ssh skips it (the dev config's own key logs in here).
    assert re.fullmatch(
        rf"hpclaunch: warning: SSH key {re.escape(str(key))} is readable by other users"
        rf"(, so ssh will not use it)?; run: chmod 600 {re.escape(str(key))}\n"
        rf"({re.escape(NO_ACTIVE_JOBS)}\n)?",
        result.stderr,
    ), result.stderr
