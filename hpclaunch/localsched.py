"""The built-in ``local`` backend: run a rendered job script as a background process, on a laptop.

It offers the same methods as SlurmClient, and gives the script what a one-node Slurm job sees: the
``SLURM_*`` variables, ``#SBATCH --job-name/--output/--error/--chdir`` honoured (with ``%j``, ``%x``...
expanded like sbatch does), and an ``srun`` on PATH that just runs its command. Each job keeps its state
in a directory: ``meta.json``, the script, ``exitcode`` (written by a small bash wrapper) and
``cancelled``.

Longer than most modules on purpose: it is a whole (small) scheduler — ids, state directories,
process groups, Slurm's filename patterns and environment, cancel with grace — and each part only
makes sense next to the others.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import shutil
import signal as signal_module
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from hpclaunch.errors import JobNotFound, SlurmError, SubmissionRejected
from hpclaunch.polling import PollBudget, UpdateCallback, wait_for
from hpclaunch.scheduler import ArrayTask, Capabilities
from hpclaunch.slurm.parse import expand_filename_pattern
from hpclaunch.slurm.request import Preflight, job_request
from hpclaunch.states import NOT_FOUND, JobInfo, JobState
from hpclaunch.transport.base import Transport

NODE_NAME = "localhost"

# Runs the job script and records its exit status. User values reach it only as positional
# arguments ($1 script, $2 exit file), never inside this string.
# Like slurmd at the end of a batch script, it then kills what the script left running in its group.
_WRAPPER = 'bash "$1"; code=$?; printf "%s\\n" "$code" > "$2.tmp" && mv -f "$2.tmp" "$2"; kill -KILL 0'

# srun stand-in: drops srun's options (and the values of those that take one) and runs the command.
_SRUN_SHIM = r"""#!/bin/sh
# hpclaunch local backend: there is no Slurm here, so run the command once, ignoring srun's options.
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; break ;;
    --*=*) shift ;;
    -A|-b|-B|-c|-C|-d|-D|-e|-G|-i|-J|-L|-m|-M|-n|-N|-o|-p|-q|-r|-S|-t|-T|-w|-W|-x|\
--account|--begin|--extra-node-info|--cpus-per-task|--constraint|--dependency|--chdir|--error|\
--gpus|--input|--job-name|--licenses|--distribution|--clusters|--ntasks|--nodes|--output|\
--partition|--qos|--relative|--core-spec|--time|--threads|--nodelist|--wait|--exclude|--mem|\
--mem-per-cpu|--mem-per-gpu|--gres|--gpus-per-node|--gpus-per-task|--gpus-per-socket|--gpu-bind|\
--cpus-per-gpu|--ntasks-per-node|--ntasks-per-socket|--ntasks-per-core|--ntasks-per-gpu|--mpi|\
--cpu-bind|--export|--het-group|--jobid|--kill-on-bad-exit|--mem-bind|--nice|--open-mode|--overlap-force|\
--propagate|--reservation|--signal|--slurmd-debug|--task-prolog|--task-epilog|--time-min|--tmp|\
--uid|--gid|--comment|--container|--cpu-freq|--network|--prolog|--epilog|--switches|--wckey)
      shift; [ $# -gt 0 ] && shift ;;
    -*) shift ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || { echo "srun (hpclaunch local): no command given" >&2; exit 2; }
