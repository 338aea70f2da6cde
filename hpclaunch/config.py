"""Profiles from TOML files, layered as flag > environment variable > profile > defaults.

Two files are read, in the same format: the site's (``/etc/hpclaunch/config.toml``, or the file
``HPCLAUNCH_SITE_CONFIG`` names; an empty value reads none), where an admin sets defaults for everyone,
and the user's own (``HPCLAUNCH_CONFIG``, default ``config.toml`` in the app directory). A profile defined
in both is merged key by key, the user's keys winning; the user's ``default`` wins over the site's.

```toml
default = "mycluster"

[clusters.mycluster]
host = "login.hpc.example.edu"   # leave out to use this machine's Slurm
user = "alice"
partition = "gpu"
gpus = 1
setup = ["module load cuda/12.4", "source ~/venvs/torch/bin/activate"]
workdir = "~/hpclaunch"
```
"""

from __future__ import annotations

import enum
import os
import shutil
import stat
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError, HpclaunchWarning, ParameterError
from .params import PARAMS_BY_NAME, reject_control_chars, validate_params

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_ENV = "HPCLAUNCH_CONFIG"
SITE_CONFIG_ENV = "HPCLAUNCH_SITE_CONFIG"
DEFAULT_SITE_CONFIG = Path("/etc/hpclaunch/config.toml")
PROFILE_ENV = "HPCLAUNCH_PROFILE"
APP_NAME = "hpclaunch"

#: Profile names that exist without a config file.
BUILTIN_LOCAL = "local"  # no Slurm: jobs run as background processes on this machine
BUILTIN_SLURM = "slurm"  # this machine's own sbatch (a login node)


class SchedulerKind(str, enum.Enum):
    """Which backend runs the jobs."""

    SLURM = "slurm"  # sbatch here or on the login host
    LOCAL = "local"  # background processes on this machine, no Slurm

    def __str__(self) -> str:
        return self.value


class TunnelMode(str, enum.Enum):
    """How the notebook's tunnel reaches the node."""

    DIRECT = "direct"  # the login host forwards to node:port
    NODE = "node"  # log in to the node (through the login host); Jupyter on the node's 127.0.0.1

    def __str__(self) -> str:
        return self.value


class NodeAccess(str, enum.Enum):
    """How an SSH client (``hpclaunch ssh-config``, VS Code) reaches a job's node."""

    STEP = "step"  # a job step runs an unprivileged `sshd -i` over srun's stdio: no port on the node
    JUMP = "jump"  # ProxyJump through the login host to the node's own sshd (sites that allow it)

    def __str__(self) -> str:
        return self.value


class TransportKind(str, enum.Enum):
    """Which SSH client carries the connection to a remote login host."""

    AUTO = "auto"  # OpenSSH where its ssh supports ControlMaster (not Windows), else paramiko
    OPENSSH = "openssh"  # the system ssh with a ControlMaster of hpclaunch's own
    PARAMIKO = "paramiko"  # one paramiko connection in this process

    def __str__(self) -> str:
        return self.value


#: Seconds a connection stays open, idle, for the next CLI command on the profile (0: off).
DEFAULT_SESSION_IDLE = 600


def choice(kind: type[enum.Enum], key: str, value: Any, where: str = "") -> Any:
    """``value`` as a member of ``kind``, or one ConfigError line listing the valid ones."""
    try:
        return kind(value)
    except ValueError:
        valid = ", ".join(str(m.value) for m in kind)
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{prefix}{key} must be one of {valid}, got {value!r}") from None


