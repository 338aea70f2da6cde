"""The pure parts of issue 11: host lists, port specs, the ssh config entries and their removal."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from hpclaunch.errors import ParameterError, TunnelError
from hpclaunch.node import sshentry
from hpclaunch.node.ports import PortSpec, parse_specs
from hpclaunch.node.target import first_node
from hpclaunch.transport import relay


@pytest.mark.parametrize(
    ("node_list", "first"),
    [("node1", "node1"), ("node[1-2]", "node1"), ("gpu[03-05,09]", "gpu03"), ("a,b", "a"), ("n[7,2]", "n7")],
)
def test_first_node_of_a_slurm_host_list(node_list: str, first: str) -> None:
    assert first_node(node_list) == first


def test_port_specs() -> None:
    assert parse_specs(["6006", "8050:18050"]) == [PortSpec(6006), PortSpec(8050, 18050)]
    for bad, fragment in [("0", "out of range"), ("1:65536", "out of range"), ("x", "not a port")]:
        with pytest.raises(ParameterError, match=fragment):
            PortSpec.parse(bad)
    with pytest.raises(ParameterError, match="given twice"):
        parse_specs(["80", "80:81"])


def test_a_port_without_a_local_number_keeps_its_own_when_free_here() -> None:
    # Issue 24: `forward JOB 8765` took a random local port.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    assert PortSpec(free).local_choice() == free
    assert PortSpec(free, 0).local_choice() == 0  # 0: any free one, as asked
    assert PortSpec(22).local_choice() == 0  # a privileged number: not ours to take
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        assert PortSpec(busy).local_choice() == 0
        with pytest.raises(TunnelError, match=f"port {busy} is in use on this machine"):
            relay.ensure_port_free(busy)


def entry(job_id: str) -> sshentry.Entry:
    return sshentry.Entry(
        job_id=job_id,
        user="alice",
        host_name="node1",
        proxy_command=["/opt/py 3/python", "-m", "hpclaunch", "proxy", job_id],
        host_keys=[f"ssh-ed25519 AAAA{job_id} hpclaunch-{job_id}"],
    )


def test_entries_are_written_and_removed_one_by_one(tmp_path: Path) -> None:
    where = sshentry.Paths(tmp_path)
    where.folder.mkdir()
    where.config.write_text("Host mine\n    HostName example.org\n")  # not ours: kept
    sshentry.write(entry("11"), where)
    sshentry.write(entry("12"), where)
    sshentry.write(entry("11"), where)  # again: replaced, not doubled
    text = where.config.read_text()
    assert text.count("Host hpclaunch-11\n") == 1 and "Host hpclaunch-12\n" in text
    assert "ProxyCommand '/opt/py 3/python' -m hpclaunch proxy 11" in text
    assert sshentry.remove("11", where)
    assert not sshentry.remove("11", where)
    assert where.config.read_text() == "Host mine\n    HostName example.org\n" + entry("12").block(
        where.known_hosts
    )
    assert where.known_hosts.read_text() == "hpclaunch-12 ssh-ed25519 AAAA12 hpclaunch-12\n"


def test_openssh_reads_the_entry(tmp_path: Path) -> None:
    """OpenSSH's own parser (ssh -G) sees the alias with our pinned, strict host key settings."""
    where = sshentry.write(entry("7"), sshentry.Paths(tmp_path))
    out = subprocess.run(
        ["ssh", "-G", "-F", str(where.config), "hpclaunch-7"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert "stricthostkeychecking true" in out
    assert "hostkeyalias hpclaunch-7" in out
    assert f"userknownhostsfile {where.known_hosts}" in out


def test_include_goes_on_top_once(tmp_path: Path) -> None:
    where = sshentry.Paths(tmp_path)
    where.user_config.write_text("Host old\n    User bob\n")
    assert not sshentry.include_present(where)
    sshentry.add_include(where)
    sshentry.add_include(where)
    text = where.user_config.read_text()
    assert text.count(where.include_line) == 1
    assert text.index(where.include_line) < text.index("Host old")
