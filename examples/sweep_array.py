#!/usr/bin/env python3
"""A hyperparameter sweep as ONE Slurm job array: one task per learning rate, then the best one.

Each task runs a tiny computation (gradient descent on a 1-D quadratic) with its own ``lr``, given on its
command line as ``{lr}`` and in its environment as ``HPCLAUNCH_PARAM_LR``. The script waits for all
tasks with one batched state query per poll and collects each task's result from its output.

    python examples/sweep_array.py                         # this machine's Slurm (or the `local` profile)
    python examples/sweep_array.py --profile hpc --tasks 12
    python examples/sweep_array.py --config /var/lib/hpclaunch-dev/config.toml --profile dev
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from hpclaunch import Cluster, HpclaunchError

#: What every task runs, staged into the run directory as task.py: prints one RESULT line of JSON.
TASK = """
import argparse, json, os
parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float, required=True)
parser.add_argument("--steps", type=int, default=50)
args = parser.parse_args()
x = 5.0
for _ in range(args.steps):
    x -= args.lr * 2 * (x - 1.0)  # d/dx (x - 1)^2
loss = (x - 1.0) ** 2
task = os.environ.get("SLURM_ARRAY_TASK_ID")
print("RESULT " + json.dumps({"task": task, "lr": args.lr, "loss": loss}))
"""


def main(argv: list[str] | None = None) -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument(
        "--profile", help="hpclaunch profile (default: the config's default, else this machine)"
    )
    parser.add_argument("--config", help="config file (default: HPCLAUNCH_CONFIG or hpclaunch's own)")
    parser.add_argument("--partition", help="partition to submit to (default: the profile's)")
    parser.add_argument("--tasks", type=int, default=6, help="number of learning rates to try (default: 6)")
    parser.add_argument("--max-concurrent", type=int, help="run at most this many tasks at once")
    parser.add_argument(
        "--timeout", type=float, default=600, help="seconds to wait for the sweep (default: 600)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the run directory on the cluster")
    args = parser.parse_args(argv)

    learning_rates = [round(0.9 / 2**i, 6) for i in range(args.tasks)]
    try:
        with Cluster(args.profile, config=args.config) as cluster, tempfile.TemporaryDirectory() as tmp:
            task_file = Path(tmp) / "task.py"
            task_file.write_text(TASK)
            started = time.monotonic()
            sweep = cluster.submit_array(
                [{"lr": lr} for lr in learning_rates],
                command=["python3", "task.py", "--lr", "{lr}", "--steps", "50"],
                files={str(task_file): "task.py"},  # staged into the run directory, where tasks start
                max_concurrent=args.max_concurrent,
                job_name="sweep-lr",
                time="10m",
                partition=args.partition,
            )
            print(f"submitted array {sweep.id} with {len(sweep)} tasks to {cluster!r}")
            infos = sweep.wait(timeout=args.timeout, on_update=lambda info: print("  ", info.describe()))
            results = []
            for task, info, log in zip(sweep, infos, sweep.logs(), strict=True):
                line = next((ln for ln in log.splitlines() if ln.startswith("RESULT ")), None)
                if info.state.value != "COMPLETED" or line is None:
                    print(f"task {task.id} failed ({info.describe()}):\n{log}", file=sys.stderr)
                    return 1
                results.append(json.loads(line[len("RESULT ") :]))
            if not args.keep and sweep.run_dir:
                cluster.remove_run_dir(sweep.run_dir)
    except HpclaunchError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return 1

    print(f"\n{'task':>4}  {'lr':>10}  {'loss':>12}")
    for result in results:
        print(f"{result['task']:>4}  {result['lr']:>10g}  {result['loss']:>12.4g}")
    best = min(results, key=lambda r: r["loss"])
    print(f"best lr: {best['lr']:g} (loss {best['loss']:.3g}); {len(results)} tasks in "
          f"{time.monotonic() - started:.1f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