@dataclass(frozen=True)
class Profile:
    """Where and how jobs run: the connection, the scheduler and default job parameters."""

    name: str
    host: str | None = None
    user: str | None = None
    port: int | None = None
    identity_file: str | None = None
    ssh_config: str | None = None
    accept_new_host_key: bool = False
    #: Over SSH, run commands in the environment of the user's login shell there (profile.d, modules);
    #: false for sites that need a plain shell. Locally the process environment is already the login one.
    login_shell: bool = True
    scheduler: SchedulerKind = SchedulerKind.SLURM
    workdir: str = "~/hpclaunch"
    template_dir: str | None = None
    tunnel: TunnelMode = TunnelMode.DIRECT
    transport: TransportKind = TransportKind.AUTO
    #: Seconds an idle connection is kept for the next command (one login for a working session); 0: off.
    session_idle: int = DEFAULT_SESSION_IDLE
    #: Port of the compute nodes' sshd, for tunnel mode ``node`` (None: the ssh config's, else 22).
    node_ssh_port: int | None = None
    #: How ``hpclaunch ssh-config`` entries reach a job's node.
    node_access: NodeAccess = NodeAccess.STEP
    #: Polling budget, seconds: the first interval of a wait and the most its backoff grows to.
    poll_min: float = 0.2
    poll_max: float = 30.0
    job: Mapping[str, Any] = field(default_factory=dict)
    source: str = "built-in"

    def __post_init__(self) -> None:
        # Plain strings are accepted (TOML, Profile(scheduler="local")) and become the typed choices.
        object.__setattr__(self, "scheduler", choice(SchedulerKind, "scheduler", self.scheduler))
        object.__setattr__(self, "tunnel", choice(TunnelMode, "tunnel", self.tunnel))
        object.__setattr__(self, "node_access", choice(NodeAccess, "node_access", self.node_access))
        object.__setattr__(self, "transport", choice(TransportKind, "transport", self.transport))

    def with_overrides(self, **changes: Any) -> Profile:
        """A copy with the non-None ``changes`` applied (flags and environment variables)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in ("job", "name", "source"):
                continue
            value = getattr(self, f.name)
            out[f.name] = value.value if isinstance(value, enum.Enum) else value
        out.update({k: list(v) if isinstance(v, tuple) else v for k, v in self.job.items()})
        return out


_CONNECTION_KEYS: dict[str, type | tuple[type, ...]] = {
    "host": str,
    "user": str,
    "port": int,
    "identity_file": str,
    "ssh_config": str,
    "accept_new_host_key": bool,
    "login_shell": bool,
    "scheduler": str,
    "workdir": str,
    "template_dir": str,
    "tunnel": str,
    "transport": str,
    "session_idle": int,
    "node_ssh_port": int,
    "node_access": str,
    "poll_min": (int, float),
    "poll_max": (int, float),
}
PROFILE_KEYS: tuple[str, ...] = tuple(_CONNECTION_KEYS) + tuple(PARAMS_BY_NAME)


def default_config_path() -> Path:
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env).expanduser()
    import click  # already imported by the CLI; cheap

    return Path(click.get_app_dir(APP_NAME)) / "config.toml"


def site_config_path() -> Path | None:
    """The site-wide file an admin writes for everyone; None when ``HPCLAUNCH_SITE_CONFIG`` is empty."""
    env = os.environ.get(SITE_CONFIG_ENV)
    if env is None:
        return DEFAULT_SITE_CONFIG
    return Path(env).expanduser() if env.strip() else None


@dataclass(frozen=True)
class Config:
    """The parsed config files: named profiles and which one is the default."""

    #: The user's file (whether or not it exists).
    path: Path
    profiles: Mapping[str, Profile]
    default: str | None
    #: Whether the user's file exists.
    exists: bool
    #: The site-wide file looked for (None: none, by ``HPCLAUNCH_SITE_CONFIG=``).
    site_path: Path | None = None
    #: The files actually read, site first.
    files_read: tuple[Path, ...] = ()

    def profile(self, name: str | None = None) -> Profile:
        """The named profile, or the default: the file's, else this machine's Slurm, else ``local``."""
        chosen = name or os.environ.get(PROFILE_ENV) or self.default
        if chosen is None:
            if len(self.profiles) == 1:
                chosen = next(iter(self.profiles))
            else:
                chosen = BUILTIN_SLURM if shutil.which("sbatch") else BUILTIN_LOCAL
        if chosen in self.profiles:
            return self.profiles[chosen]
        if chosen == BUILTIN_LOCAL:
            return Profile(
                name=BUILTIN_LOCAL, scheduler=SchedulerKind.LOCAL, workdir="~/.local/share/hpclaunch/runs"
            )
        if chosen == BUILTIN_SLURM:
            return Profile(name=BUILTIN_SLURM)
        known = sorted({*self.profiles, BUILTIN_LOCAL, BUILTIN_SLURM})
        where = " and ".join(map(str, self.files_read)) or f"{self.path} (which does not exist)"
        raise ConfigError(
            f"unknown profile {chosen!r}",
            hint=f"profiles in {where}: {', '.join(known)}",
        )


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate the site's file and the user's; a missing file is an empty one."""
    file = Path(path).expanduser() if path else default_config_path()
    if not file.exists() and (path or os.environ.get(CONFIG_ENV)):
        raise ConfigError(f"config file {file} does not exist", hint=f"create it or unset {CONFIG_ENV}")
    site = site_config_path()
    if site is not None and not site.exists() and os.environ.get(SITE_CONFIG_ENV):
        raise ConfigError(
            f"site config file {site} does not exist",
            hint=f"create it, or set {SITE_CONFIG_ENV} to an empty value to read none",
        )
    layers: list[tuple[Path, Mapping[str, Any]]] = []
    if site is not None and site.exists():
        # Meant to be read by everyone; but one that others can change runs their setup lines in your jobs.
        _warn_if_exposed(site, shared=True)
        layers.append((site, _read(site)))
    if file.exists():
        _warn_if_exposed(file)
        layers.append((file, _read(file)))
    return _merge(file, site, layers)


