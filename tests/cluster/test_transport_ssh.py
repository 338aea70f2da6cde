"""Both SSH transports (paramiko, OpenSSH) against the dev cluster's real sshd (127.0.0.1:2222,
unprivileged ``hpcuser``): every test runs once per transport (``ssh_kind``).

Everything stays on loopback. Anything started on the far side is killed by the test that started it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shlex
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from hpclaunch.errors import CommandError, CommandTimeout, ConnectionFailed, HostKeyError, TransportError
from hpclaunch.transport import PathNotFound
from hpclaunch.transport.hostkeys import ENV_ACCEPT_NEW, fingerprint
from hpclaunch.transport.ssh import SSHTransport

if TYPE_CHECKING:
    from conftest import DevCluster

    from tests.cluster.conftest import AnySSH, MakeSSH

pytestmark = pytest.mark.cluster

# Walks up from the remote shell to the sshd process serving this connection and KILLs it: the
# unprivileged per-connection child (never the root listener). Only our own connection drops.
KILL_OUR_SSHD = (
    'p=$$; while [ "$p" -gt 1 ]; do c=$(ps -o comm= -p "$p"); '
    'case "$c" in sshd*) kill -KILL "$p"; exit 0;; esac; '
    'p=$(ps -o ppid= -p "$p" | tr -d " "); done; exit 1'
)


@pytest.fixture(autouse=True)
def _no_opt_in_or_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests decide: no accept-new from the environment, no keys from a stray ssh-agent."""
    monkeypatch.delenv(ENV_ACCEPT_NEW, raising=False)
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


@pytest.fixture
def ssh(dev_cluster: DevCluster, make_ssh: MakeSSH) -> Iterator[AnySSH]:
    with make_ssh(dev_cluster.ssh_alias, ssh_config_path=str(dev_cluster.ssh_config)) as transport:
        yield transport


@pytest.fixture
def remote_dir(ssh: AnySSH) -> Iterator[str]:
    path = ssh.run(["mktemp", "-d", "/tmp/hpclaunch-test.XXXXXX"]).stdout.strip()
    yield path
    ssh.run(["rm", "-rf", path], check=False)


def write_config(
    tmp_path: Path,
    dev_cluster: DevCluster,
    *,
    known_hosts: Path | None = None,
    key: str | None = None,
    extra: str = "",
    port: int | None = None,
) -> Path:
    """An ssh_config with ``Host dev`` (the dev sshd) and ``Host jump`` (the same sshd, as a hop)."""
    block = (
        f"    HostName {dev_cluster.host}\n"
        f"    Port {port or dev_cluster.port}\n"
        f"    User {dev_cluster.user}\n"
        f"    IdentityFile {key or dev_cluster.key_path}\n"
        f"    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {known_hosts or dev_cluster.known_hosts}\n"
        f"    GlobalKnownHostsFile /dev/null\n"
    )
    config = tmp_path / "ssh_config"
    config.write_text(f"Host dev\n{extra}{block}\nHost jump\n{block}")
    return config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def host_key_fingerprint(dev_cluster: DevCluster) -> str:
    line = (dev_cluster.state_dir / "ssh_host_ed25519_key.pub").read_text().split()
    return fingerprint(base64.b64decode(line[1]))


# -- commands --------------------------------------------------------------------------------------


def test_run_stdout_stderr_exit_codes(ssh: AnySSH, dev_cluster: DevCluster) -> None:
    assert ssh.is_remote
    assert ssh.description == f"{dev_cluster.user}@{dev_cluster.host}:{dev_cluster.port}"
    result = ssh.run(["echo", "hello world", "$HOME", "a;b", "it's"])
    # Quoted at the boundary: the remote shell neither expands nor splits.
    assert result.stdout == "hello world $HOME a;b it's\n"
    assert ssh.run(["id", "-un"]).stdout.strip() == dev_cluster.user
    failed = ssh.run(["sh", "-c", "echo out; echo err >&2; exit 7"], check=False)
    assert (failed.returncode, failed.stdout, failed.stderr) == (7, "out\n", "err\n")
    with pytest.raises(CommandError) as info:
        ssh.run(["sh", "-c", "echo boom >&2; exit 2"])
    assert info.value.returncode == 2 and info.value.stderr == "boom\n"
    assert info.value.argv == ("sh", "-c", "echo boom >&2; exit 2")
    with pytest.raises(CommandError) as missing:
        ssh.run(["hpclaunch-no-such-command"])
    assert missing.value.returncode == 127
    assert "hpclaunch-no-such-command" in missing.value.one_line()


