"""Host settings from the ssh config: ``ssh -G`` output (captured), the Python evaluator, certificates."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from hpclaunch.errors import ConfigError
from hpclaunch.transport import sshconfig
from hpclaunch.transport.hostsettings import DEFAULT_IDENTITY_FILES, resolve
from hpclaunch.transport.sshcert import load_certificate, parse_certificate

VALIDITY = "20200101000000Z:20200102000000Z"
DATA = Path(__file__).resolve().parents[1] / "data" / "ssh"


# -- ssh -G output, captured from OpenSSH 9.2 with tests/data/ssh/G_config -------------------------


def test_parse_ssh_g_keeps_every_value_in_order() -> None:
    opts = sshconfig.parse_ssh_g((DATA / "G_a.txt").read_text())
    assert opts["hostname"] == ["a.example.org"]
    assert opts["identityfile"] == list(sshconfig.OPENSSH_DEFAULT_IDENTITIES)
    assert opts["proxyjump"] == ["j1,u@j2:2022"]
    assert opts["certificatefile"] == ["~/.ssh/c1-cert.pub"]


def test_settings_from_captured_ssh_g_output() -> None:
    a = resolve("a", sshconfig.parse_ssh_g((DATA / "G_a.txt").read_text()))
    assert (a.hostname, a.port, a.user) == ("a.example.org", 22, "root")
    assert a.proxy_jump == ("j1", "u@j2:2022") and a.proxy_command is None
    assert a.certificate_files == (os.path.expanduser("~/.ssh/c1-cert.pub"),)
    assert a.identity_agent == "/tmp/agent.sock"
    assert (a.keepalive, a.connect_timeout) == (15, 7.0)
    # ssh -G lists OpenSSH's default keys when none is configured: ours apply then.
    assert a.identity_files == tuple(os.path.expanduser(f) for f in DEFAULT_IDENTITY_FILES)
    assert a.user_known_hosts == ("/root/.ssh/known_hosts", "/root/.ssh/known_hosts2")
    assert not a.accept_new_in_config  # "ask"

    b = resolve("b", sshconfig.parse_ssh_g((DATA / "G_b.txt").read_text()))
    assert b.proxy_command == "nc b 22"  # ssh -G prints it unexpanded
    assert b.identity_agent == "none"
    assert b.host_key_name == "balias"

    plain = resolve("plain", sshconfig.parse_ssh_g((DATA / "G_plain.txt").read_text()))
    assert (plain.keepalive, plain.connect_timeout) == (30, 15.0)  # unset (0, none): ours
    assert plain.identity_agent is None and plain.certificate_files == ()


def test_an_explicit_key_replaces_the_openssh_defaults() -> None:
    s = resolve("plain", sshconfig.parse_ssh_g((DATA / "G_plain.txt").read_text()), identity_files=["/k"])
    assert s.identity_files == ("/k",)


@pytest.mark.skipif(not shutil.which("ssh"), reason="no OpenSSH client")
def test_openssh_reports_a_bad_config_as_one_config_error(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text("Host x\n    NoSuchOption yes\n")
    with pytest.raises(ConfigError) as info:
        sshconfig.openssh_options(shutil.which("ssh") or "ssh", "x", str(config))
    assert "NoSuchOption" in info.value.one_line() or "Bad configuration option" in info.value.one_line()


def test_a_host_that_looks_like_an_option_is_refused() -> None:
    with pytest.raises(ConfigError, match="not a host name"):
        sshconfig.openssh_options("ssh", "-oProxyCommand=touch /tmp/x", None)


# -- the Python evaluator ------------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_relative_include_is_resolved_against_the_user_ssh_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    _write(tmp_path / ".ssh" / "config.d" / "b.conf", "Host site\n    User fromb\n    IdentityFile ~/k_b\n")
    _write(tmp_path / ".ssh" / "config.d" / "a.conf", "Host site\n    HostName login.site.org\n")
    # With -F, OpenSSH still resolves a relative Include against ~/.ssh, not the file's folder.
    config = _write(tmp_path / "elsewhere" / "config", "Include config.d/*.conf\nHost *\n    User late\n")
    opts = sshconfig.python_options("site", str(config))
    assert opts["hostname"] == ["login.site.org"]  # a.conf before b.conf: sorted glob
    assert opts["user"] == ["fromb"]  # first value wins over the later Host *
    assert opts["identityfile"] == ["~/k_b"]  # like ssh -G prints it; resolve expands it
    assert resolve("site", opts).identity_files == (str(tmp_path / "k_b"),)


def test_include_inside_a_host_block_applies_only_to_that_host(tmp_path: Path) -> None:
    _write(tmp_path / "inc.conf", "User included\n")
    config = _write(tmp_path / "config", f"Host other\n    Include {tmp_path}/inc.conf\n")
    assert "user" not in sshconfig.python_options("site", str(config))
    assert sshconfig.python_options("other", str(config))["user"] == ["included"]


def test_match_host_sees_the_hostname_set_before_it(tmp_path: Path) -> None:
    config = _write(
        tmp_path / "config",
        "Host short\n    HostName login.site.org\n"
        "Match host *.site.org\n    User siteuser\n"
        "Match originalhost short\n    Port 2200\n"
        "Match !host *.site.org\n    IdentityFile /never\n",
    )
    opts = sshconfig.python_options("short", str(config))
    assert (opts["user"], opts["port"]) == (["siteuser"], ["2200"])
    assert "identityfile" not in opts


def test_match_user_localuser_exec_and_all(tmp_path: Path) -> None:
    config = _write(
        tmp_path / "config",
        'Match exec "test %h = box"\n    Port 1\n'
        'Match exec "false"\n    Port 2\n'
        "Match user alice\n    IdentityFile /alice\n"
        "Match localuser nobody-here-xyz\n    IdentityFile /nobody\n"
        "Match all\n    ConnectTimeout 9\n",
    )
    opts = sshconfig.python_options("box", str(config), user="alice")
    assert opts["port"] == ["1"]
    assert opts["identityfile"] == ["/alice"]
    assert opts["connecttimeout"] == ["9"]


def test_host_patterns_negation_and_tokens(tmp_path: Path) -> None:
    config = _write(
        tmp_path / "config",
        "Host *.org !bad.org\n    User u\n    IdentityFile ~/.ssh/%h_%r_%p\n    Port 2022\n"
        "Host * \n    ProxyJump gate\n",
    )
    good = sshconfig.python_options("good.org", str(config))
    assert good["identityfile"] == ["~/.ssh/good.org_u_2022"]
    assert "user" not in sshconfig.python_options("bad.org", str(config))
    s = resolve("good.org", good)
    assert s.proxy_jump == ("gate",)


def test_key_equals_value_and_quotes(tmp_path: Path) -> None:
    config = _write(tmp_path / "config", 'Host x\n    HostName=h.org\n    IdentityFile "/a b/key"\n')
    opts = sshconfig.python_options("x", str(config))
    assert opts["hostname"] == ["h.org"] and opts["identityfile"] == ["/a b/key"]


def test_an_include_loop_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(f"Include {config}\n")
    with pytest.raises(ConfigError, match="Include nested"):
        sshconfig.python_options("x", str(config))


@pytest.mark.skipif(not shutil.which("ssh"), reason="no OpenSSH client")
def test_python_and_openssh_agree(tmp_path: Path) -> None:
    _write(tmp_path / "d" / "site.conf", "Host site\n    HostName 10.0.0.5\n    Port 2200\n")
    config = _write(
        tmp_path / "config",
        f"Include {tmp_path}/d/*.conf\n"
        "Match host 10.0.0.*\n    User hpc\n    IdentityFile /keys/hpc\n    ProxyJump a,b\n"
        "Host *\n    ServerAliveInterval 11\n    CertificateFile /keys/hpc-cert.pub\n",
    )
    ours = resolve("site", sshconfig.python_options("site", str(config)))
    theirs = resolve("site", sshconfig.openssh_options(shutil.which("ssh") or "ssh", "site", str(config)))
    assert ours == theirs
    assert (ours.hostname, ours.port, ours.user, ours.proxy_jump) == ("10.0.0.5", 2200, "hpc", ("a", "b"))


# -- certificates ----------------------------------------------------------------------------------


@pytest.mark.skipif(not shutil.which("ssh-keygen"), reason="needs ssh-keygen")
@pytest.mark.parametrize("key_type", ["ed25519", "rsa", "ecdsa"])
def test_certificate_names_its_key_and_validity(tmp_path: Path, key_type: str) -> None:
    import paramiko

    keygen = ["ssh-keygen", "-q", "-N", ""]
    subprocess.run([*keygen, "-t", "ed25519", "-f", str(tmp_path / "ca")], check=True)
    subprocess.run([*keygen, "-t", key_type, "-f", str(tmp_path / "id")], check=True)
    subprocess.run(
        [
            *keygen[:2],
            "-s",
            str(tmp_path / "ca"),
            "-I",
            "me@site",
            "-n",
            "me",
            "-V",
            VALIDITY,
            str(tmp_path / "id.pub"),
        ],
        check=True,
    )
    cert = load_certificate(str(tmp_path / "id-cert.pub"))
    assert cert is not None
    assert cert.public_key == paramiko.PKey.from_path(tmp_path / "id").asbytes()
    assert cert.key_id == "me@site"
    assert (cert.valid_after, cert.valid_before) == (1577836800, 1577923200)
    assert cert.problem(now=1577836800 + 60) is None
    assert cert.problem(now=1577923200) == (
        f"certificate {tmp_path / 'id-cert.pub'} expired at 2020-01-02 00:00:00 UTC; get a new one"
    )
    assert "not valid before 2020-01-01" in (cert.problem(now=0) or "")


def test_not_a_certificate() -> None:
    with pytest.raises(ValueError, match="not an OpenSSH certificate"):
        parse_certificate("ssh-ed25519 !!!notbase64", "x")
    assert load_certificate("/nonexistent-cert.pub") is None
