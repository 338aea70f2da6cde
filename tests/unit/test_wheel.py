"""The wheel carries templates/ and jobs/: build it, install it into a fresh venv, render from it."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_ships_templates_and_jobs_and_renders(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
        text=True,
    )
    wheel = next(dist.glob("hpclaunch-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "hpclaunch/_data/templates/jupyter.sbatch.j2" in names
    assert "hpclaunch/_data/templates/_base.sbatch.j2" in names
    assert "hpclaunch/_data/jobs/mnist_lenet5.py" in names
    assert "hpclaunch/py.typed" in names

    fresh = tmp_path / "fresh"
    venv.create(fresh, with_pip=False)
    site = Path(
        subprocess.run(
            [
                str(fresh / "bin" / "python"),
                "-c",
                "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)  # what pip does for a pure-Python wheel
    # The dependencies (click, jinja2) come from this environment, after the wheel's own files.
    (site / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    result = subprocess.run(
        [
            str(fresh / "bin" / "python"),
            "-c",
            "import hpclaunch.render as r; print(r.__file__); print(r.data_dir('templates'))",
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    module_file, templates = result.stdout.split()
    assert module_file.startswith(str(site)) and templates.startswith(str(site))

    rendered = subprocess.run(
        [
            str(fresh / "bin" / "python"),
            "-m",
            "hpclaunch",
            "-p",
            "local",
            "render",
            "jupyter",
            "--run-dir",
            "/r",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    # The notebook template renders from the wheel too, with the notebook defaults.
    assert rendered.returncode == 0, rendered.stderr
    assert (
        "HPCLAUNCH_JUPYTER_READY" in rendered.stdout
        and "JUPYTER_TOKEN_FILE=/r/jupyter.token" in rendered.stdout
    )
    rendered = subprocess.run(
        [
            str(fresh / "bin" / "python"),
            "-m",
            "hpclaunch",
            "-p",
            "local",
            "render",
            "run",
            "--run-dir",
            "/r",
            "--",
            "echo",
            "from the wheel",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert rendered.returncode == 0, rendered.stderr
    assert rendered.stdout.startswith("#!/bin/bash") and "echo 'from the wheel'" in rendered.stdout
