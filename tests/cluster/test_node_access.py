"""The compute node for any tool (issue 11), against the dev cluster as hpcuser: `forward`, `shell`,
`ssh-config` + `proxy` with OpenSSH's own client, `code`, and the bad input of each."""

from __future__ import annotations

import os
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpclaunch.cluster import Cluster
from hpclaunch.job import Job
from hpclaunch.node.hold import wait_running
from hpclaunch.polling import Backoff, Poller

from .conftest import hpclaunch_argv, run_hpclaunch

pytestmark = pytest.mark.cluster

SLEEPER = ["sleep", "300"]


@pytest.fixture
def env(cli_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """The CLI's environment with its own ~/.ssh (entries, known_hosts, the Include line)."""
    return {**cli_env, "HPCLAUNCH_SSH_DIR": str(tmp_path / "ssh")}


@pytest.fixture
def jobs(cluster: Cluster) -> Iterator[list[Job]]:
    """Jobs a test starts; all cancelled at its end."""
    started: list[Job] = []
    yield started
    for job in started:
        try:
            job.cancel()
        except Exception:  # noqa: S110 - already gone is fine
            pass


def running_job(cluster: Cluster, jobs: list[Job], command: list[str] = SLEEPER, **params: object) -> Job:
    job = cluster.submit("run", command=command, gpus=1, **params)
    jobs.append(job)
    wait_running(job, status=lambda _msg: None, queue_timeout=60)
    return job


def generated_config(env: dict[str, str]) -> Path:
    return Path(env["HPCLAUNCH_SSH_DIR"]) / "hpclaunch" / "config"


def openssh(
    env: dict[str, str], job_id: str, *command: str, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    """OpenSSH's own client with the generated config, as VS Code would use it."""
    argv = ["ssh", "-F", str(generated_config(env)), "-o", "BatchMode=yes", f"hpclaunch-{job_id}", *command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=90, **kwargs)  # type: ignore[call-overload,no-any-return]


def node_listeners(ss_output: str) -> set[str]:
    """Listening addresses of hpcuser's processes (ss -p names only one's own) on the node. srun's own
    I/O port is on the login host (here the same machine), so it is not the node's."""
    return {line.split()[3] for line in ss_output.splitlines() if "users:" in line and '(("srun"' not in line}


def hpcuser_listeners(cluster: Cluster) -> set[str]:
    return node_listeners(cluster.transport.run(["ss", "-ltnpH"]).stdout)


def one_error_line(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("hpclaunch: error: ") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr


# --- ssh-config (step) ------------------------------------------------------------------------------


def test_step_entry_runs_ssh_inside_the_allocation_without_a_port(
    cluster: Cluster, jobs: list[Job], env: dict[str, str], tmp_path: Path
) -> None:
    job = running_job(cluster, jobs)
    made = run_hpclaunch(env, "ssh-config", job.id)
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip() == f"hpclaunch-{job.id}"
    text = generated_config(env).read_text()
    assert f"Host hpclaunch-{job.id}" in text and "StrictHostKeyChecking yes" in text
    assert "StrictHostKeyChecking no" not in text
    known = (generated_config(env).parent / "known_hosts").read_text()
    assert known.startswith(f"hpclaunch-{job.id} ssh-ed25519 ")
    before = hpcuser_listeners(cluster)

    result = openssh(env, job.id, "echo $SLURM_JOB_ID $CUDA_VISIBLE_DEVICES $SLURMD_NODENAME; ss -ltnpH")
    assert result.returncode == 0, result.stderr
    first, *listening = result.stdout.splitlines()
    assert first == f"{job.id} 0 node1"
    during = node_listeners("\n".join(listening))
    assert during == before  # the session's sshd runs on srun's stdio: no new listening port

    # scp (sftp subsystem) round-trips a file through the same entry.
    local = tmp_path / "payload.txt"
    local.write_text("through the job step\n")
    remote = f"hpclaunch-{job.id}:/tmp/hpclaunch-node-test-{job.id}.txt"
    scp = ["scp", "-q", "-F", str(generated_config(env)), "-o", "BatchMode=yes"]
    assert subprocess.run([*scp, str(local), remote], timeout=90, check=False).returncode == 0
    back = tmp_path / "back.txt"
    assert subprocess.run([*scp, remote, str(back)], timeout=90, check=False).returncode == 0
    assert back.read_text() == local.read_text()

    removed = run_hpclaunch(env, "ssh-config", job.id, "--remove")
    assert removed.returncode == 0, removed.stderr
    assert f"hpclaunch-{job.id}" not in generated_config(env).read_text()
    assert f"hpclaunch-{job.id}" not in (generated_config(env).parent / "known_hosts").read_text()
    assert not cluster.transport.exists(f"~/hpclaunch/node-sshd/{job.id}")


def test_two_jobs_on_one_node_each_have_their_own_entry_and_key(
    cluster: Cluster, jobs: list[Job], env: dict[str, str]
) -> None:
    a = running_job(cluster, jobs, sbatch_options=["--nodelist=node1"])
    b = running_job(cluster, jobs, sbatch_options=["--nodelist=node1"])
    for job in (a, b):
        assert run_hpclaunch(env, "ssh-config", job.id).returncode == 0
    known = (generated_config(env).parent / "known_hosts").read_text().splitlines()
    keys = {line.split()[0]: line.split()[2] for line in known}
    assert set(keys) == {f"hpclaunch-{a.id}", f"hpclaunch-{b.id}"}
    assert keys[f"hpclaunch-{a.id}"] != keys[f"hpclaunch-{b.id}"]
    # A's session stays open (it waits on its stdin) while B's runs: both at once.
    argv = ["ssh", "-F", str(generated_config(env)), "-o", "BatchMode=yes", f"hpclaunch-{a.id}"]
    first = subprocess.Popen(
        [*argv, "echo $SLURM_JOB_ID; read line; echo got-$line"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert first.stdout is not None
        assert first.stdout.readline().strip() == a.id
        second = openssh(env, b.id, "echo $SLURM_JOB_ID")
        assert second.returncode == 0 and second.stdout.strip() == b.id, second.stderr
        out, _ = first.communicate("bye\n", timeout=60)
        assert out.strip() == "got-bye" and first.returncode == 0
    finally:
        first.kill()
        first.wait()


def test_jump_entry_reaches_the_nodes_own_sshd(
    cluster: Cluster, jobs: list[Job], env: dict[str, str], dev_config: Path, tmp_path: Path
) -> None:
    config = tmp_path / "jump.toml"
    config.write_text(dev_config.read_text() + 'node_access = "jump"\nnode_ssh_port = 2222\n')
    config.chmod(0o600)
    jump_env = {**env, "HPCLAUNCH_CONFIG": str(config)}
    job = running_job(cluster, jobs)
    made = run_hpclaunch(jump_env, "ssh-config", job.id)
    assert made.returncode == 0, made.stderr
    assert "ProxyCommand ssh -F" in generated_config(env).read_text()
    result = openssh(env, job.id, "echo jumped-$(whoami)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "jumped-hpcuser"


# --- forward ----------------------------------------------------------------------------------------


def test_forward_reaches_a_server_in_the_job_and_ctrl_c_closes_it(
    cluster: Cluster, jobs: list[Job], env: dict[str, str]
) -> None:
    pick = "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])"
    script = f'port=$(python3 -c "{pick}"); echo PORT=$port; cd /tmp && exec python3 -m http.server $port'
    job = running_job(cluster, jobs, command=["bash", "-c", script])
    port = ""
    for _ in Poller(Backoff(0.1, 1.0), timeout=60):
        lines = [x for x in job.logs().splitlines() if x.startswith("PORT=")]
        if lines:
            port = lines[0].removeprefix("PORT=")
            break
    proc = subprocess.Popen(
        hpclaunch_argv("forward", job.id, port),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url, _, far = proc.stdout.readline().strip().partition("  ->  ")
        assert url.startswith("http://127.0.0.1:") and far == f"node1:{port}"
        with urllib.request.urlopen(url, timeout=30) as answer:  # noqa: S310 - our own 127.0.0.1 URL
            assert answer.status == 200 and b"Directory listing" in answer.read()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "tunnels closed" in err
        with pytest.raises(OSError):
            urllib.request.urlopen(url, timeout=5)  # noqa: S310
    finally:
        proc.kill()
        proc.wait()


# --- shell ------------------------------------------------------------------------------------------


def test_shell_command_prints_the_node_and_passes_back_the_exit_status(
    cluster: Cluster, jobs: list[Job], env: dict[str, str]
) -> None:
    job = running_job(cluster, jobs)
    result = run_hpclaunch(env, "shell", job.id, "--", "bash", "-c", "echo $SLURMD_NODENAME $(hostname)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["node1", os.uname().nodename]
    failed = run_hpclaunch(env, "shell", job.id, "--", "bash", "-c", "exit 3")
    assert failed.returncode == 3


def test_interactive_shell_through_a_pty_takes_ctrl_c_and_exits_cleanly(
    cluster: Cluster, jobs: list[Job], env: dict[str, str]
) -> None:
    pexpect = pytest.importorskip("pexpect")
    job = running_job(cluster, jobs)
    argv = hpclaunch_argv("shell", job.id)
    child = pexpect.spawn(argv[0], argv[1:], env=env, encoding="utf-8", timeout=60, dimensions=(30, 100))
    try:
        child.expect(r"\$ ")  # the remote shell's prompt: typing ahead of srun's pty would be lost
        child.sendline("echo mark-$((40 + 2)) $SLURM_JOB_ID; tty")
        child.expect(f"mark-42 {job.id}")
        child.expect("/dev/pts/")  # a real terminal on the far side
        child.sendline("sleep 300")
        child.sendcontrol("c")  # reaches the remote sleep, not hpclaunch
        child.sendline("echo after-$((1 + 1))")
        child.expect("after-2")
        child.sendline("exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


# --- code -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "term"])
def test_code_prints_the_command_and_cleans_up_on_a_signal(
    cluster: Cluster, env: dict[str, str], sig: signal.Signals
) -> None:
    proc = subprocess.Popen(
        hpclaunch_argv("code", "--no-browser", "--yes", "--path", "/tmp"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    job_id = ""
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("code --remote ssh-remote+hpclaunch-") and line.endswith(" /tmp"), line
        job_id = line.split("ssh-remote+hpclaunch-")[1].split()[0]
        assert f"Host hpclaunch-{job_id}" in generated_config(env).read_text()
        user_config = Path(env["HPCLAUNCH_SSH_DIR"]) / "config"
        assert f"Include {generated_config(env)}" in user_config.read_text()
        assert openssh(env, job_id, "echo $SLURM_JOB_ID").stdout.strip() == job_id
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    finally:
        proc.kill()
        proc.wait()
    assert f"hpclaunch-{job_id}" not in generated_config(env).read_text()
    assert cluster.job(job_id).wait(timeout=60).is_terminal  # cancelled: past COMPLETING within seconds


def start_code(env: dict[str, str], *args: str) -> tuple[subprocess.Popen[str], str]:
    """``hpclaunch code --no-browser`` until it has printed the command; the process and the job id."""
    proc = subprocess.Popen(
        hpclaunch_argv("code", "--no-browser", "--yes", *args),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line.startswith("code --remote ssh-remote+hpclaunch-"), (line, proc.stderr and proc.stderr.read())
    return proc, line.split("ssh-remote+hpclaunch-")[1].split()[0]


def test_code_idle_timeout_ends_the_job_once_no_session_is_left(
    cluster: Cluster, env: dict[str, str]
) -> None:
    proc, job_id = start_code(env, "--idle-timeout", "8")
    try:
        # A session longer than the idle time (a VS Code window open) keeps the job: it is a step.
        session = openssh(env, job_id, "sleep 15; echo $SLURM_JOB_ID")
        assert session.stdout.strip() == job_id, session.stderr
        assert not cluster.job(job_id).info().is_terminal
        assert proc.poll() is None
        _, err = proc.communicate(timeout=60)  # no session now: about 8 s later it ends by itself
        assert proc.returncode == 0, err
        assert f"no session for 8 s: cancelled job {job_id}" in err, err
    finally:
        proc.kill()
        proc.wait()
    assert f"hpclaunch-{job_id}" not in generated_config(env).read_text()
    assert cluster.job(job_id).wait(timeout=60).is_terminal  # past COMPLETING


def test_code_keep_leaves_job_and_entry_for_sessions_and_stop(cluster: Cluster, env: dict[str, str]) -> None:
    import json

    proc, job_id = start_code(env, "--keep")
    try:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert f"end it with: hpclaunch stop {job_id}" in err, err
        # The command is gone; VS Code's way in is not.
        assert openssh(env, job_id, "echo $SLURM_JOB_ID").stdout.strip() == job_id
        listing = run_hpclaunch(env, "sessions", "--json")
        assert listing.returncode == 0, listing.stderr
        row = next(r for r in json.loads(listing.stdout) if r["job_id"] == job_id)
        assert row["kind"] == "code" and row["host_entry"] == f"hpclaunch-{job_id}", row
        assert row["state"] == "RUNNING", row
        text = run_hpclaunch(env, "sessions").stdout
        assert any(
            ln.split()[:2] == [job_id, "code"] and f"ssh hpclaunch-{job_id}" in ln for ln in text.splitlines()
        )
        stopped = run_hpclaunch(env, "stop", job_id)
        assert stopped.returncode == 0, stopped.stderr
        assert f"removed Host hpclaunch-{job_id}" in stopped.stderr
    finally:
        proc.kill()
        proc.wait()
        cluster.job(job_id).cancel()
    assert f"hpclaunch-{job_id}" not in generated_config(env).read_text()
    assert cluster.job(job_id).wait(timeout=60).is_terminal


def test_code_idle_timeout_in_jump_mode_is_refused_before_submitting(
    cluster: Cluster, env: dict[str, str]
) -> None:
    before = {job.id for job in cluster.jobs()}
    result = run_hpclaunch(env, "code", "--no-browser", "--access", "jump", "--idle-timeout", "60")
    assert result.returncode == 2, result.stderr
    assert "--idle-timeout needs node_access = step" in result.stderr and "Traceback" not in result.stderr
    assert {job.id for job in cluster.jobs()} == before


# --- bad input --------------------------------------------------------------------------------------


def test_jobs_that_are_not_running_or_not_yours_are_one_line_each(
    cluster: Cluster, jobs: list[Job], env: dict[str, str]
) -> None:
    pending = cluster.submit("run", command=SLEEPER, sbatch_options=["--begin=now+3600"])
    jobs.append(pending)
    ended = cluster.submit("run", command=["true"])
    jobs.append(ended)
    ended.wait(timeout=60)
    # A job of another user (root submits it on this machine).
    theirs = subprocess.run(
        ["sbatch", "--parsable", "-p", "debug", "--output=/dev/null", "--wrap", "sleep 120"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        cases = [(pending.id, "not running"), (ended.id, "ended"), (theirs, "belongs to root")]
        for job_id, fragment in cases:
            for args in (
                ("shell", job_id, "--", "true"),
                ("forward", job_id, "8000"),
                ("ssh-config", job_id),
            ):
                one_error_line(run_hpclaunch(env, *args), fragment)
        assert not generated_config(env).exists() or "Host " not in generated_config(env).read_text()
    finally:
        subprocess.run(["scancel", theirs], check=False)


def test_bad_ports_are_one_line_and_leave_nothing_open(
    cluster: Cluster, jobs: list[Job], env: dict[str, str]
) -> None:
    job = running_job(cluster, jobs)
    one_error_line(run_hpclaunch(env, "forward", job.id, "0"), "port 0 is out of range")
    one_error_line(run_hpclaunch(env, "forward", job.id, "8000:70000"), "local port 70000 is out of range")
    never = run_hpclaunch(env, "forward", job.id, "9", "--wait", "2")
    assert never.returncode != 0
    assert (
        never.stderr.strip()
        .splitlines()[-1]
        .startswith("hpclaunch: error: nothing listens on port 9 of node1")
    )
    assert "http://" not in never.stdout  # no URL: no tunnel was opened
