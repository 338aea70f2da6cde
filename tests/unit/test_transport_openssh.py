"""The OpenSSH transport's pure parts: which client ``auto`` picks, what a failed ``ssh`` login said,
the runtime directory's checks, and the one-line errors the CLI prints for them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hpclaunch.cli import main
from hpclaunch.errors import ConfigError, HostKeyError, TransportError
from hpclaunch.transport import choice, runtime
from hpclaunch.transport.sshfailure import login_failure

TARGET, ALIAS, CONFIG = "alice@login:2222", "login", "~/.ssh/config"


def test_auto_prefers_openssh_where_ssh_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(choice.shutil, "which", lambda name: "/usr/bin/ssh")
    picked = choice.choose("auto")
    assert (picked.name, picked.why) == ("openssh", "auto: /usr/bin/ssh supports ControlMaster")
    assert choice.choose("paramiko").name == "paramiko"
    monkeypatch.setattr(choice.shutil, "which", lambda name: None)
    assert choice.choose("auto") == choice.Choice("paramiko", "auto: no OpenSSH client (`ssh`) on PATH")
    with pytest.raises(ConfigError, match="needs the OpenSSH client"):
        choice.choose("openssh")
    monkeypatch.setattr(choice.os, "name", "nt")
    assert choice.choose("auto").why == "auto: Windows's OpenSSH has no ControlMaster"


def test_no_ssh_binary_with_transport_openssh_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.toml"
    config.write_text('default = "c"\n[clusters.c]\nhost = "login.example.org"\ntransport = "openssh"\n')
    config.chmod(0o600)
    monkeypatch.setenv("HPCLAUNCH_CONFIG", str(config))
    monkeypatch.setenv("PATH", str(tmp_path))  # no ssh here
    with pytest.raises(SystemExit) as exited:
        main(["status"])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert err == (
        "hpclaunch: error: transport 'openssh' needs the OpenSSH client `ssh`, and there is none on PATH "
        '(install OpenSSH (openssh-client), or use transport = "paramiko" (--transport paramiko))\n'
    )


# Real stderr of OpenSSH 9.2 (LogLevel ERROR) for each failure.
REFUSED = "ssh: connect to host 127.0.0.1 port 2999: Connection refused\r\n"
UNKNOWN = (
    "No ED25519 host key is known for [127.0.0.1]:2222 and you have requested strict checking.\r\n"
    "Host key verification failed.\r\n"
)
CHANGED = """@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!
The fingerprint for the ED25519 key sent by the remote host is
SHA256:2fJ8mXoCk0fWv3cT1zGq0dC3l2Yw0Yv4b2bV0kq1XjM.
Host key verification failed.
"""
DENIED = "hpcuser@127.0.0.1: Permission denied (publickey).\r\n"
NO_TICKET = "hpcuser@localhost: Permission denied (gssapi-with-mic).\r\n"


@pytest.mark.parametrize(
    ("stderr", "kind", "line"),
    [
        (
            REFUSED,
            TransportError,
            "cannot connect to alice@login:2222: connection refused "
            "(is sshd running? check HostName/Port of login in ~/.ssh/config)",
        ),
        (UNKNOWN, HostKeyError, "the host key of alice@login:2222 is not known"),
        (
            CHANGED,
            HostKeyError,
            "HAS CHANGED (now ed25519 SHA256:2fJ8mXoCk0fWv3cT1zGq0dC3l2Yw0Yv4b2bV0kq1XjM",
        ),
        (DENIED, TransportError, "the server refused every key offered (~/.ssh/id_ed25519)"),
        (NO_TICKET, TransportError, "accepts only Kerberos (GSSAPI) and no ticket was accepted (run `kinit`"),
    ],
)
def test_login_failures_are_one_line(stderr: str, kind: type[Exception], line: str) -> None:
    # GSSAPIAuthentication on and no word from klist: what is known without a ticket cache.
    error = login_failure(stderr, TARGET, ALIAS, CONFIG, ("~/.ssh/id_ed25519",), gssapi=True)
    assert isinstance(error, kind)
    assert line in error.one_line()
    assert "\n" not in error.one_line()


def test_runtime_directory_is_private_and_ours(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(runtime.ENV, str(tmp_path / "rt"))
    made = runtime.directory()
    assert oct(os.stat(made).st_mode & 0o777) == "0o700"
    os.chmod(made, 0o750)  # noqa: S103 - the point: a directory others can enter is refused
    with pytest.raises(TransportError, match="open to other users"):
        runtime.directory()
    os.chmod(made, 0o700)
    (tmp_path / "link").symlink_to(made)
    monkeypatch.setenv(runtime.ENV, str(tmp_path / "link"))
    with pytest.raises(TransportError, match="not a directory"):
        runtime.directory()
