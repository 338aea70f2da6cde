"""Host key checks and ssh_config resolution of the SSH transport, without a server.

Keys come from the real ``ssh-keygen``, so fingerprints and hashed names are checked against OpenSSH.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from hpclaunch.errors import ConnectionFailed, HostKeyError
from hpclaunch.transport import hostkeys
from hpclaunch.transport.hostkeys import HostKeyChecker, fingerprint, host_key_name, parse_known_hosts

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs OpenSSH's ssh-keygen")


def _keygen(tmp_path: Path, name: str, kind: str = "ed25519") -> tuple[str, bytes, str]:
    """A fresh key pair: (key type, public blob, path of the private key)."""
    path = tmp_path / name
    subprocess.run(
        ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", name, "-f", str(path)],
        check=True,
        capture_output=True,
    )
    key_type, b64 = (tmp_path / f"{name}.pub").read_text().split()[:2]
    return key_type, base64.b64decode(b64), str(path)


def _line(name: str, key_type: str, blob: bytes) -> str:
    return f"{name} {key_type} {base64.b64encode(blob).decode()}\n"


def test_fingerprint_matches_ssh_keygen(tmp_path: Path) -> None:
    _, blob, path = _keygen(tmp_path, "k")
    out = subprocess.run(
        ["ssh-keygen", "-l", "-f", path + ".pub"], capture_output=True, text=True, check=True
    )
    assert out.stdout.split()[1] == fingerprint(blob)


def test_host_key_name() -> None:
    assert host_key_name("login.example.org", 22) == "login.example.org"
    assert host_key_name("127.0.0.1", 2222) == "[127.0.0.1]:2222"


def test_parse_and_match_forms(tmp_path: Path) -> None:
    key_type, blob, _ = _keygen(tmp_path, "k")
    b64 = base64.b64encode(blob).decode()
    text = "\n".join(
        [
            "# comment",
            "",
            f"[127.0.0.1]:2222 {key_type} {b64} dev",
            f"login1,login2.example.org {key_type} {b64}",
            f"*.cluster.org,!evil.cluster.org {key_type} {b64}",
            f"{hostkeys.hash_name('hashed.example.org')} {key_type} {b64}",
            f"@revoked bad.example.org {key_type} {b64}",
            "malformed-line",
            f"bad-base64 {key_type} !!!notbase64!!!",
        ]
    )
    keys = parse_known_hosts(text, "kh")
    assert len(keys) == 5
    assert keys[-1].marker == "@revoked"
    path = tmp_path / "known_hosts"
    path.write_text(text)
    checker = HostKeyChecker([str(path)], [])
    for name in ("[127.0.0.1]:2222", "login1", "LOGIN2.example.org", "a.cluster.org", "hashed.example.org"):
        checker.check(name, key_type, blob)  # known: no error
    for name in ("127.0.0.1", "[127.0.0.1]:22", "evil.cluster.org", "cluster.org", "login3"):
        assert checker.known_for(name) == [], name
    with pytest.raises(HostKeyError, match="revoked"):
        checker.check("bad.example.org", key_type, blob)


def test_openssh_hashed_entries_are_understood(tmp_path: Path) -> None:
    key_type, blob, _ = _keygen(tmp_path, "k")
    path = tmp_path / "known_hosts"
    path.write_text(_line("[10.0.0.1]:2200", key_type, blob) + _line("node.example.org", key_type, blob))
    subprocess.run(["ssh-keygen", "-H", "-f", str(path)], check=True, capture_output=True)
    assert "node.example.org" not in path.read_text()  # really hashed by OpenSSH
    checker = HostKeyChecker([str(path)], [])
    checker.check("[10.0.0.1]:2200", key_type, blob)
    checker.check("node.example.org", key_type, blob)


def test_unknown_host_is_refused_with_fingerprint_and_opt_in(tmp_path: Path) -> None:
    key_type, blob, _ = _keygen(tmp_path, "k")
    known = tmp_path / "ssh" / "known_hosts"
    checker = HostKeyChecker([str(known)], [])
    with pytest.raises(HostKeyError) as info:
        checker.check("[127.0.0.1]:2222", key_type, blob)
    line = info.value.one_line()
    assert "\n" not in line
    for part in ("[127.0.0.1]:2222", key_type, fingerprint(blob), "--accept-new-host-key",
                 "accept_new_host_key = true", "HPCLAUNCH_ACCEPT_NEW_HOST_KEY=1"):  # fmt: skip
        assert part in line
    assert not known.exists()


def test_accept_new_records_like_openssh(tmp_path: Path) -> None:
    key_type, blob, _ = _keygen(tmp_path, "k")
    known = tmp_path / "newdir" / "known_hosts"
    HostKeyChecker([str(known)], [], accept_new=True).check("[127.0.0.1]:2222", key_type, blob)
    assert stat.S_IMODE(known.stat().st_mode) == 0o600
    assert stat.S_IMODE(known.parent.stat().st_mode) == 0o700
    assert known.read_text() == _line("[127.0.0.1]:2222", key_type, blob)
    # OpenSSH finds it, and so does a checker without the opt-in.
    found = subprocess.run(["ssh-keygen", "-F", "[127.0.0.1]:2222", "-f", str(known)], capture_output=True)
    assert found.returncode == 0
    HostKeyChecker([str(known)], []).check("[127.0.0.1]:2222", key_type, blob)


def test_accept_new_hashed_and_appends_after_a_line_without_newline(tmp_path: Path) -> None:
    key_type, blob, _ = _keygen(tmp_path, "k")
    other_type, other, _ = _keygen(tmp_path, "other")
    known = tmp_path / "known_hosts"
    known.write_text(_line("other.example.org", other_type, other).rstrip("\n"))
    HostKeyChecker([str(known)], [], accept_new=True, hash_new_entries=True).check("node9", key_type, blob)
    lines = known.read_text().splitlines()
    assert len(lines) == 2 and lines[1].startswith("|1|")
    found = subprocess.run(["ssh-keygen", "-F", "node9", "-f", str(known)], capture_output=True)
    assert found.returncode == 0
    HostKeyChecker([str(known)], []).check("other.example.org", other_type, other)


def test_changed_key_is_always_refused_and_never_recorded(tmp_path: Path) -> None:
    key_type, old, _ = _keygen(tmp_path, "old")
    _, new, _ = _keygen(tmp_path, "new")
    known = tmp_path / "known_hosts"
    known.write_text(_line("[127.0.0.1]:2222", key_type, old))
    before = known.read_text()
    for accept_new in (False, True):
        with pytest.raises(HostKeyError) as info:
            HostKeyChecker([str(known)], [], accept_new=accept_new).check("[127.0.0.1]:2222", key_type, new)
        line = info.value.one_line()
        assert "HAS CHANGED" in line
        assert fingerprint(new) in line and fingerprint(old) in line
        assert f"{known}:1" in line and "ssh-keygen -R" in line
    assert known.read_text() == before


def test_key_of_another_type_for_a_known_host_is_refused(tmp_path: Path) -> None:
    _, blob, _ = _keygen(tmp_path, "ed")
    rsa_type, rsa, _ = _keygen(tmp_path, "rsa", "rsa")
    known = tmp_path / "known_hosts"
    known.write_text(_line("host1", "ssh-ed25519", blob))
    with pytest.raises(HostKeyError, match="HAS CHANGED"):
        HostKeyChecker([str(known)], [], accept_new=True).check("host1", rsa_type, rsa)


def test_system_file_is_read_but_not_written(tmp_path: Path) -> None:
    key_type, blob, _ = _keygen(tmp_path, "k")
    system = tmp_path / "ssh_known_hosts"
    system.write_text(_line("login", key_type, blob))
    user = tmp_path / "user_known_hosts"
    HostKeyChecker([str(user)], [str(system)]).check("login", key_type, blob)
    assert not user.exists()


def test_preferred_key_types_put_known_first(tmp_path: Path) -> None:
    key_type, blob, _ = _keygen(tmp_path, "k", "rsa")
    known = tmp_path / "known_hosts"
    known.write_text(_line("login", key_type, blob))
    offered = ["ssh-ed25519", "ecdsa-sha2-nistp256", "rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"]
    checker = HostKeyChecker([str(known)], [])
    assert checker.preferred_key_types("login", offered) == [
        "rsa-sha2-512", "rsa-sha2-256", "ssh-rsa", "ssh-ed25519", "ecdsa-sha2-nistp256",
    ]  # fmt: skip
    assert checker.preferred_key_types("unknown", offered) == offered


def test_a_paramiko_key_of_an_unknown_host_is_refused_and_not_recorded(tmp_path: Path) -> None:
    import paramiko

    _, _, path = _keygen(tmp_path, "k")
    key = paramiko.PKey.from_path(path)
    known = tmp_path / "kh"
    with pytest.raises(HostKeyError):
        # What the SSH transport does with the key a server presents.
        HostKeyChecker([str(known)], []).check("[127.0.0.1]:2222", key.get_name(), key.asbytes())
    assert not known.exists()


def test_accept_new_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(hostkeys.ENV_ACCEPT_NEW, raising=False)
    assert not hostkeys.accept_new_from_env()
    monkeypatch.setenv(hostkeys.ENV_ACCEPT_NEW, "1")
    assert hostkeys.accept_new_from_env()
    monkeypatch.setenv(hostkeys.ENV_ACCEPT_NEW, "0")
    assert not hostkeys.accept_new_from_env()


# -- ssh_config resolution -------------------------------------------------------------------------


_NO_SSH = pytest.mark.skipif(not shutil.which("ssh"), reason="no OpenSSH client")
EVALUATORS = ["python", pytest.param("openssh", marks=_NO_SSH)]


def _options(tmp_path: Path, text: str, host: str, evaluator: str) -> dict[str, list[str]]:
    """``host``'s settings from a config ``text``, evaluated by OpenSSH (``ssh -G``) or in Python."""
    from hpclaunch.transport import sshconfig

    config = tmp_path / "ssh_config"
    config.write_text(text)
    if evaluator == "openssh":
        return sshconfig.openssh_options(shutil.which("ssh") or "ssh", host, str(config))
    return sshconfig.python_options(host, str(config))