def _read(file: Path) -> Mapping[str, Any]:
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{file}: not valid TOML: {err}") from None
    except OSError as err:
        raise ConfigError(f"{file}: cannot read: {err.strerror}") from None
    _parse(file, data)  # each file on its own first, so that an error names the file it is in
    return data


def _parse(file: Path, data: Mapping[str, Any]) -> Config:
    clusters = _clusters(file, data)
    profiles = {name: _parse_profile(file, name, body) for name, body in clusters.items()}
    default = data.get("default")
    if default is not None and not isinstance(default, str):
        raise ConfigError(f"{file}: 'default' must be a profile name")
    return Config(path=file, profiles=profiles, default=default, exists=True, files_read=(file,))


def _clusters(file: Path, data: Mapping[str, Any]) -> Mapping[str, Any]:
    for key in data:
        if key not in ("default", "clusters"):
            raise ConfigError(f"{file}: unknown top-level key {key!r}", hint="valid: default, clusters")
    clusters = data.get("clusters", {})
    if not isinstance(clusters, dict):
        raise ConfigError(f"{file}: 'clusters' must be a table of [clusters.NAME] sections")
    return clusters


def _merge(file: Path, site: Path | None, layers: list[tuple[Path, Mapping[str, Any]]]) -> Config:
    """The layers (site first, then the user's) as one config: later keys win, profile by profile."""
    bodies: dict[str, dict[str, Any]] = {}
    origins: dict[str, list[Path]] = {}
    default: str | None = None
    default_from = file
    for layer_file, data in layers:
        for name, body in _clusters(layer_file, data).items():
            bodies.setdefault(name, {}).update(body)
            origins.setdefault(name, []).append(layer_file)
        if data.get("default") is not None:
            default, default_from = data["default"], layer_file
    profiles = {
        name: _parse_profile(origins[name][-1], name, body, source=" + ".join(map(str, origins[name])))
        for name, body in bodies.items()
    }
    if default is not None and default not in profiles and default not in (BUILTIN_LOCAL, BUILTIN_SLURM):
        raise ConfigError(
            f"{default_from}: default profile {default!r} is not defined",
            hint="defined: " + ", ".join(sorted(profiles)) if profiles else "add a [clusters.NAME] section",
        )
    return Config(
        path=file,
        profiles=profiles,
        default=default,
        exists=file.exists(),
        site_path=site,
        files_read=tuple(layer_file for layer_file, _ in layers),
    )


