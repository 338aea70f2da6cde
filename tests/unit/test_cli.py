"""The CLI as a user meets it: fast help, one-line errors, no tracebacks, nothing submitted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("paramiko", "jinja2", "torch", "submitit")


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "hpclaunch", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=60,
    )


def test_help_imports_no_heavy_module() -> None:
    code = (
        "import sys\n"
        "from hpclaunch.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("command", ["submit", "render", "jupyter", "status", "logs", "cancel"])
def test_subcommand_help_names_env_vars(command: str) -> None:
    result = run_cli(command, "--help")
    assert result.returncode == 0
    if command in ("submit", "render", "jupyter"):
        assert "HPCLAUNCH_PARTITION" in result.stdout and "HPCLAUNCH_TIME" in result.stdout
    assert "Usage:" in result.stdout


@pytest.fixture
def local_config(tmp_path: Path) -> dict[str, str]:
    config = tmp_path / "config.toml"
    config.write_text(
        'default = "here"\n[clusters.here]\nscheduler = "local"\nworkdir = "%s"\n' % (tmp_path / "runs")
    )
    config.chmod(0o600)
    return {"HPCLAUNCH_CONFIG": str(config), "XDG_STATE_HOME": str(tmp_path / "state"), "HOME": str(tmp_path)}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["-p", "nope", "render", "run", "--", "true"], "unknown profile 'nope'"),
        (["render", "run", "--time", "25 hours", "--", "true"], "is not a time limit"),
        (["render", "run", "--mem", "lots", "--", "true"], "is not an amount of memory"),
        (["render", "run", "--gpus", "-1", "--", "true"], "gpus: must be at least 0"),
        (["render", "nosuchtemplate"], "unknown template 'nosuchtemplate'"),
        (["render", "run"], "needs a command"),
        (["render", "run", "--partition", "a;b", "--", "true"], "not a valid Slurm name"),
        (["render", "run", "--set", "bad", "--", "true"], "expected KEY=VALUE"),
        (["submit", "./missing-script.sh"], "does not exist"),
        (["render", "run", "--bogus"], "No such option"),
    ],
)
def test_bad_input_is_one_line(
    args: list[str], needle: str, local_config: dict[str, str], tmp_path: Path
) -> None:
    result = run_cli(*args, env=local_config, cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing submitted


def test_config_syntax_error_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "config.toml"
    bad.write_text("[clusters.x\n")
    bad.chmod(0o600)
    result = run_cli("config", "show", env={"HPCLAUNCH_CONFIG": str(bad)})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and str(bad) in result.stderr and "not valid TOML" in result.stderr


def test_debug_shows_traceback(local_config: dict[str, str]) -> None:
    result = run_cli("--debug", "render", "run", "--mem", "lots", "--", "true", env=local_config)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_config_show_resolves_flag_over_env_over_profile(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[clusters.c]\nhost = "from-profile"\nuser = "u1"\npartition = "gpu"\n')
    env = {"HPCLAUNCH_CONFIG": str(config), "HPCLAUNCH_USER": "from-env", "HPCLAUNCH_HOST": "env-host"}
    result = run_cli("--host", "flag-host", "config", "show", "--json", env=env)
    assert result.returncode == 0, result.stderr
    import json

    data = json.loads(result.stdout)
    assert data["host"] == "flag-host" and data["user"] == "from-env" and data["partition"] == "gpu"


def test_render_prints_script(local_config: dict[str, str]) -> None:
    result = run_cli(
        "render", "run", "--gpus", "2", "--run-dir", "/tmp/x", "--", "echo", "hi there", env=local_config
    )
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --gres=gpu:2" in result.stdout and "echo 'hi there'" in result.stdout


def test_cancel_checks_every_id_before_cancelling_any(local_config: dict[str, str], tmp_path: Path) -> None:
    submitted = run_cli("submit", "run", "--", "sleep", "30", env=local_config, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    try:
        refused = run_cli("cancel", job_id, "not-an-id", env=local_config, cwd=tmp_path)
        assert refused.returncode != 0 and "'not-an-id' is not a job id" in refused.stderr
        status = run_cli("status", job_id, "--json", env=local_config, cwd=tmp_path)
        assert '"RUNNING"' in status.stdout or '"PENDING"' in status.stdout, status.stdout
    finally:
        run_cli("cancel", job_id, env=local_config, cwd=tmp_path)


def test_config_show_says_which_files_were_read_and_how_a_site_sets_defaults(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text('default = "c"\n[clusters.c]\nhost = "login"\npartition = "gpu"\n')
    user = tmp_path / "config.toml"
    user.write_text('[clusters.c]\npartition = "debug"\n')
    user.chmod(0o600)
    env = {"HPCLAUNCH_CONFIG": str(user), "HPCLAUNCH_SITE_CONFIG": str(site)}
    text = run_cli("config", "show", env=env)
    assert text.returncode == 0, text.stderr
    assert f"# files read: {site}, {user}" in text.stdout
    assert "An admin sets defaults for everyone in" in text.stdout and 'partition = "debug"' in text.stdout
    data = json.loads(run_cli("config", "show", "--json", env=env).stdout)
    assert data["files_read"] == [str(site), str(user)] and data["site_config"] == str(site)
    assert data["host"] == "login" and data["partition"] == "debug"
    assert "HPCLAUNCH_SITE_CONFIG" in run_cli("config", "show", "--help").stdout
