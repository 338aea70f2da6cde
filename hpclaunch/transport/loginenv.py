"""Remote commands in the environment the user's login shell on the login host gives.

Sites put Slurm's commands and the ``module`` function on PATH through ``/etc/profile.d``, which only a
login shell reads; ``ssh host cmd`` runs a plain non-login shell. A login shell per command would cost a
login each time (tens of ms, seconds with conda hooks), so the login shell runs ONCE per connection and
prints its environment (``env -0``) between two random markers: whatever ``~/.bash_profile`` or profile.d
prints lies outside them and never reaches a parser. Each command then runs as ``env -i K=V ... argv``:
one more exec on the far side, the argv quoted once, as before. With the OpenSSH transport the connection
(its ControlMaster) outlives each CLI process, so the captured environment is kept beside the master's
socket for the next process: a warm command is one round trip.

Shared by both SSH transports and free of I/O: the transport hands :meth:`LoginEnv.command` a key for its
current connection and a function that runs one raw command string; see that method.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence

from hpclaunch.errors import CommandTimeout, HpclaunchWarning
from hpclaunch.transport.base import CommandResult

#: Seconds the login shell may take to print its environment (a broken ~/.bash_profile may hang).
CAPTURE_TIMEOUT = 15.0
#: Linux caps one argument at 128 KiB, and the remote shell gets the whole command as one (``-c``):
#: an environment bigger than this leaves too little room for argv, so it is not used.
MAX_ENV_BYTES = 64 * 1024
#: Variables each process or directory sets for itself: the captured values would be stale.
_DROP = frozenset({"_", "SHLVL", "PWD", "OLDPWD"})
_BEGIN = "hpclaunch-env-"
_END = "hpclaunch-end-"

#: Runs one command string as-is on the current connection within the timeout (seconds); raises
#: CommandTimeout past it. No login environment, no check of the exit code.
Capture = Callable[[str, float], CommandResult]


def capture_command(token: str) -> str:
    """The command string that prints the login environment between markers made from ``token``.

    The markers never appear literally in the command (``printf`` joins their halves), so a profile
    that echoes the command line cannot fake them. ``/bin/sh`` runs the outer part whatever the user's
    shell is; csh-like shells do not take ``-lc``, so their users get bash's login setup (profile.d).
    """
    inner = f'printf "%s%s\\n" {_BEGIN} {token}; env -0; printf "%s%s\\n" {_END} {token}'
    outer = (
        'case "${SHELL##*/}" in bash|sh|dash|ksh|mksh|zsh) s=$SHELL ;; *) s=bash ;; esac; '
        f'exec "$s" -lc {shlex.quote(inner)} </dev/null'
    )
    return shlex.join(["/bin/sh", "-c", outer])


def parse_env(stdout: str, token: str) -> dict[str, str] | None:
    """The environment framed by the markers of ``token`` in ``stdout``; None when they are missing."""
    begin = stdout.find(f"{_BEGIN}{token}\n")
    if begin < 0:
        return None
    start = begin + len(_BEGIN) + len(token) + 1
    stop = stdout.find(f"{_END}{token}\n", start)
    if stop < 0:
        return None
    env: dict[str, str] = {}
    for record in stdout[start:stop].split("\0"):
        name, eq, value = record.partition("=")
        # env(1) would read a name starting with "-" as an option; such names do not occur in practice.
        if eq and name and not name.startswith("-") and name not in _DROP:
            env[name] = value
    return env or None


def plain_command(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """``argv`` as the remote command string, with ``env`` added by env(1) (sshd drops most setenv)."""
    words = ["env", *(f"{k}={v}" for k, v in env.items()), *argv] if env else list(argv)
    return shlex.join(words)


def login_prefix(login: Mapping[str, str]) -> str:
    """``env -i K=V ...`` quoted once; a command string is this, a space, and the command."""
    return shlex.join(["env", "-i", *(f"{k}={v}" for k, v in login.items())])


class LoginEnv:
    """The login environment of one transport's current connection, captured on first use."""

    def __init__(
        self,
        where: str | Callable[[], str],
        *,
        enabled: bool = True,
        timeout: float | None = None,
        cache: str | None = None,
    ) -> None:
        """``cache``: a file in a private (0700) directory where the captured environment waits for the
        next process on the same connection (the OpenSSH master outlives us): a warm command then
        costs no login shell. Written 0600; used only while the connection's key matches. ``where``
        names the host in warnings (a function: asked only when there is something to say)."""
        self._where = where
        self.cache = cache
        #: False: commands run in the plain environment (the profile's ``login_shell = false``, or the
        #: login shell failed once: a broken profile does not mend itself within one session).
        self.enabled = enabled
        self.timeout = CAPTURE_TIMEOUT if timeout is None else timeout
        #: How many times the login shell ran (once per connection; tests and the benchmark read it).
        self.captures = 0
        self._lock = threading.Lock()
        self._key: object = None
        self._env: dict[str, str] | None = None
        self._prefix = ""

    @property
    def where(self) -> str:
        return self._where if isinstance(self._where, str) else self._where()

    @property
    def environment(self) -> Mapping[str, str] | None:
        """The captured environment (None before the first command, or when not used)."""
        return self._env if self.enabled else None

    def command(
        self, key: object, argv: Sequence[str], env: Mapping[str, str] | None, capture: Capture
    ) -> str:
        """The remote command string for ``argv`` (``env`` added on top): THE hook of an SSH transport.

        ``key`` identifies the live connection: equal while it lasts, different after a reconnect (a new
        connection may land on another login node), e.g. the connection object or a ControlMaster's pid.
        ``capture`` runs a raw string on it.
        Call it where argv becomes a string, just before the command is sent.
        """
        if not self.enabled:
            return plain_command(argv, env)
        with self._lock:
            if (self._env is None or key != self._key) and not self._load(key):
                self._capture(key, capture)
            if not self.enabled:
                return plain_command(argv, env)
            prefix = self._prefix
        extra = shlex.join([*(f"{k}={v}" for k, v in (env or {}).items()), *argv])
        return f"{prefix} {extra}"

    def _capture(self, key: object, capture: Capture) -> None:
        token = secrets.token_hex(16)
        self.captures += 1
        try:
            result = capture(capture_command(token), self.timeout)
        except CommandTimeout:
            return self._give_up(f"did not print its environment within {self.timeout:g} s")
        env = parse_env(result.stdout, token)
        if env is None:
            tail = result.stderr.strip().splitlines()[-1:] or [f"exit code {result.returncode}"]
            return self._give_up(f"did not print its environment ({tail[0][:200]})")
        prefix = login_prefix(env)
        if len(prefix.encode()) > MAX_ENV_BYTES:
            return self._give_up(f"gives an environment of {len(prefix.encode())} bytes, too big to pass")
        self._key, self._env, self._prefix = key, env, prefix
        self._save(key, env)

    def _load(self, key: object) -> bool:
        """The environment another process captured on this very connection, if there is one."""
        if self.cache is None or key is None:
            return False
        try:
            with open(self.cache, encoding="utf-8") as file:
                saved = json.load(file)
        except (OSError, ValueError):
            return False
        if not isinstance(saved, dict) or saved.get("key") != _jsonable(key):
            return False
        env = saved.get("env")
        if not isinstance(env, dict):
            return False
        self._key, self._env, self._prefix = key, env, login_prefix(env)
        return True

    def _save(self, key: object, env: Mapping[str, str]) -> None:
        if self.cache is None or key is None:
            return
        tmp = f"{self.cache}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                json.dump({"key": _jsonable(key), "env": dict(env)}, file)
            os.replace(tmp, self.cache)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def _give_up(self, problem: str) -> None:
        self.enabled = False
        warnings.warn(
            f"the login shell on {self.where} {problem}; running commands in the plain ssh environment "
            "(fix ~/.bash_profile, or set login_shell = false in the profile)",
            HpclaunchWarning,
            stacklevel=4,
        )


def _jsonable(key: object) -> object:
    """A connection key as JSON gives it back (tuples come back as lists)."""
    return list(key) if isinstance(key, tuple) else key