def _parse_profile(file: Path, name: str, body: Any, *, source: str | None = None) -> Profile:
    where = f"{file}: [clusters.{name}]"
    if not isinstance(body, dict):
        raise ConfigError(f"{where} must be a table")
    connection: dict[str, Any] = {}
    job_values: dict[str, Any] = {}
    for key, value in body.items():
        if key in _CONNECTION_KEYS:
            expected = _CONNECTION_KEYS[key]
            if (isinstance(value, bool) and expected is not bool) or not isinstance(value, expected):
                want = expected.__name__ if isinstance(expected, type) else "number"
                raise ConfigError(f"{where}: {key} must be a {want}, got {value!r}")
            connection[key] = value
        elif key in PARAMS_BY_NAME:
            job_values[key] = value
        else:
            raise ConfigError(
                f"{where}: unknown key {key!r}",
                hint="valid keys: " + ", ".join(PROFILE_KEYS),
            )
    try:
        job = validate_params(job_values)
    except ParameterError as err:
        raise ConfigError(f"{where}: {err.message}", hint=err.hint) from None
    kinds: tuple[tuple[str, type[enum.Enum]], ...] = (
        ("scheduler", SchedulerKind),
        ("tunnel", TunnelMode),
        ("transport", TransportKind),
        ("node_access", NodeAccess),
    )
    for key, kind in kinds:
        if key in connection:
            connection[key] = choice(kind, key, connection[key], where)
    profile = Profile(name=name, job=job, source=source or str(file), **connection)
    check_profile(profile, where)
    return profile


def check_profile(profile: Profile, where: str = "") -> None:
    """Validate values that only make sense together; ``where`` names their origin."""
    prefix = f"{where}: " if where else ""
    if profile.scheduler is SchedulerKind.LOCAL and profile.host:
        raise ConfigError(f"{prefix}the local scheduler runs on this machine: remove 'host'")
    if profile.port is not None and not 0 < profile.port < 65536:
        raise ConfigError(f"{prefix}port must be between 1 and 65535, got {profile.port}")
    if not 0 < profile.poll_min <= profile.poll_max:
        raise ConfigError(
            f"{prefix}poll_min and poll_max must be seconds with 0 < poll_min <= poll_max, "
            f"got {profile.poll_min} and {profile.poll_max}"
        )
    if profile.session_idle < 0:
        raise ConfigError(f"{prefix}session_idle must be seconds >= 0 (0: off), got {profile.session_idle}")
    if profile.node_ssh_port is not None and not 0 < profile.node_ssh_port < 65536:
        raise ConfigError(f"{prefix}node_ssh_port must be between 1 and 65535, got {profile.node_ssh_port}")
    for key in ("host", "user"):
        value = getattr(profile, key)
        if value is not None and (not value.strip() or any(c.isspace() for c in value)):
            raise ConfigError(f"{prefix}{key} {value!r} must be one word")
    for key in ("host", "user", "identity_file", "ssh_config", "workdir", "template_dir"):
        value = getattr(profile, key)
        if value is None:
            continue
        if not value.strip():
            raise ConfigError(f"{prefix}{key} is empty")
        try:
            reject_control_chars(key, value)
        except ParameterError as err:
            raise ConfigError(prefix + err.message, hint=err.hint) from None


def _warn_if_exposed(file: Path, *, shared: bool = False) -> None:
    """A user's file should be theirs alone; a ``shared`` (site) file is read by all, written by root only."""
    try:
        mode = file.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = "writable by other users"
    elif mode & stat.S_IROTH and not shared:
        problem = "readable by other users"
    else:
        return
    what = f"site config {file}" if shared else str(file)
    fix = f"chmod {'644' if shared else '600'} {file}"
    warnings.warn(f"{what} is {problem}; run: {fix}", HpclaunchWarning, stacklevel=3)
