"""One login for a working session, measured on the dev cluster (run as root, under the cluster lock):

1. a warm ``hpclaunch status`` from a fresh process (the OpenSSH master is up) vs ``ssh HOST squeue``
   with a fresh OpenSSH login (ControlPath=none): medians and their ratio (target >= 3x, <= 0.15 s);
2. a 200 MB download through a tunnel: plain ``ssh -N -L`` vs the OpenSSH transport's forward
   (target >= 90%) vs the paramiko transport's (target >= 50%).

    flock /tmp/hpclaunch-cluster.lock .venv/bin/python bench/ssh_session.py [--runs 15]
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

STATE = Path(os.environ.get("HPCLAUNCH_DEV_DIR") or "/var/lib/hpclaunch-dev")
SSH_CONFIG = STATE / "ssh_config"
ALIAS = "hpcdev"
SIZE = 200_000_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True, capture_output=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - started


def fetch(port: int) -> float:
    """MB/s of one download of the big file through 127.0.0.1:port."""
    started = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/big", timeout=120) as response:
        got = 0
        while chunk := response.read(1 << 20):
            got += len(chunk)
    assert got == SIZE, got
    return got / (time.perf_counter() - started) / 1e6


def wait_listening(port: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=15, help="runs of each command (default: 15)")
    args = parser.parse_args()
    runtime = tempfile.mkdtemp(prefix="hcl-b-", dir="/tmp")
    config = Path(runtime) / "config.toml"
    config.write_text(
        f'default = "b"\n[clusters.b]\nhost = "{ALIAS}"\nssh_config = "{SSH_CONFIG}"\ntransport = "openssh"\n'
    )
    config.chmod(0o600)
    env = {**os.environ, "HPCLAUNCH_CONFIG": str(config), "HPCLAUNCH_RUNTIME_DIR": runtime}
    hpclaunch = [sys.executable, "-m", "hpclaunch"]
    # What `pip install hpclaunch` leaves: compiled bytecode. An editable checkout under
    # PYTHONDONTWRITEBYTECODE=1 (as on these machines) would compile every module on each start, ~80 ms.
    import compileall

    compileall.compile_dir(str(Path(__file__).resolve().parents[1] / "hpclaunch"), quiet=1)
    subprocess.run([*hpclaunch, "connect"], env=env, check=True, capture_output=True)
    warm = [timed([*hpclaunch, "status"], env) for _ in range(args.runs)]
    fresh_ssh = [
        "ssh",
        "-F",
        str(SSH_CONFIG),
        "-o",
        "ControlPath=none",
        ALIAS,
        "squeue",
        "-h",
        "-u",
        "hpcuser",
    ]
    fresh = [timed(fresh_ssh, env) for _ in range(args.runs)]
    w, f = statistics.median(warm), statistics.median(fresh)
    print(f"warm `hpclaunch status` (fresh process, OpenSSH master up): median {w:.3f} s")
    print(f"`ssh {ALIAS} squeue` with a fresh OpenSSH login:              median {f:.3f} s")
    print(f"ratio: {f / w:.2f}x faster (target >= 3x, median <= 0.15 s)")

    from hpclaunch.transport.openssh import OpenSSHTransport
    from hpclaunch.transport.ssh import SSHTransport

    with OpenSSHTransport(ALIAS, ssh_config_path=str(SSH_CONFIG), persist=0, control_dir=runtime) as ossh:
        remote = ossh.run(["mktemp", "-d", "/tmp/hpclaunch-bench.XXXXXX"]).stdout.strip()
        port = free_port()
        start = (
            f"cd {shlex.quote(remote)} && head -c {SIZE} /dev/urandom > big && setsid nohup python3 -m "
            f"http.server --bind 127.0.0.1 {port} >/dev/null 2>&1 </dev/null & echo $!"
        )
        pid = ossh.run(["sh", "-c", start], timeout=120).stdout.strip()
        try:
            time.sleep(1)
            local = free_port()
            plain = subprocess.Popen(
                [
                    "ssh",
                    "-F",
                    str(SSH_CONFIG),
                    "-o",
                    "ControlPath=none",
                    "-N",
                    "-L",
                    f"127.0.0.1:{local}:127.0.0.1:{port}",
                    ALIAS,
                ]
            )
            try:
                wait_listening(local)
                fetch(local)
                base = max(fetch(local) for _ in range(3))
            finally:
                plain.terminate()
                plain.wait()
            with ossh.forward("127.0.0.1", port) as fwd:
                fetch(fwd.local_port)
                ours = max(fetch(fwd.local_port) for _ in range(3))
            with (
                SSHTransport(ALIAS, ssh_config_path=str(SSH_CONFIG)) as pssh,
                pssh.forward("127.0.0.1", port) as fwd,
            ):
                fetch(fwd.local_port)
                para = max(fetch(fwd.local_port) for _ in range(3))
        finally:
            ossh.run(["kill", pid], check=False)
            ossh.run(["rm", "-rf", remote], check=False)
    print(f"tunnel, 200 MB (best of 3): plain ssh -N -L {base:.0f} MB/s")
    print(f"  OpenSSH transport forward: {ours:.0f} MB/s = {ours / base:.0%} of plain (target >= 90%)")
    print(f"  paramiko transport forward: {para:.0f} MB/s = {para / base:.0%} of plain (target >= 50%)")
    subprocess.run([*hpclaunch, "disconnect"], env=env, capture_output=True)


if __name__ == "__main__":
    main()
