"""The layers contract in pyproject.toml holds, and it would catch an import against the layering."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=tree, env=env, capture_output=True, text=True, timeout=120
    )


def _copy(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "hpclaunch", tree / "hpclaunch", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def test_the_tree_keeps_its_layers(tmp_path: Path) -> None:
    result = _lint(_copy(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_an_import_circle_breaks_the_contract(tmp_path: Path) -> None:
    tree = _copy(tmp_path)
    job = tree / "hpclaunch" / "job.py"
    # Job reaching up into the façade: the circle the first landing had.
    upward = "\n\ndef _up() -> object:\n    from .cluster import Cluster\n\n    return Cluster\n"
    job.write_text(job.read_text() + upward)
    result = _lint(tree)
    assert result.returncode != 0
    assert "hpclaunch.job -> hpclaunch.cluster" in result.stdout


def test_the_version_is_written_once() -> None:
    import importlib.metadata

    import tomllib

    import hpclaunch

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert hpclaunch.__version__ == importlib.metadata.version("hpclaunch") == declared
    assert declared not in (ROOT / "hpclaunch" / "__init__.py").read_text()
