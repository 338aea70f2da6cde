"""The paramiko transport's connection holder: its wire, and one login (one MFA prompt) for many processes.

The holder is a real background process (``python -m hpclaunch.transport.holder``) logging in to the
in-process key + one-time-code server of test_transport_ssh_auth; a new ``HeldTransport`` stands for
each CLI command.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import struct
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from hpclaunch.errors import CommandError, ConnectionFailed, HostKeyError, TransportError
from hpclaunch.transport import connect, holdwire
from hpclaunch.transport.base import PathNotFound
from hpclaunch.transport.held import HeldTransport
from hpclaunch.transport.ssh import SSHTransport
from tests.unit.test_transport_ssh_auth import CODE, MfaServer, mfa  # noqa: F401 - the fixture

# -- the wire ---------------------------------------------------------------------------------------


def test_a_message_and_its_blob_round_trip() -> None:
    a, b = socket.socketpair()
    with a, b:
        holdwire.send(a, {"op": "write", "path": "~/x"}, b"\0binary\xff" * 1000)
        holdwire.send(a, {"op": "home"})
        assert holdwire.recv(b) == ({"op": "write", "path": "~/x"}, b"\0binary\xff" * 1000)
        assert holdwire.recv(b) == ({"op": "home"}, None)
        a.close()
        with pytest.raises(holdwire.Closed):
            holdwire.recv(b)


@pytest.mark.parametrize(
    "raw",
    [
        struct.pack(">I", holdwire.MAX_HEADER + 1),  # absurd length: never allocated
        struct.pack(">I", 5) + b"hello",  # not JSON
        struct.pack(">I", 2) + b"[]",  # not an object
        struct.pack(">I", 10) + b'{"op"',  # hung up mid-message
        struct.pack(">I", 12) + b'{"blob": -1}',  # bad blob size
    ],
)
def test_what_is_not_a_message_is_a_wire_error(raw: bytes) -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(raw)
        a.close()
        with pytest.raises(holdwire.WireError) as info:
            holdwire.recv(b)
        assert not isinstance(info.value, holdwire.Closed)


def test_errors_come_back_as_the_same_class_and_line() -> None:
    cases: list[Exception] = [
        CommandError(["sbatch", "x"], 1, "", "sbatch: error: bad", hint="look"),
        PathNotFound("~/nope", "alice@login:22"),
        HostKeyError("the host key changed", hint="ask your admins"),
        TransportError("cannot read ~/x", details="more"),
    ]
    for exc in cases:
        back = holdwire.error_from_wire(json.loads(json.dumps(holdwire.error_to_wire(exc))))
        assert type(back) is type(exc)
        assert back.one_line() == exc.one_line()  # type: ignore[attr-defined]
    command = holdwire.error_from_wire(holdwire.error_to_wire(cases[0]))
    assert isinstance(command, CommandError) and command.stderr == "sbatch: error: bad"
    assert isinstance(holdwire.error_from_wire(holdwire.error_to_wire(cases[1])), FileNotFoundError)


def test_a_bug_in_the_holder_or_a_malformed_error_is_one_line() -> None:
    bug = holdwire.error_from_wire(holdwire.error_to_wire(KeyError("argv")))
    assert type(bug) is TransportError and "the connection holder failed: KeyError" in bug.one_line()
    for junk in (
        None,
        "x",
        {"class": "CommandError", "message": "m"},
        {"class": "SystemExit", "message": "m"},
    ):
        assert isinstance(holdwire.error_from_wire(junk), TransportError)


def test_the_peer_uid_is_ours() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert holdwire.can_check_peers()
        assert holdwire.peer_uid(a) == os.getuid()
        assert holdwire.same_user(a)


# -- a real holder ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


@pytest.fixture
def runtime() -> Iterator[str]:
    # Short: a unix socket path has about 100 bytes; pytest's tmp_path can be longer.
    path = tempfile.mkdtemp(prefix="hcl-u-", dir="/tmp")
    try:
        yield path
    finally:
        _end_all(path)
        shutil.rmtree(path, ignore_errors=True)


def _end_all(path: str) -> None:
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if stat.S_ISSOCK(os.lstat(full).st_mode):
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(5)
            try:
                sock.connect(full)
                holdwire.send(sock, {"op": "exit"})
                holdwire.recv(sock)
            except (OSError, holdwire.WireError):
                pass
            finally:
                sock.close()


class Asked:
    """A prompter that answers the code and counts the times it was asked."""

    def __init__(self, answer: str = CODE) -> None:
        self.rounds: list[list[tuple[str, bool]]] = []
        self.answer = answer

    def __call__(self, title: str, instructions: str, prompts: Sequence[tuple[str, bool]]) -> list[str]:
        self.rounds.append(list(prompts))
        return [self.answer]


def held(config: Path, runtime: str, asked: Asked, idle: int = 60) -> HeldTransport:
    return HeldTransport(
        "mfa", ssh_config_path=str(config), prompter=asked, login_shell=False, idle=idle, runtime_dir=runtime
    )


def test_ten_processes_one_login_one_prompt(mfa: tuple[MfaServer, Path], runtime: str) -> None:  # noqa: F811
    server, config = mfa
    asked = Asked()
    for _ in range(10):  # ten "CLI commands", each its own transport
        with held(config, runtime, asked) as ssh:
            assert ssh.run(["squeue", "--me"]).stdout == "ran squeue --me\n"
    assert asked.rounds == [[("Code: ", False)]]
    assert server.logins == 1
    sockets = [n for n in os.listdir(runtime) if stat.S_ISSOCK(os.lstat(os.path.join(runtime, n)).st_mode)]
    assert len(sockets) == 1
    assert stat.S_IMODE(os.lstat(os.path.join(runtime, sockets[0])).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.join(runtime, sockets[0]) + ".log").st_mode) == 0o600


def test_a_wrong_code_is_the_same_clear_error_and_leaves_no_holder(
    mfa: tuple[MfaServer, Path],  # noqa: F811
    runtime: str,
) -> None:
    _, config = mfa
    with pytest.raises(ConnectionFailed) as info:
        held(config, runtime, Asked("000000")).connect()
    assert "keyboard-interactive login was refused" in info.value.one_line()
    time.sleep(0.3)
    assert not any(stat.S_ISSOCK(os.lstat(os.path.join(runtime, n)).st_mode) for n in os.listdir(runtime))


def test_a_killed_holder_is_replaced_by_a_new_login(mfa: tuple[MfaServer, Path], runtime: str) -> None:  # noqa: F811
    server, config = mfa
    asked = Asked()
    first = held(config, runtime, asked)
    first.connect()
    pid = first.holder_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # leaves its socket file behind
    time.sleep(0.2)
    assert os.path.exists(first.socket_path)
    assert first.holder_pid() is None
    again = held(config, runtime, asked)
    assert again.run(["true"]).stdout == "ran true\n"
    assert again.holder_pid() not in (None, pid)
    # The old transport notices too: its next request goes to the new holder, no new login.
    assert first.run(["hostname"]).stdout == "ran hostname\n"
    assert (len(asked.rounds), server.logins) == (2, 2)


def test_a_stopped_holder_is_stale_and_replaced(mfa: tuple[MfaServer, Path], runtime: str) -> None:  # noqa: F811
    _, config = mfa
    asked = Asked()
    ssh = held(config, runtime, asked)
    ssh.connect()
    pid = ssh.holder_pid()
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # accepts (the kernel does) but never answers
    try:
        fresh = held(config, runtime, asked)
        started = time.monotonic()
        assert fresh.run(["true"]).ok
        assert time.monotonic() - started < 15
    finally:
        os.kill(pid, signal.SIGCONT)
    # Woken up, the old one sees its socket path taken over and ends.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not alive: the holder is nobody's child, but look anyway.
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split()[2] == "Z")


def test_an_idle_holder_ends_and_removes_its_socket(mfa: tuple[MfaServer, Path], runtime: str) -> None:  # noqa: F811
    _, config = mfa
    ssh = held(config, runtime, Asked(), idle=1)
    ssh.connect()
    assert os.path.exists(ssh.socket_path)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and os.path.exists(ssh.socket_path):
        time.sleep(0.1)
    assert not os.path.exists(ssh.socket_path)
    assert ssh.holder_pid() is None


def test_disconnect_ends_it(mfa: tuple[MfaServer, Path], runtime: str) -> None:  # noqa: F811
    _, config = mfa
    ssh = held(config, runtime, Asked())
    assert ssh.end_holder() is False
    ssh.connect()
    assert ssh.end_holder() is True
    assert ssh.holder_pid() is None and not os.path.exists(ssh.socket_path)


def test_connect_picks_the_holder_only_when_kept(runtime: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPCLAUNCH_RUNTIME_DIR", runtime)
    kept = connect("login.example.edu", transport="paramiko", session_idle=600)
    assert isinstance(kept, HeldTransport) and kept.socket_path.startswith(runtime)
    assert type(connect("login.example.edu", transport="paramiko", session_idle=0)) is SSHTransport
    other = connect("login.example.edu", transport="paramiko", user="bob")
    assert isinstance(other, HeldTransport) and other.socket_path != kept.socket_path
