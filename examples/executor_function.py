#!/usr/bin/env python3
"""Run Python functions as Slurm jobs with submitit, configured from an hpclaunch profile.

``cluster.executor()`` gives a ``submitit`` executor with the profile's partition, account, time, GPUs
and setup lines. submitit runs ``sbatch`` on this machine and shares pickles with the job through the
filesystem, so run this on a login node (a profile without ``host``); over SSH hpclaunch says why not
and points to ``cluster.submit_array`` instead (see sweep_array.py).

The job runs the function with this same Python interpreter (``sys.executable``), so it needs to be
reachable from the nodes and have submitit installed; ``--python`` chooses another.

    python examples/executor_function.py                 # this machine's Slurm (or the `local` profile)
    python examples/executor_function.py --profile gpu-login --gpus 1
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from hpclaunch import Cluster, HpclaunchError


def fit(lr: float, steps: int = 50) -> dict[str, Any]:
    """The function that runs on the node: gradient descent on (x - 1)^2; returns where it ended."""
    import os
    import socket

    x = 5.0
    for _ in range(steps):
        x -= lr * 2 * (x - 1.0)
    return {
        "lr": lr,
        "loss": (x - 1.0) ** 2,
        "job": os.environ.get("SLURM_JOB_ID"),
        "host": socket.gethostname(),
    }


def main(argv: list[str] | None = None) -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--profile", help="hpclaunch profile without `host` (default: this machine)")
    parser.add_argument("--config", help="config file (default: HPCLAUNCH_CONFIG or hpclaunch's own)")
    parser.add_argument("--partition", help="partition to submit to (default: the profile's)")
    parser.add_argument("--gpus", type=int, help="GPUs per node (default: the profile's)")
    parser.add_argument("--python", help="python command the job runs (default: this interpreter)")
    parser.add_argument(
        "--folder", help="submitit folder, shared with the nodes (default: WORKDIR/submitit/%%j)"
    )
    args = parser.parse_args(argv)

    try:
        with Cluster(args.profile, config=args.config) as cluster:
            executor = cluster.executor(
                time="10m",
                job_name="hpclaunch-example",
                partition=args.partition,
                gpus=args.gpus,
                python=args.python,
                folder=args.folder,
            )
            started = time.monotonic()
            job = executor.submit(fit, 0.1)
            print(f"submitted job {job.job_id}; waiting for its result")
            result = job.result()
            print(f"fit(0.1) = {result}  [{time.monotonic() - started:.1f} s]")

            # Several calls as one submitit job array.
            jobs = executor.map_array(fit, [0.3, 0.03, 0.003])
            for lr_job in jobs:
                print(f"job {lr_job.job_id}: {lr_job.result()}")
    except HpclaunchError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
