"""Shared test fixtures.

Tests marked ``cluster`` talk to the real dev cluster that ``scripts/dev-cluster up`` starts (Slurm with
node1/node2, and an sshd on 127.0.0.1:2222 for the unprivileged user ``hpcuser``). When it is not up,
they are skipped on a laptop but FAIL in CI (``CI=true``), so a broken cluster can never pass as green.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

DEFAULT_STATE_DIR = Path("/var/lib/hpclaunch-dev")
# Node states (sinfo %t) of a node that can take jobs.
USABLE_NODE_STATES = frozenset({"idle", "mix", "alloc", "comp"})


@dataclass(frozen=True)
class DevCluster:
    """Where the dev cluster's sshd is and the files to reach it (see docs/DEV-NOTES.md)."""

    state_dir: Path
    ssh_config: Path
    key_path: Path
    known_hosts: Path
    host: str = "127.0.0.1"
    port: int = 2222
    user: str = "hpcuser"
    ssh_alias: str = "hpcdev"
    partition: str = "debug"
    nodes: tuple[str, ...] = ("node1", "node2")

    def ssh_argv(self, *remote: str) -> list[str]:
        """argv for OpenSSH running ``remote`` as the cluster user (strict host key checking)."""
        return ["ssh", "-F", str(self.ssh_config), self.ssh_alias, *remote]


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def _cluster() -> DevCluster:
    state = Path(os.environ.get("HPCLAUNCH_DEV_DIR") or DEFAULT_STATE_DIR)
    return DevCluster(
        state_dir=state,
        ssh_config=state / "ssh_config",
        key_path=state / "id_ed25519",
        known_hosts=state / "known_hosts",
    )


def _problems(cluster: DevCluster) -> list[str]:
    """What is missing, cheaply: state files, both nodes usable in sinfo, the sshd's banner."""
    problems = [
        f"missing {p}" for p in (cluster.ssh_config, cluster.key_path, cluster.known_hosts) if not p.is_file()
    ]
    if shutil.which("sinfo") is None:
        problems.append("sinfo not found")
    else:
        try:
            out = subprocess.run(
                ["sinfo", "-h", "-N", "-p", cluster.partition, "-o", "%N %t"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
        except subprocess.TimeoutExpired:
            problems.append("sinfo timed out")
        else:
            states = dict(line.split(maxsplit=1) for line in out.stdout.splitlines() if " " in line)
            for node in cluster.nodes:
                state = states.get(node)
                if state not in USABLE_NODE_STATES:
                    problems.append(f"{node} is {state or 'not listed'} ({out.stderr.strip() or 'sinfo'})")
    try:
        with socket.create_connection((cluster.host, cluster.port), timeout=3) as sock:
            sock.settimeout(3)
            if not sock.recv(64).startswith(b"SSH-"):
                problems.append(f"no SSH banner on {cluster.host}:{cluster.port}")
    except OSError as exc:
        problems.append(f"sshd on {cluster.host}:{cluster.port}: {exc}")
    return problems


@pytest.fixture(scope="session")
def dev_cluster() -> DevCluster:
    """The running dev cluster; checked once per session (a skip or failure here is cached by pytest)."""
    cluster = _cluster()
    problems = _problems(cluster)
    if problems:
        msg = "dev cluster is not up (run `scripts/dev-cluster up` as root): " + "; ".join(problems)
        if in_ci():
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return cluster


@pytest.fixture(autouse=True)
def _no_site_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine's /etc/hpclaunch/config.toml must not change what the tests see (unless a test sets one)."""
    if "HPCLAUNCH_SITE_CONFIG" not in os.environ:
        monkeypatch.setenv("HPCLAUNCH_SITE_CONFIG", "")


@pytest.fixture(autouse=True)
def _require_dev_cluster_for_cluster_tests(request: pytest.FixtureRequest) -> None:
    """Every test marked ``cluster`` needs the dev cluster, whether or not it asks for the fixture."""
    if request.node.get_closest_marker("cluster") is not None:
        request.getfixturevalue("dev_cluster")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """In CI no test may skip: a skip there means `.ci/run` failed to install or start something."""
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.longrepr = f"skipped in CI, which must run every test: {reason}"
