"""Capture the golden files in this folder from the real dev cluster (``scripts/dev-cluster up``).

Run as root on the machine with the cluster: ``.venv/bin/python tests/data/slurm/capture.py``. It submits
jobs in every state we can produce, runs the exact argv hpclaunch runs (from hpclaunch.slurm.parse),
writes ``<name>.txt`` (stdout) and ``<name>.stderr.txt`` (stderr), a ``manifest.txt`` saying which
command made which file, and ``jobs.txt`` mapping each scenario to its job id. It cancels its jobs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from hpclaunch.slurm import parse

HERE = Path(__file__).resolve().parent
WORK = Path("/tmp/hpclaunch-capture")
ENV = {**os.environ, **parse.QUERY_ENV}
manifest: list[str] = []


def run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, env=ENV, cwd=WORK, check=False)


def save(name: str, argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = run(argv, stdin)
    (HERE / f"{name}.txt").write_text(proc.stdout)
    if proc.stderr:
        (HERE / f"{name}.stderr.txt").write_text(proc.stderr)
    manifest.append(f"{name}: rc={proc.returncode} argv={argv!r}")
    return proc


def sbatch(name: str, script: str, *args: str) -> str:
    proc = save(f"sbatch_{name}", ["sbatch", "--parsable", *args], stdin=script)
    job_id, _ = parse.parse_sbatch(proc.stdout)
    return job_id


def main() -> None:
    WORK.mkdir(exist_ok=True)
    os.chmod(WORK, 0o777)  # noqa: S103 - jobs of any user write here
    for old in HERE.glob("*.txt"):
        old.unlink()
    header = "#!/bin/bash\n"
    jobs: dict[str, str] = {}
    jobs["completed"] = sbatch("completed", header + "echo hello from $SLURM_JOB_ID\n", "-J", "cap completed")
    jobs["failed"] = sbatch("failed", header + "echo about to fail\nexit 3\n", "-J", "cap-failed")
    jobs["signaled"] = sbatch("signaled", header + "kill -9 $$\n", "-J", "cap-signaled")
    jobs["running"] = sbatch("running", header + "sleep 600\n", "-J", "cap-running", "-t", "30")
    jobs["cancelled"] = sbatch("cancelled", header + "sleep 600\n", "-J", "cap-cancelled")
    jobs["held"] = sbatch("held", header + "true\n", "-J", "cap-held", "--hold")
    jobs["begin"] = sbatch("begin", header + "true\n", "-J", "cap-begin", "--begin=now+1hour")
    jobs["dependency"] = sbatch(
        "dependency", header + "true\n", "-J", "cap-dep", f"--dependency=afterok:{jobs['running']}"
    )
    jobs["array"] = sbatch(
        "array", header + "echo task $SLURM_ARRAY_TASK_ID\n", "-J", "cap-array", "--array=1-3"
    )
    jobs["array_throttled"] = sbatch(
        "array_throttled", header + "sleep 600\n", "-J", "cap-array-thr", "--array=5-9%1"
    )
    jobs["two_node"] = sbatch(
        "two_node", header + "srun hostname\n", "-J", "cap-2node", "-N", "2", "--ntasks-per-node=1"
    )
    jobs["gres"] = sbatch(
        "gres", header + "echo CUDA=$CUDA_VISIBLE_DEVICES\n", "-J", "cap-gres", "--gres=gpu:1"
    )
    jobs["pipe_name"] = sbatch(
        "pipe_name",
        header + "true\n",
        "-J",
        "odd|#|name with spaces",
        "-o",
        str(WORK / "custom-%x-%j.out"),
    )
    jobs["timeout"] = sbatch("timeout", header + "sleep 600\n", "-J", "cap-timeout", "-t", "1")
    time.sleep(4)  # the scheduler's next pass (0-3 s here) starts what can start
    save("scancel_running", ["scancel", jobs["cancelled"]])
    time.sleep(2)
    jobs["resources"] = sbatch(
        "resources", header + "true\n", "-J", "cap-resources", "-N", "2", "--exclusive"
    )
    time.sleep(2)

    ids = list(jobs.values())
    (HERE / "jobs.txt").write_text("".join(f"{k}={v}\n" for k, v in jobs.items()))
    save("squeue_all", parse.squeue_argv(ids))
    save("squeue_me", parse.squeue_argv())
    save("squeue_one_unknown_among_known", parse.squeue_argv([jobs["completed"], "999999"]))
    save("squeue_single_unknown", parse.squeue_argv(["999999"]))
    for kind, job_id in jobs.items():
        save(f"scontrol_{kind}", parse.scontrol_argv(job_id))
    save("scontrol_all", parse.scontrol_argv())
    save("scontrol_unknown", parse.scontrol_argv("999999"))
    save("sacct", parse.sacct_argv(ids))
    save("scancel_finished", ["scancel", jobs["completed"]])
    save("scancel_unknown", ["scancel", "999999"])
    save("sbatch_invalid_partition", ["sbatch", "--parsable", "-p", "nope"], stdin=header + "true\n")
    save("sbatch_too_many_gpus", ["sbatch", "--parsable", "--gres=gpu:5"], stdin=header + "true\n")
    save("sbatch_no_shebang", ["sbatch", "--parsable"], stdin="true\n")

    # TIMEOUT needs the 1-minute limit to pass; slurmctld checks limits about every 30 s.
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        out = run(parse.squeue_argv([jobs["timeout"]])).stdout
        if "TIMEOUT" in out:
            break
        time.sleep(5)
    save("squeue_timeout", parse.squeue_argv([jobs["timeout"]]))
    save("scontrol_timeout", parse.scontrol_argv(jobs["timeout"]))
    save("squeue_final", parse.squeue_argv(ids))

    run(["scancel", *ids])
    (HERE / "manifest.txt").write_text(
        f"# captured {time.strftime('%Y-%m-%d')} from {run(['sbatch', '--version']).stdout.strip()}\n"
        + "\n".join(manifest)
        + "\n"
    )


if __name__ == "__main__":
    main()