def test_run_stdin_env_and_large_output(ssh: AnySSH) -> None:
    assert ssh.run(["cat"], stdin="a\nb\n").stdout == "a\nb\n"
    big_in = os.urandom(3_000_000)
    assert ssh.run(["sha256sum"], stdin=big_in).stdout.split()[0] == hashlib.sha256(big_in).hexdigest()
    assert ssh.run(["cat"], timeout=10).stdout == ""  # no stdin: EOF at once, no hang
    assert ssh.run(["sh", "-c", 'echo "$HPCL_A|$HPCL_B"'], env={"HPCL_A": "x y", "HPCL_B": "$z"}).stdout == (
        "x y|$z\n"
    )
    script = "head -c 8000000 /dev/zero | tr '\\0' a; head -c 4000000 /dev/zero | tr '\\0' b >&2"
    result = ssh.run(["sh", "-c", script], timeout=60)
    assert (len(result.stdout), len(result.stderr)) == (8_000_000, 4_000_000)


def test_timeout_raises_and_kills_the_command(ssh: AnySSH) -> None:
    token = f"hpclaunch-timeout-{os.getpid()}-{time.monotonic_ns()}"
    started = time.monotonic()
    with pytest.raises(CommandTimeout) as info:
        ssh.run(["python3", "-c", "import time; time.sleep(60)", token], timeout=1)
    assert time.monotonic() - started < 5
    assert "within 1 s" in info.value.one_line()
    deadline = time.monotonic() + 5
    # -u: the dev "cluster" is this machine, where the local ssh client's argv has the token too.
    while ssh.run(["pgrep", "-u", "hpcuser", "-f", token], check=False).returncode == 0:
        assert time.monotonic() < deadline, "the timed-out command is still running"
        time.sleep(0.1)
    # The connection is still good after a timeout.
    assert ssh.run(["echo", "ok"]).stdout == "ok\n"


def test_one_handshake_for_commands_files_and_forward(ssh: AnySSH, remote_dir: str) -> None:
    for _ in range(20):
        ssh.run(["squeue", "-h", "-u", "hpcuser"])
    ssh.write_text(f"{remote_dir}/a", "x")
    assert ssh.read_text(f"{remote_dir}/a") == "x"
    with ssh.forward("127.0.0.1", 1) as fwd:
        assert fwd.local_port > 0
    assert ssh.command_counts["squeue"] == 20
    assert ssh.command_counts["mktemp"] == 1
    assert ssh.connections_opened == 1


def test_commands_are_fast_on_one_connection(ssh: AnySSH, ssh_kind: str) -> None:
    ssh.run(["true"])
    started = time.perf_counter()
    for _ in range(20):
        ssh.run(["true"])
    per_command = (time.perf_counter() - started) / 20
    assert ssh.connections_opened == 1  # twenty commands, no new login
    if ssh_kind == "paramiko":
        # About 3 ms with TCP_NODELAY, 44 ms without (Nagle + delayed ACK): a generous bound that still
        # catches Nagle. (An OpenSSH mux client per command is a process start: bench/ssh_session.py.)
        assert per_command < 0.035, f"{per_command * 1000:.1f} ms per command"


# -- files -----------------------------------------------------------------------------------------


