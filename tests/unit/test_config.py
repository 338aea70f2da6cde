"""Config file: profiles, defaults, validation errors that name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpclaunch.config import BUILTIN_LOCAL, Config, load
from hpclaunch.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_profile_values_are_validated_and_typed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
default = "hpc"
[clusters.hpc]
host = "login.example"
user = "alice"
partition = "gpu"
gpus = 2
time = "2h"
setup = ["module load cuda"]
tunnel = "node"
""",
    )
    profile = load(path).profile()
    assert profile.name == "hpc" and profile.host == "login.example" and profile.tunnel == "node"
    assert profile.job == {"partition": "gpu", "gpus": 2, "time": "02:00:00", "setup": ("module load cuda",)}


def test_missing_file_gives_builtin_profiles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPCLAUNCH_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load()
    monkeypatch.delenv("HPCLAUNCH_CONFIG")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    config = Config(path=tmp_path / "c.toml", profiles={}, default=None, exists=False)
    assert config.profile().name == BUILTIN_LOCAL
    assert config.profile().scheduler == "local"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[clusters.a\nhost='x'", "not valid TOML"),
        ("[clusters.a]\nhots = 'x'", "unknown key 'hots'"),
        ("[clusters.a]\ngpus = -1", "[clusters.a]: gpus: must be at least 0"),
        ("[clusters.a]\ntime = '25 hours'", "is not a time limit"),
        ("[clusters.a]\nport = 'ssh'", "port must be a int"),
        ("[clusters.a]\ntunnel = 'magic'", "tunnel must be one of"),
        ("default = 'b'\n[clusters.a]\nhost='x'", "default profile 'b' is not defined"),
        ("colour = 1", "unknown top-level key"),
        ('[clusters.a]\nsetup = ["ok", "bad\\nline"]', "control character"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    line = info.value.one_line()
    assert str(path) in line and needle in line and "\n" not in line


def test_unknown_profile_lists_known(tmp_path: Path) -> None:
    path = write(tmp_path, "[clusters.hpc]\nhost='x'\n")
    with pytest.raises(ConfigError) as info:
        load(path).profile("nope")
    assert "unknown profile 'nope'" in info.value.one_line() and "hpc" in info.value.one_line()
