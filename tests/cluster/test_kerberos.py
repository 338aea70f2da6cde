"""Kerberos (GSSAPI) logins as users have them (issue 10), against a real MIT KDC on loopback.

``scripts/dev-cluster up`` runs a KDC for HPC.TEST on 127.0.0.1:8888 (every file under
``$STATE/krb5``) and a third sshd on 127.0.0.1:2224 that accepts only ``gssapi-with-mic``: no key logs
in there. The tests run as root with a private credential cache holding hpcuser's ticket (``kinit -k``
with hpcuser's keytab); the login user is hpcuser, whose session lands on this machine, the Slurm login
host, so jobs go through it end to end.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from hpclaunch.cluster import Cluster
from hpclaunch.transport.openssh import OpenSSHTransport

from .conftest import profile_env, run_hpclaunch

if TYPE_CHECKING:
    from conftest import DevCluster

pytestmark = pytest.mark.cluster

KRB_PORT = 2224
KRB_SSHD_LOG = Path("/var/log/hpclaunch-dev-sshd-krb.log")
PRINCIPAL = "hpcuser@HPC.TEST"
ACCEPTED = f"Accepted gssapi-with-mic for {PRINCIPAL.split('@')[0]}"


@dataclass(frozen=True)
class Realm:
    """The dev realm's files (see docs/DEV-NOTES.md) and this test's own credential cache."""

    krb5_conf: Path
    keytab: Path
    known_hosts: Path
    ccache: Path

    def env(self) -> dict[str, str]:
        """What a user's shell has after `kinit`: the realm's config and the cache."""
        return {"KRB5_CONFIG": str(self.krb5_conf), "KRB5CCNAME": f"FILE:{self.ccache}"}

    def kinit(self) -> None:
        """A ticket for hpcuser, without a prompt (the keytab holds hpcuser's key)."""
        argv = ["kinit", "-k", "-t", str(self.keytab), PRINCIPAL]
        done = subprocess.run(
            argv, env={**os.environ, **self.env()}, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr

    def kdestroy(self) -> None:
        subprocess.run(["kdestroy", "-q"], env={**os.environ, **self.env()}, capture_output=True, timeout=30)
        assert not self.ccache.exists()


def _problems(dev: DevCluster) -> list[str]:
    krb = dev.state_dir / "krb5"
    files = (
        krb / "krb5.conf",
        krb / "hpcuser.keytab",
        dev.state_dir / "krb_known_hosts",
        dev.state_dir / "sshd-krb.pid",
    )
    problems = [f"missing {p}" for p in files if not p.is_file()]
    return problems + [
        f"no `{tool}` on PATH" for tool in ("kinit", "klist", "kdestroy") if shutil.which(tool) is None
    ]


@pytest.fixture
def realm(dev_cluster: DevCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Realm:
    # `up` makes the Kerberos part with the rest: missing, it is a broken dev cluster (here and in CI).
    problems = _problems(dev_cluster)
    if problems:
        pytest.fail(
            f"the dev cluster's Kerberos part is not up (run scripts/dev-cluster up): {'; '.join(problems)}"
        )
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)  # no agent to log in with instead
    krb = dev_cluster.state_dir / "krb5"
    return Realm(
        krb / "krb5.conf",
        krb / "hpcuser.keytab",
        dev_cluster.state_dir / "krb_known_hosts",
        tmp_path / "ccache",
    )


def _profile(dev: DevCluster, realm: Realm, tmp_path: Path) -> dict[str, str]:
    """The CLI's environment for profile `p`: a host whose ssh config has Kerberos and no key at all."""
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text(
        "Host krbdev\n"
        f"    HostName {dev.host}\n"
        f"    Port {KRB_PORT}\n"
        f"    User {dev.user}\n"
        "    GSSAPIAuthentication yes\n"
        "    PubkeyAuthentication no\n"
        "    IdentityFile none\n"
        "    IdentitiesOnly yes\n"
        "    IdentityAgent none\n"
        f"    UserKnownHostsFile {realm.known_hosts}\n"
        "    GlobalKnownHostsFile /dev/null\n"
    )
    # session_idle = 0: no master outlives a command, so each command logs in with the cache as it is.
    env = profile_env(dev, tmp_path, host="krbdev", ssh_config=ssh_config, extra="session_idle = 0\n")
    return {**env, **realm.env()}


def _log_size() -> int:
    return KRB_SSHD_LOG.stat().st_size if KRB_SSHD_LOG.exists() else 0


def _logins_since(offset: int) -> int:
    with KRB_SSHD_LOG.open("rb") as fh:
        fh.seek(offset)
        return sum(ACCEPTED in line for line in fh.read().decode(errors="replace").splitlines())


def test_a_job_runs_end_to_end_with_a_ticket_and_no_key(
    dev_cluster: DevCluster, realm: Realm, tmp_path: Path
) -> None:
    env = _profile(dev_cluster, realm, tmp_path)
    realm.kinit()
    before = _log_size()
    result = run_hpclaunch(env, "--transport", "openssh", "submit", "run", "--follow", "--", "hostname")
    assert result.returncode == 0, result.stderr
    assert socket.gethostname() in result.stdout  # the 2224 sshd's logins land on this login host
    assert _logins_since(before) >= 1, "the Kerberos sshd logged no GSSAPI login"


def test_the_python_api_logs_in_with_the_ticket(
    dev_cluster: DevCluster, realm: Realm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = _profile(dev_cluster, realm, tmp_path)
    for name in ("KRB5_CONFIG", "KRB5CCNAME", "XDG_STATE_HOME"):
        monkeypatch.setenv(name, env[name])  # what the ssh the transport runs inherits
    realm.kinit()
    before = _log_size()
    with Cluster("p", config=env["HPCLAUNCH_CONFIG"], ssh_client="openssh") as cluster:
        assert isinstance(cluster.transport, OpenSSHTransport)
        assert cluster.transport.settings.gssapi_authentication
        assert cluster.transport.settings.identity_files == ()
        job = cluster.submit("run", command=["bash", "-c", "echo krb-$(whoami)"])
        assert job.wait(timeout=60).state.value == "COMPLETED"
        assert "krb-hpcuser" in job.logs()
    assert _logins_since(before) == 1  # one login (the master) carried every command


def test_without_a_ticket_the_cli_says_kinit_in_one_line(
    dev_cluster: DevCluster, realm: Realm, tmp_path: Path
) -> None:
    env = _profile(dev_cluster, realm, tmp_path)
    realm.kinit()
    realm.kdestroy()
    result = run_hpclaunch(env, "--transport", "openssh", "submit", "run", "--", "true")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0] == (
        f"hpclaunch: error: cannot log in to {dev_cluster.user}@{dev_cluster.host}:{KRB_PORT}: "
        "no Kerberos ticket (`klist` shows none) (run `kinit` to get one, then try again)"
    )


def test_paramiko_says_to_use_the_openssh_transport_in_one_line(
    dev_cluster: DevCluster, realm: Realm, tmp_path: Path
) -> None:
    env = _profile(dev_cluster, realm, tmp_path)
    realm.kinit()  # a ticket does not help: paramiko has no GSSAPI
    result = run_hpclaunch(env, "--transport", "paramiko", "submit", "run", "--", "true")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "which the paramiko transport cannot do" in lines[0]
    assert lines[0].endswith(
        '(use the OpenSSH transport: transport = "openssh" in the profile (or --transport openssh))'
    )
