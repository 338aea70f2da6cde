"""The examples run without a cluster (the `local` profile) and type-check against the public API."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_sweep_example_on_the_local_profile(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[clusters.laptop]\nscheduler = "local"\nworkdir = "{tmp_path / "work"}"\n')
    config.chmod(0o600)
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data"), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "examples/sweep_array.py", "--config", str(config), "--profile", "laptop"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "best lr: 0.45" in result.stdout
    assert not any((tmp_path / "work").iterdir())  # the run directory was removed


def test_examples_and_bench_type_check() -> None:
    pytest.importorskip("mypy")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "examples", "bench/submit_many.py"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
