"""SlurmClient against the real dev cluster, on this machine (root) and over SSH (``hpcuser``).

Every job a test submits is cancelled by it; the cluster schedules in 0-3 s, so each test is short.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import pytest

from hpclaunch.errors import SubmissionRejected
from hpclaunch.slurm.client import SlurmClient
from hpclaunch.states import JobState, Phase
from hpclaunch.transport import Transport, connect
from hpclaunch.transport.base import CommandResult

if TYPE_CHECKING:
    from conftest import DevCluster

# A ~/.bash_profile that prints on every login is in place for all of these: it must change nothing.
pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("talking_login")]

HEADER = "#!/bin/bash\n"


@pytest.fixture(params=["local", "ssh"])
def transport(request: pytest.FixtureRequest, dev_cluster: DevCluster) -> Iterator[Transport]:
    """This machine as root, or the loopback sshd as the unprivileged cluster user."""
    host = None if request.param == "local" else dev_cluster.ssh_alias
    with connect(host, ssh_config_path=str(dev_cluster.ssh_config)) as transport:
        yield transport


@pytest.fixture
def workdir(transport: Transport) -> Iterator[str]:
    path = transport.run(["mktemp", "-d", "/tmp/hpclaunch-slurm-test.XXXXXX"]).stdout.strip()
    yield path
    transport.run(["rm", "-rf", path], check=False)


@pytest.fixture
def client(transport: Transport) -> Iterator[SlurmClient]:
    slurm = SlurmClient(transport)
    submitted: list[str] = []
    real_submit = slurm.submit

    def tracking_submit(script_text: str, **kwargs: object) -> str:
        job_id = real_submit(script_text, **kwargs)  # type: ignore[arg-type]
        submitted.append(job_id)
        return job_id

    slurm.submit = tracking_submit  # type: ignore[method-assign]
    slurm.submitted = submitted  # type: ignore[attr-defined]
    yield slurm
    for job_id in submitted:  # nothing a test started outlives it
        slurm.cancel(job_id)


def test_submit_runs_to_completed_and_output_reads_back(
    client: SlurmClient, transport: Transport, workdir: str
) -> None:
    script = (
        HEADER
        + "#SBATCH -J hl-test-basic\n#SBATCH -o out-%x-%j.txt\necho hello from $SLURM_JOB_ID $HL_TEST\n"
    )
    job_id = client.submit(script, workdir=workdir, env={"HL_TEST": "env passed"})
    updates: list[JobState] = []
    info = client.wait([job_id], timeout=60, on_update=lambda i: updates.append(i.state))[job_id]
    assert info.state is JobState.COMPLETED and info.exit_code == 0, info
    assert updates[-1] is JobState.COMPLETED
    assert info.user == transport.run(["id", "-un"]).stdout.strip()  # root here, hpcuser over SSH
    path = client.output_path(job_id)
    assert path == f"{workdir}/out-hl-test-basic-{job_id}.txt"  # scontrol expanded %x and %j
    assert transport.read_text(path) == f"hello from {job_id} env passed\n"
    assert info.stdout_path == path  # squeue's pattern, expanded by us, agrees


def test_failed_job_reports_its_exit_code(client: SlurmClient, workdir: str) -> None:
    job_id = client.submit(HEADER + "exit 7\n", workdir=workdir)
    info = client.wait([job_id], timeout=60)[job_id]
    assert (info.state, info.phase, info.exit_code) == (JobState.FAILED, Phase.FAILED, 7)


def test_two_nodes_answer_from_node1_and_node2(
    client: SlurmClient, transport: Transport, workdir: str
) -> None:
    # `srun hostname` prints the one real host name twice here (both slurmd share the machine);
    # SLURMD_NODENAME tells which emulated node each task ran on.
    script = HEADER + "#SBATCH -N 2\n#SBATCH --ntasks-per-node=1\nsrun bash -c 'echo $SLURMD_NODENAME'\n"
    job_id = client.submit(script, workdir=workdir)
    info = client.wait([job_id], timeout=60)[job_id]
    assert info.state is JobState.COMPLETED, info
    assert info.node_list == "node[1-2]"
    assert sorted(transport.read_text(client.output_path(job_id)).split()) == ["node1", "node2"]


def test_gpu_job_sees_cuda_visible_devices(client: SlurmClient, transport: Transport, workdir: str) -> None:
    job_id = client.submit(
        HEADER + "echo gpus=$CUDA_VISIBLE_DEVICES\n", sbatch_args=["--gres=gpu:1"], workdir=workdir
    )
    assert client.wait([job_id], timeout=60)[job_id].state is JobState.COMPLETED
    assert transport.read_text(client.output_path(job_id)).strip() in {"gpus=0", "gpus=1"}


def test_cancel_ends_a_running_job(client: SlurmClient, workdir: str) -> None:
    job_id = client.submit(HEADER + "sleep 300\n", workdir=workdir)
    deadline = time.monotonic() + 30
    while (info := client.info(job_id)).state is not JobState.RUNNING and time.monotonic() < deadline:
        time.sleep(0.1)
    assert info.state is JobState.RUNNING and info.node_list in {"node1", "node2"}, info
    client.cancel(job_id)
    info = client.wait([job_id], timeout=60)[job_id]
    assert info.state is JobState.CANCELLED
    client.cancel(job_id)  # a second cancel of a finished job is fine


def test_states_of_fifty_jobs_is_one_squeue_call(
    client: SlurmClient, transport: Transport, workdir: str
) -> None:
    # Held jobs never run: the cluster stays free, and each one answers with a pending reason.
    ids = [client.submit(HEADER + "true\n", sbatch_args=["--hold", "-J", f"hl-many-{i}"], workdir=workdir)
           for i in range(50)]  # fmt: skip
    before = dict(transport.command_counts)
    states = client.states(ids)
    after = dict(transport.command_counts)
    assert {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)} == {"squeue": 1}
    assert list(states) == ids
    assert all(s.state is JobState.PENDING and s.pending_reason == "JobHeldUser" for s in states.values())
    mine = {job.job_id for job in client.jobs(name_prefix="hl-many-")}
    assert set(ids) <= mine


def test_unknown_partition_is_rejected_quoting_slurm(client: SlurmClient, workdir: str) -> None:
    with pytest.raises(SubmissionRejected) as info:
        client.submit(HEADER + "true\n", sbatch_args=["-p", "nope"], workdir=workdir)
    assert "sbatch: error: invalid partition specified: nope" in str(info.value)


def test_scontrol_answers_when_squeue_does_not_and_sacct_is_disabled(
    client: SlurmClient, transport: Transport, workdir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = client.submit(HEADER + "echo done\n", workdir=workdir)
    assert client.wait([job_id], timeout=60)[job_id].state is JobState.COMPLETED

    real_run = transport.run

    def squeue_forgets(argv: Sequence[str], **kwargs: object) -> CommandResult:
        # As if the job had left squeue's view; scontrol and sacct are the real ones.
        if argv[0] == "squeue":
            return CommandResult(tuple(argv), 0, "", "")
        return real_run(argv, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(transport, "run", squeue_forgets)
    fresh = SlurmClient(transport)
    states = fresh.states([job_id, "999999"])
    assert states[job_id].state is JobState.COMPLETED and states[job_id].source == "scontrol"
    assert states["999999"].state is JobState.UNKNOWN and "not known" in (states["999999"].reason or "")
    assert fresh.accounting is False  # the real sacct said "accounting storage is disabled"


def test_unknown_id_is_unknown_not_failed(client: SlurmClient) -> None:
    info = client.info("999998")
    assert info.state is JobState.UNKNOWN and not info.is_terminal


def test_requeue_counts_restarts(client: SlurmClient, transport: Transport, workdir: str) -> None:
    script = HEADER + "#SBATCH -J hl-requeue\nsleep 300\n"
    job_id = client.submit(script, sbatch_args=["--requeue"], workdir=workdir)
    client.submitted.append(job_id)  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    while (info := client.info(job_id)).state is not JobState.RUNNING and time.monotonic() < deadline:
        time.sleep(0.1)
    assert info.state is JobState.RUNNING, info
    transport.run(["scontrol", "requeue", job_id])
    deadline = time.monotonic() + 30
    while (info := client.info(job_id)).restart_count < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert info.restart_count == 1 and not info.is_terminal, info