exec "$@"
"""


def default_state_dir() -> Path:
    """``$XDG_DATA_HOME/hpclaunch/local-jobs`` (``~/.local/share/...`` by default)."""
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data) / "hpclaunch" / "local-jobs"


@dataclass(frozen=True)
class _Meta:
    job_id: str
    name: str
    pid: int
    proc_start: str | None  # /proc start time, to tell our process from a recycled pid
    submit_time: str
    work_dir: str
    stdout_path: str
    stderr_path: str
    user: str

    @classmethod
    def load(cls, path: Path) -> _Meta:
        data: dict[str, Any] = json.loads(path.read_text())
        fields: dict[str, Any] = {key: data.get(key) for key in cls.__dataclass_fields__}
        return cls(**fields)


class LocalScheduler:
    """Runs job scripts as detached background processes on this machine (no Slurm needed)."""

    name = "local"
    capabilities = Capabilities(arrays=False, cancel_array=False, runs_here=True)

    def __init__(
        self,
        state_dir: str | os.PathLike[str] | None = None,
        *,
        kill_grace: float = 5.0,
        transport: Transport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        self.kill_grace = kill_grace
        self._transport = transport
        self._sleep = sleep
        self._clock = clock
        # Children we started: polled so they are reaped (a zombie would look alive to kill(pid, 0)).
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def transport(self) -> Transport:
        """A local transport for reading the jobs' files."""
        if self._transport is None:
            from hpclaunch.transport.local import LocalTransport

            self._transport = LocalTransport()
        return self._transport

    # -- state directory -------------------------------------------------------------------------------

    def _job_dir(self, job_id: str) -> Path:
        job_id = str(job_id).strip()
        if not job_id.isdigit():
            raise SlurmError(f"not a local job id: {job_id!r}")
        return self.state_dir / job_id

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl  # POSIX only; the local backend needs bash and process groups anyway

        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.state_dir / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _next_id(self) -> str:
        """The next job id from a counter file, safe against concurrent submitters."""
        with self._locked():
            counter = self.state_dir / "last-job-id"
            try:
                last = int(counter.read_text().strip() or 0)
            except (FileNotFoundError, ValueError):
                last = 0
            job_id = last + 1
            while (self.state_dir / str(job_id)).exists():  # a lost counter must not reuse a job dir
                job_id += 1
            (self.state_dir / str(job_id)).mkdir(mode=0o700)
            tmp = counter.with_suffix(".tmp")
            tmp.write_text(f"{job_id}\n")
            tmp.replace(counter)
            return str(job_id)

    def _shim_dir(self) -> Path:
        shim_dir = self.state_dir / "bin"
        srun = shim_dir / "srun"
        if not srun.exists() or srun.read_text() != _SRUN_SHIM:
            shim_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = shim_dir / ".srun.tmp"
            tmp.write_text(_SRUN_SHIM)
            tmp.chmod(0o755)
            tmp.replace(srun)
        return shim_dir

    # -- submitting ------------------------------------------------------------------------------------

    def submit(
        self,
        script_text: str,
        *,
        sbatch_args: Sequence[str] = (),
        workdir: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> str:
        """Start the script with bash in the background and return its job id at once."""
        return self._start(script_text, sbatch_args=sbatch_args, workdir=workdir, env=env)

    def submit_array(
        self, script_text: str, *, count: int, workdir: str, max_concurrent: int | None = None
    ) -> list[ArrayTask]:
        """No arrays here: each task runs as its own background job, all at once (a throttle does not
        apply), with the ``SLURM_ARRAY_*`` variables a Slurm task sees and ``%A``/``%a`` in output
        paths expanded as Slurm would; ``%A`` is the first task's job id."""
        tasks: list[ArrayTask] = []
        for index in range(count):
            env = {
                "SLURM_ARRAY_TASK_ID": str(index),
                "SLURM_ARRAY_TASK_COUNT": str(count),
                "SLURM_ARRAY_TASK_MIN": "0",
                "SLURM_ARRAY_TASK_MAX": str(count - 1),
                "SLURM_ARRAY_TASK_STEP": "1",
                "HPCLAUNCH_TASK_OFFSET": "0",
            }
            first = tasks[0].job_id if tasks else None
            job_id = self._start(script_text, workdir=workdir, env=env, array=(first, str(index)))
            tasks.append(ArrayTask(job_id, first or job_id, index))
        return tasks

    def gpus_per_node(self, partition: str | None) -> int | None:
        """This machine's GPUs are not scheduled: unknown."""
        return None

    def cpus_per_gpu(self, partition: str | None) -> int | None:
        return None

    def check(
        self, script_text: str, *, sbatch_args: Sequence[str] = (), workdir: str | None = None
    ) -> Preflight:
        """Every job starts at once here; only an unreadable ``#SBATCH`` header is refused."""
        job_request(script_text, sbatch_args)
        return Preflight(start=datetime.now(), nodes=NODE_NAME, partition="local")

    def max_array_size(self) -> int | None:
        return None

    def _start(
        self,
        script_text: str,
        *,
        sbatch_args: Sequence[str] = (),
        workdir: str | None = None,
        env: Mapping[str, str] | None = None,
        array: tuple[str | None, str] | None = None,
    ) -> str:
        if "\0" in script_text:
            raise SubmissionRejected("the job script contains a NUL byte")
        if isinstance(sbatch_args, str):
            raise TypeError("sbatch_args must be a list of strings, not one string")
        # Command-line arguments win over the script's #SBATCH lines, as with sbatch.
        options = job_request(script_text, sbatch_args)
        submit_dir = os.getcwd()
        work_dir = os.path.expanduser(options.get("chdir") or workdir or submit_dir)
        if not os.path.isdir(work_dir):
            raise SubmissionRejected(f"the job's working directory does not exist: {work_dir}")
        cpus = options.get("cpus_per_task") or "1"
        if not cpus.isdigit():
            raise SubmissionRejected(f"--cpus-per-task must be a number, not {cpus!r}")

        job_id = self._next_id()
        job_dir = self.state_dir / job_id
        name = options.get("job_name") or "sbatch"
        user = getpass.getuser()
        values = {
            "j": job_id,
            "x": name,
            "u": user,
            "N": NODE_NAME,
            "A": (array[0] or job_id) if array else job_id,
            "a": array[1] if array else "4294967294",
            "n": "0",
            "t": "0",
            "s": "batch",
        }
        stdout_path = self._out_path(options.get("output") or "slurm-%j.out", values, work_dir)
        stderr_path = (
            self._out_path(options["error"], values, work_dir) if "error" in options else stdout_path
        )

        script = job_dir / "script.sh"
        script.write_text(script_text)
        script.chmod(0o700)
        job_env = {
            **os.environ,
            **(env or {}),
            "PATH": f"{self._shim_dir()}{os.pathsep}{os.environ.get('PATH', os.defpath)}",
            "SLURM_JOB_ID": job_id,
            "SLURM_JOBID": job_id,
            "SLURM_JOB_NAME": name,
            "SLURM_JOB_USER": user,
            "SLURM_JOB_NODELIST": NODE_NAME,
            "SLURM_NODELIST": NODE_NAME,
            "SLURMD_NODENAME": NODE_NAME,
            "SLURM_SUBMIT_DIR": submit_dir,
            "SLURM_SUBMIT_HOST": NODE_NAME,
            "SLURM_CPUS_PER_TASK": cpus,
            "SLURM_CPUS_ON_NODE": cpus,
            "SLURM_NTASKS": "1",
            "SLURM_NPROCS": "1",
            "SLURM_NNODES": "1",
            "SLURM_JOB_NUM_NODES": "1",
            "SLURM_PROCID": "0",
            "SLURM_LOCALID": "0",
            "SLURM_NODEID": "0",
            "SLURM_TASKS_PER_NODE": "1",
            "SLURM_CLUSTER_NAME": "local",
            "SLURM_JOB_PARTITION": "local",
        }
        exit_file = job_dir / "exitcode"
        try:
            with self._open_outputs(stdout_path, stderr_path) as (out, err):
                proc = subprocess.Popen(
                    ["bash", "-c", _WRAPPER, "hpclaunch-local-job", str(script), str(exit_file)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    cwd=work_dir,
                    env=job_env,
                    start_new_session=True,  # its own process group: cancel signals the whole job
                    close_fds=True,
                )
        except OSError as exc:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise SubmissionRejected(f"cannot start the local job: {exc}") from exc
        self._children[job_id] = proc
        meta = _Meta(
            job_id=job_id,
            name=name,
            pid=proc.pid,
            proc_start=_proc_start(proc.pid),
            submit_time=datetime.now().replace(microsecond=0).isoformat(),
            work_dir=work_dir,
            stdout_path=stdout_path,
            stderr_path=stderr_path,
            user=user,
        )
        tmp = job_dir / "meta.json.tmp"
        tmp.write_text(json.dumps(meta.__dict__, indent=1))
        tmp.replace(job_dir / "meta.json")
        return job_id

    @staticmethod
    def _out_path(pattern: str, values: Mapping[str, str], work_dir: str) -> str:
        expanded = expand_filename_pattern(pattern, values)
        path = expanded if expanded is not None else pattern  # unknown tokens stay literal
        return os.path.join(work_dir, os.path.expanduser(path))

    @staticmethod
    @contextlib.contextmanager
    def _open_outputs(stdout_path: str, stderr_path: str) -> Iterator[tuple[int, int]]:
        """Open the output files like slurmd does: created, appended to, shared when they are the same."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        out = os.open(stdout_path, flags, 0o644)
        err = out if stderr_path == stdout_path else os.open(stderr_path, flags, 0o644)
        try:
            yield out, err
        finally:
            os.close(out)
            if err != out:
                os.close(err)

    # -- querying --------------------------------------------------------------------------------------

    def states(self, job_ids: Iterable[str]) -> dict[str, JobInfo]:
        """The info of each id, from its state directory and whether its process still runs."""
        return {str(job_id).strip(): self._info(str(job_id).strip()) for job_id in dict.fromkeys(job_ids)}

    def info(self, job_id: str) -> JobInfo:
        """The current info of one job."""
        return self._info(str(job_id).strip())

    def _info(self, job_id: str) -> JobInfo:
        job_dir = self._job_dir(job_id)
        try:
            meta = _Meta.load(job_dir / "meta.json")
        except (FileNotFoundError, ValueError, TypeError):
            return JobInfo(
                job_id=job_id,
                state=JobState.UNKNOWN,
                source=NOT_FOUND,
                reason=f"no local job {job_id} in {self.state_dir}",
            )
        alive = self._alive(job_id, meta)
        code = _read_int(job_dir / "exitcode")
        cancelled = (job_dir / "cancelled").exists()
        reason: str | None = None
        signal: int | None = None
        if cancelled and not alive:
            state = JobState.CANCELLED
        elif alive:
            state = JobState.RUNNING
        elif code is None:
            state = JobState.FAILED
            reason = "the job's process ended without recording an exit code"
        elif code == 0:
            state = JobState.COMPLETED
        else:
            state = JobState.FAILED
            reason = "NonZeroExitCode"
            if code > 128:  # bash reports death by signal N as 128+N
                signal = code - 128
        submit = datetime.fromisoformat(meta.submit_time)
        end = _mtime(job_dir / "exitcode") or _mtime(job_dir / "cancelled")
        elapsed = (
            int(((end or datetime.now()) - submit).total_seconds()) if state.is_terminal or alive else None
        )
        return JobInfo(
            job_id=job_id,
            state=state,
            source="local",
            name=meta.name,
            reason=reason,
            node_list=NODE_NAME,
            start_time=submit,
            submit_time=submit,
            elapsed=max(0, elapsed) if elapsed is not None else None,
            exit_code=code if state.is_terminal else None,
            signal=signal,
            work_dir=meta.work_dir,
            stdout_path=meta.stdout_path,
            stderr_path=meta.stderr_path,
            partition="local",
            user=meta.user,
        )

    def _alive(self, job_id: str, meta: _Meta) -> bool:
        """True while the job's process group has a live member (its own pid, or a child it left)."""
        child = self._children.get(job_id)
        if child is not None and child.poll() is not None:
            self._children.pop(job_id, None)
        if (self.state_dir / job_id / "exitcode").exists():
            return False
        if child is None and meta.proc_start is not None:
            now = _proc_start(meta.pid)
            if now is not None and now != meta.proc_start:
                return False  # the pid (and so maybe the group id) now belongs to another process
        # The wrapper may be gone (cancel kills it first) while the script it started still runs.
        return _group_alive(meta.pid)

    def output_path(self, job_id: str) -> str:
        """Where the job's standard output goes (patterns already expanded at submit)."""
        try:
            return _Meta.load(self._job_dir(job_id) / "meta.json").stdout_path
        except FileNotFoundError:
            raise SlurmError(f"no local job {job_id} in {self.state_dir}") from None

    def jobs(self, name_prefix: str | None = None, user: str | None = None) -> list[JobInfo]:
        """Every job in the state directory (they are all this user's), oldest first."""
        if user is not None and user != getpass.getuser():
            return []
        if not self.state_dir.is_dir():
            return []
        ids = sorted((p.name for p in self.state_dir.iterdir() if p.name.isdigit()), key=int)
        jobs = [info for info in self.states(ids).values() if info.state is not JobState.UNKNOWN]
        if name_prefix is not None:
            jobs = [job for job in jobs if (job.name or "").startswith(name_prefix)]
        return jobs

    def tool_steps(self, job_id: str) -> list[str]:
        """A local job has no steps: nothing joins it."""
        return []

    # -- acting on jobs --------------------------------------------------------------------------------

    def cancel(self, job_id: str, *, signal: str | None = None, batch_only: bool = False) -> None:
        """SIGTERM the job's process group, then SIGKILL after ``kill_grace`` seconds; with ``signal``,
        only send that signal. A job that already ended is left alone."""
        job_id = str(job_id).strip()
        job_dir = self._job_dir(job_id)
        number = _signal_number(signal) if signal is not None else None  # refuse a bad name in any case
        try:
            meta = _Meta.load(job_dir / "meta.json")
        except FileNotFoundError:
            raise JobNotFound(
                f"no local job {job_id} in {self.state_dir}", hint="see `hpclaunch -p local status`"
            ) from None
        if not self._alive(job_id, meta):
            return
        if number is not None:
            if not batch_only:
                self._signal(meta.pid, number, group=True)
                return
            # Like scancel --batch: only the batch shell, which is the wrapper's child running the script.
            for pid in _children_of(meta.pid) or [meta.pid]:
                self._signal(pid, number, group=False)
            return
        (job_dir / "cancelled").touch()
        self._signal(meta.pid, signal_module.SIGTERM, group=True)
        deadline = self._clock() + self.kill_grace
        while self._alive(job_id, meta) and self._clock() < deadline:
            self._sleep(0.05)
        if self._alive(job_id, meta):
            self._signal(meta.pid, signal_module.SIGKILL, group=True)
            deadline = self._clock() + 5.0
            while self._alive(job_id, meta) and self._clock() < deadline:
                self._sleep(0.05)

    @staticmethod
    def _signal(pid: int, number: int, *, group: bool) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(pid, number)
            else:
                os.kill(pid, number)

    def wait(
        self,
        job_ids: Iterable[str],
        *,
        timeout: float | None = None,
        poll: float | None = None,
        max_poll: float | None = None,
        on_update: UpdateCallback | None = None,
        unknown_grace: float | None = 120.0,
    ) -> dict[str, JobInfo]:
        """Block until every job has ended; raise WaitTimeout at ``timeout``, JobNotFound for an id
        unknown for ``unknown_grace`` s. Asking costs no controller here: the default ceiling is 2 s."""
        return wait_for(
            lambda ids: self.states(ids),
            job_ids,
            timeout=timeout,
            backoff=PollBudget(0.2, 2.0).backoff(poll, max_poll),
            on_update=on_update,
            what="local job",
            sleep=self._sleep,
            clock=self._clock,
            unknown_grace=unknown_grace,
        )


def _signal_number(signal: str | int) -> int:
    text = str(signal).strip().upper()
    if text.isdigit():
        return int(text)
    name = text if text.startswith("SIG") else "SIG" + text
    try:
        return int(signal_module.Signals[name])
    except KeyError:
        raise SlurmError(f"not a signal name or number: {signal!r}") from None


def _group_alive(pgid: int) -> bool:
    """True while the process group has a member that is not a zombie."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg also counts zombies, which an init that reaps slowly leaves around for a while.
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


def _children_of(pid: int) -> list[int]:
    """The direct children of ``pid``: from /proc on Linux, else from ``pgrep -P``."""
    proc = Path("/proc")
    if proc.is_dir():
        children = []
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
            except OSError:
                continue
            if len(fields) > 1 and fields[1] == str(pid):
                children.append(int(entry.name))
        return children
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout
    except OSError:
        return []
    return [int(word) for word in out.split() if word.isdigit()]


def _proc_start(pid: int) -> str | None:
    """The process start time from /proc (Linux), or None where there is no /proc (macOS)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22, counted after the command name, which may itself hold spaces and parentheses.
    return stat.rsplit(")", 1)[-1].split()[19]


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _mtime(path: Path) -> datetime | None:
    try:
        return datetime.fromtimestamp(path.stat().st_mtime).replace(microsecond=0)
    except FileNotFoundError:
        return None
