"""find_server against real job output: each fixture in tests/data/banners is what a server printed.

Provenance is in tests/data/banners/README.md: most were captured here by starting that
Jupyter version (capture.sh); the rest are startup logs quoted in public issues, tokens replaced.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hpclaunch.jupyter.banner import MARKER, ServerLocation, find_server, format_marker
from hpclaunch.jupyter.token import new_token, redact

BANNERS = Path(__file__).resolve().parent.parent / "data" / "banners"


def read(name: str) -> str:
    # Bytes, not text mode: text mode would turn the captured \r\n into \n before the parser sees it.
    return (BANNERS / f"{name}.txt").read_bytes().decode("utf-8", errors="replace")


def loc(
    host: str, port: int, base_url: str = "/", token: str | None = None, source: str = "banner"
) -> ServerLocation:
    return ServerLocation(host, port, base_url, token, source)  # type: ignore[arg-type]


# fixture name -> what find_server must return. Comments: the software that printed it.
EXPECTED: dict[str, ServerLocation | None] = {
    # JupyterLab 4.6.6 on Jupyter Server 2.21.1
    "lab4_default": loc("127.0.0.1", 43417, token="0ec2c453e12c213dcf5da6744308c4ae5367d59a3505e869"),
    "lab4_hostname": loc("vm", 45221, token="d469136d5443d1b7d1952ff0ec60c10ec442aab7740c0279"),
    "lab4_fqdn": loc("c123.cluster.edu", 8888, token="efc10825925c23eb02c55289023715d4df49c3012148540e"),
    "lab4_token_config": loc("vm", 37481),  # --ServerApp.token=...: printed as '?token=...'
    "lab4_token_env": loc("vm", 54793),  # JUPYTER_TOKEN in the environment: '?token=...'
    "lab4_ipv6": loc("::1", 44209, token="d7587a94ac2ffd1a1205b9f41d5bd8b268d698a31e68a152"),
    "lab4_base_url": loc("vm", 56963, "/user/bob/", "4229b0bc5a4b5ae237e4a4ff8334fb9a535ce58aa89c3998"),
    "lab4_no_token": loc("vm", 60525),  # token '' : no query at all
    # --ip=0.0.0.0: 'running at' shows 0.0.0.0, the critical block the node's hostname
    "lab4_wildcard": loc("c12", 50751, token="c662663604a6a222df5f8aca0e33877f26a52a7cda7a38f8"),
    # under a pseudo-terminal: colour escapes, ESC ( B, and \r\n line ends
    "lab4_tty": loc("vm", 58291, token="860ede1bcde743f747f6eed68cdf0dc73ab20471207e5dce"),
    # two starts in one log: the second (new port) wins
    "lab4_restart_new_port": loc(
        "127.0.0.1", 53621, token="79607d2dfded959899b2add4521af2559520bf93b0d4541c"
    ),
    # same port, first bound to the hostname, then only to 127.0.0.1: the first must not leak in
    "lab4_restart_same_port_loopback": loc(
        "127.0.0.1", 43135, token="896d71db31fd18c1ede5b2a59ddc4eff01f1976ccf1502e9"
    ),
    # --gateway-url: the gateway's URL is printed inside the banner and must be skipped
    "lab4_gateway": loc("127.0.0.1", 8888, token="2aa1a1646978388e40e8f79f2f52f8c597aa2faae44902e1"),
    # --log-level=WARN: no 'running at', only the critical 'copy and paste' block
    "lab4_log_level_warn": loc("node2", 8888, token="d3e161c1a5f73ddfa54ab91bbb812f001c11d490fc6c4731"),
    "lab4_sock": None,  # --ServerApp.sock: http+unix:// and an 'ssh -L 8888:/path.sock' hint
    "lab4_starting": None,  # extensions loading, no banner yet
    "lab4_header_only": None,  # 'is running at:' flushed, its URL line not yet
    # Jupyter Server 2.21.1 alone: default_url '/'
    "server2_root": loc("vm", 49439, token="9caa6e7b16460c637186bd26d8e48b73e67f6260e39af1fb"),
    # `jupyter server list`: a bare URL line with a token and ' :: root_dir'
    "server_list": loc("gpu07", 8888, token="c6133dd960b97ee76b9486555bab8706683e0ac2bf50d29e"),
    # JupyterLab 3.6.8 on Jupyter Server 1.24.0 (' or http://127.0.0.1...' lines, nbclassic banner art)
    "lab3_hostname": loc("vm", 50849, token="2be07b33db8b41e3b2aae27cffed9539bf9282ffbab18782"),
    "lab3_token_env": loc("vm", 48015),
    "lab3_wildcard": loc("c12", 53575, token="253ebe451b0581a81714abc139e89901e40977905b468c1f"),
    # nbclassic 1.3.3 on Jupyter Server 1.24.0, --ip=::1 (it prints ' or http://127.0.0.1' too)
    "nbclassic_ipv6": loc("::1", 40565, token="aaab152573e0412c1a422e94f09cefaf3d9ed65e98c58796"),
    # Notebook 6.4.12 (NotebookApp, 'Jupyter Notebook 6.4.12 is running at:')
    "nb6_hostname": loc("vm", 50113, token="c5cc77c1a98de899f1f235a1b0f3f55cb2fd48379770a90b"),
    "nb6_localhost": loc("localhost", 34145, token="36dec164b967cca340adc35bda091d26de073185c5fd2c2a"),
    "nb6_base_url": loc("vm", 51981, "/user/alice/", "bd05bc8e3e21e6c7a9521891602f794cb13a27ada5f96fd3"),
    "nb6_token_env": loc("vm", 54721),
    "nb6_wildcard": loc("gpu-a100-07", 35619, token="78973d9da8322e7ceda5c16c0f817bcb0bb417a18dadf84a"),
    # Notebook 7.2.2 on Jupyter Server 2.21.1: default_url /tree
    "nb7_hostname": loc("vm", 51169, token="2fe91c2f17f5c1932c356b080eab970f5165ec44b685587c"),
    "nb7_base_url_no_token": loc("vm", 34017, "/proxy/x1/"),
    # site job scripts (captured by running them): echo an ssh command, then start JupyterLab 4
    "site_princeton": loc("tiger-i23c1n5", 8889, token="dbdadb0e2e8c5a0fbe9ac9c6cb6b7cadca1bfe55b128b383"),
    "site_greene": loc("localhost", 54461, token="53a9452adc7ce16c359a4d0053fd60eac477996ae37402bd"),
    "site_jump": loc("127.0.0.1", 8888, token="11914ada9434bb524c613f3242165f24fd3030a6d1ee3054"),
    "site_spider": loc("wn-hb-02", 8882, token="60affca4fb48eed79ab4e1328cb744aa806a9537b28e67d9"),
    # ... and the same logs before Jupyter printed anything: only the ssh line tells
    # 'ssh -L 8888:localhost:8888 -J login.cluster.edu node12': the jump makes localhost the node
    "site_jump_early": loc("node12", 8888, source="ssh-forward"),
    "site_spider_early": loc("wn-hb-02", 8882, source="ssh-forward"),  # local port 8889, remote 8882
    "site_script_source": None,  # the script itself: ${port}:${node}:${port} is not an address
    # an hpclaunch-style job: banner with '?token=...', then the marker once the server answered
    "marker_after_banner": loc("node1", 8888, "/hpclaunch/job42/", source="marker"),
    # quoted in public issues (tokens and user paths replaced)
    "nb5_servername_or_loopback": loc(  # jupyter/help#449, Notebook 5, --ip=0.0.0.0
        "servername", 8888, token="084bc892420e158182e874e7e1afec4bb057ae597a7dcd91"
    ),
    "nb5_ip_address": loc(  # google-deepmind/graph_nets#5, --ip=192.168.6.113
        "192.168.6.113", 8888, token="7c346fc7450c11087e4c4cc1c9719904e4caabe27083fd84"
    ),
    "nb4_running_at_inline": loc("localhost", 8888),  # DonJayamanne/vscodeJupyter#27, URL on the header line
    "nb6_with_lab2_localhost_or_loopback": loc(  # jupyter/notebook#5577
        "localhost", 8888, token="651accefdbf5fde5ab29e6681a51a947c02e621aced433e8"
    ),
    "lab1_access_block_then_debug": loc(  # jupyterlab/jupyterlab#6696, LabApp on the Notebook server
        "localhost", 8888, token="a6a9a45f671c561da1d8da099ef5054305e44b3bf9848e6c"
    ),
    "lab3_access_block_localhost_or_loopback": loc(  # jupyterlab/jupyterlab#9802
        "localhost", 8888, token="350c6403152dcd304069aae08b01b56461fdc65999716e56"
    ),
    "server2_wildcard_password": loc("0.0.0.0", 8888),  # noqa: S104  jupyter-server/jupyter_server#1674
    "lab4_no_prefix": loc("P15", 8888),  # jupyterlab/jupyterlab#15520, pasted without log prefixes
    # negatives
    "empty": None,
    "file_url_only": None,
    "slurm_cancelled": None,
    "garbage": None,  # bad UTF-8, ports out of range, bad markers, URLs without a port
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture(name: str) -> None:
    assert find_server(read(name)) == EXPECTED[name]


def test_every_fixture_has_an_expectation() -> None:
    on_disk = {p.stem for p in BANNERS.glob("*.txt")}
    assert on_disk == set(EXPECTED)


def test_enough_real_server_variants() -> None:
    found = [name for name, want in EXPECTED.items() if want is not None and want.source == "banner"]
    assert len(found) >= 12


# -- behaviour across fixtures ---------------------------------------------------------------


def test_crlf_and_lone_cr_line_ends() -> None:
    text = read("lab4_hostname")
    want = EXPECTED["lab4_hostname"]
    assert find_server(text.replace("\n", "\r\n")) == want
    assert find_server(text.replace("\n", "\r")) == want


def test_colour_codes_around_the_url() -> None:
    text = "Jupyter Server 2.0.0 is running at:\n\x1b[1m\x1b]8;;http://x\x07http://node3:8888/lab?token=ab12\x1b[0m\n"
    assert find_server(text) == loc("node3", 8888, token="ab12")


def test_a_cut_banner_is_waited_for_not_taken_from_the_previous_start() -> None:
    text = read("lab4_restart_new_port")
    second_header = text.rindex("is running at:")
    cut = text[: text.index("\n", second_header) + 1]
    assert find_server(cut) is None
    assert find_server(text) == EXPECTED["lab4_restart_new_port"]


def test_growing_output_finds_the_server_once_its_url_is_out() -> None:
    text = read("lab4_fqdn")
    lines = text.splitlines(keepends=True)
    url_line = next(i for i, line in enumerate(lines) if "http://c123" in line)
    assert find_server("".join(lines[:url_line])) is None
    assert find_server("".join(lines[: url_line + 1])) == loc(
        "c123.cluster.edu", 8888, token="efc10825925c23eb02c55289023715d4df49c3012148540e"
    )


def test_banner_beats_an_earlier_ssh_line() -> None:
    assert read("site_princeton").index("ssh -N") < read("site_princeton").index("running at")
    assert find_server(read("site_princeton")).source == "banner"  # type: ignore[union-attr]


def test_site_prose_saying_running_at_does_not_hide_the_banner() -> None:
    text = read("lab4_hostname") + "Your notebook is running at: node12, see the URL above\n"
    assert find_server(text) == EXPECTED["lab4_hostname"]


def test_site_prose_url_without_token_is_not_a_server() -> None:
    # site_jump_early says 'then open http://localhost:8888/ in your browser.' (the laptop's end)
    assert "http://localhost:8888/" in read("site_jump_early")
    assert find_server(read("site_jump_early")).source == "ssh-forward"  # type: ignore[union-attr]


# -- base_url and token from URLs ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "base_url"),
    [
        ("http://n:8888/", "/"),
        ("http://n:8888", "/"),
        ("http://n:8888/lab", "/"),
        ("http://n:8888/tree", "/"),
        ("http://n:8888/lab/tree/work/a.ipynb", "/"),
        ("http://n:8888/lab/workspaces/auto-x", "/"),
        ("http://n:8888/user/bob/lab", "/user/bob/"),
        ("http://n:8888/user/bob/lab/tree/x.ipynb", "/user/bob/"),
        ("http://n:8888/user/bob/", "/user/bob/"),
        ("http://n:8888/user/bob", "/user/bob/"),
        ("http://n:8888/proxy/8888/notebooks/x.ipynb", "/proxy/8888/"),
    ],
)
def test_base_url(url: str, base_url: str) -> None:
    found = find_server(f"Jupyter Server 2.0.0 is running at:\n{url}\n")
    assert found is not None and found.base_url == base_url


@pytest.mark.parametrize(
    ("query", "token"),
    [
        ("?token=abc123", "abc123"),
        ("?token=...", None),
        ("?token=", None),
        ("?token=<token>", None),
        ("?token=c8de56fa...", None),
        ("?token=ab12&token=ab12", "ab12"),
        ("?foo=1&token=ab12", "ab12"),
        ("", None),
    ],
)
def test_token(query: str, token: str | None) -> None:
    found = find_server(
        f"[I 12:00:00.000 NotebookApp] The Jupyter Notebook is running at:\nhttp://n1:8888/{query}\n"
    )
    assert found == loc("n1", 8888, token=token)


def test_https_and_ip_addresses() -> None:
    text = "Jupyter Server 2.1.0 is running at:\nhttps://10.1.2.3:9999/lab?token=ff\n    https://127.0.0.1:9999/lab?token=ff\n"
    assert find_server(text) == loc("10.1.2.3", 9999, token="ff")


# -- the marker --------------------------------------------------------------------------------


def test_marker_round_trip() -> None:
    line = format_marker("c123.cluster.edu", 40123, "/hpclaunch/job7/")
    assert line == f"{MARKER} host=c123.cluster.edu port=40123 base_url=/hpclaunch/job7/"
    assert find_server(line + "\n") == loc("c123.cluster.edu", 40123, "/hpclaunch/job7/", source="marker")


def test_the_templates_marker_line_is_what_the_parser_reads(tmp_path: Path) -> None:
    """Run the marker line of the rendered notebook script itself, and parse what it prints."""
    from hpclaunch.cluster import Cluster
    from hpclaunch.config import Profile

    cluster = Cluster(Profile(name="t", scheduler="local", workdir=str(tmp_path)))
    script = cluster.render("jupyter", run_dir=str(tmp_path / "run"))
    (line,) = [ln.strip() for ln in script.splitlines() if MARKER in ln and "echo" in ln]
    printed = subprocess.run(
        ["bash", "-c", 'node=gpu17.cluster.edu; port=40123; eval "$1"', "bash", line],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert printed.strip() == format_marker("gpu17.cluster.edu", 40123)
    assert find_server(printed) == loc("gpu17.cluster.edu", 40123, source="marker")


@pytest.mark.parametrize(
    ("args", "line_end"),
    [
        (("::1", 8888), "host=::1 port=8888 base_url=/"),
        (("[::1]", 8888), "host=::1 port=8888 base_url=/"),
        (("n", 1, "/a/b"), "host=n port=1 base_url=/a/b/"),
        (("n", 65535, "/"), "host=n port=65535 base_url=/"),
    ],
)
def test_marker_normalises(args: tuple[str, int] | tuple[str, int, str], line_end: str) -> None:
    line = format_marker(*args)
    assert line.endswith(line_end)
    found = find_server(line)
    assert found is not None and found.source == "marker"


@pytest.mark.parametrize(
    "args",
    [
        ("", 8888),
        ("a b", 8888),
        ("n\n", 8888),
        ("n", 0),
        ("n", 65536),
        ("n", True),
        ("n", 8888, "x/"),
        ("n", 8888, "/a b"),
    ],
)
def test_marker_rejects(args: tuple[object, ...]) -> None:
    with pytest.raises(ValueError):
        format_marker(*args)  # type: ignore[arg-type]


def test_marker_beats_a_later_banner_and_the_last_marker_wins() -> None:
    text = "\n".join(
        [
            format_marker("node1", 1111),
            read("lab4_hostname"),
            "hpclaunch: port 1111 was taken, retrying with another (attempt 1)",
            format_marker("node2", 2222, "/x/"),
            read("nb6_hostname"),
        ]
    )
    assert find_server(text) == loc("node2", 2222, "/x/", source="marker")


def test_marker_with_a_line_prefix_and_ansi() -> None:
    text = "0: \x1b[32m" + format_marker("gpu3", 8000) + "\x1b[0m\r\n"
    assert find_server(text) == loc("gpu3", 8000, source="marker")


def test_shell_trace_of_the_marker_echo_is_not_a_marker() -> None:
    trace = "+ echo 'HPCLAUNCH_JUPYTER_READY host=node1 port=8888 base_url=/'\n"
    assert find_server(trace) is None
    assert find_server(trace + format_marker("node1", 8888) + "\n") == loc("node1", 8888, source="marker")


_HOST = st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,10}){0,3}", fullmatch=True)


@given(
    host=_HOST,
    port=st.integers(1, 65535),
    base=st.lists(st.from_regex(r"[A-Za-z0-9_.~-]{1,8}", fullmatch=True), max_size=3),
    noise=st.text(max_size=200),
)
def test_marker_round_trip_property(host: str, port: int, base: list[str], noise: str) -> None:
    base_url = "/" + "".join(part + "/" for part in base)
    text = noise + "\n" + format_marker(host, port, base_url) + "\n"
    assert find_server(text) == loc(host, port, base_url, source="marker")


_CHUNKS = [
    *"http://(or)[]:?=&/ -.\r\n",
    *["node1", "127.0.0.1", "::1", ":8888", ":99999", "/lab", "?token=", "ab12", "...", " or ", "\x1b[31m"],
    *["Jupyter Server 2.0.0 is running at:", "copy and paste one of these URLs:", "ssh -L ", "-J ", "-N"],
    *["8888:node:8888", "HPCLAUNCH_JUPYTER_READY host=", " port=", " base_url=/"],
]


@given(st.lists(st.sampled_from(_CHUNKS), max_size=60).map("".join))
def test_find_server_never_raises(text: str) -> None:
    found = find_server(text)
    assert found is None or 0 < found.port < 65536


# -- ssh -L lines ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "host", "port"),
    [
        ("ssh -N -L 8888:node12:8888 user@login.cluster.edu", "node12", 8888),
        ("ssh -N -f -L 9001:c123.cluster.edu:8890 me@login", "c123.cluster.edu", 8890),
        ("ssh -NfL 9001:node3:8890 me@login", "node3", 8890),
        ("ssh -L9001:node3:8890 -N me@login", "node3", 8890),
        ("ssh -L 127.0.0.1:9001:node3:8890 me@login", "node3", 8890),
        ("ssh -L [::1]:9001:[fe80::1]:8890 me@login", "fe80::1", 8890),
        ("ssh -p 2222 -i ~/.ssh/id -N -L 8888:10.0.0.7:8888 me@login", "10.0.0.7", 8888),
        ("/usr/bin/ssh -N -L 8888:gpu01:8888 login", "gpu01", 8888),
        ("    $ ssh -N -L 8888:gpu01:8888 login   # run this on your laptop", "gpu01", 8888),
        ("ssh -L 8888:localhost:8888 -J login node12", "node12", 8888),
        ("ssh -L 8888:127.0.0.1:8888 -J me@login:22 me@node12", "node12", 8888),
        ("ssh -N -J hpcuser@login -p 22 -L 50001:127.0.0.1:41234 node7", "node7", 41234),  # hpclaunch's own
        ("ssh -o ProxyJump=login -L 8888:localhost:8888 node12", "node12", 8888),
        ("ssh -L 8888:localhost:8888 -J login ssh://me@node12:2222", "node12", 8888),
        # no jump: the destination is the login host, whose localhost a reverse tunnel serves
        ("ssh -L 54461:localhost:54461 hpcuser@greene.hpc.nyu.edu", "localhost", 54461),
        ("ssh -L 8787:node1:8787 -L 8888:node1:8888 login", "node1", 8787),  # the first -L
    ],
)
def test_ssh_forward(line: str, host: str, port: int) -> None:
    assert find_server(line + "\n") == loc(host, port, source="ssh-forward")


@pytest.mark.parametrize(
    "line",
    [
        "ssh -N -f -L ${port}:${node}:${port} ${user}@${cluster}",
        "ssh -L 8888:/tmp/jupyter.sock -N user@this_host",
        "ssh -R 8888:localhost:8888 login01",
        "ssh -D 1080 login",
        "ssh -L 8888:node1:99999 login",
        "Command to create ssh tunnel:",
        "use an ssh -L tunnel to reach the node",
        "ssh -L 'unbalanced quote",
        "sshd -L 8888:node1:8888",
    ],
)
def test_not_an_ssh_forward(line: str) -> None:
    assert find_server(line + "\n") is None


def test_last_ssh_line_wins() -> None:
    text = "ssh -N -L 8888:node1:8888 login\nretrying\nssh -N -L 8888:node2:9999 login\n"
    assert find_server(text) == loc("node2", 9999, source="ssh-forward")


# -- token helpers ---------------------------------------------------------------------------


def test_new_token_is_long_random_hex() -> None:
    tokens = {new_token() for _ in range(50)}
    assert len(tokens) == 50
    for token in tokens:
        assert re.fullmatch(r"[0-9a-f]{64}", token)  # 256 bits


def test_redact() -> None:
    token = new_token()
    text = f"http://n:8888/lab?token={token}\nAuthorization: token {token}\n"
    out = redact(text, token)
    assert token not in out
    assert out == "http://n:8888/lab?token=***\nAuthorization: token ***\n"


@pytest.mark.parametrize("token", ["", None])
def test_redact_without_a_token_changes_nothing(token: str | None) -> None:
    assert redact("abc", token) == "abc"


def test_redact_a_real_banner() -> None:
    text = read("lab4_hostname")
    token = EXPECTED["lab4_hostname"].token  # type: ignore[union-attr]
    assert token is not None and token in text
    out = redact(text, token)
    assert token not in out and out.count("***") == text.count(token)
