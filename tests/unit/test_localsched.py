"""The built-in ``local`` backend: real background processes on this machine, no Slurm involved."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpclaunch.errors import SlurmError, SubmissionRejected, WaitTimeout
from hpclaunch.localsched import LocalScheduler
from hpclaunch.scheduler import Scheduler
from hpclaunch.slurm.request import parse_sbatch_options, sbatch_header_args
from hpclaunch.states import JobState, Phase


@pytest.fixture
def sched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalScheduler]:
    monkeypatch.chdir(tmp_path)
    scheduler = LocalScheduler(tmp_path / "state", kill_grace=1.0)
    yield scheduler
    for job in scheduler.jobs():  # nothing outlives a test
        scheduler.cancel(job.job_id)


def test_both_backends_satisfy_the_protocol(sched: LocalScheduler) -> None:
    from hpclaunch.slurm.client import SlurmClient
    from hpclaunch.transport.local import LocalTransport

    assert isinstance(sched, Scheduler)
    assert isinstance(SlurmClient(LocalTransport()), Scheduler)


def test_job_sees_slurm_variables_and_output_pattern(sched: LocalScheduler, tmp_path: Path) -> None:
    script = (
        "#!/bin/bash\n"
        "#SBATCH --job-name=hello\n"
        "#SBATCH -o out-%x-%j.txt\n"
        "#SBATCH --cpus-per-task=3\n"
        "\n"
        "#SBATCH --job-name=ignored  # a plain comment line above keeps the header open\n"
        "echo start\n"
        "#SBATCH --job-name=too-late\n"
        "for v in SLURM_JOB_ID SLURM_JOB_NAME SLURM_NTASKS SLURM_NNODES SLURM_NODELIST SLURMD_NODENAME \\\n"
        "  SLURM_CPUS_PER_TASK SLURM_PROCID SLURM_LOCALID SLURM_NODEID SLURM_TASKS_PER_NODE \\\n"
        '  SLURM_JOB_NUM_NODES SLURM_SUBMIT_DIR FOO; do echo "$v=${!v}"; done\n'
        'echo "pwd=$PWD"\n'
    )
    job_id = sched.submit(script, env={"FOO": "bar baz"})
    info = sched.wait([job_id], timeout=20)[job_id]
    assert info.state is JobState.COMPLETED and info.exit_code == 0 and info.phase is Phase.DONE
    assert info.name == "ignored"
    path = sched.output_path(job_id)
    assert path == str(tmp_path / f"out-ignored-{job_id}.txt") == info.stdout_path
    lines = dict(line.split("=", 1) for line in Path(path).read_text().splitlines()[1:])
    assert lines == {
        "SLURM_JOB_ID": job_id,
        "SLURM_JOB_NAME": "ignored",
        "SLURM_NTASKS": "1",
        "SLURM_NNODES": "1",
        "SLURM_NODELIST": "localhost",
        "SLURMD_NODENAME": "localhost",
        "SLURM_CPUS_PER_TASK": "3",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_TASKS_PER_NODE": "1",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "FOO": "bar baz",
        "pwd": str(tmp_path),
    }


def test_exit_code_and_separate_error_file(sched: LocalScheduler, tmp_path: Path) -> None:
    workdir = tmp_path / "work dir"
    workdir.mkdir()
    script = "#!/bin/bash\n#SBATCH -e err-%j.log\necho out; echo err >&2; exit 3\n"
    job_id = sched.submit(script, workdir=str(workdir))
    info = sched.wait([job_id], timeout=20)[job_id]
    assert (info.state, info.exit_code, info.reason) == (JobState.FAILED, 3, "NonZeroExitCode")
    assert Path(sched.output_path(job_id)).read_text() == "out\n"
    assert Path(sched.output_path(job_id)).parent == workdir
    assert (workdir / f"err-{job_id}.log").read_text() == "err\n"


def test_srun_shim_runs_the_command_once_ignoring_options(sched: LocalScheduler) -> None:
    script = (
        "#!/bin/bash\n"
        "srun -n 2 --gres=gpu:1 --ntasks-per-node 2 echo one\n"
        "srun --cpu-bind=cores -l -- bash -c 'echo two $SLURM_PROCID'\n"
        "srun python3 -c 'import sys; print(sys.argv[1:])' -n 3\n"
    )
    job_id = sched.submit(script)
    assert sched.wait([job_id], timeout=20)[job_id].state is JobState.COMPLETED
    assert Path(sched.output_path(job_id)).read_text() == "one\ntwo 0\n['-n', '3']\n"


def test_cancel_ends_the_whole_process_group(sched: LocalScheduler, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    # The script ignores SIGTERM, so only the SIGKILL after the grace period ends it.
    script = f"#!/bin/bash\ntrap '' TERM\nsleep 300 &\necho $! > {pidfile}\nwait\nsleep 300\n"
    job_id = sched.submit(script)
    deadline = time.monotonic() + 10
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sched.info(job_id).state is JobState.RUNNING
    started = time.monotonic()
    sched.cancel(job_id)
    assert time.monotonic() - started < 4
    assert sched.info(job_id).state is JobState.CANCELLED
    child = int(pidfile.read_text())
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    sched.cancel(job_id)  # cancelling a finished job is not an error


def test_background_leftovers_are_killed_when_the_script_ends(sched: LocalScheduler, tmp_path: Path) -> None:
    pidfile = tmp_path / "bg.pid"
    job_id = sched.submit(f"#!/bin/bash\nsleep 300 &\necho $! > {pidfile}\n")
    assert sched.wait([job_id], timeout=20)[job_id].state is JobState.COMPLETED
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            break
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            break
        time.sleep(0.05)
    else:
        pytest.fail("the background sleep outlived its job")


def test_signal_only_does_not_cancel(sched: LocalScheduler, tmp_path: Path) -> None:
    script = "#!/bin/bash\ntrap 'echo got usr1; exit 0' USR1\nwhile true; do sleep 0.05; done\n"
    job_id = sched.submit(script)
    time.sleep(0.3)
    sched.cancel(job_id, signal="USR1", batch_only=True)
    info = sched.wait([job_id], timeout=20)[job_id]
    assert info.state is JobState.COMPLETED
    assert "got usr1" in Path(info.stdout_path or "").read_text()
    with pytest.raises(SlurmError):
        sched.cancel(job_id, signal="NOPE")


def test_user_values_are_never_shell_code(sched: LocalScheduler, tmp_path: Path) -> None:
    name = "x$(touch pwned1)`touch pwned2`;touch pwned3"
    job_id = sched.submit("#!/bin/bash\necho ok\n", sbatch_args=["-J", name, "--output=o '$(x)'-%j"])
    info = sched.wait([job_id], timeout=20)[job_id]
    assert info.state is JobState.COMPLETED and info.name == name
    assert Path(sched.output_path(job_id)).name == f"o '$(x)'-{job_id}"
    assert not list(tmp_path.glob("pwned*"))


def test_wait_timeout_and_unknown_ids(sched: LocalScheduler) -> None:
    job_id = sched.submit("#!/bin/bash\nsleep 300\n")
    with pytest.raises(WaitTimeout, match=f"local job {job_id} still not finished"):
        sched.wait([job_id], timeout=0.3)
    assert sched.info("999").state is JobState.UNKNOWN
    with pytest.raises(SlurmError):
        sched.output_path("999")
    with pytest.raises(SlurmError):
        sched.info("../etc")


def test_ids_count_up_and_jobs_lists_them(sched: LocalScheduler, tmp_path: Path) -> None:
    first = sched.submit("#!/bin/bash\ntrue\n", sbatch_args=["-J", "nb-1"])
    second = LocalScheduler(tmp_path / "state").submit("#!/bin/bash\ntrue\n", sbatch_args=["-J", "train"])
    assert int(second) == int(first) + 1
    sched.wait([first, second], timeout=20)
    assert [j.job_id for j in sched.jobs()] == [first, second]
    assert [j.job_id for j in sched.jobs(name_prefix="nb-")] == [first]
    assert sched.jobs(user="somebody-else") == []


def test_refusals(sched: LocalScheduler, tmp_path: Path) -> None:
    with pytest.raises(SubmissionRejected, match="does not exist"):
        sched.submit("#!/bin/bash\ntrue\n", workdir=str(tmp_path / "missing"))
    with pytest.raises(SubmissionRejected, match="NUL"):
        sched.submit("#!/bin/bash\necho \0\n")
    with pytest.raises(SubmissionRejected, match="cannot start"):
        sched.submit("#!/bin/bash\ntrue\n", sbatch_args=["-o", str(tmp_path / "no" / "such" / "dir.out")])
    assert sched.jobs() == []  # a refused job leaves no trace


def test_sbatch_option_parsing() -> None:
    header = sbatch_header_args(
        '#!/bin/sh\n#SBATCH -J "a b" -c4\n# note\n#SBATCH --chdir=/x # c\ntrue\n#SBATCH -J no\n'
    )
    assert header == ["-J", "a b", "-c4", "--chdir=/x"]
    assert parse_sbatch_options([*header, "--time", "10", "--job-name", "c", "-oout", "--error=e"]) == {
        "job_name": "c",
        "cpus_per_task": "4",
        "chdir": "/x",
        "time": "10",
        "output": "out",
        "error": "e",
    }


def test_default_state_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert LocalScheduler().state_dir == tmp_path / "hpclaunch" / "local-jobs"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert str(LocalScheduler().state_dir) == os.path.expanduser("~/.local/share/hpclaunch/local-jobs")
