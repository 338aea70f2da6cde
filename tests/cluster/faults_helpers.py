"""Helpers for the fault tests: stop a dev-cluster daemon, bring the cluster back, fake Slurm failures.

Everything here acts only on what ``scripts/dev-cluster`` started (pid files in its state dir) or on what
the test itself made, so other processes on the machine are left alone.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEV_CLUSTER = REPO / "scripts" / "dev-cluster"

#: Slurm's own words for a controller that does not answer (seen from squeue/sbatch/scontrol 22.05).
SOCKET_TIMEOUT = "slurm_load_jobs error: Socket timed out on send/recv operation"
SBATCH_UNREACHABLE = (
    "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)"
)
SCONTROL_UNREACHABLE = "slurm_load_jobs error: Unable to contact slurm controller (connect failure)"


# -- daemons -----------------------------------------------------------------------------------------


def _pid_of(pid_file: Path) -> int | None:
    try:
        text = "".join(c for c in pid_file.read_text() if c.isdigit())
    except OSError:
        return None
    return int(text) if text else None


def _comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    state = next((line.split()[1] for line in status.splitlines() if line.startswith("State:")), "")
    return state not in ("", "Z")


def stop_daemon(state_dir: Path, name: str, comm: str, *, timeout: float = 20.0) -> int:
    """SIGTERM the daemon ``scripts/dev-cluster`` recorded in ``<state_dir>/<name>.pid``; wait until gone.

    Refuses a pid whose process is not ``comm`` (a stale file must never make us kill a stranger).
    """
    pid = _pid_of(state_dir / f"{name}.pid")
    assert pid is not None, (
        f"no pid in {state_dir / f'{name}.pid'}: was {name} started by scripts/dev-cluster?"
    )
    assert _comm(pid) == comm, f"pid {pid} from {name}.pid is {_comm(pid)!r}, not {comm!r}"
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline += 5
        time.sleep(0.05)
    return pid


def dev_cluster_up(timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``scripts/dev-cluster up``: starts whatever is not running and verifies the whole cluster."""
    return subprocess.run(
        [str(DEV_CLUSTER), "up"], capture_output=True, text=True, timeout=timeout, check=False
    )


def dev_cluster_healthy() -> bool:
    result = subprocess.run(
        [str(DEV_CLUSTER), "status"], capture_output=True, text=True, timeout=60, check=False
    )
    return result.returncode == 0


def ensure_dev_cluster_up() -> None:
    """Bring the dev cluster back to healthy (for finally blocks); raise with its output if it cannot."""
    result = dev_cluster_up()
    if result.returncode != 0 or not dev_cluster_healthy():
        raise AssertionError(f"scripts/dev-cluster up failed:\n{result.stderr[-3000:]}")


def server_pids_of_connection(local_port: int, server_port: int = 2222) -> list[int]:
    """The sshd processes serving the TCP connection whose client end is 127.0.0.1:``local_port``."""
    out = subprocess.run(
        ["ss", "-Htnp", "state", "established", f"( sport = :{server_port} and dport = :{local_port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pids = {int(p) for p in _field_values(out, "pid=")}
    return sorted(pid for pid in pids if _comm(pid) == "sshd")


def _field_values(text: str, key: str) -> Iterator[str]:
    for part in text.replace(")", ",").split(","):
        part = part.strip()
        if part.startswith(key):
            yield part[len(key) :]


# -- Slurm commands --------------------------------------------------------------------------------------


def slurm_state(job_id: str) -> str | None:
    """The job's state as the controller (as root) reports it, or None when it does not know the job."""
    out = subprocess.run(
        ["scontrol", "--oneliner", "show", "job", job_id], capture_output=True, text=True, check=False
    ).stdout
    for word in out.split():
        if word.startswith("JobState="):
            return word.split("=", 1)[1]
    return None


def wait_state(job_id: str, states: set[str], timeout: float) -> str:
    """Poll until the job is in one of ``states``; fail with the last state seen after ``timeout``."""
    deadline = time.monotonic() + timeout
    state = slurm_state(job_id)
    while state not in states:
        assert time.monotonic() < deadline, f"job {job_id} is {state}, not one of {sorted(states)}"
        time.sleep(0.1)
        state = slurm_state(job_id)
    return state


def scancel(*job_ids: str) -> None:
    ids = [j for j in job_ids if j]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, check=False, timeout=60)


def running_jobs_on(node: str) -> list[str]:
    out = subprocess.run(
        ["squeue", "-h", "-w", node, "-t", "running,completing", "-o", "%i"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return out.split()


# -- a PATH shim that makes Slurm commands fail ------------------------------------------------------------


@dataclass
class SlurmShim:
    """A directory of ``squeue``/``sbatch``/``scontrol`` wrappers: each fails its first ``fail`` calls with
    Slurm's message, then runs the real command. Put :attr:`bin` first on PATH."""

    root: Path
    real: dict[str, str] = field(default_factory=dict)

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    def install(self, command: str, *, fail: int, message: str, exit_code: int = 1) -> None:
        """Make ``command`` fail ``fail`` times (counted in a file), printing ``message`` on stderr."""
        import shutil

        real = self.real.get(command) or shutil.which(command, path=os.defpath + ":/usr/bin:/usr/sbin")
        assert real, f"{command} not found"
        self.real[command] = real
        self.bin.mkdir(parents=True, exist_ok=True)
        counter = self.root / f"{command}.count"
        counter.write_text("0\n")
        script = self.bin / command
        script.write_text(
            "#!/bin/bash\n"
            f"counter={shlex.quote(str(counter))}\n"
            # A lock keeps the count right when several calls run at once.
            'exec 9>>"$counter.lock"; flock 9\n'
            'n=$(( $(cat "$counter") + 1 )); echo "$n" >"$counter"\n'
            "exec 9>&-\n"
            f"if (( n <= {int(fail)} )); then\n"
            f"  printf '%s\\n' {shlex.quote(message)} >&2; exit {int(exit_code)}\n"
            "fi\n"
            f'exec {shlex.quote(real)} "$@"\n'
        )
        script.chmod(0o755)

    def calls(self, command: str) -> int:
        """How many times ``command`` ran through the shim (failed or not)."""
        return int((self.root / f"{command}.count").read_text().strip() or 0)

    def path(self, base: str | None = None) -> str:
        """A PATH with the shim first."""
        return f"{self.bin}:{base if base is not None else os.environ.get('PATH', os.defpath)}"


# -- small servers -----------------------------------------------------------------------------------------


class EchoServer:
    """A TCP echo server on 127.0.0.1 (any free port), one thread per client."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._echo, args=(client,), daemon=True).start()

    @staticmethod
    def _echo(client: socket.socket) -> None:
        with client:
            while data := client.recv(65536):
                client.sendall(data)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


def echo_through(port: int, payload: bytes = b"ping", timeout: float = 10.0) -> bytes:
    """Send ``payload`` to 127.0.0.1:``port`` and read the same number of bytes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


class SlowRelay:
    """A TCP relay to ``target`` that holds every new connection for ``delay`` seconds before passing
    bytes on (a slow network during the SSH login). ``accepted`` is set when a client connected."""

    def __init__(self, target: tuple[str, int], delay: float) -> None:
        self.target = target
        self.delay = delay
        self.accepted = threading.Event()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self._sock.settimeout(0.2)
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted.set()
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        if self._stop.wait(self.delay):
            client.close()
            return
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            client.close()
            return

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pump, args=(upstream, client), daemon=True).start()
        pump(client, upstream)
        client.close()
        upstream.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()
