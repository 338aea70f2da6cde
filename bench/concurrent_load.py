#!/usr/bin/env python3
"""Many notebooks and training jobs at once on the dev cluster: no port collisions, all reachable or done.

Starts N `hpclaunch jupyter` sessions (each its own process, as N users would) spread over both nodes and
M two-process DDP training jobs through one `Cluster`, then checks that every notebook answers 200 with
its own token on its own port, that all training jobs complete (each DDP pair found its own rendezvous
port), and that everything is cleaned up. Bounded: every wait has a deadline. Usage:

    .venv/bin/python bench/concurrent_load.py [--sessions 20] [--train-jobs 20]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hpclaunch.cluster import Cluster

STATE = Path(os.environ.get("HPCLAUNCH_DEV_DIR", "/var/lib/hpclaunch-dev"))
DEADLINE_S = 600


def status_of(port: int, token: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/api/status", headers={"Authorization": f"token {token}"})
    return conn.getresponse().status


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=20, help="concurrent notebooks")
    parser.add_argument("--train-jobs", type=int, default=20, help="concurrent 2-process training jobs")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hpclaunch-load-"))
    config = tmp / "config.toml"
    config.write_text(
        f'default = "dev"\n[clusters.dev]\nhost = "hpcdev"\nssh_config = "{STATE / "ssh_config"}"\n'
        'partition = "debug"\nsetup = ["source /opt/hpc-env/bin/activate"]\n'
    )
    config.chmod(0o600)
    env = {
        **os.environ,
        "HPCLAUNCH_CONFIG": str(config),
        "XDG_STATE_HOME": str(tmp / "state"),
        "PYTHONUNBUFFERED": "1",
    }
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hpclaunch",
                "jupyter",
                "--no-browser",
                "--sbatch-options",
                f"--nodelist=node{1 + i % 2}",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(args.sessions)
    ]
    problems: list[str] = []
    endpoints: list[tuple[str, int, int]] = []
    with Cluster("dev", config=config) as cluster:
        train = [
            cluster.train(
                "mnist_lenet5",
                ["--dataset", "synthetic", "--epochs", "1", "--limit-train", "512", "--limit-test", "256"],
                ntasks_per_node=2,
                sbatch_options=[f"--nodelist=node{1 + i % 2}"],
            )
            for i in range(args.train_jobs)
        ]
        try:
            for proc in procs:
                assert proc.stdout is not None and proc.stderr is not None
                url = proc.stdout.readline().strip()
                err = ""
                while "Same tunnel with OpenSSH" not in err and time.monotonic() - t0 < DEADLINE_S:
                    line = proc.stderr.readline()
                    if not line:
                        break
                    err += line
                match = re.match(r"http://127\.0\.0\.1:(\d+)/lab\?token=(\w+)", url)
                fwd = re.search(r"running in job \S+ on (\S+?)\.\n.*-L \d+:\S+:(\d+)", err, re.S)
                if not match or not fwd:
                    problems.append(f"session without URL: {err.strip()[-300:]}")
                    continue
                local, token = int(match.group(1)), match.group(2)
                code = status_of(local, token)
                if code != 200:
                    problems.append(f"session on port {local} answered {code}")
                endpoints.append((fwd.group(1), int(fwd.group(2)), local))
            notebooks_s = time.monotonic() - t0
            infos = cluster.wait(train, timeout=DEADLINE_S)
            train_s = time.monotonic() - t0
            failed = [i for i in infos.values() if i.state.value != "COMPLETED"]
            problems += [f"training job {i.describe()}" for i in failed]
            for job in train:
                log = job.logs()
                if log.count("final-weights-sha256") != 2:
                    problems.append(f"training job {job.id}: not both ranks finished")
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
            for proc in procs:
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    problems.append("a session did not stop on Ctrl-C")
            for job in train:
                job.cancel()
    remote_ports = [(node, port) for node, port, _ in endpoints]
    if len(set(remote_ports)) != len(remote_ports):
        problems.append(f"port collision among notebooks: {sorted(remote_ports)}")
    if len({p for _, _, p in endpoints}) != len(endpoints):
        problems.append("local port collision among tunnels")
    left = subprocess.run(
        ["squeue", "-h", "-u", "hpcuser", "-n", "hpclaunch-jupyter", "-t", "RUNNING,PENDING", "-o", "%i"],
        capture_output=True,
        text=True,
    ).stdout.split()
    result = {
        "sessions": args.sessions,
        "reachable": len(endpoints) - sum("answered" in p for p in problems),
        "distinct_ports": len(set(remote_ports)),
        "nodes": sorted({n for n, _ in remote_ports}),
        "train_jobs": args.train_jobs,
        "train_completed": args.train_jobs - len([p for p in problems if p.startswith("training job")]),
        "notebooks_ready_s": round(notebooks_s, 1),
        "all_done_s": round(train_s, 1),
        "notebook_jobs_left": left,
        "problems": problems,
    }
    print(json.dumps(result, indent=None if args.json else 2))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
