"""SSH as users have it: Include + Match + a ProxyJump chain, and user certificates (issue 10).

The certificate tests use the dev cluster's second sshd on 127.0.0.1:2223, which trusts only the
dev user CA (``TrustedUserCAKeys``; no authorized_keys at all): only a certificate logs in there.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from hpclaunch.errors import ConnectionFailed
from hpclaunch.transport.hostkeys import ENV_ACCEPT_NEW
from hpclaunch.transport.ssh import SSHTransport

from .conftest import run_hpclaunch

if TYPE_CHECKING:
    from conftest import DevCluster

pytestmark = pytest.mark.cluster

CERT_PORT = 2223
CERT_SSHD_LOG = Path("/var/log/hpclaunch-dev-sshd-cert.log")
EVALUATORS = [pytest.param(True, id="ssh-G"), pytest.param(False, id="python")]


@pytest.fixture(autouse=True)
def _no_opt_in_or_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_ACCEPT_NEW, raising=False)
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


# -- Include, Match, ProxyJump -------------------------------------------------------------------


def _layered_config(tmp_path: Path, dev: DevCluster) -> Path:
    """The layout many sites and tools write: a main file that includes config.d/*.conf."""
    (tmp_path / "config.d").mkdir()
    (tmp_path / "config.d" / "10-jumps.conf").write_text(
        f"Host jumpa jumpb\n    HostName {dev.host}\n    Port {dev.port}\n"
    )
    (tmp_path / "config.d" / "20-cluster.conf").write_text(
        "Host mycluster\n"
        f"    HostName {dev.host}\n"
        f"    Port {dev.port}\n"
        "    ProxyJump jumpa,jumpb\n"
        "\n"
        # Who and with which key: only from this Match block (matched on the HostName set above).
        f"Match host {dev.host}\n"
        f"    User {dev.user}\n"
        f"    IdentityFile {dev.key_path}\n"
        "    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {dev.known_hosts}\n"
        "    GlobalKnownHostsFile /dev/null\n"
    )
    main = tmp_path / "config"
    main.write_text(f"Include {tmp_path}/config.d/*.conf\n\nHost *\n    ServerAliveInterval 20\n")
    return main


@pytest.mark.parametrize("openssh", EVALUATORS)
def test_include_match_and_a_proxyjump_chain_reach_the_cluster(
    dev_cluster: DevCluster, tmp_path: Path, openssh: bool
) -> None:
    if openssh and not shutil.which("ssh"):
        pytest.skip("no OpenSSH client")
    config = _layered_config(tmp_path, dev_cluster)
    with SSHTransport("mycluster", ssh_config_path=str(config), openssh_config=openssh) as ssh:
        assert ssh.settings.proxy_jump == ("jumpa", "jumpb")
        assert (ssh.settings.user, ssh.settings.keepalive) == (dev_cluster.user, 20)
        assert ssh.run(["whoami"]).stdout == f"{dev_cluster.user}\n"
        partitions = [p.rstrip("*") for p in ssh.run(["sinfo", "-h", "-o", "%P"]).stdout.split()]
        assert dev_cluster.partition in partitions
        # jumpa, then jumpb through it, then the cluster through jumpb: three logins.
        assert ssh.connections_opened == 3


def test_paramikos_own_parser_does_not_see_an_included_host(dev_cluster: DevCluster, tmp_path: Path) -> None:
    """Why the first landing failed with this config: paramiko's SSHConfig ignores Include."""
    import paramiko

    config = _layered_config(tmp_path, dev_cluster)
    assert paramiko.SSHConfig.from_path(str(config)).lookup("mycluster")["hostname"] == "mycluster"


# -- certificates --------------------------------------------------------------------------------


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


def _sign(dev: DevCluster, pub: Path, key_id: str, validity: str = "+1h") -> Path:
    """Sign ``pub`` with the dev user CA for the cluster user; returns the ``-cert.pub`` written."""
    ca = dev.state_dir / "user_ca"
    subprocess.run(
        ["ssh-keygen", "-q", "-s", str(ca), "-I", key_id, "-n", dev.user, "-V", validity, str(pub)],
        check=True,
    )
    return pub.with_name(pub.name.removesuffix(".pub") + "-cert.pub")


def _cert_config(tmp_path: Path, dev: DevCluster, extra: str) -> Path:
    config = tmp_path / "ssh_config"
    config.write_text(
        "Host certhost\n"
        f"    HostName {dev.host}\n"
        f"    Port {CERT_PORT}\n"
        f"    User {dev.user}\n"
        "    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {dev.state_dir / 'cert_known_hosts'}\n"
        "    GlobalKnownHostsFile /dev/null\n" + extra
    )
    return config


def _accepted_with(key_id: str) -> bool:
    """The certificate sshd logged a login with the certificate ``key_id``."""
    log = CERT_SSHD_LOG.read_text(errors="replace")
    return any("Accepted publickey for" in ln and f"ID {key_id} " in ln for ln in log.splitlines())


@pytest.fixture
def cert_sshd(dev_cluster: DevCluster) -> DevCluster:
    if not (dev_cluster.state_dir / "sshd-cert.pid").exists():
        pytest.fail("the certificate sshd (127.0.0.1:2223) is not running: run scripts/dev-cluster up")
    return dev_cluster


def test_a_key_in_no_authorized_keys_is_refused_without_its_certificate(
    cert_sshd: DevCluster, tmp_path: Path
) -> None:
    _keygen(tmp_path / "id")
    config = _cert_config(tmp_path, cert_sshd, f"    IdentityFile {tmp_path / 'id'}\n")
    with pytest.raises(ConnectionFailed, match="the server refused every key offered"):
        SSHTransport("certhost", ssh_config_path=str(config)).connect()


def test_certificate_beside_the_key_logs_in(cert_sshd: DevCluster, tmp_path: Path) -> None:
    _keygen(tmp_path / "id")
    key_id = f"beside-{secrets.token_hex(4)}"
    _sign(cert_sshd, tmp_path / "id.pub", key_id)
    config = _cert_config(tmp_path, cert_sshd, f"    IdentityFile {tmp_path / 'id'}\n")
    with SSHTransport("certhost", ssh_config_path=str(config)) as ssh:
        assert ssh.run(["whoami"]).stdout == f"{cert_sshd.user}\n"
    assert _accepted_with(key_id)


@pytest.mark.parametrize("openssh", EVALUATORS)
def test_certificate_file_from_the_config_logs_in(
    cert_sshd: DevCluster, tmp_path: Path, openssh: bool
) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "certs").mkdir()
    _keygen(tmp_path / "keys" / "id")
    key_id = f"certfile-{secrets.token_hex(4)}"
    cert = _sign(cert_sshd, tmp_path / "keys" / "id.pub", key_id)
    moved = cert.rename(tmp_path / "certs" / "issued-cert.pub")  # not beside the key: only CertificateFile
    config = _cert_config(
        tmp_path, cert_sshd, f"    IdentityFile {tmp_path / 'keys' / 'id'}\n    CertificateFile {moved}\n"
    )
    with SSHTransport("certhost", ssh_config_path=str(config), openssh_config=openssh) as ssh:
        assert ssh.settings.certificate_files == (str(moved),)
        assert ssh.run(["whoami"]).stdout == f"{cert_sshd.user}\n"
        assert ssh.read_text("/etc/hostname")  # SFTP over the certificate login too
    assert _accepted_with(key_id)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Path]:
    """A private ssh-agent on a socket under tmp_path; stopped by its pid afterwards."""
    if not shutil.which("ssh-agent"):
        pytest.skip("no ssh-agent")
    sock = tmp_path / "agent.sock"
    out = subprocess.run(
        ["ssh-agent", "-s", "-a", str(sock)], capture_output=True, text=True, check=True
    ).stdout
    pid = int(out.split("SSH_AGENT_PID=")[1].split(";")[0])
    try:
        yield sock
    finally:
        os.kill(pid, signal.SIGTERM)


def test_certificate_for_a_key_held_by_the_agent(cert_sshd: DevCluster, tmp_path: Path, agent: Path) -> None:
    (tmp_path / "keys").mkdir()
    _keygen(tmp_path / "keys" / "id")
    # The agent holds only the plain key (no -cert.pub beside it when it is added).
    subprocess.run(
        ["ssh-add", "-q", str(tmp_path / "keys" / "id")],
        env={**os.environ, "SSH_AUTH_SOCK": str(agent)},
        check=True,
        capture_output=True,
    )
    key_id = f"agent-{secrets.token_hex(4)}"
    cert = _sign(cert_sshd, tmp_path / "keys" / "id.pub", key_id).rename(tmp_path / "agent-cert.pub")
    (tmp_path / "keys" / "id").unlink()  # the private key is only in the agent now
    config = _cert_config(
        tmp_path, cert_sshd, f"    IdentityAgent {agent}\n    CertificateFile {cert}\n    IdentityFile none\n"
    )
    with SSHTransport("certhost", ssh_config_path=str(config)) as ssh:
        assert ssh.run(["whoami"]).stdout == f"{cert_sshd.user}\n"
    assert _accepted_with(key_id)


def _expired(tmp_path: Path, dev: DevCluster) -> Path:
    _keygen(tmp_path / "id")
    _sign(dev, tmp_path / "id.pub", f"expired-{secrets.token_hex(4)}", validity="20200101:20200102")
    return _cert_config(tmp_path, dev, f"    IdentityFile {tmp_path / 'id'}\n")


def test_an_expired_certificate_is_one_clear_line(cert_sshd: DevCluster, tmp_path: Path) -> None:
    config = _expired(tmp_path, cert_sshd)
    with pytest.raises(ConnectionFailed) as info:
        SSHTransport("certhost", ssh_config_path=str(config)).connect()
    line = info.value.one_line()
    assert line.startswith(
        f"cannot log in to {cert_sshd.user}@127.0.0.1:{CERT_PORT}: certificate {tmp_path / 'id-cert.pub'} "
        "expired at 2020-01-02 "
    )
    assert "\n" not in line


def test_an_expired_certificate_in_the_cli_is_one_line_without_a_traceback(
    cert_sshd: DevCluster, tmp_path: Path
) -> None:
    config = _expired(tmp_path, cert_sshd)
    profile = tmp_path / "config.toml"
    profile.write_text(f'default = "c"\n[clusters.c]\nhost = "certhost"\nssh_config = "{config}"\n')
    profile.chmod(0o600)
    env = {**os.environ, "HPCLAUNCH_CONFIG": str(profile), "XDG_STATE_HOME": str(tmp_path / "state")}
    result = run_hpclaunch(env, "status")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("hpclaunch: error: cannot log in to ")
    assert "expired at 2020-01-02" in lines[0]
    assert "Traceback" not in result.stderr
