"""Job parameters: validation, normalisation, unknown names, control characters."""

from __future__ import annotations

import pytest

from hpclaunch.errors import ParameterError
from hpclaunch.params import JOB_PARAMS, parse_time, resolve, sbatch_directives, validate_params


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("30", "00:30:00"),
        ("90:30", "00:90:30".replace("00:90:30", "01:30:30")),
        ("2:00:00", "02:00:00"),
        ("1-12", "1-12:00:00"),
        ("1-12:30", "1-12:30:00"),
        ("2-00:00:01", "2-00:00:01"),
        ("90m", "01:30:00"),
        ("2h", "02:00:00"),
        ("1d", "1-00:00:00"),
        ("2h30m", "02:30:00"),
        ("1d12h", "1-12:00:00"),
        ("1h 30m 10s", "01:30:10"),
        ("2H30M", "02:30:00"),
        ("unlimited", "UNLIMITED"),
    ],
)
def test_time_formats_normalise(raw: str, expected: str) -> None:
    assert validate_params({"time": raw})["time"] == expected


@pytest.mark.parametrize("raw", ["25 hours", "lots", "1:2:3:4", "-5", "0", "1.5h", "", "30m2h", "h", "2h2h"])
def test_bad_times_are_refused(raw: str) -> None:
    with pytest.raises(ParameterError, match="time"):
        validate_params({"time": raw})


@pytest.mark.parametrize(
    ("raw", "expected"), [("16G", "16G"), ("16g", "16G"), ("4000", "4000M"), ("2TB", "2T")]
)
def test_memory_normalises(raw: str, expected: str) -> None:
    assert validate_params({"mem": raw})["mem"] == expected


@pytest.mark.parametrize("raw", ["lots", "16 GB extra", "-1G", "1.5G", "G"])
def test_bad_memory_is_refused(raw: str) -> None:
    with pytest.raises(ParameterError, match="not an amount of memory"):
        validate_params({"mem": raw})


@pytest.mark.parametrize(
    ("key", "raw"), [("gpus", -1), ("gpus", "-1"), ("nodes", 0), ("cpus_per_task", "x"), ("gpus", True)]
)
def test_bad_counts_are_refused(key: str, raw: object) -> None:
    with pytest.raises(ParameterError, match=key):
        validate_params({key: raw})


def test_unknown_parameter_lists_valid_ones() -> None:
    with pytest.raises(ParameterError) as info:
        validate_params({"gpu": 2})
    assert "unknown job parameter 'gpu'" in info.value.message
    assert info.value.hint is not None and "gpus" in info.value.hint and "partition" in info.value.hint


@pytest.mark.parametrize(
    "param",
    [p.name for p in JOB_PARAMS if p.name not in ("nodes", "ntasks_per_node", "cpus_per_task", "gpus")],
)
@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\x00b"])
def test_control_characters_refused_everywhere(param: str, bad: str) -> None:
    value: object = [bad] if next(p for p in JOB_PARAMS if p.name == param).multiple else bad
    with pytest.raises(ParameterError):
        validate_params({param: value})


def test_partition_refuses_shell_syntax() -> None:
    with pytest.raises(ParameterError, match="not a valid Slurm name"):
        validate_params({"partition": "gpu; rm -rf ~"})


def test_resolve_layers_highest_first() -> None:
    flags = validate_params({"gpus": 2})
    profile = validate_params({"gpus": 1, "partition": "gpu"})
    job = resolve(flags, profile)
    assert job["gpus"] == 2 and job["partition"] == "gpu" and job["time"] == "01:00:00"


def test_parse_time_seconds() -> None:
    assert parse_time("1-00:00:00") == 86400
    assert parse_time("10") == 600


def test_directives_gres_with_type() -> None:
    job = resolve(validate_params({"gpus": 2, "gpu_type": "a100", "job_name": "x"}))
    out = sbatch_directives(job, output="/r/slurm-%j.out", chdir="/r")
    assert "--gres=gpu:a100:2" in out
    assert "--output=/r/slurm-%j.out" in out and "--chdir=/r" in out


def test_directives_leave_out_absent_keys() -> None:
    assert sbatch_directives({"partition": "debug"}) == ["--partition=debug"]
