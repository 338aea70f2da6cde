"""Kerberos logins (issue 10): the settings that ask for GSSAPI, ``klist -s``, and the one line each
transport prints when a Kerberos login fails (the OpenSSH one names `kinit`; paramiko has no GSSAPI at
all and names the OpenSSH transport). The real KDC and GSSAPI sshd are in tests/cluster/test_kerberos.py.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hpclaunch.errors import ConnectionFailed
from hpclaunch.transport import kerberos, sshconfig
from hpclaunch.transport.hostsettings import resolve
from hpclaunch.transport.sshfailure import login_failure

TARGET, ALIAS, CONFIG = "alice@login:2222", "login", "~/.ssh/config"
KRB_ONLY = "Host login\n    GSSAPIAuthentication yes\n    PubkeyAuthentication no\n    IdentityFile none\n"

# Real stderr of OpenSSH 9.2 (LogLevel ERROR): a Kerberos-only sshd, and one that also takes keys.
GSSAPI_ONLY = "hpcuser@127.0.0.1: Permission denied (gssapi-with-mic).\r\n"
GSSAPI_OR_KEY = "hpcuser@127.0.0.1: Permission denied (publickey,gssapi-with-mic).\r\n"
KEY_ONLY = "hpcuser@127.0.0.1: Permission denied (publickey).\r\n"
KEY = ("/home/alice/.ssh/id_ed25519",)


# -- settings -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("openssh", [True, False], ids=["ssh-G", "python"])
def test_a_kerberos_only_host_asks_for_gssapi_and_has_no_key(tmp_path: Path, openssh: bool) -> None:
    ssh = shutil.which("ssh")
    if openssh and ssh is None:
        pytest.skip("no OpenSSH client")
    config = tmp_path / "config"
    config.write_text(KRB_ONLY)
    if openssh:
        opts = sshconfig.openssh_options(ssh or "ssh", "login", str(config))
    else:
        opts = sshconfig.python_options("login", str(config))
    s = resolve("login", opts)
    assert (s.gssapi_authentication, s.pubkey_authentication, s.identity_files) == (True, False, ())


def test_openssh_defaults_are_no_gssapi_and_keys(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text("Host login\n    HostName 10.0.0.1\n")
    s = resolve("login", sshconfig.python_options("login", str(config)))
    assert (s.gssapi_authentication, s.pubkey_authentication) == (False, True)
    assert s.identity_files  # OpenSSH's default key files, as before


# -- klist -s -----------------------------------------------------------------------------------------


def _fake_klist(directory: Path, code: int) -> None:
    klist = directory / "klist"
    klist.write_text(f'#!/bin/sh\n[ "$1" = -s ] || exit 9\nexit {code}\n')
    klist.chmod(0o755)


@pytest.mark.parametrize(("code", "expected"), [(0, True), (1, False)])
def test_klist_s_tells_whether_there_is_a_ticket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, expected: bool
) -> None:
    _fake_klist(tmp_path, code)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert kerberos.has_ticket() is expected


def test_without_klist_nobody_knows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert kerberos.has_ticket() is None


# -- what a failed OpenSSH login means ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("stderr", "keys", "gssapi", "ticket", "line"),
    [
        pytest.param(
            GSSAPI_ONLY,
            (),
            True,
            False,
            "cannot log in to alice@login:2222: no Kerberos ticket (`klist` shows none) "
            "(run `kinit` to get one, then try again)",
            id="no-ticket",
        ),
        pytest.param(
            GSSAPI_OR_KEY,
            (),
            True,
            False,
            "cannot log in to alice@login:2222: no Kerberos ticket (`klist` shows none) "
            "(run `kinit` to get one, then try again)",
            id="no-ticket-and-no-key",
        ),
        pytest.param(
            GSSAPI_ONLY,
            KEY,
            True,
            False,
            "cannot log in to alice@login:2222: no Kerberos ticket",
            id="no-ticket-key-useless",
        ),
        pytest.param(
            GSSAPI_ONLY,
            (),
            True,
            True,
            "the server did not accept your Kerberos ticket (is it for the right realm and not expired",
            id="ticket-refused",
        ),
        pytest.param(
            GSSAPI_ONLY,
            (),
            True,
            None,
            "accepts only Kerberos (GSSAPI) and no ticket was accepted (run `kinit`",
            id="no-klist",
        ),
        pytest.param(
            GSSAPI_ONLY,
            KEY,
            False,
            None,
            "it accepts only Kerberos (GSSAPI), which the ssh config does not turn on for login "
            "(add `GSSAPIAuthentication yes` to Host login in ~/.ssh/config, and run `kinit`)",
            id="gssapi-off",
        ),
        pytest.param(
            GSSAPI_OR_KEY,
            KEY,
            True,
            False,
            "the server refused every key offered (/home/alice/.ssh/id_ed25519); and there is no "
            "Kerberos ticket (`klist` shows none) (if this host uses Kerberos, run `kinit` first",
            id="key-and-no-ticket",
        ),
        pytest.param(
            # Debian's ssh_config turns GSSAPI on everywhere: a key-only server is about the key.
            KEY_ONLY,
            KEY,
            True,
            False,
            "the server refused every key offered (/home/alice/.ssh/id_ed25519) (is your key in",
            id="key-only-server",
        ),
    ],
)
def test_a_refused_kerberos_login_is_one_line(
    stderr: str, keys: tuple[str, ...], gssapi: bool, ticket: bool | None, line: str
) -> None:
    error = login_failure(stderr, TARGET, ALIAS, CONFIG, keys, gssapi=gssapi, ticket=ticket)
    assert isinstance(error, ConnectionFailed)
    assert line in error.one_line()
    assert "\n" not in error.one_line()
    if "Kerberos" not in line and "kinit" not in line:
        assert "kinit" not in error.one_line()


# -- paramiko: no GSSAPI ------------------------------------------------------------------------------

paramiko = pytest.importorskip("paramiko")


class _KerberosServer:
    """A paramiko server that offers ``allowed`` and accepts nothing (what a GSSAPI sshd is to paramiko)."""

    def __init__(self, host_key: paramiko.PKey, allowed: str) -> None:
        self.host_key = host_key
        self.allowed = allowed
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port: int = self.sock.getsockname()[1]
        self.transports: list[paramiko.Transport] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        outer = self

        class Interface(paramiko.ServerInterface):  # type: ignore[misc]
            def get_allowed_auths(self, username: str) -> str:
                return outer.allowed

            def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
                return paramiko.AUTH_FAILED

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            transport = paramiko.Transport(conn)
            transport.add_server_key(self.host_key)
            self.transports.append(transport)
            transport.start_server(server=Interface())

    def stop(self) -> None:
        self.sock.close()
        for transport in self.transports:
            transport.close()


@pytest.fixture
def host_key(tmp_path: Path) -> paramiko.PKey:
    if shutil.which("ssh-keygen") is None:
        pytest.skip("needs OpenSSH's ssh-keygen")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "host")], check=True)
    return paramiko.PKey.from_path(tmp_path / "host")


#: ``(allowed methods, extra ssh config lines) -> (server, ssh config for Host krb)``
MakeServer = Callable[[str, str], tuple[_KerberosServer, Path]]


@pytest.fixture
def make_server(tmp_path: Path, host_key: paramiko.PKey) -> Iterator[MakeServer]:
    servers: list[_KerberosServer] = []

    def make(allowed: str, extra: str) -> tuple[_KerberosServer, Path]:
        server = _KerberosServer(host_key, allowed)
        servers.append(server)
        known = tmp_path / "known_hosts"
        known.write_text(f"[127.0.0.1]:{server.port} {host_key.get_name()} {host_key.get_base64()}\n")
        config = tmp_path / "ssh_config"
        config.write_text(
            f"Host krb\n  HostName 127.0.0.1\n  Port {server.port}\n  User alice\n"
            f"  UserKnownHostsFile {known}\n  GlobalKnownHostsFile /dev/null\n  IdentityAgent none\n{extra}"
        )
        return server, config

    yield make
    for server in servers:
        server.stop()


USE_OPENSSH = '(use the OpenSSH transport: transport = "openssh" in the profile (or --transport openssh))'


def _key(tmp_path: Path) -> str:
    """A new key that the server will refuse, as ssh config lines."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "id")], check=True)
    return f"  IdentityFile {tmp_path / 'id'}\n  IdentitiesOnly yes\n"


