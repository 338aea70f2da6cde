"""The concurrency load script (bench/concurrent_load.py) at a small size: no collisions, all reachable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]


def test_concurrent_notebooks_and_training_jobs() -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "concurrent_load.py"),
            "--sessions",
            "6",
            "--train-jobs",
            "4",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["problems"] == []
    assert report["reachable"] == 6 and report["distinct_ports"] == 6
    assert report["nodes"] == ["node1", "node2"]
    assert report["train_completed"] == 4
