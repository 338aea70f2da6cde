"""Rendering: golden scripts, hostile values render inert, strict undefined, user template dirs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from hpclaunch.cluster import Cluster
from hpclaunch.config import Profile
from hpclaunch.errors import ParameterError, TemplateError
from hpclaunch.render import Renderer, sbatch_quote, shell_quote

GOLDEN = Path(__file__).parent.parent / "data" / "golden"
RUN_DIR = "/home/alice/hpclaunch/run-1"


def cluster(**job: object) -> Cluster:
    return Cluster(Profile(name="test", job={}), **job)


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed; rerun with UPDATE_GOLDEN=1 if intended"


def test_golden_minimal_run() -> None:
    text = cluster().render("run", command=["python", "train.py", "--epochs", "3"], run_dir=RUN_DIR)
    check_golden("run_minimal.sbatch", text)


def test_golden_full_header() -> None:
    text = cluster().render(
        "run",
        command=["srun", "python", "-c", "print('hi there')"],
        run_dir=RUN_DIR,
        job_name="my job",
        partition="gpu",
        account="proj-42",
        qos="normal",
        time="1-12",
        nodes=2,
        ntasks_per_node=4,
        cpus_per_task=8,
        mem="64G",
        gpus=4,
        gpu_type="a100",
        constraint="a100|h100",
        error="/scratch/err-%j.txt",
        sbatch_options=["--exclusive", "--mail-type=END"],
        modules=["cuda/12.4", "gcc"],
        conda_env="torch env",
        venv="/opt/venvs/torch",
        setup=["export OMP_NUM_THREADS=1"],
    )
    check_golden("run_full.sbatch", text)


HOSTILE = [
    "$(touch CANARY)",
    "`touch CANARY`",
    "x; touch CANARY",
    "a'b\"c",
    "it's $HOME && touch CANARY",
    "\\ # comment",
    "a | touch CANARY",
]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_render_inert(value: str, tmp_path: Path) -> None:
    text = cluster().render("run", command=["echo", value], run_dir=str(tmp_path), job_name=value)
    script = tmp_path / "job.sh"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    env = {**os.environ, "SLURM_JOB_ID": "1"}
    result = subprocess.run(["bash", str(script)], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert value in result.stdout  # the value arrived as one literal argument
    assert not (tmp_path / "CANARY").exists()


@pytest.mark.parametrize("value", ["a\nb", "a\rb", "a\x00b"])
def test_newline_is_refused(value: str) -> None:
    with pytest.raises(ParameterError, match="control character"):
        cluster().render("run", command=["echo", value], run_dir=RUN_DIR)
    with pytest.raises(ParameterError, match="control character"):
        cluster().render("run", command=["true"], run_dir=RUN_DIR, job_name=value)


def test_sbatch_quote() -> None:
    assert sbatch_quote("--time=01:00:00") == "--time=01:00:00"
    assert sbatch_quote('--job-name=a "b"') == '"--job-name=a \\"b\\""'
    assert shell_quote("a b") == "'a b'"


def test_unknown_template_lists_available() -> None:
    with pytest.raises(TemplateError) as info:
        cluster().render("nope", run_dir=RUN_DIR)
    assert "unknown template 'nope'" in info.value.one_line() and "run" in info.value.one_line()


def test_template_name_cannot_escape_directory() -> None:
    with pytest.raises(TemplateError, match="bare name"):
        Renderer().source_of("../etc/passwd")


def test_user_template_dir_overrides_and_adds(tmp_path: Path) -> None:
    (tmp_path / "hello.sbatch.j2").write_text(
        '{% extends "_base.sbatch.j2" %}{% block body %}echo {{ vars.greeting | q }}\n{% endblock %}'
    )
    (tmp_path / "run.sbatch.j2").write_text("#!/bin/bash\necho overridden\n{{ command | shell_join }}\n")
    c = Cluster(Profile(name="t", template_dir=str(tmp_path)))
    assert "echo 'hello world'" in c.render("hello", run_dir=RUN_DIR, variables={"greeting": "hello world"})
    assert c.render("run", command=["x"], run_dir=RUN_DIR) == "#!/bin/bash\necho overridden\nx\n"
    (tmp_path / "run.sbatch.j2").write_text("#!/bin/bash\necho overridden\n")
    with pytest.raises(ParameterError, match="the 'run' template takes no command"):
        Cluster(Profile(name="t", template_dir=str(tmp_path))).render("run", command=["x"], run_dir=RUN_DIR)
    assert "hello" in c.renderer.names()


def test_undefined_variable_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "needs.sbatch.j2").write_text("echo {{ vars.dataset | q }}\n")
    c = Cluster(Profile(name="t", template_dir=str(tmp_path)))
    with pytest.raises(TemplateError, match="undefined variable"):
        c.render("needs", run_dir=RUN_DIR)


def test_missing_template_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="does not exist"):
        Renderer(tmp_path / "missing")


# --- the setup block, run for real by bash (a stand-in `module` / `conda` where the real one is absent) ---


def run_setup(tmp_path: Path, *, env: dict[str, str], **job: object) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "job.sbatch"
    script.write_text(cluster().render("run", command=["echo", "COMMAND-RAN"], run_dir=str(tmp_path), **job))
    base = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    return subprocess.run(
        ["bash", str(script)], cwd=tmp_path, env={**base, **env}, capture_output=True, text=True, timeout=30
    )


def stand_in(tmp_path: Path, body: str) -> dict[str, str]:
    """Functions defined before the script runs, as a login environment would have them (BASH_ENV)."""
    (tmp_path / "env.sh").write_text(body)
    return {"BASH_ENV": str(tmp_path / "env.sh")}


def test_a_module_that_fails_to_load_ends_the_job_with_its_message(tmp_path: Path) -> None:
    env = stand_in(
        tmp_path, 'module() { echo "Lmod has detected the following error: unknown: $2" >&2; return 1; }\n'
    )
    result = run_setup(tmp_path, env=env, modules=["nope/1.0"])
    assert result.returncode != 0
    assert "Lmod has detected the following error: unknown: nope/1.0" in result.stderr
    assert "COMMAND-RAN" not in result.stdout


def test_a_module_function_already_defined_is_used_as_it_is(tmp_path: Path) -> None:
    env = stand_in(tmp_path, 'module() { echo "module $*"; }\n')
    result = run_setup(tmp_path, env=env, modules=["cuda/12.4", "gcc"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == ["module load cuda/12.4", "module load gcc", "COMMAND-RAN"]


def test_conda_env_without_conda_is_one_line_error(tmp_path: Path) -> None:
    result = run_setup(tmp_path, env={}, conda_env="torch")
    assert result.returncode == 1
    assert "COMMAND-RAN" not in result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("hpclaunch: error: no conda found on ")
    assert lines[0].endswith("cannot activate torch")


def test_conda_env_runs_the_shell_hook_before_activate(tmp_path: Path) -> None:
    bin_dir = tmp_path / "conda" / "bin"
    bin_dir.mkdir(parents=True)
    fake = bin_dir / "conda"
    # What `conda shell.bash hook` prints, reduced: it defines the `conda` shell function.
    fake.write_text(
        "#!/bin/bash\n"
        '[ "$1 $2" = "shell.bash hook" ] || exit 3\n'
        'echo \'conda() { echo "conda $*"; export CONDA_DEFAULT_ENV="$2"; }\'\n'
    )
    fake.chmod(0o755)
    result = run_setup(tmp_path, env={"CONDA_EXE": str(fake)}, conda_env="torch env")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == ["conda activate torch env", "COMMAND-RAN"]