def test_sftp_write_sets_mode_at_creation(ssh: AnySSH, remote_dir: str) -> None:
    path = f"{remote_dir}/token"
    ssh.write_text(path, "secret\n")
    assert ssh.run(["stat", "-c", "%a %s %U", path]).stdout.split() == ["600", "7", "hpcuser"]
    ssh.write_bytes(path, b"#!/bin/sh\necho hi\n", mode=0o755)
    assert ssh.run(["stat", "-c", "%a", path]).stdout.strip() == "755"
    assert ssh.run([path]).stdout == "hi\n"
    # Atomic replace through a temporary: nothing else is left in the directory.
    assert ssh.run(["ls", "-A", remote_dir]).stdout.split() == ["token"]


def test_sftp_read_offset_size_exists_remove(ssh: AnySSH, remote_dir: str) -> None:
    log = f"{remote_dir}/job.out"
    ssh.run(["sh", "-c", f"printf 0123456789 > {shlex.quote(log)}"])
    assert ssh.read_bytes(log) == b"0123456789"
    assert ssh.read_bytes(log, offset=4) == b"456789"
    assert ssh.read_bytes(log, offset=4, limit=3) == b"456"
    assert ssh.read_bytes(log, offset=10) == b""
    ssh.run(["sh", "-c", f"printf abc >> {shlex.quote(log)}"])
    assert ssh.read_bytes(log, offset=10) == b"abc"
    assert len(ssh.read_bytes(log)) == 13
    assert ssh.exists(log)
    ssh.remove(log)
    assert not ssh.exists(log)
    with pytest.raises(PathNotFound):
        ssh.read_bytes(log, limit=1)
    ssh.remove(log)  # missing: fine
    with pytest.raises(PathNotFound) as info:
        ssh.read_bytes(log)
    assert isinstance(info.value, FileNotFoundError)
    assert log in info.value.one_line()


def test_sftp_large_file_home_makedirs_put_get(ssh: AnySSH, remote_dir: str, tmp_path: Path) -> None:
    assert ssh.home() == f"/home/{ssh.settings.user}"
    assert ssh.expand("~/x") == f"/home/{ssh.settings.user}/x"
    payload = os.urandom(5_000_000)
    ssh.write_bytes(f"{remote_dir}/big", payload)
    assert ssh.read_bytes(f"{remote_dir}/big") == payload
    assert ssh.read_bytes(f"{remote_dir}/big", offset=4_000_000) == payload[4_000_000:]
    nested = f"{remote_dir}/a/b/c"
    ssh.makedirs(nested)
    ssh.makedirs(nested)
    assert ssh.run(["stat", "-c", "%a", f"{remote_dir}/a", nested]).stdout.split() == ["700", "700"]
    src = tmp_path / "src.sh"
    src.write_bytes(b"#!/bin/sh\necho put\n")
    src.chmod(0o750)
    ssh.put(str(src), f"{nested}/run.sh")
    assert ssh.run(["stat", "-c", "%a", f"{nested}/run.sh"]).stdout.strip() == "750"
    assert ssh.run([f"{nested}/run.sh"]).stdout == "put\n"
    ssh.get(f"{remote_dir}/big", str(tmp_path / "back"))
    assert (tmp_path / "back").read_bytes() == payload


# -- forward ---------------------------------------------------------------------------------------


@pytest.fixture
def http_server(ssh: AnySSH, remote_dir: str) -> Iterator[int]:
    """``python3 -m http.server`` on the far side, serving remote_dir on 127.0.0.1, killed after."""
    port = free_port()
    ssh.write_text(f"{remote_dir}/index.html", "hello from the cluster\n", mode=0o644)
    ssh.run(["sh", "-c", f"head -c 20000000 /dev/urandom > {shlex.quote(remote_dir)}/big"])
    start = (
        f"cd {shlex.quote(remote_dir)} && setsid nohup python3 -m http.server --bind 127.0.0.1 {port}"
        " >/dev/null 2>&1 </dev/null & echo $!"
    )
    pid = ssh.run(["sh", "-c", start]).stdout.strip()
    try:
        deadline = time.monotonic() + 10
        probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)"
        while ssh.run(["python3", "-c", probe], check=False).returncode != 0:
            assert time.monotonic() < deadline, "http.server did not start"
            time.sleep(0.1)
        yield port
    finally:
        ssh.run(["kill", pid], check=False)


