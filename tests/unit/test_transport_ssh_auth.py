"""Key + keyboard-interactive (MFA) login, against an in-process paramiko server on 127.0.0.1.

The dev cluster's sshd accepts keys only, so the one-time-code path is tested here: the server wants a
key first and then a code, like many HPC centres.
"""

from __future__ import annotations

import base64
import io
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hpclaunch.errors import ConnectionFailed
from hpclaunch.transport.ssh import SSHTransport

paramiko = pytest.importorskip("paramiko")
pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs OpenSSH's ssh-keygen")

CODE = "123456"


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


@dataclass
class MfaServer:
    """Accepts the given key as a first factor, then asks for a one-time code."""

    host_key: paramiko.PKey
    client_blob: bytes
    port: int = 0
    logins: int = 0
    commands: list[str] = field(default_factory=list)
    _sock: socket.socket | None = None
    _transports: list[paramiko.Transport] = field(default_factory=list)

    def start(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen()
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self) -> None:
        assert self._sock is not None
        self._sock.close()
        for transport in self._transports:
            transport.close()

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            transport = paramiko.Transport(conn)
            transport.add_server_key(self.host_key)
            self._transports.append(transport)
            transport.start_server(server=self._Interface(self))

    class _Interface(paramiko.ServerInterface):  # type: ignore[misc]
        def __init__(self, outer: MfaServer) -> None:
            self.outer = outer
            self.key_ok = False

        def get_allowed_auths(self, username: str) -> str:
            return "keyboard-interactive" if self.key_ok else "publickey"

        def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
            if key.asbytes() == self.outer.client_blob:
                self.key_ok = True
                return paramiko.AUTH_PARTIALLY_SUCCESSFUL
            return paramiko.AUTH_FAILED

        def check_auth_interactive(self, username: str, submethods: str) -> object:
            if not self.key_ok:
                return paramiko.AUTH_FAILED
            return paramiko.InteractiveQuery("Duo", "Enter your one-time code", ("Code: ", False))

        def check_auth_interactive_response(self, responses: Sequence[str]) -> int:
            if list(responses) == [CODE]:
                self.outer.logins += 1
                return paramiko.AUTH_SUCCESSFUL
            return paramiko.AUTH_FAILED

        def check_channel_request(self, kind: str, chanid: int) -> int:
            return (
                paramiko.OPEN_SUCCEEDED
                if kind == "session"
                else paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
            )

        def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
            text = command.decode()
            self.outer.commands.append(text)

            def reply() -> None:
                # paramiko answers the exec request after we return: do not close the channel first.
                time.sleep(0.05)
                channel.sendall(f"ran {text}\n".encode())
                channel.send_exit_status(0)
                channel.close()

            threading.Thread(target=reply, daemon=True).start()
            return True


@pytest.fixture
def mfa(tmp_path: Path) -> Iterator[tuple[MfaServer, Path]]:
    _keygen(tmp_path / "host")
    _keygen(tmp_path / "client")
    host_key = paramiko.PKey.from_path(tmp_path / "host")
    client_blob = base64.b64decode((tmp_path / "client.pub").read_text().split()[1])
    server = MfaServer(host_key, client_blob)
    server.start()
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{server.port} {host_key.get_name()} {host_key.get_base64()}\n")
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host mfa\n  HostName 127.0.0.1\n  Port {server.port}\n  User alice\n"
        f"  IdentityFile {tmp_path / 'client'}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {known}\n  GlobalKnownHostsFile /dev/null\n"
    )
    yield server, config
    server.stop()


@pytest.fixture(autouse=True)
def _no_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


def test_key_then_one_time_code_asked_once_per_connection(mfa: tuple[MfaServer, Path]) -> None:
    server, config = mfa
    asked: list[tuple[str, str, list[tuple[str, bool]]]] = []

    def prompter(title: str, instructions: str, prompts: Sequence[tuple[str, bool]]) -> list[str]:
        asked.append((title, instructions, list(prompts)))
        return [CODE]

    # The fake server echoes commands, it has no shell to log in to: plain commands only.
    with SSHTransport("mfa", ssh_config_path=str(config), prompter=prompter, login_shell=False) as ssh:
        for _ in range(5):
            assert ssh.run(["squeue", "--me"]).stdout == "ran squeue --me\n"
        assert asked == [("Duo", "Enter your one-time code", [("Code: ", False)])]
        assert (ssh.connections_opened, server.logins) == (1, 1)
        # A new connection is a new login: the code is asked again.
        ssh.reconnect()
        ssh.run(["true"])
        assert len(asked) == 2 and server.logins == 2


def test_wrong_code_is_a_clear_error(mfa: tuple[MfaServer, Path]) -> None:
    _, config = mfa
    ssh = SSHTransport("mfa", ssh_config_path=str(config), prompter=lambda *_: ["000000"])
    with pytest.raises(ConnectionFailed) as info:
        ssh.connect()
    line = info.value.one_line()
    assert line.startswith("cannot log in to alice@127.0.0.1:")
    assert "keyboard-interactive login was refused" in line


def test_no_terminal_is_a_clear_error(mfa: tuple[MfaServer, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    _, config = mfa
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # not a TTY
    with pytest.raises(ConnectionFailed) as info:
        SSHTransport("mfa", ssh_config_path=str(config)).connect()
    line = info.value.one_line()
    assert "keyboard-interactive" in line and "no terminal" in line
    assert "\n" not in line


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs OpenSSH's ssh")
def test_openssh_ten_processes_one_login_one_prompt(
    mfa: tuple[MfaServer, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenSSH's own client asks for the code (here through SSH_ASKPASS, as it would on the terminal)
    once; ten transports, as ten CLI processes make them, then share the master's one login."""
    import tempfile

    from hpclaunch.transport.openssh import OpenSSHTransport

    server, config = mfa
    asked = tmp_path / "asked"
    askpass = tmp_path / "askpass"
    askpass.write_text(f'#!/bin/sh\nprintf "%s\\n" "$1" >> {asked}\necho {CODE}\n')
    askpass.chmod(0o755)
    monkeypatch.setenv("SSH_ASKPASS", str(askpass))
    monkeypatch.setenv("SSH_ASKPASS_REQUIRE", "force")
    control = tempfile.mkdtemp(prefix="hcl-m-", dir="/tmp")  # unix socket paths are short
    first = OpenSSHTransport("mfa", ssh_config_path=str(config), control_dir=control, login_shell=False)
    try:
        for _ in range(10):
            transport = OpenSSHTransport(
                "mfa", ssh_config_path=str(config), control_dir=control, login_shell=False
            )
            assert transport.run(["hostname"]).stdout.startswith("ran ")
            transport.close()
        assert server.logins == 1
        assert asked.read_text().splitlines() == ["(alice@127.0.0.1) Code: "]  # asked once
    finally:
        first.end_master()
        shutil.rmtree(control, ignore_errors=True)
