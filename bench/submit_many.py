#!/usr/bin/env python3
"""Many jobs over one connection: submit N trivial jobs, then read all their states, two ways in one run.

- hpclaunch: one ``Cluster`` session over SSH: ``cluster.submit`` N times (each makes a run directory
  and writes its script there too), then ``cluster.states(jobs)``: one squeue for all.
- naive: what scripts do with OpenSSH: ``ssh HOST sbatch`` with a NEW connection per job, then one
  ``ssh HOST squeue -j ID`` per job.

Prints both times and the ratio (target: at least 10x), then cancels every job it submitted and deletes
hpclaunch's run directories. Needs the dev cluster (scripts/dev-cluster up). Usage:

    .venv/bin/python bench/submit_many.py [--jobs 100] [--json]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hpclaunch import Cluster
from hpclaunch.config import Profile
from hpclaunch.transport import runtime

STATE = Path(os.environ.get("HPCLAUNCH_DEV_DIR", "/var/lib/hpclaunch-dev"))
SCRIPT = "#!/bin/bash\ntrue\n"
JOB_NAME = "bench-submit-many"


@dataclass
class Timing:
    submit_s: float
    states_s: float
    ssh_connections: int
    commands: int

    @property
    def total_s(self) -> float:
        return self.submit_s + self.states_s


def bench_hpclaunch(cluster: Cluster, n: int, partition: str) -> tuple[Timing, list[str], list[str]]:
    started = time.monotonic()
    jobs = [
        cluster.submit("run", command=["true"], job_name=JOB_NAME, partition=partition, time="5m")
        for _ in range(n)
    ]
    submitted = time.monotonic()
    infos = cluster.states(jobs)
    done = time.monotonic()
    assert len(infos) == n, f"asked {n} states, got {len(infos)}"
    transport = cluster.transport
    timing = Timing(
        submitted - started, done - submitted, transport.connections_opened, transport.commands_run
    )
    return timing, [job.id for job in jobs], [job.run_dir for job in jobs if job.run_dir]


def bench_openssh(ssh: list[str], n: int, partition: str) -> tuple[Timing, list[str]]:
    sbatch = ["sbatch", "--parsable", f"--partition={partition}", f"--job-name={JOB_NAME}", "--time=5",
              "--output=/dev/null"]  # fmt: skip
    started = time.monotonic()
    ids = []
    for _ in range(n):
        out = subprocess.run([*ssh, *sbatch], input=SCRIPT, capture_output=True, text=True, check=True)
        ids.append(out.stdout.strip().split(";")[0])
    submitted = time.monotonic()
    for job_id in ids:
        out = subprocess.run(
            [*ssh, "squeue", "--noheader", "--states=all", f"--jobs={job_id}", "--format=%T"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.strip(), f"no state for job {job_id}"
    done = time.monotonic()
    return Timing(submitted - started, done - submitted, 2 * n, 2 * n), ids


def main(argv: list[str] | None = None) -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--jobs", type=int, default=100, help="jobs to submit each way (default: 100)")
    parser.add_argument("--host", default="hpcdev", help="ssh host alias (default: hpcdev)")
    parser.add_argument("--ssh-config", default=str(STATE / "ssh_config"), help="ssh config file")
    parser.add_argument("--partition", default="debug", help="partition (default: debug)")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = parser.parse_args(argv)

    # A cold start, its one login counted: a master of our own in a fresh runtime directory (not one an
    # earlier command left running), ended when the bench ends.
    os.environ[runtime.ENV] = tempfile.mkdtemp(prefix="hpclaunch-bench-")
    atexit.register(shutil.rmtree, os.environ[runtime.ENV], True)
    profile = Profile(name="bench", host=args.host, ssh_config=args.ssh_config, session_idle=0)
    ssh = ["ssh", "-F", args.ssh_config, args.host]
    all_ids: list[str] = []
    run_dirs: list[str] = []
    with Cluster(profile) as cluster:
        try:
            ours, ids, run_dirs = bench_hpclaunch(cluster, args.jobs, args.partition)
            all_ids += ids
            naive, ids = bench_openssh(ssh, args.jobs, args.partition)
            all_ids += ids
        finally:
            # Clean up through the same session: one scancel, one rm, whatever happened above.
            if all_ids:
                cluster.transport.run(["scancel", *all_ids], timeout=120, check=False)
            if run_dirs:
                cluster.transport.run(["rm", "-rf", "--", *run_dirs], timeout=120, check=False)

    n = args.jobs
    rows = [("hpclaunch, one SSH connection", ours), ("OpenSSH, new connection per command", naive)]
    print(f"{n} jobs submitted, then their states read, on {args.host}:")
    print(f"  {'':38} {'submit':>8} {'states':>8} {'total':>8}  ssh connections  commands")
    for label, t in rows:
        print(f"  {label:38} {t.submit_s:7.2f}s {t.states_s:7.2f}s {t.total_s:7.2f}s  "
              f"{t.ssh_connections:15d}  {t.commands:8d}")  # fmt: skip
    ratio = naive.total_s / ours.total_s
    print(f"  speedup: {ratio:.1f}x total (submit {naive.submit_s / ours.submit_s:.1f}x, "
          f"states {naive.states_s / ours.states_s:.1f}x); target >= 10x")  # fmt: skip
    if args.json:
        record = {
            "jobs": n,
            "hpclaunch": {**asdict(ours), "total_s": ours.total_s},
            "openssh": {**asdict(naive), "total_s": naive.total_s},
            "ratio": ratio,
        }
        print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