def _paramiko_error(config: Path) -> str:
    from hpclaunch.transport.ssh import SSHTransport

    with pytest.raises(ConnectionFailed) as failed:
        SSHTransport("krb", ssh_config_path=str(config), openssh_config=False).connect()
    line = failed.value.one_line()
    assert "\n" not in line
    return line


def test_paramiko_on_a_kerberos_only_host_names_the_openssh_transport(make_server: MakeServer) -> None:
    server, config = make_server("gssapi-with-mic", "  GSSAPIAuthentication yes\n  IdentityFile none\n")
    assert _paramiko_error(config) == (
        f"cannot log in to alice@127.0.0.1:{server.port}: it accepts only Kerberos (GSSAPI), "
        f"which the paramiko transport cannot do {USE_OPENSSH}"
    )


def test_paramiko_with_gssapi_asked_and_a_key_refused_names_the_openssh_transport(
    make_server: MakeServer, tmp_path: Path
) -> None:
    _, config = make_server("publickey,gssapi-with-mic", "  GSSAPIAuthentication yes\n" + _key(tmp_path))
    line = _paramiko_error(config)
    assert (
        "the ssh config asks for Kerberos (GSSAPIAuthentication yes), which the paramiko transport " in line
    )
    assert f"the server refused every key offered ({tmp_path / 'id'})" in line
    assert line.endswith(USE_OPENSSH)


def test_paramiko_without_gssapi_asked_blames_the_key_as_before(
    make_server: MakeServer, tmp_path: Path
) -> None:
    _, config = make_server("publickey,gssapi-with-mic", _key(tmp_path))
    line = _paramiko_error(config)
    assert "Kerberos" not in line and "openssh" not in line
    assert "authorized_keys" in line
