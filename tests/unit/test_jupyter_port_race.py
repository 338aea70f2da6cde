"""Two notebooks on one node that draw the same free port: the one whose Jupyter could not bind must not
take the other's server (on the same port, answering HTTP) for its own. The readiness check of the
rendered notebook script itself runs here against a server that does or does not take its token."""

from __future__ import annotations

import http.server
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

TOKEN = "a" * 48


class _Jupyter(http.server.BaseHTTPRequestHandler):
    """/api/status as jupyter_server answers it: 200 with the right token, 403 without."""

    token = TOKEN

    def do_GET(self) -> None:
        ok = self.headers.get("Authorization") == f"token {self.token}"
        self.send_response(200 if ok else 403)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(params=["ours", "another"])
def server(request: pytest.FixtureRequest) -> Iterator[tuple[int, str]]:
    handler = type("H", (_Jupyter,), {"token": TOKEN if request.param == "ours" else "b" * 48})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1], request.param
    httpd.shutdown()


def readiness_check(tmp_path: Path) -> str:
    from hpclaunch.cluster import Cluster
    from hpclaunch.config import Profile

    cluster = Cluster(Profile(name="t", scheduler="local", workdir=str(tmp_path)))
    script = cluster.render("jupyter", run_dir=str(tmp_path / "run"))
    found = re.search(r"^wait_until_answering\(\) \{\n.*?\nPY\n\}\n", script, re.S | re.M)
    assert found, script
    return found.group(0)


def test_a_server_that_refuses_our_token_is_not_ours(tmp_path: Path, server: tuple[int, str]) -> None:
    port, whose = server
    token_file = tmp_path / "jupyter.token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    ours = subprocess.Popen(["sleep", "30"])  # stands for our own jupyter, still starting
    try:
        result = subprocess.run(
            ["bash", "-c", f'{readiness_check(tmp_path)}bind_ip=127.0.0.1; wait_until_answering "$1" "$2"',
             "bash", str(port), str(ours.pid)],
            env={"PATH": "/usr/bin:/bin", "JUPYTER_TOKEN_FILE": str(token_file)},
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
    finally:
        ours.kill()
        ours.wait()
    assert result.returncode == (0 if whose == "ours" else 3), result.stderr
