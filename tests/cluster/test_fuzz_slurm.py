"""Nasty values through the REAL sbatch: job names and command arguments arrive exactly as given.

The unit fuzz (tests/unit/test_fuzz_params.py) checks rendered scripts against a model of sbatch's
``#SBATCH`` tokenizer; here Slurm itself reads them. Jobs are submitted on this machine's Slurm
(local transport), run on node1/node2, and must: complete, show the job name exactly in
``scontrol show job`` and in hpclaunch's own view, hand every argument to the program verbatim,
and leave no canary file anywhere.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from hpclaunch.cluster import Cluster
from hpclaunch.config import Profile

pytestmark = pytest.mark.cluster

CANARY = f"hpl-canary-{uuid.uuid4().hex[:8]}"

NAMES = [
    f'a "b" $(touch {CANARY}) c',
    f"`touch {CANARY}` # not a comment",
    f"it's; touch {CANARY} | x & y",
    'back\\slash \\"q\\" \\\\ end\\',
    "é 日本 🚀 name",
    "#starts-with-hash",
    "tab\tinside",
    "%j %x ${HOME} ~ * ?",
    "--job-name=inner",
    "'single' and \"double\" mixed",
]
ARGS = [
    f"$(touch {CANARY})",
    f"`touch {CANARY}`",
    f"; touch {CANARY}",
    "#",
    "'",
    '"',
    "\\",
    "",
    " spaced  out ",
    "--flag=$HOME",
    "é🚀",
]
RECORD = "import json, sys; json.dump(sys.argv[1:], open('argv.json', 'w'))"


def scontrol_name(job_id: str) -> str:
    out = subprocess.run(
        ["scontrol", "show", "job", job_id], capture_output=True, check=True, timeout=30
    ).stdout.decode("utf-8")
    first = out.splitlines()[0]
    assert first.startswith(f"JobId={job_id} JobName="), first
    return first.split(" JobName=", 1)[1]


def scontrol_field(job_id: str, field: str) -> str:
    out = subprocess.run(
        ["scontrol", "show", "job", job_id], capture_output=True, check=True, timeout=30
    ).stdout.decode("utf-8")
    for line in out.splitlines():
        line = line.strip()
        if line.startswith(field + "="):
            return line[len(field) + 1 :]
    raise AssertionError(f"no {field}= in {out}")


def test_nasty_names_and_arguments_round_trip_through_sbatch(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    out_dir = tmp_path / f"out $(touch {CANARY}) 'q' #x"
    out_dir.mkdir()
    comment = f'$(touch {CANARY}) "q" #c'
    jobs = []
    with Cluster(Profile(name="root-slurm", workdir=str(work)), partition="debug", time="2") as cluster:
        for i, name in enumerate(NAMES):
            extra: dict[str, Any] = {}
            if i == 0:
                extra = {"output": str(out_dir / "job %j.out"), "sbatch_options": [f"--comment={comment}"]}
            args = [name, *ARGS]
            job = cluster.submit("run", command=["python3", "-c", RECORD, *args], job_name=name, **extra)
            jobs.append((job, name, args))
        finals = cluster.wait([j for j, _, _ in jobs], timeout=90)

        for job, name, args in jobs:
            assert finals[job.id].state.value == "COMPLETED", (name, finals[job.id])
            assert scontrol_name(job.id) == name
            assert finals[job.id].name == name  # hpclaunch's own parse of Slurm's answer
            assert job.run_dir is not None
            assert json.loads((Path(job.run_dir) / "argv.json").read_text()) == args
        first = jobs[0][0]
        assert scontrol_field(first.id, "Comment") == comment
        assert (out_dir / f"job {first.id}.out").is_file()

    places = [tmp_path, Path.cwd(), Path.home(), Path("/tmp")]
    found = [str(p / CANARY) for p in places if (p / CANARY).exists()]
    found += [str(p) for p in tmp_path.rglob(f"*{CANARY}") if p.name == CANARY]
    assert not found, f"canary files: {found}"