@pytest.mark.parametrize("evaluator", EVALUATORS)
def test_resolve_reads_ssh_config(tmp_path: Path, evaluator: str) -> None:
    from hpclaunch.transport.hostsettings import resolve

    config = _options(
        tmp_path,
        f"""
Host hpc
    HostName login.example.org
    User alice
    Port 2200
    IdentityFile {tmp_path}/id_a
    IdentityFile ~/id_b
    IdentitiesOnly yes
    ProxyJump bastion,alice@gate:2022
    UserKnownHostsFile {tmp_path}/kh1 {tmp_path}/kh2
    GlobalKnownHostsFile /dev/null
    HostKeyAlias hpc-login
    HashKnownHosts yes
    StrictHostKeyChecking accept-new
    ServerAliveInterval 15
    ConnectTimeout 7
""",
        "hpc",
        evaluator,
    )
    s = resolve("hpc", config)
    assert (s.hostname, s.user, s.port) == ("login.example.org", "alice", 2200)
    assert s.identity_files == (f"{tmp_path}/id_a", os.path.expanduser("~/id_b"))
    assert s.identities_only
    assert s.proxy_jump == ("bastion", "alice@gate:2022")
    assert s.user_known_hosts == (f"{tmp_path}/kh1", f"{tmp_path}/kh2")
    assert s.global_known_hosts == ("/dev/null",)
    assert s.host_key_name == "[hpc-login]:2200"
    assert s.hash_known_hosts and s.accept_new_in_config
    assert (s.keepalive, s.connect_timeout) == (15, 7.0)
    assert s.target == "alice@login.example.org:2200"
    # Explicit arguments win over the config; -i files come first.
    s2 = resolve("hpc", config, user="bob", port=22, identity_files=["/k"], keepalive=0)
    assert (s2.user, s2.port, s2.keepalive) == ("bob", 22, 0)
    assert s2.identity_files[0] == "/k"
    assert s2.target == "bob@login.example.org"


