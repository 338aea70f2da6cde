"""The login environment helper, against real shells: output captured over SSH from the dev cluster,
and a local bash started the way sshd starts the user's shell (``$SHELL -c COMMAND``) in a temporary HOME
whose ``~/.bash_profile`` talks, hangs or fails."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from hpclaunch.errors import CommandTimeout, HpclaunchWarning
from hpclaunch.transport import loginenv
from hpclaunch.transport.base import CommandResult
from hpclaunch.transport.loginenv import LoginEnv, capture_command, parse_env, plain_command

DATA = Path(__file__).parent.parent / "data" / "ssh"
#: The token of tests/data/ssh/login_env_banner.out: `capture_command(TOKEN)` run over SSH on the dev
#: cluster as hpcuser, with a ~/.bash_profile that prints three lines (one looks like a marker).
TOKEN = "5f2c9a0e7b1d4c3a8e6f0a1b2c3d4e5f"

BANNER = """echo "Welcome! Quota: 97% used."
echo "PATH=/banner/is/not/a/path"
printf '%s\\n' "hpclaunch-env-0123 is not a marker"
"""

TRICKY = ["a b", "it's", '"q"', "$HOME", "`id`", "x\ny", ";rm -rf ~", "*", "", "--", "-i"]


def test_real_output_with_a_banner_gives_only_the_environment() -> None:
    env = parse_env((DATA / "login_env_banner.out").read_text(), TOKEN)
    assert env is not None
    assert env["PATH"].endswith(":/opt/site-bin")  # from /etc/profile.d, not the banner's "PATH=" line
    assert env["MODULEPATH"].endswith("/opt/hpc-modules")
    assert env["BASH_FUNC_module%%"].startswith("() {") and "\n" in env["BASH_FUNC_module%%"]
    assert env["HOME"] == "/home/hpcuser"
    assert not {"_", "SHLVL", "PWD", "OLDPWD"} & set(env)  # the command's own process sets these
    assert not any("Welcome" in k or "Welcome" in v for k, v in env.items())


@pytest.mark.parametrize(
    "cut",
    [
        lambda text: text.replace(TOKEN, "0" * 32),  # another capture's markers
        lambda text: text[: text.index("hpclaunch-end-")],  # cut before the end marker
        lambda text: text[: text.index("SHELL=")].replace(f"hpclaunch-env-{TOKEN}\n", ""),  # banner only
    ],
    ids=["other-token", "no-end", "banner-only"],
)
def test_output_without_both_markers_is_no_environment(cut: Callable[[str], str]) -> None:
    assert parse_env(cut((DATA / "login_env_banner.out").read_text()), TOKEN) is None


def test_the_command_does_not_contain_its_markers() -> None:
    # A profile that echoes the command line ($BASH_EXECUTION_STRING) cannot fake the frame.
    command = capture_command(TOKEN)
    assert f"hpclaunch-env-{TOKEN}" not in command and f"hpclaunch-end-{TOKEN}" not in command


# --- a real local login shell ---------------------------------------------------------------------


class Login:
    """A HOME with a ~/.bash_profile, and `$SHELL -c COMMAND` run there as sshd would."""

    def __init__(self, tmp_path: Path) -> None:
        self.home = tmp_path / "home"
        self.home.mkdir()
        self.site_bin = tmp_path / "site-bin"
        self.site_bin.mkdir()
        tool = self.site_bin / "site-only"
        tool.write_text('#!/bin/sh\necho "site-only: LOGIN_ONLY=$LOGIN_ONLY args=$#"\n')
        tool.chmod(0o755)
        self.profile(BANNER)
        self.captures: list[str] = []

    def profile(self, lines: str) -> None:
        (self.home / ".bash_profile").write_text(
            f'{lines}export LOGIN_ONLY=yes\nexport PATH="$PATH:{self.site_bin}"\n'
        )

    def plain_env(self) -> dict[str, str]:
        return {"HOME": str(self.home), "SHELL": "/bin/bash", "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}

    def sh(self, command: str, timeout: float = 30) -> CommandResult:
        proc = subprocess.Popen(
            ["/bin/bash", "-c", command],
            cwd=self.home,
            env=self.plain_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise CommandTimeout("login shell timed out") from None
        return CommandResult(("bash", "-c", command), proc.returncode, out, err)

    def capture(self, command: str, timeout: float) -> CommandResult:
        self.captures.append(command)
        return self.sh(command, timeout)


@pytest.fixture
def login(tmp_path: Path) -> Login:
    return Login(tmp_path)


def test_commands_see_the_login_environment_and_argv_arrives_intact(login: Login) -> None:
    le = LoginEnv("test-host")
    command = le.command("conn-1", ["printf", "[%s]\\n", *TRICKY], None, login.capture)
    result = login.sh(command)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "".join(f"[{arg}]\n" for arg in TRICKY)  # quoted exactly once; no banner
    site = login.sh(le.command("conn-1", ["site-only", "a b"], None, login.capture))
    assert site.stdout == "site-only: LOGIN_ONLY=yes args=1\n"
    assert le.captures == 1  # one login shell for both commands


def test_added_variables_win_over_the_login_ones(login: Login) -> None:
    le = LoginEnv("test-host")
    command = le.command(
        "c", ["sh", "-c", 'echo "$LOGIN_ONLY $X"'], {"LOGIN_ONLY": "mine", "X": "a b"}, login.capture
    )
    assert login.sh(command).stdout == "mine a b\n"


def test_a_new_connection_runs_the_login_shell_again(login: Login) -> None:
    le = LoginEnv("test-host")
    first, second = object(), object()
    for key in (first, first, second, second):
        le.command(key, ["true"], None, login.capture)
    assert le.captures == 2
    assert len(set(login.captures)) == 2  # fresh markers each time


def test_without_login_shell_the_command_is_the_plain_one(login: Login) -> None:
    le = LoginEnv("test-host", enabled=False)
    assert le.command("c", ["echo", "a b"], {"X": "1"}, login.capture) == "env X=1 echo 'a b'"
    assert le.command("c", ["echo", "a b"], None, login.capture) == plain_command(["echo", "a b"])
    assert login.sh(le.command("c", ["site-only"], None, login.capture)).returncode == 127
    assert login.captures == []


@pytest.mark.parametrize(
    ("profile", "timeout", "says"),
    [
        ("sleep 30\n", 0.5, "did not print its environment within 0.5 s"),
        ("echo 'broken profile' >&2; exit 3\n", 30, "(broken profile)"),
        ("exec 1>&-\n", 30, "did not print its environment"),  # stdout closed: nothing to parse
    ],
    ids=["hangs", "exits", "no-stdout"],
)
def test_a_broken_login_shell_warns_once_and_falls_back(
    login: Login, profile: str, timeout: float, says: str
) -> None:
    login.profile(profile)
    le = LoginEnv("test-host", timeout=timeout)
    with pytest.warns(HpclaunchWarning) as caught:
        command = le.command("c", ["echo", "a b"], None, login.capture)
        again = le.command("c", ["echo", "x"], None, login.capture)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert says in message and "test-host" in message and "login_shell = false" in message
    assert "\n" not in message
    assert (command, again) == ("echo 'a b'", "echo x")
    assert le.captures == 1 and not le.enabled


def test_an_environment_too_big_to_pass_is_not_used(login: Login, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loginenv, "MAX_ENV_BYTES", 100)
    le = LoginEnv("test-host")
    with pytest.warns(HpclaunchWarning, match="too big to pass"):
        command = le.command("c", ["echo", "hi"], None, login.capture)
    assert shlex.split(command) == ["echo", "hi"]


def test_a_saved_environment_serves_the_next_process_on_the_same_connection(
    login: Login, tmp_path: Path
) -> None:
    cache = str(tmp_path / "ssh-abc.env")
    first = LoginEnv("test-host", cache=cache)
    site = login.sh(first.command((7, 1), ["site-only"], None, login.capture))
    assert site.stdout == "site-only: LOGIN_ONLY=yes args=0\n"
    assert os.stat(cache).st_mode & 0o777 == 0o600
    # A later process on the same master: no login shell, the same environment.
    second = LoginEnv("test-host", cache=cache)
    again = login.sh(second.command((7, 1), ["site-only"], None, login.capture))
    assert again.stdout == site.stdout
    assert second.captures == 0 and len(login.captures) == 1
    # Another master (same inode, another birth): captured anew, never the stale one.
    third = LoginEnv("test-host", cache=cache)
    third.command((7, 2), ["true"], None, login.capture)
    assert third.captures == 1 and len(login.captures) == 2


@pytest.mark.parametrize("text", ["", "not json", '{"key": [7, 1], "env": "x"}', "[1, 2]"])
def test_a_broken_saved_environment_is_captured_again(login: Login, tmp_path: Path, text: str) -> None:
    cache = tmp_path / "ssh-abc.env"
    cache.write_text(text)
    le = LoginEnv("test-host", cache=str(cache))
    le.command((7, 1), ["true"], None, login.capture)
    assert le.captures == 1
