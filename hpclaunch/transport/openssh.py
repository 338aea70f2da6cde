"""Reach the cluster through the system's OpenSSH client and a ControlMaster that hpclaunch starts.

The first use logs in once (``ssh -f -N -o ControlMaster=yes -o ControlPersist=...``); the master then
carries every command (``ssh -o ControlMaster=no``: a mux client, a few ms), every file (streamed
through ``cat``: measured faster than ``sftp -b`` for the small files hpclaunch moves, see
bench/ssh_session.py) and every forward (``ssh -O forward -L 127.0.0.1:PORT:HOST:PORT``, moved by the
master itself at OpenSSH's speed). With ``persist`` > 0 the master outlives this process, so the next
CLI command on the profile costs no login at all; 0 ends it when the transport closes.

Everything OpenSSH supports works unchanged: the user's config as ``ssh`` reads it, GSSAPI/Kerberos,
FIDO2 and PKCS#11 keys, certificates, agents, ProxyJump. Host keys are OpenSSH's own checking, strict
unless the user opted in to ``accept-new`` (never ``no``).

Commands go only through the master: they carry ``ProxyCommand=false``, so when the master is gone a
command fails at once instead of logging in on its own; the transport then starts a new master and runs
the command again (it never reached the server). A master that dies while a command runs is reported,
not retried: the command may have run.

Longer than most modules on purpose: the master's life (start under a cross-process lock, detect a
stale socket, replace it) and every role's use of it (commands with their remote pid for timeouts,
files streamed through ``cat``, forwards re-added by a watcher when the master is replaced) depend on
the same control socket and its identity; login messages (:mod:`.sshfailure`), host settings
(:mod:`.hostsettings`), key checks (:mod:`.keyfile`) and the login environment (:mod:`.loginenv`)
already live apart.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import IO

from hpclaunch.errors import (
    CommandError,
    CommandTimeout,
    ConfigError,
    ConnectionFailed,
    TransportError,
    TunnelError,
)
from hpclaunch.transport import relay, runtime
from hpclaunch.transport.base import (
    CommandResult,
    Forward,
    PathNotFound,
    Transport,
    as_bytes,
    check_argv,
    decode,
    reason,
    short_command,
)
from hpclaunch.transport.hostkeys import accept_new_from_env
from hpclaunch.transport.hostsettings import HostSettings, Resolver
from hpclaunch.transport.loginenv import LoginEnv

log = logging.getLogger(__name__)

#: Seconds an idle master stays up for the next command (the profile's ``session_idle``).
DEFAULT_PERSIST = 600
#: The first stderr line of a command with a deadline: the remote shell's pid, to kill its group.
_PID_MARK = b"hpclaunch-pid:"
#: A login (with a human answering MFA) may take this long before we give up on it.
LOGIN_TIMEOUT = 300.0
#: What ``ssh`` prints when ``ProxyCommand=false`` ran: there was no master, the command never left.
_NO_MASTER = ("kex_exchange_identification", "UNKNOWN port 65535")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_MISSING = 66  # our scripts' exit code for "no such file" (EX_NOINPUT)
NO_SSH = "transport 'openssh' needs the OpenSSH client `ssh`, and there is none on PATH"
NO_SSH_HINT = 'install OpenSSH (openssh-client), or use transport = "paramiko" (--transport paramiko)'


def _option(key: str, value: str) -> list[str]:
    # ssh -o splits its value like a config line: a path with spaces must be quoted.
    if any(c.isspace() for c in value) or '"' in value:
        value = '"' + value.replace('"', "") + '"'
    return ["-o", f"{key}={value}"]


class OpenSSHTransport(Transport):
    """The system ``ssh`` with a ControlMaster of hpclaunch's own; see the module docstring."""

    is_remote = True

    def __init__(
        self,
        host: str,
        *,
        user: str | None = None,
        port: int | None = None,
        identity_file: str | Sequence[str] | None = None,
        ssh_config_path: str | None = None,
        accept_new_host_key: bool = False,
        known_hosts_file: str | None = None,
        connect_timeout: float | None = None,
        keepalive: int | None = None,
        persist: int = DEFAULT_PERSIST,
        proxy_jump: str | None = None,
        control_dir: str | None = None,
        login_shell: bool = True,
    ) -> None:
        """``persist``: seconds the master stays up once idle, for later processes (0: until close)."""
        super().__init__()
        ssh = shutil.which("ssh")
        if ssh is None:
            raise ConfigError(NO_SSH, hint=NO_SSH_HINT)
        self.ssh = ssh
        if isinstance(identity_file, str):
            identity_file = [identity_file]
        files = [os.path.expanduser(p) for p in identity_file or ()]
        self.resolver = Resolver(
            ssh_config_path,
            identity_files=files,
            connect_timeout=connect_timeout,
            keepalive=keepalive,
            openssh=True,
        )
        self.alias = host
        self._user, self._port, self._proxy_jump = user, port, proxy_jump
        self.persist = max(0, int(persist))
        self._accept_new_asked = accept_new_host_key or accept_new_from_env()
        self._known_hosts = known_hosts_file
        # One master per distinct way of connecting: OpenSSH's %C hashes only host, port and user, so
        # two profiles with different keys or configs would share (and bypass) each other's login.
        identity = repr(
            (
                ssh,
                ssh_config_path and os.path.abspath(os.path.expanduser(ssh_config_path)),
                host,
                user,
                port,
                files,
                known_hosts_file,
                proxy_jump,
            )
        )
        self.control_path = runtime.socket_path("ssh", identity, control_dir)
        opts: list[str] = []
        if ssh_config_path:
            opts += ["-F", os.path.expanduser(ssh_config_path)]
        if user:
            opts += ["-l", user]
        if port:
            opts += ["-p", str(port)]
        for path in files:
            opts += ["-i", path]
        if proxy_jump:
            opts += ["-J", proxy_jump]
        if known_hosts_file:
            opts += _option("UserKnownHostsFile", os.path.expanduser(known_hosts_file))
        opts += _option("ControlPath", self.control_path.replace("%", "%%"))
        opts += _option("LogLevel", "ERROR")
        self._opts = opts
        self._lock = threading.RLock()
        #: How many times a lost master was replaced (by ``reconnect`` or transparently).
        self.reconnects = 0
        self._seen_master = False
        self._started_here = False
        self._home: str | None = None
        self._hops: int | None = None
        self._forwards: list[Forward] = []
        #: The socket of the master this process started last (its forwards are already on it).
        self._master_id: tuple[int, int] | None = None
        self.login_env = LoginEnv(
            lambda: self.description, enabled=login_shell, cache=self.control_path + ".env"
        )

    @functools.cached_property
    def settings(self) -> HostSettings:
        """Where and as whom, as OpenSSH resolves it (``ssh -G``): for the login and its messages. Not
        needed while a master answers, so a warm command spawns no ``ssh -G``."""
        settings = self.resolver.host(self.alias, user=self._user, port=self._port)
        if self._proxy_jump:
            settings = replace(settings, proxy_jump=(self._proxy_jump,), proxy_command=None)
        return settings

    @property
    def _accept_new(self) -> bool:
        return self._accept_new_asked or self.settings.accept_new_in_config

    @property
    def description(self) -> str:
        return self.settings.target

    # -- the master ---------------------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        return self._alive()

    def _alive(self) -> bool:
        """Whether a master answers on the control socket (a unix connect: microseconds, no ssh)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.control_path)
        except OSError:
            return False
        finally:
            sock.close()
        return True

    def _socket_id(self) -> tuple[int, int] | None:
        """Changes when a new master binds the socket (so a forward knows to add itself again, and a
        saved login environment is not reused); the inode alone may be reused by the next socket."""
        try:
            st = os.stat(self.control_path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns)

    @contextlib.contextmanager
    def _master_lock(self) -> Iterator[None]:
        """Across processes: two commands that find no master start one, not two."""
        fd = os.open(self.control_path + ".lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def connect(self) -> None:
        self._ensure()

    def _ensure(self) -> None:
        if self._alive():
            self._seen_master = True
            return
        with self._lock, self._master_lock():
            if self._alive():
                self._seen_master = True
                return
            lost = self._seen_master
            self._start_master()
            if lost:
                self.reconnects += 1
                log.info("reconnected to %s", self.description)

    def _master_argv(self) -> list[str]:
        persist = f"{self.persist}s" if self.persist else "yes"
        return [
            self.ssh,
            *self._opts,
            # Only the master logs in: host keys, keepalives and the connect timeout are its business.
            *_option("StrictHostKeyChecking", "accept-new" if self._accept_new else "yes"),
            *_option("ServerAliveInterval", str(self.settings.keepalive)),
            *_option("ServerAliveCountMax", "3"),
            *_option("ConnectTimeout", str(max(1, int(self.settings.connect_timeout)))),
            *_option("ControlMaster", "yes"),
            *_option("ControlPersist", persist),
            # Our master binds no LocalForward/RemoteForward of the user's config (their own sessions
            # do). Not on `-O forward`: there it would clear the -L asked for.
            *_option("ClearAllForwardings", "yes"),
            "-f",
            "-N",
            "-T",
            "--",
            self.alias,
        ]

    def _start_master(self) -> None:
        for stale in (self.control_path, self.control_path + ".env"):  # a master killed hard leaves them
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)
        if self._accept_new:
            self._prepare_known_hosts()
        # Only a login needs these: a warm command imports none of them.
        from hpclaunch.transport import kerberos, sshfailure
        from hpclaunch.transport.keyfile import warn_if_exposed

        for path in dict.fromkeys(self.settings.identity_files):
            warn_if_exposed(path, ignored=True)
        # stderr to a file, not a pipe: a ProxyJump/ProxyCommand child inherits it and lives on.
        with tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.run(
                    self._master_argv(),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    timeout=LOGIN_TIMEOUT,
                )
            except FileNotFoundError:
                raise ConfigError(NO_SSH, hint=NO_SSH_HINT) from None
            except subprocess.TimeoutExpired:
                raise ConnectionFailed(
                    f"cannot connect to {self.description}: no login within {LOGIN_TIMEOUT:g} s"
                ) from None
            err.seek(0)
            stderr = decode(err.read())
        with self._count_lock:
            self.connections_opened += self._hop_count()
        if proc.returncode != 0:
            s = self.settings
            # Only the keys ssh could offer: with none, a refused Kerberos login is the whole story.
            keys = tuple(k for k in s.identity_files if os.path.exists(k)) if s.pubkey_authentication else ()
            asked = s.gssapi_authentication and "Permission denied" in stderr
            error = sshfailure.login_failure(
                stderr,
                self.description,
                self.alias,
                self.resolver.config_name,
                keys,
                ",".join(s.proxy_jump) or None,
                gssapi=s.gssapi_authentication,
                ticket=kerberos.has_ticket() if asked else None,
            )
            # The server refuses an expired certificate without saying why, and ssh without a
            # terminal skips a locked key: look inside ours.
            problems = self._key_problems() if "refused" in error.message else []
            if problems:
                error = type(error)(f"{error.message}; {'; '.join(problems)}", hint=error.hint)
            raise error
        if not self._alive():
            raise ConnectionFailed(
                f"ssh logged in to {self.description} but no master answers on {self.control_path}",
                hint=stderr.strip().splitlines()[-1] if stderr.strip() else None,
            )
        self._seen_master = True
        self._started_here = True
        self._home = None
        # The forwards this process holds come back on the same local ports, before anyone uses them.
        for fwd in list(self._forwards):
            with contextlib.suppress(TransportError):
                self._add_forward(fwd.remote_host, fwd.remote_port, fwd.local_port)
        self._master_id = self._socket_id()

    def _key_problems(self) -> list[str]:
        from hpclaunch.transport.keyfile import needs_passphrase
        from hpclaunch.transport.sshcert import load_certificate

        keys = self.settings.identity_files
        paths = [*self.settings.certificate_files, *(f"{k}-cert.pub" for k in keys)]
        found = (load_certificate(p) for p in dict.fromkeys(paths))
        problems = [why for cert in found if cert is not None and (why := cert.problem()) is not None]
        problems += [
            f"key {key} is protected by a passphrase, which ssh cannot ask for without a terminal "
            f"(run `ssh-add {key}` first, or `hpclaunch connect` in a terminal)"
            for key in dict.fromkeys(keys)
            if needs_passphrase(key)
        ]
        return problems

    def _hop_count(self) -> int:
        """Logins a master start costs: one per ProxyJump hop and the target."""
        if self._hops is None:
            try:
                self._hops = len(self.resolver.chain(self.settings))
            except Exception:
                self._hops = 1
        return self._hops

    def _prepare_known_hosts(self) -> None:
        """OpenSSH appends a newly accepted key with the umask's mode; make the file 0600 first."""
        path = self._known_hosts or (self.settings.user_known_hosts or ("",))[0]
        if not path or os.path.exists(path):
            return
        with contextlib.suppress(OSError):
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))

    def _control(self, operation: str, *extra: str) -> subprocess.CompletedProcess[str]:
        """``ssh -O operation``: talks to the master only."""
        argv = [self.ssh, *self._opts, "-O", operation, *extra, "--", self.alias]
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL, check=False
        )

    def master_pid(self) -> int | None:
        """The running master's pid (``ssh -O check``), None when there is none."""
        if not self._alive():
            return None
        found = re.search(r"pid=(\d+)", self._control("check").stderr)
        return int(found.group(1)) if found else None

    def end_master(self) -> bool:
        """Stop the master (``ssh -O exit``); True when one was running."""
        if not self._alive():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.control_path)
            return False
        self._control("exit")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.control_path + ".env")
        deadline = time.monotonic() + 5
        while self._alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        return True

    def reconnect(self) -> None:
        """End the master (alive or not) and log in again; raises ConnectionFailed on failure."""
        with self._lock:
            lost = self._seen_master
            self.end_master()
            self._seen_master = False
            with self._master_lock():
                self._start_master()
            if lost:
                self.reconnects += 1

    def close(self) -> None:
        # With persist the master is the point: the next command reuses it. Without, it ends with us.
        if self.persist == 0 and self._started_here:
            with contextlib.suppress(Exception):
                self.end_master()
            self._started_here = False

    # -- commands -----------------------------------------------------------------------------------

    def _mux_argv(self, command: str) -> list[str]:
        return [
            self.ssh,
            *self._opts,
            *_option("ControlMaster", "no"),
            # Never a login of its own: without the master this fails at once (see the module docstring).
            *_option("ProxyCommand", "false"),
            *_option("BatchMode", "yes"),
            *_option("ClearAllForwardings", "yes"),
            "-T",
            "--",
            self.alias,
            command,
        ]

    def remote_command(
        self, args: Sequence[str], env: Mapping[str, str] | None, timeout: float | None
    ) -> str:
        """The one place a command's argv becomes the string the remote login shell runs.

        With a ``timeout`` the shell first tells us its pid (sshd made it a session leader; ``exec``
        keeps the pid for the command): killing the local ``ssh`` alone leaves the remote command
        running, so a timeout kills that process group through the master.
        """
        if env:
            for name in env:
                if not _ENV_NAME.match(name):
                    raise ValueError(f"not an environment variable name: {name!r}")
        # In the login environment: the first command on a master runs the login shell once.
        self._ensure()
        command = self.login_env.command(self._socket_id(), args, env, self._run_raw)
        if timeout is None:
            return command
        return f"printf '{_PID_MARK.decode()}%s\\n' \"$$\" >&2; exec {command}"

    def _run_raw(self, command: str, timeout: float) -> CommandResult:
        """``command`` exactly as given, not counted as a command: the login shell's capture."""
        argv = ["$SHELL", "-l"]  # for messages
        code, out, err = self._call(command, argv, timeout=timeout)
        return CommandResult(tuple(argv), code, decode(out), decode(err))

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: str | bytes | None = None,
        timeout: float | None = 60.0,
        check: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> CommandResult:
        args = check_argv(argv)
        command = self.remote_command(args, env, timeout)
        self._count_command(args)
        code, out, err = self._call(command, args, stdin=as_bytes(stdin), timeout=timeout)
        result = CommandResult(tuple(args), code, decode(out), decode(err))
        if check and not result.ok:
            hint = None
            if code == 127:
                shells = "login shells" if self.login_env.enabled else "non-interactive logins"
                hint = f"is `{args[0]}` installed on {self.description} and on PATH for {shells}?"
            raise CommandError(args, code, result.stdout, result.stderr, hint=hint)
        return result

    def run_attached(self, argv: Sequence[str], *, tty: bool = False) -> int:
        """``argv`` on the host with this process's stdin, stdout and stderr (``ssh -tt`` with ``tty``:
        a terminal, raw mode and window resizes are ssh's own); returns its exit status."""
        args = check_argv(argv)
        self._count_command(args)
        self._ensure()
        command = self.login_env.command(self._socket_id(), args, None, self._run_raw)
        mux = self._mux_argv(command)
        mux[mux.index("-T")] = "-tt" if tty else "-T"
        return subprocess.call(mux)

    def _call(
        self,
        command: str,
        args: Sequence[str],
        *,
        stdin: bytes | IO[bytes] | None = None,
        stdout: IO[bytes] | None = None,
        timeout: float | None = 60.0,
    ) -> tuple[int, bytes, bytes]:
        """Run ``command`` through the master: (exit code, stdout, stderr). Starts the master if needed;
        a command refused for want of a master (it never left this machine) is run once more."""
        for attempt in (0, 1):
            self._ensure()
            if isinstance(stdin, bytes) or stdin is None:
                source: int | IO[bytes] = subprocess.PIPE if stdin else subprocess.DEVNULL
            else:
                stdin.seek(0)
                source = stdin
            # stderr in a file: on a timeout its first line (the remote pid) is there to read.
            with tempfile.TemporaryFile() as errfile:
                proc = subprocess.Popen(
                    self._mux_argv(command),
                    stdin=source,
                    stdout=stdout if stdout is not None else subprocess.PIPE,
                    stderr=errfile,
                    start_new_session=True,  # a Ctrl-C meant for us is handled by us, once
                )
                try:
                    out, _ = proc.communicate(stdin if isinstance(stdin, bytes) else None, timeout=timeout)
                except subprocess.TimeoutExpired:
                    self._kill(proc)
                    errfile.seek(0)
                    self._kill_remote(errfile.read())
                    raise CommandTimeout(
                        f"`{short_command(args)}` did not finish within {timeout or 0:g} s "
                        f"on {self.description}; killed it"
                    ) from None
                except BaseException:
                    self._kill(proc)
                    errfile.seek(0)
                    with contextlib.suppress(Exception):
                        self._kill_remote(errfile.read())
                    raise
                errfile.seek(0)
                err = _strip_pid(errfile.read())
            out = out or b""
            if proc.returncode == 255 and not self._alive():
                text = decode(err)
                if attempt == 0 and any(mark in text for mark in _NO_MASTER):
                    continue  # the master was gone before the command started: safe to run again
                raise TransportError(
                    f"the connection to {self.description} broke while `{short_command(args)}` ran; "
                    "it may or may not have finished",
                    hint="run the command again once the connection is back",
                )
            return proc.returncode, out, err
        raise AssertionError("unreachable")

    def _kill_remote(self, stderr: bytes) -> None:
        """KILL the process group of the remote shell whose pid ``stderr`` starts with."""
        pid = _remote_pid(stderr)
        if pid is None or not self._alive():
            return
        script = 'kill -KILL -- -"$(ps -o pgid= -p "$1" | tr -d " ")" 2>/dev/null || kill -KILL "$1"'
        argv = ["sh", "-c", script, "hpclaunch", str(pid)]
        with contextlib.suppress(TransportError, subprocess.TimeoutExpired):
            self._call(shlex.join(argv), argv, timeout=None)

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            proc.communicate(timeout=5)

    # -- files --------------------------------------------------------------------------------------

    def _script(
        self,
        what: str,
        path: str,
        script: str,
        *args: str,
        stdin: bytes | IO[bytes] | None = None,
        stdout: IO[bytes] | None = None,
    ) -> bytes:
        """Run a small sh script on a file; exit 66 means the file (or its directory) is missing."""
        argv = ["sh", "-c", script, "hpclaunch", *args]
        self._count_command(argv)
        code, out, err = self._call(shlex.join(argv), argv, stdin=stdin, stdout=stdout, timeout=None)
        if code == _MISSING:
            raise PathNotFound(path, self.description)
        if code != 0:
            lines = decode(err).strip().splitlines()
            raise TransportError(
                f"cannot {what} {path} on {self.description}: {lines[-1] if lines else f'exit {code}'}"
            )
        return out

    def read_bytes(self, path: str, *, offset: int = 0, limit: int | None = None) -> bytes:
        target = self.expand(path)
        script = '[ -e "$1" ] || exit 66; '
        if offset or limit is not None:
            # tail seeks in a regular file; head stops reading at the limit (a growing log's new part).
            script += 'tail -c +"$2" -- "$1"' + (' | head -c "$3"' if limit is not None else "")
        else:
            script += 'exec cat -- "$1"'
        return self._script("read", path, script, target, str(offset + 1), str(limit or 0))

    def _write(self, path: str, mode: int, stdin: bytes | IO[bytes]) -> None:
        target = self.expand(path)
        # umask 077 and chmod before any content: the file never holds data under a wider mode.
        script = (
            'umask 077; d=$(dirname -- "$1"); [ -d "$d" ] || exit 66; t="$1.tmp-$$-$3"; '
            ': > "$t" && chmod "$2" "$t" && cat > "$t" && mv -f -- "$t" "$1" || { rm -f -- "$t"; exit 1; }'
        )
        self._script("write", path, script, target, f"{mode:o}", secrets.token_hex(4), stdin=stdin)

    def write_bytes(self, path: str, data: bytes, *, mode: int = 0o600) -> None:
        self._write(path, mode, data)

    def exists(self, path: str) -> bool:
        target = self.expand(path)
        argv = ["sh", "-c", 'test -e "$1" || test -L "$1"', "hpclaunch", target]
        self._count_command(argv)
        code, _, err = self._call(shlex.join(argv), argv, timeout=60)
        if code not in (0, 1):
            raise TransportError(f"cannot look at {path} on {self.description}: {decode(err).strip()}")
        return code == 0

    def makedirs(self, path: str, *, mode: int = 0o700) -> None:
        target = self.expand(path)
        script = 'umask 077; [ -d "$1" ] || { mkdir -p -- "$1" && chmod "$2" -- "$1"; }'
        self._script("create directory", path, script, target, f"{mode:o}")

    def remove(self, path: str) -> None:
        self._script("remove", path, 'rm -f -- "$1"', self.expand(path))

    def home(self) -> str:
        if self._home is None:
            # sshd starts the session in the home directory; -P as SFTP's realpath(".") would.
            self._home = self._script("find the home directory", "~", "pwd -P").decode().strip()
        return self._home

    def put(self, local_path: str, remote_path: str, *, mode: int | None = None) -> None:
        try:
            src = open(local_path, "rb")  # closed by the with below; opened first to fail early
        except FileNotFoundError:
            raise PathNotFound(local_path, "this machine") from None
        except OSError as exc:
            raise TransportError(f"cannot read {local_path}: {reason(exc)}") from None
        with src:
            file_mode = mode if mode is not None else os.fstat(src.fileno()).st_mode & 0o7777
            self._write(remote_path, file_mode, src)

    def get(self, remote_path: str, local_path: str) -> None:
        target = self.expand(remote_path)
        tmp = f"{local_path}.tmp-{secrets.token_hex(4)}"
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except OSError as exc:
            raise TransportError(f"cannot write {local_path} on this machine: {reason(exc)}") from None
        try:
            with os.fdopen(fd, "wb") as fh:
                self._script(
                    "read", remote_path, '[ -e "$1" ] || exit 66; exec cat -- "$1"', target, stdout=fh
                )
            os.replace(tmp, local_path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    # -- forwards -----------------------------------------------------------------------------------

    def forward(
        self, remote_host: str, remote_port: int, *, local_port: int = 0
    ) -> contextlib.AbstractContextManager[Forward]:
        return self._forward(remote_host, remote_port, local_port)

    @staticmethod
    def _spec(local_port: int, host: str, port: int) -> str:
        far = f"[{host}]" if ":" in host else host
        return f"127.0.0.1:{local_port}:{far}:{port}"

    def _add_forward(self, host: str, port: int, local_port: int) -> int:
        """Ask the master to listen on 127.0.0.1 (a free port when ``local_port`` is 0)."""
        # The master accepts a forward it already has (another session's) as done, and our cancel
        # on exit would then close that session's tunnel: a port in use is refused here.
        relay.ensure_port_free(local_port)
        for _ in range(5):
            chosen = local_port or _free_port()
            done = self._control("forward", "-L", self._spec(chosen, host, port))
            if done.returncode == 0:
                return chosen
            if local_port:
                raise TunnelError(
                    f"cannot listen on 127.0.0.1:{local_port} for {host}:{port}: "
                    f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'refused'}",
                    hint="is that port in use? choose another, or 0 for any free one",
                )
        raise TunnelError(f"cannot open a local port for {host}:{port} through {self.description}")

    @contextlib.contextmanager
    def _forward(self, host: str, port: int, local_port: int) -> Iterator[Forward]:
        self._ensure()
        fwd = Forward(self._add_forward(host, port, local_port), host, port)
        self._forwards.append(fwd)
        stop = threading.Event()
        watcher = threading.Thread(
            target=self._watch, args=(fwd, stop), name="hpclaunch-forward", daemon=True
        )
        watcher.start()
        try:
            yield fwd
        finally:
            stop.set()
            watcher.join(timeout=10)
            self._forwards.remove(fwd)
            if self._alive():
                with contextlib.suppress(Exception):
                    self._control("cancel", "-L", self._spec(fwd.local_port, host, port))

    def _keeper(self) -> subprocess.Popen[bytes]:
        """A mux session that only waits: while a tunnel is open, the master is not idle (ControlPersist)."""
        return subprocess.Popen(
            self._mux_argv("exec cat >/dev/null"),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _watch(self, fwd: Forward, stop: threading.Event) -> None:
        """Bring the forward back, on the same local port, when the master is lost or replaced."""
        socket_id = self._socket_id()
        keeper = self._keeper()
        try:
            while not stop.wait(0.5):
                if self._alive() and self._socket_id() == socket_id:
                    continue
                try:
                    self._ensure()
                    if self._socket_id() != self._master_id:  # another process started this master
                        self._add_forward(fwd.remote_host, fwd.remote_port, fwd.local_port)
                except TransportError as exc:
                    with fwd.status._lock:
                        fwd.status.last_error = exc.one_line()
                    stop.wait(2.0)
                    continue
                socket_id = self._socket_id()
                keeper.kill()
                keeper.wait()
                keeper = self._keeper()
        finally:
            with contextlib.suppress(Exception):
                if keeper.stdin is not None:
                    keeper.stdin.close()
                keeper.wait(timeout=5)
            if keeper.poll() is None:
                keeper.kill()
                keeper.wait()


def _remote_pid(stderr: bytes) -> int | None:
    first = stderr.split(b"\n", 1)[0]
    if first.startswith(_PID_MARK) and first[len(_PID_MARK) :].isdigit():
        return int(first[len(_PID_MARK) :])
    return None


def _strip_pid(stderr: bytes) -> bytes:
    return stderr.split(b"\n", 1)[1] if _remote_pid(stderr) is not None else stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


__all__ = ["DEFAULT_PERSIST", "OpenSSHTransport"]
