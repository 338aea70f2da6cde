"""Security properties that need no cluster: the token, host-key policy, file permission warnings,
secrets kept out of error output. The cluster side (listeners, tunnel mode ``node``, the client's output
during a real session) is tests/cluster/test_security.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from hpclaunch.cli import main
from hpclaunch.errors import HpclaunchWarning
from hpclaunch.job import Job, log_tail
from hpclaunch.jupyter.token import REDACTED, new_token, redact
from hpclaunch.transport import keyfile
from hpclaunch.transport import ssh as ssh_mod

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"

# --- the Jupyter token ------------------------------------------------------------------------------


def test_token_has_at_least_128_bits_from_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    token = new_token()
    assert re.fullmatch(r"[0-9a-f]+", token), token  # URL-safe, and what Jupyter's own tokens look like
    assert len(bytes.fromhex(token)) * 8 >= 128
    assert len({new_token() for _ in range(1000)}) == 1000

    import secrets

    calls: list[int] = []
    real = secrets.token_hex

    def spy(nbytes: int | None = None) -> str:
        calls.append(nbytes or 32)
        return real(nbytes)

    monkeypatch.setattr(secrets, "token_hex", spy)
    new_token()
    assert calls and calls[0] * 8 >= 128, "the token must come from the secrets module"


def test_redact() -> None:
    token = new_token()
    assert redact(f"a {token} b {token}", token) == f"a {REDACTED} b {REDACTED}"
    assert redact("text", None) == "text" and redact("text", "") == "text"


# --- host keys: never trust an unknown key automatically ---------------------------------------------

SOURCE_DIRS = ("hpclaunch", "tests", "bench", "examples", "jobs", "scripts")
TRUST_ALL = re.compile(r"\b(AutoAdd|Warning)Policy\s*\(|set_missing_host_key_policy")


def test_no_auto_add_policy_anywhere() -> None:
    offenders = []
    for top in SOURCE_DIRS:
        for path in (ROOT / top).rglob("*"):
            if not path.is_file() or path.suffix not in ("", ".py", ".sh", ".md", ".toml"):
                continue
            if path == Path(__file__).resolve():
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            offenders += [f"{path}:{m.group()}" for m in TRUST_ALL.finditer(text)]
    assert not offenders, offenders


def test_ruff_rule_s507_is_enforced() -> None:
    import tomllib

    lint = tomllib.loads(PYPROJECT.read_text())["tool"]["ruff"]["lint"]
    selected = set(lint["select"])
    assert selected & {"S", "S5", "S50", "S507", "ALL"}, "ruff's flake8-bandit rules must be selected"
    ignored = set(lint.get("ignore", [])) | {
        code for codes in lint.get("per-file-ignores", {}).values() for code in codes
    }
    assert not ignored & {"S", "S5", "S50", "S507"}, "S507 (paramiko without host key checking) is ignored"

    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed")
    probe = (
        "import paramiko\n\nc = paramiko.SSHClient()\n"
        "c.set_missing_host_key_policy(paramiko.AutoAddPolicy())\n"
    )
    for where in ("hpclaunch/probe.py", "tests/unit/probe.py"):
        result = subprocess.run(
            [ruff, "check", "--no-cache", "--stdin-filename", where, "--output-format", "concise", "-"],
            input=probe,
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
            check=False,
        )
        assert "S507" in result.stdout, (where, result.stdout, result.stderr)


# --- files others can read ----------------------------------------------------------------------------


def run_cli(config: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HPCLAUNCH_")},
        "HPCLAUNCH_CONFIG": str(config),
        "HOME": str(tmp),
        "XDG_DATA_HOME": str(tmp / "data"),
        "PYTHONWARNINGS": "default",
    }
    return subprocess.run(
        [sys.executable, "-m", "hpclaunch", *args], capture_output=True, text=True, env=env, timeout=60
    )


@pytest.mark.parametrize(
    ("mode", "problem"),
    [
        (0o644, "readable by other users"),
        (0o604, "readable by other users"),
        (0o620, "writable by other users"),
        (0o602, "writable by other users"),
        (0o666, "writable by other users"),
        (0o640, None),  # the group may read it (a shared project config)
        (0o600, None),
        (0o400, None),
    ],
)
def test_config_file_open_to_others_warns_in_one_line(tmp_path: Path, mode: int, problem: str | None) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[clusters.here]\nscheduler = "local"\nworkdir = "{tmp_path / "runs"}"\n')
    config.chmod(mode)
    result = run_cli(config, tmp_path, "config", "show")
    assert result.returncode == 0, result.stderr
    if problem is None:
        assert result.stderr == ""
    else:
        assert result.stderr == f"hpclaunch: warning: {config} is {problem}; run: chmod 600 {config}\n"


def test_cli_shows_each_warning_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """However often the file is read (a reconnect, a jump host and a node using one key...)."""
    import hpclaunch.config as config_mod

    config = tmp_path / "config.toml"
    config.write_text(f'[clusters.here]\nscheduler = "local"\nworkdir = "{tmp_path / "runs"}"\n')
    config.chmod(0o644)
    real = config_mod.load

    def load_three_times(path: object = None) -> config_mod.Config:
        real(path)  # type: ignore[arg-type]
        real(path)  # type: ignore[arg-type]
        return real(path)  # type: ignore[arg-type]

    monkeypatch.setattr(config_mod, "load", load_three_times)
    monkeypatch.setenv("HPCLAUNCH_CONFIG", str(config))
    main(["config", "show", "--json"])  # returns normally on success
    err = capsys.readouterr().err
    assert err == f"hpclaunch: warning: {config} is readable by other users; run: chmod 600 {config}\n"


@pytest.mark.parametrize(("mode", "word"), [(0o644, "readable"), (0o604, "readable"), (0o620, "writable")])
def test_ssh_key_open_to_others_warns(tmp_path: Path, mode: int, word: str) -> None:
    key = tmp_path / "id_ed25519"
    key.write_text("not really a key\n")
    key.chmod(mode)
    with pytest.warns(HpclaunchWarning, match=f"SSH key {key} is {word} by other users; run: chmod 600"):
        keyfile.warn_if_exposed(str(key))
    with pytest.warns(HpclaunchWarning, match=f"SSH key {key} is {word} by other users, so ssh will not"):
        keyfile.warn_if_exposed(str(key), ignored=True)
    key.chmod(0o600)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        keyfile.warn_if_exposed(str(key))


def test_ssh_transport_warns_when_it_loads_an_exposed_key(tmp_path: Path) -> None:
    """The check sits where key files are loaded for a login: offering a 0644 key warns."""
    import paramiko

    if shutil.which("ssh-keygen") is None:
        pytest.skip("needs ssh-keygen")
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    key.chmod(0o644)
    (tmp_path / "ssh_config").write_text("")
    transport = ssh_mod.SSHTransport(
        "127.0.0.1",
        port=2,
        user="u",
        identity_file=str(key),
        ssh_config_path=str(tmp_path / "ssh_config"),
        allow_agent=False,
    )

    class Refusing:
        offered: list[str] = []

        def auth_publickey(self, user: str, pkey: paramiko.PKey) -> list[str]:
            self.offered.append(pkey.get_name())
            raise paramiko.AuthenticationException("no")

        def is_authenticated(self) -> bool:
            return False

    server = Refusing()
    problems: list[str] = []
    with pytest.warns(HpclaunchWarning, match=f"SSH key {key} is readable by other users"):
        transport.auth.publickey(server, transport.settings, problems)  # type: ignore[arg-type]
    assert server.offered == ["ssh-ed25519"]


# --- secrets in error output ----------------------------------------------------------------------------


class FakeFiles:
    """Just the file reading a Job's log needs."""

    def __init__(self, text: str) -> None:
        self.text = text

    def read_text(self, path: str) -> str:
        return self.text


class FakeHost:
    def __init__(self, text: str) -> None:
        self.transport = FakeFiles(text)
        self.scheduler = None


def test_log_tails_in_errors_mask_the_token() -> None:
    token = new_token()
    log = f"starting\nhttp://node1:8888/lab?token={token}\nfailed with {token}\n"
    job = Job(FakeHost(log), "1", output="/log")  # type: ignore[arg-type]
    for tail in (log_tail(log, secret=token), job.log_tail(secret=token)):
        assert tail is not None and token not in tail and REDACTED in tail and "starting" in tail
