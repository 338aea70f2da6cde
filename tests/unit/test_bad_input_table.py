"""Every CLI option and argument, and every config key, with an invalid value: one clear line on stderr,
a non-zero exit code, no traceback, nothing submitted and no run directory made.

The options are read from the click commands themselves, so a new option (or config key) without a
row here fails :func:`test_every_option_has_a_row` (or :func:`test_every_config_key_has_a_row`).
Runs use the ``local`` scheduler in a temporary HOME; the schedulers' ``submit`` is replaced by one that
fails the test, so a value that slips through cannot start anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from hpclaunch.cli import cli, main
from hpclaunch.config import PROFILE_KEYS
from hpclaunch.params import JOB_PARAMS

# --- the table ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    command: str  # "" for the global options, "config show" for a subcommand of a group
    param: str  # the option's longest name, or an argument's metavar
    argv: tuple[str, ...]  # "{tmp}" is replaced by the test's temporary directory
    fragment: str

    @property
    def id(self) -> str:
        return f"{self.command or 'hpclaunch'}:{self.param}"


#: One bad value per job parameter; used for every command that takes job options.
JOB_PARAM_BAD: dict[str, tuple[str, str]] = {
    "job_name": ("x\ny", "control character"),
    "partition": ("a b", "not a valid Slurm name"),
    "account": ("acct;rm", "not a valid Slurm name"),
    "qos": ("$(id)", "not a valid Slurm name"),
    "time": ("soon", "not a time limit"),
    "nodes": ("0", "must be at least 1"),
    "ntasks_per_node": ("many", "expected a whole number"),
    "cpus_per_task": ("-2", "must be at least 1"),
    "mem": ("lots", "not an amount of memory"),
    "gpus": ("two", "expected a whole number"),
    "gpu_type": ("a100 x", "not a valid Slurm name"),
    "constraint": ("a;b", "not a valid Slurm constraint"),
    "output": ("out\r.txt", "control character"),
    "error": ("", "the path is empty"),
    "sbatch_options": ("exclusive", "is not an sbatch option"),
    "modules": ("cuda 12", "not an environment module name"),
    "conda_env": ("env\x1b[0m", "control character"),
    "venv": ("\udcff", "not valid UTF-8"),
    "setup": ("echo\nrm", "control character"),
}

#: How each command is called around the bad option: (before, after).
BASE: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "": ((), ("submit", "run", "--", "true")),
    "render": (("render", "run"), ("--", "true")),
    "submit": (("submit", "run"), ("--", "true")),
    "check": (("check", "run"), ("--", "true")),
    "jupyter": (("jupyter",), ()),
    "train": (("train", "mnist_lenet5"), ()),
    "attach": (("attach", "1"), ()),
    "logs": (("logs", "1"), ()),
    "status": (("status",), ()),
    "sessions": (("sessions",), ()),
    "config show": (("config", "show"), ()),
    "config path": (("config", "path"), ()),
    "clean": (("clean",), ()),
    "forward": (("forward", "1", "8080"), ()),
    "ssh-config": (("ssh-config", "1"), ()),
    "code": (("code",), ()),
}

NO_VALUE = "does not take a value"

#: (command, option) -> (bad value or None for `--flag=x`, expected fragment)
OPTION_BAD: dict[tuple[str, str], tuple[str | None, str]] = {
    ("", "--profile"): ("nope", "unknown profile 'nope'"),
    ("", "--config"): ("{tmp}/missing.toml", "does not exist"),
    ("", "--host"): ("login", "remove 'host'"),  # the local scheduler runs here
    ("", "--user"): ("a b", "must be one word"),
    ("", "--port"): ("ssh", "is not a valid integer"),
    ("", "--template-dir"): ("{tmp}/no-templates", "does not exist"),
    ("", "--accept-new-host-key"): (None, NO_VALUE),
    ("", "--transport"): ("telnet", "is not one of"),
    ("", "--debug"): (None, NO_VALUE),
    ("render", "--set"): ("novalue", "expected KEY=VALUE"),
    ("render", "--run-dir"): ("run\ndir", "control character"),
    ("submit", "--set"): ("1x=2", "expected KEY=VALUE"),
    ("submit", "--follow"): (None, NO_VALUE),
    ("submit", "--wait"): (None, NO_VALUE),
    ("submit", "--keep"): (None, NO_VALUE),
    ("submit", "--preflight"): (None, NO_VALUE),
    ("check", "--set"): ("=2", "expected KEY=VALUE"),
    ("jupyter", "--preflight"): (None, NO_VALUE),
    ("train", "--preflight"): (None, NO_VALUE),
    ("jupyter", "--app"): ("vscode", "is not one of"),
    ("jupyter", "--tunnel"): ("carrier-pigeon", "is not one of"),
    ("jupyter", "--local-port"): ("70000", "not in the range"),
    ("jupyter", "--server-timeout"): ("0", "not in the range"),
    ("jupyter", "--open"): (None, NO_VALUE),
    ("jupyter", "--idle-timeout"): ("-1", "not in the range"),
    ("jupyter", "--queue-timeout"): ("soon", "is not a valid float"),
    ("jupyter", "--keep"): (None, NO_VALUE),
    ("jupyter", "--forward"): ("70000", "port 70000 is out of range"),
    ("attach", "--app"): ("vscode", "is not one of"),
    ("attach", "--tunnel"): ("both", "is not one of"),
    ("attach", "--local-port"): ("-1", "not in the range"),
    ("attach", "--server-timeout"): ("never", "is not a valid float"),
    ("attach", "--open"): (None, NO_VALUE),
    ("train", "--python"): ("python\n3", "control character"),
    ("train", "--max-requeues"): ("-1", "not in the range"),
    ("train", "--signal-lead"): ("5", "not in the range"),
    ("train", "--follow"): (None, NO_VALUE),
    ("train", "--keep"): (None, NO_VALUE),
    ("logs", "--follow"): (None, NO_VALUE),
    ("status", "--json"): (None, NO_VALUE),
    ("status", "--all"): (None, NO_VALUE),
    ("sessions", "--json"): (None, NO_VALUE),
    ("config show", "--json"): (None, NO_VALUE),
    ("config path", "--site"): (None, NO_VALUE),
    ("clean", "--older-than"): ("a week", "is not an age"),
    ("clean", "--dry-run"): (None, NO_VALUE),
    ("clean", "--results"): (None, NO_VALUE),
    ("forward", "--wait"): ("-1", "not in the range"),
    ("ssh-config", "--remove"): (None, NO_VALUE),
    ("ssh-config", "--access"): ("telnet", "is not one of"),
    ("ssh-config", "--yes"): (None, NO_VALUE),
    ("code", "--path"): ("a\nb", "control character"),
    ("code", "--open"): (None, NO_VALUE),
    ("code", "--access"): ("rsh", "is not one of"),
    ("code", "--yes"): (None, NO_VALUE),
    ("code", "--preflight"): (None, NO_VALUE),
    ("code", "--idle-timeout"): ("-5", "not in the range"),
    ("code", "--keep"): (None, NO_VALUE),
}

#: (command, argument) -> (full argv, expected fragment)
ARGUMENT_BAD: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {
    ("render", "TEMPLATE"): (("render", "nope", "--", "true"), "unknown template 'nope'"),
    ("render", "COMMAND"): (("render", "run", "--", "echo", "a\nb"), "control character"),
    ("submit", "TEMPLATE_OR_SCRIPT"): (("submit", "./missing.sh"), "does not exist"),
    ("submit", "COMMAND"): (("submit", "run", "--", "echo", "a\x00b"), "control character"),
    ("check", "TEMPLATE_OR_SCRIPT"): (("check", "nope"), "unknown template 'nope'"),
    ("check", "COMMAND"): (("check", "run", "--", "echo", "a\nb"), "control character"),
    ("train", "JOB"): (("train", "nope"), "unknown training job 'nope'"),
    ("train", "SCRIPT_ARGS"): (("train", "mnist_lenet5", "--", "--epochs", "1\n2"), "control character"),
    ("attach", "JOB_ID"): (("attach", "12;rm"), "is not a job id"),
    ("cancel", "JOB_IDS"): (("cancel", "$(id)"), "is not a job id"),
    ("stop", "JOB_IDS"): (("stop", "x"), "is not a job id"),
    ("status", "JOB_IDS"): (("status", "1", "abc"), "not a local job id"),
    ("logs", "JOB_ID"): (("logs", "1 2"), "is not a job id"),
    ("fetch", "JOB_ID"): (("fetch", "abc"), "is not a job id"),
    ("fetch", "DEST"): (("fetch", "1", "{tmp}/afile"), "is a file"),
    ("forward", "JOB_ID"): (("forward", "1;2", "8080"), "is not a job id"),
    ("forward", "PORTS"): (("forward", "1", "70000"), "port 70000 is out of range"),
    ("shell", "JOB_ID"): (("shell", "x"), "is not a job id"),
    ("ssh-config", "JOB_ID"): (("ssh-config", "1;rm"), "is not a job id"),
    ("proxy", "JOB_ID"): (("proxy", "../1"), "is not a job id"),
    ("shell", "COMMAND"): (("shell", "1", "--", "echo", "a\x00b"), "contains a NUL byte"),
}

#: Options that take no value to be wrong about.
EXEMPT = {("", "--version")}

JOB_FLAGS = {p.flag: p.name for p in JOB_PARAMS}


def cli_params() -> Iterator[tuple[str, str]]:
    """(command path, option or argument) of every parameter of every command."""

    def walk(command: click.Command, path: str) -> Iterator[tuple[str, str]]:
        for param in command.params:
            if isinstance(param, click.Option):
                yield path, max(param.opts, key=len)
            else:
                yield path, (param.name or "").upper()
        if isinstance(command, click.Group):
            ctx = click.Context(command)
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                assert sub is not None
                yield from walk(sub, f"{path} {name}".strip())

    yield from walk(cli, "")


def build_rows() -> list[Row]:
    rows = []
    for command, param in cli_params():
        if (command, param) in EXEMPT:
            continue
        if param in JOB_FLAGS:
            value, fragment = JOB_PARAM_BAD[JOB_FLAGS[param]]
            before, after = BASE[command]
            rows.append(Row(command, param, (*before, param, value, *after), fragment))
        elif (command, param) in OPTION_BAD:
            bad, fragment = OPTION_BAD[(command, param)]
            before, after = BASE[command]
            given = (f"{param}=x",) if bad is None else (param, bad)
            rows.append(Row(command, param, (*before, *given, *after), fragment))
        elif (command, param) in ARGUMENT_BAD:
            argv, fragment = ARGUMENT_BAD[(command, param)]
            rows.append(Row(command, param, argv, fragment))
    return rows


ROWS = build_rows()


def test_every_option_has_a_row() -> None:
    found = set(cli_params()) - EXEMPT
    covered = {(r.command, r.param) for r in ROWS}
    assert found - covered == set(), "add a bad value for these to tests/unit/test_bad_input_table.py"
    assert len(JOB_PARAM_BAD) == len(JOB_PARAMS)
    stale = (set(OPTION_BAD) | set(ARGUMENT_BAD)) - found
    assert not stale, f"rows for options that no longer exist: {stale}"


# --- running one row --------------------------------------------------------------------------------


@dataclass
class Home:
    tmp: Path
    config: Path

    def check_nothing_made(self) -> None:
        runs = self.tmp / "runs"
        assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())
        jobs = self.tmp / "data" / "hpclaunch" / "local-jobs"
        assert not jobs.exists() or not [p for p in jobs.iterdir() if p.name.isdigit()]
        assert not any((self.tmp / "cwd").iterdir()), list((self.tmp / "cwd").iterdir())


def write_profile(path: Path, tmp: Path, **overrides: str) -> None:
    body = {"scheduler": '"local"', "workdir": f'"{tmp / "runs"}"', **overrides}
    path.write_text('default = "here"\n[clusters.here]\n' + "".join(f"{k} = {v}\n" for k, v in body.items()))
    path.chmod(0o600)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Home:
    for key in list(os.environ):
        if key.startswith("HPCLAUNCH_"):
            monkeypatch.delenv(key)
    config = tmp_path / "config.toml"
    write_profile(config, tmp_path)
    (tmp_path / "cwd").mkdir()
    (tmp_path / "afile").write_text("x")
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("HPCLAUNCH_CONFIG", str(config))

    def refuse(*_args: object, **_kwargs: object) -> str:
        raise AssertionError("a job was submitted")

    monkeypatch.setattr("hpclaunch.localsched.LocalScheduler.submit", refuse)
    monkeypatch.setattr("hpclaunch.slurm.client.SlurmClient.submit", refuse)
    return Home(tmp_path, config)


def run_main(argv: tuple[str, ...], tmp: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    args = [a.replace("{tmp}", str(tmp)) for a in argv]
    with pytest.raises(SystemExit) as exited:
        main(args)
    code = exited.value.code
    return (code if isinstance(code, int) else 1), capsys.readouterr().err


def check_one_line(code: int, err: str, fragment: str) -> None:
    assert code != 0, err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    assert lines[0].startswith("hpclaunch"), err
    assert ": error: " in lines[0], err
    assert fragment in lines[0], (fragment, err)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_option(row: Row, home: Home, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_main(row.argv, home.tmp, capsys)
    check_one_line(code, err, row.fragment)
    home.check_nothing_made()


# --- config keys ---------------------------------------------------------------------------------

#: key -> (TOML value, expected fragment)
CONFIG_BAD: dict[str, tuple[str, str]] = {
    "host": ('"login.example.org"', "remove 'host'"),
    "user": ('"a b"', "must be one word"),
    "port": ('"22"', "port must be a int"),
    "identity_file": ("5", "identity_file must be a str"),
    "ssh_config": ('""', "ssh_config is empty"),
    "accept_new_host_key": ('"yes"', "accept_new_host_key must be a bool"),
    "login_shell": ('"no"', "login_shell must be a bool"),
    "scheduler": ('"pbs"', "scheduler must be one of"),
    "workdir": ('"runs\\nhere"', "control character"),
    "template_dir": ('"/nonexistent-hpclaunch-templates"', "does not exist"),
    "tunnel": ('"magic"', "tunnel must be one of"),
    "transport": ('"telnet"', "transport must be one of auto, openssh, paramiko"),
    "session_idle": ("-5", "session_idle must be seconds >= 0"),
    "node_ssh_port": ("0", "node_ssh_port must be between 1 and 65535"),
    "node_access": ('"telnet"', "node_access must be one of"),
    "poll_min": ("0", "0 < poll_min <= poll_max"),
    "poll_max": ('"fast"', "poll_max must be a number"),
    "job_name": ('""', "the job name is empty"),
    "partition": ('"gpu a100"', "not a valid Slurm name"),
    "account": ('"a/b"', "not a valid Slurm name"),
    "qos": ("[1]", "expected text"),
    "time": ('"forever"', "not a time limit"),
    "nodes": ("0", "must be at least 1"),
    "ntasks_per_node": ('"x"', "expected a whole number"),
    "cpus_per_task": ("true", "expected a whole number"),
    "mem": ('"1Q"', "not an amount of memory"),
    "gpus": ("-1", "must be at least 0"),
    "gpu_type": ('"a b"', "not a valid Slurm name"),
    "constraint": ('"a;b"', "not a valid Slurm constraint"),
    "output": ('""', "the path is empty"),
    "error": ('["x"]', "expected text"),
    "sbatch_options": ('["exclusive"]', "is not an sbatch option"),
    "modules": ('["cuda 12"]', "not an environment module name"),
    "conda_env": ('"a\\u0000b"', "control character"),
    "venv": ("{ a = 1 }", "expected text"),
    "setup": ("5", "expected a list of text"),
}


def test_every_config_key_has_a_row() -> None:
    assert set(CONFIG_BAD) == set(PROFILE_KEYS)


@pytest.mark.parametrize("key", sorted(CONFIG_BAD))
def test_bad_config_key(key: str, home: Home, capsys: pytest.CaptureFixture[str]) -> None:
    value, fragment = CONFIG_BAD[key]
    write_profile(home.config, home.tmp, **{key: value})
    code, err = run_main(("submit", "run", "--", "true"), home.tmp, capsys)
    check_one_line(code, err, fragment)
    assert str(home.config) in err or key == "template_dir", err  # says which file
    home.check_nothing_made()


@pytest.mark.parametrize(
    ("toml", "fragment"),
    [
        ("[clusters.here]\nbogus = 1\n", "unknown key 'bogus'"),
        ("verbose = true\n", "unknown top-level key 'verbose'"),
        ("[clusters.here\n", "not valid TOML"),
        ('default = "elsewhere"\n[clusters.here]\n', "default profile 'elsewhere' is not defined"),
        ("clusters = 3\n", "must be a table"),
    ],
)
def test_bad_config_file(toml: str, fragment: str, home: Home, capsys: pytest.CaptureFixture[str]) -> None:
    home.config.write_text(toml)
    code, err = run_main(("submit", "run", "--", "true"), home.tmp, capsys)
    check_one_line(code, err, fragment)
    home.check_nothing_made()


# --- the same through a real process --------------------------------------------------------------


@pytest.mark.parametrize(
    "row",
    [r for r in ROWS if r.id in {"hpclaunch:--port", "train:--gpus", "jupyter:--time", "render:COMMAND"}],
    ids=lambda r: r.id,
)
def test_bad_option_in_a_real_process(row: Row, home: Home) -> None:
    """No test harness in between: the installed entry point prints one line and exits non-zero."""
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    result = subprocess.run(
        [sys.executable, "-m", "hpclaunch", *(a.replace("{tmp}", str(home.tmp)) for a in row.argv)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    check_one_line(result.returncode, result.stderr, row.fragment)
    assert result.stdout == ""
    home.check_nothing_made()