def fetch(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/{path}", timeout=30) as response:
        body: bytes = response.read()
    return body


def test_forward_to_a_server_on_the_far_side(ssh: AnySSH, http_server: int, remote_dir: str) -> None:
    with ssh.forward("127.0.0.1", http_server) as fwd:
        assert fwd.remote_port == http_server
        assert fetch(fwd.local_port, "index.html") == b"hello from the cluster\n"
        remote_sum = ssh.run(["sha256sum", f"{remote_dir}/big"]).stdout.split()[0]
        started = time.perf_counter()
        body = fetch(fwd.local_port, "big")
        seconds = time.perf_counter() - started
        assert hashlib.sha256(body).hexdigest() == remote_sum
        print(f"forward: {len(body) / seconds / 1e6:.0f} MB/s through python's http.server")
        port = fwd.local_port
        if isinstance(ssh, SSHTransport):  # OpenSSH's master accepts the clients itself: no counters
            assert fwd.status.accepted == 2
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert ssh.connections_opened == 1


def test_forward_to_a_closed_port_is_not_fatal(ssh: AnySSH) -> None:
    with ssh.forward("127.0.0.1", free_port()) as fwd:
        with pytest.raises(OSError):
            fetch(fwd.local_port, "")
        if isinstance(ssh, SSHTransport):  # OpenSSH's master accepts the clients itself: no counters
            deadline = time.monotonic() + 5
            while fwd.status.open_failures < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert fwd.status.open_failures == 1
            assert fwd.status.last_error is not None
    assert ssh.run(["true"]).ok  # the connection survived


# -- reconnect -------------------------------------------------------------------------------------


def test_commands_and_forward_survive_a_dropped_connection(ssh: AnySSH, http_server: int) -> None:
    with ssh.forward("127.0.0.1", http_server) as fwd:
        assert fetch(fwd.local_port, "index.html") == b"hello from the cluster\n"
        assert ssh.connections_opened == 1
        # The command that kills its own connection cannot report an exit status.
        with pytest.raises(TransportError, match="broke while"):
            ssh.run(["sh", "-c", KILL_OUR_SSHD])
        deadline = time.monotonic() + 5
        while ssh.is_connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not ssh.is_connected
        # The next command reconnects transparently, once.
        assert ssh.run(["echo", "back"]).stdout == "back\n"
        assert ssh.connections_opened == 2
        assert ssh.reconnects == 1
        # Same local port, new connection underneath.
        assert fetch(fwd.local_port, "index.html") == b"hello from the cluster\n"
        assert ssh.connections_opened == 2


def test_forward_reconnects_by_itself(ssh: AnySSH, http_server: int) -> None:
    with ssh.forward("127.0.0.1", http_server) as fwd:
        with pytest.raises(TransportError):
            ssh.run(["sh", "-c", KILL_OUR_SSHD])
        deadline = time.monotonic() + 5
        while ssh.is_connected and time.monotonic() < deadline:
            time.sleep(0.05)
        # No command in between: the new client itself (paramiko) or the forward's watcher (OpenSSH:
        # a new master, then the forward on it again) brings the connection back.
        deadline = time.monotonic() + 10
        while not isinstance(ssh, SSHTransport):
            try:
                fetch(fwd.local_port, "index.html")
                break
            except OSError:
                assert time.monotonic() < deadline, "the forward did not come back within 10 s"
                time.sleep(0.05)
        assert fetch(fwd.local_port, "index.html") == b"hello from the cluster\n"
        assert ssh.connections_opened == 2


def test_explicit_reconnect(ssh: AnySSH) -> None:
    ssh.run(["true"])
    ssh.reconnect()
    assert ssh.connections_opened == 2
    assert ssh.run(["echo", "ok"]).stdout == "ok\n"
    assert ssh.connections_opened == 2


# -- ProxyJump -------------------------------------------------------------------------------------


def test_proxyjump_through_the_same_sshd(
    dev_cluster: DevCluster, tmp_path: Path, remote_dir: str, make_ssh: MakeSSH
) -> None:
    config = write_config(tmp_path, dev_cluster, extra="    ProxyJump jump\n")
    with make_ssh("dev", ssh_config_path=str(config)) as ssh:
        assert ssh.run(["id", "-un"]).stdout.strip() == dev_cluster.user
        ssh.write_text(f"{remote_dir}/via-jump", "j")
        assert ssh.read_text(f"{remote_dir}/via-jump") == "j"
        assert ssh.connections_opened == 2  # the jump host, then the target through it
        ssh.run(["true"])
        assert ssh.connections_opened == 2


def test_proxyjump_chain_of_two_hops(dev_cluster: DevCluster, tmp_path: Path, make_ssh: MakeSSH) -> None:
    config = write_config(tmp_path, dev_cluster, extra="    ProxyJump jump,jump\n")
    with make_ssh("dev", ssh_config_path=str(config)) as ssh:
        assert ssh.run(["echo", "two hops"]).stdout == "two hops\n"
        assert ssh.connections_opened == 3


def test_proxyjump_to_a_dead_port(dev_cluster: DevCluster, tmp_path: Path, make_ssh: MakeSSH) -> None:
    config = write_config(tmp_path, dev_cluster, extra="    ProxyJump jump\n", port=free_port())
    # Only "dev" gets the dead port; keep the jump host on the real one.
    text = config.read_text().split("Host jump")
    config.write_text(text[0] + "Host jump" + text[1].replace(text[1].split("Port ")[1].split()[0], "2222"))
    with pytest.raises(ConnectionFailed) as info:
        make_ssh("dev", ssh_config_path=str(config)).connect()
    line = info.value.one_line()
    assert "via jump host" in line and "could not reach it" in line
    assert "\n" not in line


# -- failures --------------------------------------------------------------------------------------


def test_nothing_listening_is_one_line(dev_cluster: DevCluster, make_ssh: MakeSSH) -> None:
    port = free_port()
    transport = make_ssh(dev_cluster.ssh_alias, ssh_config_path=str(dev_cluster.ssh_config), port=port)
    with pytest.raises(ConnectionFailed) as info:
        transport.run(["true"])
    assert info.value.one_line() == (
        f"cannot connect to {dev_cluster.user}@127.0.0.1:{port}: connection refused "
        f"(is sshd running? check HostName/Port of {dev_cluster.ssh_alias} in {dev_cluster.ssh_config})"
    )


def test_wrong_key_is_refused(dev_cluster: DevCluster, tmp_path: Path, make_ssh: MakeSSH) -> None:
    key = tmp_path / "id_wrong"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    config = write_config(tmp_path, dev_cluster, key=str(key))
    with pytest.raises(ConnectionFailed) as info:
        make_ssh("dev", ssh_config_path=str(config)).connect()
    line = info.value.one_line()
    assert not isinstance(info.value, HostKeyError)
    assert line.startswith(f"cannot log in to {dev_cluster.user}@127.0.0.1:{dev_cluster.port}")
    assert str(key) in line and "refused" in line and "authorized_keys" in line


def test_passphrase_key_without_agent_is_a_clear_error(
    dev_cluster: DevCluster, tmp_path: Path, make_ssh: MakeSSH
) -> None:
    # No agent and no terminal (OpenSSH's ssh would ask on one): the error names the key and the fix.
    key = tmp_path / "id_locked"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "s3cret", "-f", str(key)], check=True)
    config = write_config(tmp_path, dev_cluster, key=str(key))
    with pytest.raises(ConnectionFailed) as info:
        make_ssh("dev", ssh_config_path=str(config)).connect()
    line = info.value.one_line()
    assert "passphrase" in line and f"ssh-add {key}" in line


