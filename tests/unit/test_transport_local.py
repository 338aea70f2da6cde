"""LocalTransport: real subprocesses, real files, a real TCP relay (no mocks)."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpclaunch.errors import CommandError, CommandTimeout, TunnelError
from hpclaunch.transport import LocalTransport, PathNotFound, Transport, connect


@pytest.fixture
def local() -> LocalTransport:
    return LocalTransport()


def test_connect_none_is_local() -> None:
    transport = connect(None)
    assert isinstance(transport, LocalTransport)
    assert isinstance(transport, Transport)
    assert not transport.is_remote
    assert transport.description == "this machine"
    assert isinstance(connect(""), LocalTransport)


# -- commands --------------------------------------------------------------------------------------


def test_run_returns_output_and_counts(local: LocalTransport) -> None:
    result = local.run(["echo", "hello world", "$HOME", "a;b"])
    # argv stays a list: no shell expands or splits anything.
    assert result.stdout == "hello world $HOME a;b\n"
    assert result.ok and result.returncode == 0
    assert result.argv == ("echo", "hello world", "$HOME", "a;b")
    local.run(["true"])
    local.run(["true"])
    assert local.command_counts["true"] == 2
    assert local.command_counts["echo"] == 1
    assert local.commands_run == 3
    assert local.connections_opened == 0


def test_run_stdin_str_and_bytes(local: LocalTransport) -> None:
    assert local.run(["cat"], stdin="line1\nline2\n").stdout == "line1\nline2\n"
    assert local.run(["wc", "-c"], stdin=b"\x00\x01\x02").stdout.strip() == "3"


def test_run_without_stdin_does_not_wait_for_input(local: LocalTransport) -> None:
    # stdin is /dev/null: a command reading it ends at once instead of hanging on our terminal.
    assert local.run(["cat"], timeout=5).stdout == ""


def test_run_env_adds_to_environment(local: LocalTransport) -> None:
    out = local.run(["sh", "-c", 'echo "$HPCL_X|$PATH"'], env={"HPCL_X": "a b"}).stdout
    value, path = out.rstrip("\n").split("|")
    assert value == "a b"
    assert path == os.environ["PATH"]


def test_large_output_on_both_streams_does_not_deadlock(local: LocalTransport) -> None:
    script = "head -c 3000000 /dev/zero | tr '\\0' a; head -c 3000000 /dev/zero | tr '\\0' b >&2"
    result = local.run(["sh", "-c", script], timeout=30)
    assert len(result.stdout) == 3_000_000
    assert len(result.stderr) == 3_000_000


def test_nonzero_exit_raises_with_details(local: LocalTransport) -> None:
    with pytest.raises(CommandError) as info:
        local.run(["sh", "-c", "echo out; echo boom >&2; exit 3"])
    err = info.value
    assert err.argv == ("sh", "-c", "echo out; echo boom >&2; exit 3")
    assert err.returncode == 3
    assert err.stdout == "out\n"
    assert err.stderr == "boom\n"
    assert "exited with 3: boom" in err.one_line()


def test_nonzero_exit_without_check(local: LocalTransport) -> None:
    result = local.run(["sh", "-c", "exit 4"], check=False)
    assert result.returncode == 4
    assert not result.ok


def test_missing_executable_is_127_and_named(local: LocalTransport) -> None:
    with pytest.raises(CommandError) as info:
        local.run(["hpclaunch-no-such-command", "--x"])
    assert info.value.returncode == 127
    assert "hpclaunch-no-such-command" in info.value.one_line()
    assert "\n" not in info.value.one_line()
    result = local.run(["hpclaunch-no-such-command"], check=False)
    assert result.returncode == 127
    assert "hpclaunch-no-such-command" in result.stderr


def test_timeout_kills_the_whole_process_group(local: LocalTransport, tmp_path: Path) -> None:
    marker = tmp_path / "child.pid"
    # The shell starts a background grandchild: the timeout must kill it too, and quickly.
    script = f"sleep 60 & echo $! > {marker}; wait"
    started = time.monotonic()
    with pytest.raises(CommandTimeout) as info:
        local.run(["sh", "-c", script], timeout=0.5)
    assert time.monotonic() - started < 5
    assert "0.5 s" in info.value.one_line()
    child = int(marker.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"grandchild {child} survived the timeout")


def test_argv_must_be_a_list(local: LocalTransport) -> None:
    with pytest.raises(TypeError):
        local.run("echo hi")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        local.run([])


# -- files -----------------------------------------------------------------------------------------


def test_write_sets_mode_and_is_atomic(local: LocalTransport, tmp_path: Path) -> None:
    target = tmp_path / "secret.txt"
    old = os.umask(0o022)
    try:
        local.write_text(str(target), "token=abc\n")
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
        local.write_bytes(str(target), b"#!/bin/sh\n", mode=0o755)
        assert stat.S_IMODE(target.stat().st_mode) == 0o755
        # The umask cannot take bits the caller asked for.
        os.umask(0o077)
        local.write_bytes(str(target), b"x", mode=0o644)
        assert stat.S_IMODE(target.stat().st_mode) == 0o644
    finally:
        os.umask(old)
    assert target.read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.txt"]  # no temporary left


def test_read_with_offset_and_limit(local: LocalTransport, tmp_path: Path) -> None:
    log = tmp_path / "job.out"
    log.write_bytes(b"0123456789")
    assert local.read_bytes(str(log)) == b"0123456789"
    assert local.read_bytes(str(log), offset=4) == b"456789"
    assert local.read_bytes(str(log), offset=4, limit=3) == b"456"
    assert local.read_bytes(str(log), offset=10) == b""
    assert local.read_bytes(str(log), offset=50) == b""
    with log.open("ab") as fh:
        fh.write(b"abc")
    # Following a growing log: read from where we stopped.
    assert local.read_bytes(str(log), offset=10) == b"abc"
    assert local.read_text(str(log)) == "0123456789abc"


def test_missing_file(local: LocalTransport, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(PathNotFound) as info:
        local.read_bytes(missing)
    assert isinstance(info.value, FileNotFoundError)
    assert missing in info.value.one_line()
    assert not local.exists(missing)
    with pytest.raises(PathNotFound):
        local.read_bytes(missing, limit=1)
    assert not local.exists(missing)
    local.remove(missing)  # not an error


def test_size_exists_remove(local: LocalTransport, tmp_path: Path) -> None:
    path = str(tmp_path / "f")
    local.write_bytes(path, b"12345")
    assert local.exists(path)
    assert len(local.read_bytes(path)) == 5
    local.remove(path)
    assert not local.exists(path)


def test_makedirs_mode(local: LocalTransport, tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    local.makedirs(str(target))
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    local.makedirs(str(target))  # again: fine


def test_put_get_and_home(local: LocalTransport, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(200_000))
    os.chmod(src, 0o640)
    local.put(str(src), str(tmp_path / "copy.bin"))
    assert (tmp_path / "copy.bin").read_bytes() == src.read_bytes()
    assert stat.S_IMODE((tmp_path / "copy.bin").stat().st_mode) == 0o640
    local.put(str(src), str(tmp_path / "copy600.bin"), mode=0o600)
    assert stat.S_IMODE((tmp_path / "copy600.bin").stat().st_mode) == 0o600
    local.get(str(tmp_path / "copy.bin"), str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
    with pytest.raises(PathNotFound):
        local.put(str(tmp_path / "nope"), str(tmp_path / "x"))
    assert local.home() == os.path.expanduser("~")
    assert local.expand("~/x") == os.path.expanduser("~/x")


# -- forward ---------------------------------------------------------------------------------------


@pytest.fixture
def echo_server() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that echoes what it gets, upper-cased, until the client's EOF."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    stop = threading.Event()

    def handle(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data.upper())

    def loop() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


def _exchange(port: int, payload: bytes) -> bytes:
    """Send ``payload`` then EOF, return all that comes back (the far side may close early)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:

        def send() -> None:
            with contextlib.suppress(OSError):
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        chunks = []
        with contextlib.suppress(ConnectionResetError):  # a refused client may see RST, not EOF
            while data := sock.recv(65536):
                chunks.append(data)
        sender.join()
    return b"".join(chunks)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_forward_relays_and_frees_the_port(local: LocalTransport, echo_server: int) -> None:
    with local.forward("127.0.0.1", echo_server) as fwd:
        assert fwd.local_port != echo_server
        assert fwd.remote_host == "127.0.0.1" and fwd.remote_port == echo_server
        assert _exchange(fwd.local_port, b"hello") == b"HELLO"
        payload = os.urandom(4_000_000).replace(b"\n", b"x")
        assert _exchange(fwd.local_port, payload) == payload.upper()
        # Several clients at once.
        results: list[bytes] = []
        threads = [
            threading.Thread(target=lambda i=i: results.append(_exchange(fwd.local_port, b"c%d" % i)))
            for i in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == sorted(b"C%d" % i for i in range(8))
        assert fwd.status.accepted == 10
        port = fwd.local_port
    assert not _listening(port)
    # The same port can be taken again at once (SO_REUSEADDR, all connections closed).
    with local.forward("127.0.0.1", echo_server, local_port=port) as again:
        assert again.local_port == port
        assert _exchange(port, b"again") == b"AGAIN"


def test_forward_listens_on_loopback_only(local: LocalTransport, echo_server: int) -> None:
    with local.forward("127.0.0.1", echo_server) as fwd:
        listening = [
            line.split()
            for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
            if line.split()[3] == "0A"  # LISTEN
        ]
        ours = [fields[1] for fields in listening if int(fields[1].split(":")[1], 16) == fwd.local_port]
        assert ours == [f"0100007F:{fwd.local_port:04X}"]  # 127.0.0.1, not 0.0.0.0


def test_forward_to_nothing_counts_failures_but_does_not_break(local: LocalTransport) -> None:
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    dead_port = free.getsockname()[1]
    free.close()
    with local.forward("127.0.0.1", dead_port) as fwd:
        # The client is accepted, then closed: the far end is not there (yet).
        assert _exchange(fwd.local_port, b"x") == b""
        deadline = time.monotonic() + 5
        while fwd.status.open_failures < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fwd.status.open_failures == 1
        assert fwd.status.last_error is not None and str(dead_port) in fwd.status.last_error
    # Leaving the context raised nothing: a server that is not up yet is not a broken tunnel.


def test_forward_busy_port_is_a_tunnel_error(local: LocalTransport, echo_server: int) -> None:
    with local.forward("127.0.0.1", echo_server) as fwd, pytest.raises(TunnelError) as info:
        with local.forward("127.0.0.1", echo_server, local_port=fwd.local_port):
            pass
    assert str(fwd.local_port) in info.value.one_line()


def test_forward_body_exception_propagates_and_closes(local: LocalTransport, echo_server: int) -> None:
    port = 0
    with pytest.raises(KeyError), local.forward("127.0.0.1", echo_server) as fwd:
        port = fwd.local_port
        raise KeyError("body")
    assert not _listening(port)


def test_forward_reraises_unexpected_thread_errors(echo_server: int) -> None:
    from hpclaunch.transport import relay

    def broken_opener(origin: tuple[str, int]) -> relay.Stream:
        raise RuntimeError("bug in opener")

    with pytest.raises(TunnelError) as info, relay.serve(("127.0.0.1", echo_server), broken_opener) as fwd:
        _exchange(fwd.local_port, b"x")
        deadline = time.monotonic() + 5
        while fwd.status.last_error is None and time.monotonic() < deadline:
            time.sleep(0.01)
    assert "bug in opener" in info.value.one_line()


def test_local_transport_imports_no_paramiko() -> None:
    import subprocess

    code = (
        "import sys, hpclaunch.transport as t; t.connect(None).run(['true']); "
        "print('paramiko' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