@pytest.mark.parametrize("evaluator", EVALUATORS)
def test_resolve_defaults_for_an_unknown_host(tmp_path: Path, evaluator: str) -> None:
    from hpclaunch.transport.hostsettings import DEFAULT_IDENTITY_FILES, resolve

    s = resolve("10.1.2.3", _options(tmp_path, "Host other\n  User x\n", "10.1.2.3", evaluator))
    assert (s.hostname, s.port, s.proxy_jump, s.proxy_command) == ("10.1.2.3", 22, (), None)
    assert s.identity_files == tuple(os.path.expanduser(f) for f in DEFAULT_IDENTITY_FILES)
    assert s.keepalive == 30
    assert not s.accept_new_in_config
    assert s.host_key_name == "10.1.2.3"


def test_parse_hop() -> None:
    from hpclaunch.transport.hostsettings import parse_hop

    assert parse_hop("bastion") == (None, "bastion", None)
    assert parse_hop("u@gate:2022") == ("u", "gate", 2022)
    assert parse_hop("ssh://u@gate:2022") == ("u", "gate", 2022)
    assert parse_hop("[::1]:2222") == (None, "::1", 2222)


def test_missing_ssh_config_path_is_a_config_error(tmp_path: Path) -> None:
    from hpclaunch.errors import ConfigError
    from hpclaunch.transport.ssh import SSHTransport

    with pytest.raises(ConfigError, match="cannot read ssh config"):
        SSHTransport("x", ssh_config_path=str(tmp_path / "nope"))


def test_refused_port_is_one_clear_line(tmp_path: Path) -> None:
    from hpclaunch.transport.ssh import SSHTransport

    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    config = tmp_path / "ssh_config"
    config.write_text(f"Host nothere\n  HostName 127.0.0.1\n  Port {port}\n  User hpcuser\n")
    transport = SSHTransport("nothere", ssh_config_path=str(config))
    with pytest.raises(ConnectionFailed) as info:
        transport.run(["true"])
    assert info.value.one_line() == (
        f"cannot connect to hpcuser@127.0.0.1:{port}: connection refused "
        f"(is sshd running? check HostName/Port of nothere in {config})"
    )
    assert transport.connections_opened == 0


def test_not_an_ssh_server_is_one_clear_line(tmp_path: Path) -> None:
    from hpclaunch.transport.ssh import SSHTransport

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    try:
        transport = SSHTransport("127.0.0.1", port=port, user="u", connect_timeout=2)
        # Nobody accepts or answers: the banner never comes.
        with pytest.raises(ConnectionFailed) as info:
            transport.connect()
    finally:
        server.close()
    line = info.value.one_line()
    assert line.startswith(f"cannot connect to u@127.0.0.1:{port}: the SSH handshake failed")
    assert "\n" not in line