def test_explicit_identity_file_and_user(dev_cluster: DevCluster, make_ssh: MakeSSH) -> None:
    # No ssh_config entry at all: everything from arguments (known_hosts still required).
    ssh = make_ssh(
        dev_cluster.host,
        port=dev_cluster.port,
        user=dev_cluster.user,
        identity_file=str(dev_cluster.key_path),
        known_hosts_file=str(dev_cluster.known_hosts),
        ssh_config_path=os.devnull,
    )
    with ssh:
        assert ssh.run(["id", "-un"]).stdout.strip() == dev_cluster.user


# -- host keys -------------------------------------------------------------------------------------


def test_unknown_host_key_is_refused_by_default(
    dev_cluster: DevCluster, tmp_path: Path, make_ssh: MakeSSH, ssh_kind: str
) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("")
    config = write_config(tmp_path, dev_cluster, known_hosts=known)
    with pytest.raises(HostKeyError) as info:
        make_ssh("dev", ssh_config_path=str(config)).connect()
    line = info.value.one_line()
    if ssh_kind == "paramiko":  # OpenSSH names neither the key nor the host in its refusal
        assert f"[127.0.0.1]:{dev_cluster.port}" in line
        assert f"ssh-ed25519 {host_key_fingerprint(dev_cluster)}" in line
    else:
        assert f"127.0.0.1:{dev_cluster.port} is not known" in line
    assert "--accept-new-host-key" in line and ENV_ACCEPT_NEW in line
    assert known.read_text() == ""


