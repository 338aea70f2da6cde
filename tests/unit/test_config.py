"""Config file: profiles, defaults, validation errors that name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpclaunch.config import BUILTIN_LOCAL, Config, load, site_config_path
from hpclaunch.errors import ConfigError, HpclaunchWarning


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


# --- the site-wide file: /etc/hpclaunch/config.toml or HPCLAUNCH_SITE_CONFIG, the user's file winning ---

SITE = """
default = "hpc"
[clusters.hpc]
host = "login.example"
partition = "gpu"
modules = ["hpcenv"]
time = "2h"
"""


def site_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str = SITE) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(text)
    path.chmod(0o644)  # meant to be read by everyone
    monkeypatch.setenv("HPCLAUNCH_SITE_CONFIG", str(path))
    return path


def test_site_file_alone_gives_everyone_its_profiles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = site_file(tmp_path, monkeypatch)
    config = load(write(tmp_path, ""))
    profile = config.profile()
    assert profile.name == "hpc" and profile.host == "login.example"
    assert profile.job == {"partition": "gpu", "modules": ("hpcenv",), "time": "02:00:00"}
    assert config.files_read == (site, tmp_path / "config.toml")


def test_users_keys_win_over_the_sites_key_by_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = site_file(tmp_path, monkeypatch)
    user = write(tmp_path, '[clusters.hpc]\nuser = "alice"\npartition = "debug"\nmodules = ["mine"]\n')
    profile = load(user).profile()
    assert profile.host == "login.example" and profile.user == "alice"  # one from each file
    assert profile.job == {"partition": "debug", "modules": ("mine",), "time": "02:00:00"}
    assert profile.source == f"{site} + {user}"


def test_users_default_wins_and_may_name_a_site_profile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site_file(tmp_path, monkeypatch, SITE + '[clusters.other]\nhost = "other.example"\n')
    assert load(write(tmp_path, 'default = "other"\n')).profile().host == "other.example"
    assert load(write(tmp_path, '[clusters.mine]\nhost = "m"\n')).profile().name == "hpc"


def test_an_error_in_the_site_file_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = site_file(tmp_path, monkeypatch, "[clusters.hpc]\ngpus = -1\n")
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, ""))
    assert str(site) in info.value.one_line() and "gpus: must be at least 0" in info.value.one_line()


def test_site_file_named_but_missing_is_an_error_empty_reads_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HPCLAUNCH_SITE_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match=r"site config file .* does not exist"):
        load(write(tmp_path, ""))
    monkeypatch.setenv("HPCLAUNCH_SITE_CONFIG", "")
    config = load(write(tmp_path, ""))
    assert config.site_path is None and config.files_read == (tmp_path / "config.toml",)


def test_default_site_file_is_etc_hpclaunch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HPCLAUNCH_SITE_CONFIG")
    assert site_config_path() == Path("/etc/hpclaunch/config.toml")


def test_site_file_others_can_write_is_warned_about(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = site_file(tmp_path, monkeypatch)
    site.chmod(0o666)
    with pytest.warns(HpclaunchWarning, match="writable by other users"):
        load(write(tmp_path, ""))
