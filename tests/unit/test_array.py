"""Job arrays and the submitit executor: pure parts (parameter files, command lines, parameter mapping)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from hpclaunch.array import (
    array_spec,
    check_params_list,
    command_line,
    env_name,
    params_jsonl,
    params_script,
)
from hpclaunch.cluster import Cluster
from hpclaunch.config import Profile
from hpclaunch.errors import ConfigError, ParameterError
from hpclaunch.executor import slurm_parameters, time_minutes

HOSTILE = ["it's", "$(touch /tmp/pwned)", "`id`", "a b  c", "'; rm -rf ~; '", "*", "", '"quoted"', "\\"]


def run_task(tmp_path: Path, tasks: list[dict[str, object]], index: int, command: str) -> str:
    """Source params.sh as task ``index`` would, then run ``command`` in that shell."""
    env_file = tmp_path / "params.sh"
    env_file.write_text(params_script(tasks))
    script = f"source {env_file} || exit 2\n{command}\n"
    result = subprocess.run(
        ["bash", "-c", script],
        env={"SLURM_ARRAY_TASK_ID": str(index), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_each_task_exports_its_own_parameters(tmp_path: Path) -> None:
    tasks = check_params_list([{"lr": 0.1, "seed": 1, "tag": "a"}, {"lr": 1e-5, "seed": 2, "tag": "b"}])
    for index, task in enumerate(tasks):
        out = run_task(tmp_path, tasks, index, 'printf "%s|%s|%s\\n" "$HPCLAUNCH_PARAM_LR" '
                       '"$HPCLAUNCH_PARAM_SEED" "$HPCLAUNCH_TASK_PARAMS"')  # fmt: skip
        lr, seed, blob = out.rstrip("\n").split("|", 2)
        assert float(lr) == task["lr"] and int(seed) == task["seed"]
        assert json.loads(blob) == task


def test_hostile_values_arrive_verbatim(tmp_path: Path) -> None:
    canary = tmp_path / "pwned"
    tasks = check_params_list([{"v": value.replace("/tmp/pwned", str(canary))} for value in HOSTILE])
    for index, task in enumerate(tasks):
        out = run_task(tmp_path, tasks, index, 'printf "%s" "$HPCLAUNCH_PARAM_V"')
        assert out == task["v"]
    assert not canary.exists()


def test_unknown_task_index_fails_the_task(tmp_path: Path) -> None:
    env_file = tmp_path / "params.sh"
    env_file.write_text(params_script([{"a": 1}]))
    result = subprocess.run(
        ["bash", "-c", f"source {env_file}; echo after"],
        env={"SLURM_ARRAY_TASK_ID": "7"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and "after" not in result.stdout
    assert "no parameters for array task 7" in result.stderr


def test_jsonl_has_one_line_per_task() -> None:
    tasks = check_params_list([{"x": "two\tcols"}, {"x": 2}, {}])
    lines = params_jsonl(tasks).splitlines()
    assert [json.loads(line) for line in lines] == [{"x": "two\tcols"}, {"x": 2}, {}]


@pytest.mark.parametrize(
    ("params_list", "message"),
    [
        ([], "empty"),
        ("abc", "list of dicts"),
        ([{"lr": 1}, "x"], "task 1"),
        ([{"1lr": 1}], "not an identifier"),
        ([{"lr-x": 1}], "not an identifier"),
        ([{"lr": 1, "LR": 2}], "differ only in case"),
        ([{"lr": [1, 2]}], "expected text"),
        ([{"lr": None}], "expected text"),
        ([{"lr": float("nan")}], "cannot be written"),
        ([{"lr": "a\nb"}], "control character"),
    ],
)
def test_bad_parameters_are_refused(params_list: object, message: str) -> None:
    with pytest.raises(ParameterError, match=message):
        check_params_list(params_list)  # type: ignore[arg-type]


def test_command_placeholders_become_quoted_variable_references(tmp_path: Path) -> None:
    tasks = check_params_list([{"lr": 0.5, "name": "it's $HOME"}])
    line, used = command_line(
        ["printf", "%s\\n", "--lr={lr}", "{name}", "{other}", "{1..3}", "awk '{print $1}'", ""], tasks
    )
    assert used == {"lr", "name"}
    assert '"${HPCLAUNCH_PARAM_LR}"' in line and "'{other}'" in line
    out = run_task(tmp_path, tasks, 0, line)
    assert out.splitlines() == ["--lr=0.5", "it's $HOME", "{other}", "{1..3}", "awk '{print $1}'", ""]


def test_placeholder_missing_from_a_task_is_refused() -> None:
    with pytest.raises(ParameterError, match="task 1 has no parameter 'lr'"):
        command_line(["echo", "{lr}"], [{"lr": 1}, {"seed": 2}])


def test_array_spec() -> None:
    assert array_spec(20, None) == "0-19"
    assert array_spec(1, 4) == "0-0%4"
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ParameterError):
            array_spec(3, bad)  # type: ignore[arg-type]


def test_env_name() -> None:
    assert env_name("learning_rate") == "HPCLAUNCH_PARAM_LEARNING_RATE"


def test_render_of_an_array_script_reads_the_task_parameters() -> None:
    cluster = Cluster(Profile(name="test", job={}))
    run_dir = "/home/alice/hpclaunch/sweep"
    context = {
        "array": {
            "count": 3,
            "params_file": f"{run_dir}/params.jsonl",
            "env_file": f"{run_dir}/params.sh",
            "command_line": 'python train.py --lr "${HPCLAUNCH_PARAM_LR}"',
        }
    }
    script = cluster.prepare(
        "run",
        cluster.resolve_job({}, default_name="hpclaunch-run"),
        run_dir=run_dir,
        command=["python"],
        context=context,
        output_name="slurm-%A_%a.out",
        more_directives=["--array=0-2%2"],
    ).script
    header = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --array=0-2%2" in header
    assert f"#SBATCH --output={run_dir}/slurm-%A_%a.out" in header
    body = script.split("#SBATCH --chdir", 1)[1]
    assert body.index("source /home/alice/hpclaunch/sweep/params.sh") < body.index("set -e")
    assert script.rstrip().endswith('python train.py --lr "${HPCLAUNCH_PARAM_LR}"')


# --- the submitit executor ---------------------------------------------------------------------------


def test_time_in_minutes_rounds_up() -> None:
    assert time_minutes("01:00:00") == 60
    assert time_minutes("00:00:30") == 1
    assert time_minutes("1-00:01:01") == 1442
    assert time_minutes("UNLIMITED") is None


def test_slurm_parameters_map_the_profile() -> None:
    cluster = Cluster(
        Profile(
            name="t", job={"partition": "gpu", "account": "proj", "setup": ("source ~/env/bin/activate",)}
        )
    )
    job = cluster.resolve_job(
        {
            "time": "2h",
            "gpus": 2,
            "gpu_type": "a100",
            "mem": "16G",
            "cpus_per_task": 4,
            "nodes": 2,
            "ntasks_per_node": 2,
            "modules": ["cuda/12.4"],
            "sbatch_options": ["--exclusive", "--mail-type=END"],
        },
        default_name="hpclaunch-submitit",
    )
    assert slurm_parameters(job) == {
        "job_name": "hpclaunch-submitit",
        "partition": "gpu",
        "account": "proj",
        "time": 120,
        "nodes": 2,
        "ntasks_per_node": 2,
        "cpus_per_task": 4,
        "mem": "16G",
        "gres": "gpu:a100:2",
        "setup": ["module load cuda/12.4", "source ~/env/bin/activate"],
        "additional_parameters": {"exclusive": True, "mail_type": "END"},
    }


def test_slurm_parameters_are_accepted_by_submitit(tmp_path: Path) -> None:
    submitit = pytest.importorskip("submitit")
    from submitit.slurm.slurm import _make_sbatch_string

    cluster = Cluster(Profile(name="t", job={"partition": "debug"}))
    job = cluster.resolve_job({"time": "UNLIMITED", "gpus": 1}, default_name="x")
    text = _make_sbatch_string(command="true", folder=tmp_path, **slurm_parameters(job))
    assert "#SBATCH --time=UNLIMITED" in text and "#SBATCH --gres=gpu:1" in text
    assert submitit.__version__


def test_executor_over_ssh_says_why_not() -> None:
    cluster = Cluster(Profile(name="remote", host="login.example.org"))
    with pytest.raises(ConfigError) as info:
        cluster.executor(time="5m")
    assert "submitit runs sbatch on this machine" in info.value.message
    assert info.value.hint and "cluster.submit" in info.value.hint
    assert cluster._transport is None  # refused before connecting


def test_executor_refuses_output_paths(tmp_path: Path) -> None:
    cluster = Cluster(Profile(name="here", workdir=str(tmp_path)))
    with pytest.raises(ParameterError, match="chosen by submitit"):
        cluster.executor(output="x.out")