def test_accept_new_records_the_key(dev_cluster: DevCluster, tmp_path: Path, make_ssh: MakeSSH) -> None:
    known = tmp_path / "dotssh" / "known_hosts"
    config = write_config(tmp_path, dev_cluster, known_hosts=known)
    with make_ssh("dev", ssh_config_path=str(config), accept_new_host_key=True) as ssh:
        ssh.run(["true"])
    recorded = known.read_text()
    assert recorded.startswith(f"[127.0.0.1]:{dev_cluster.port} ssh-ed25519 ")
    assert recorded.split()[2] == (dev_cluster.state_dir / "ssh_host_ed25519_key.pub").read_text().split()[1]
    assert oct(known.stat().st_mode & 0o777) == "0o600"
    assert oct(known.parent.stat().st_mode & 0o777) == "0o700"
    # OpenSSH agrees with what we wrote.
    out = subprocess.run(
        ["ssh", "-F", str(config), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "dev", "true"],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr
    # Second time: known, no opt-in needed.
    with make_ssh("dev", ssh_config_path=str(config)) as ssh:
        assert ssh.run(["echo", "ok"]).stdout == "ok\n"
    assert known.read_text() == recorded


def test_accept_new_from_environment(
    dev_cluster: DevCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_ssh: MakeSSH
) -> None:
    known = tmp_path / "known_hosts"
    config = write_config(tmp_path, dev_cluster, known_hosts=known)
    monkeypatch.setenv(ENV_ACCEPT_NEW, "1")
    make_ssh("dev", ssh_config_path=str(config)).connect()
    assert known.read_text().startswith(f"[127.0.0.1]:{dev_cluster.port} ")


def test_changed_host_key_is_refused_even_with_accept_new(
    dev_cluster: DevCluster, tmp_path: Path, make_ssh: MakeSSH
) -> None:
    other = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    key_type, b64 = (tmp_path / "other_host_key.pub").read_text().split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{dev_cluster.port} {key_type} {b64}\n")
    before = known.read_text()
    config = write_config(tmp_path, dev_cluster, known_hosts=known)
    with pytest.raises(HostKeyError) as info:
        make_ssh("dev", ssh_config_path=str(config), accept_new_host_key=True).connect()
    line = info.value.one_line()
    assert "HAS CHANGED" in line
    assert host_key_fingerprint(dev_cluster) in line
    assert known.read_text() == before
