"""Distributed set-up of the bundled jobs: where a process sits, the rendezvous, its GPU, stopping together.

Part of the bundled jobs' shared code (staged with ``hpctrain.py``). Multi-process runs come from
torchrun's variables or from a Slurm step (srun), see ``read_dist_env``.

* The rendezvous port of a Slurm step comes from the job id, in ``PORT_LO..PORT_HI`` (below Linux's
  ephemeral range 32768-60999, so no outgoing connection of the node holds it by chance). Job ids less
  than ``PORT_SPAN`` apart never share a port; when the port is still taken anyway (EADDRINUSE, or a
  listener that is not this job's store), every rank moves on to the next candidate, in the same order.
* One GPU per rank: a task that sees several GPUs takes its local rank's; after the process group is up
  the ranks compare GPU UUIDs per node and stop with a clear error if two share one.
* Stopping (SIGUSR2/SIGTERM) is agreed on a CPU (gloo) group, so the check never waits for the GPU.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from hpctrain_data import DataError

#: Rendezvous ports for Slurm steps: [PORT_LO, PORT_HI), below the ephemeral range (32768-60999).
PORT_LO, PORT_HI = 10000, 32768
PORT_SPAN = PORT_HI - PORT_LO
#: Candidates tried after a taken port; the hop is prime so the retries do not follow the modulo pattern.
PORT_TRIES, PORT_HOP = 4, 7919
#: How long a rank waits for the store it reached to prove it is this job's (rank 0 writes that at once).
OWNER_WAIT = datetime.timedelta(seconds=15)
TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job; source is "torchrun", "slurm" or "single"."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"
    #: Ports to try in order (Slurm steps without MASTER_PORT); () means master_port only.
    port_candidates: tuple[int, ...] = ()
    #: Identifies this job's store to the other ranks (Slurm job and step id).
    token: str = ""

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _job_number(job_id: str) -> int:
    digits = "".join(ch for ch in job_id if ch.isdigit()) or "0"
    return int(digits)


def slurm_master_port(job_id: str, attempt: int = 0) -> int:
    """Rendezvous port of a job id: distinct for ids less than PORT_SPAN apart, below the ephemeral range."""
    return PORT_LO + (_job_number(job_id) + attempt * PORT_HOP) % PORT_SPAN


def read_dist_env() -> DistEnv:
    """torchrun's variables first, then a Slurm step (srun), else a single process.

    In the batch shell itself Slurm sets SLURM_PROCID/SLURM_NTASKS too but runs ONE process, so only
    a step started by srun (SLURM_STEP_ID set) counts as a multi-process launch.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
            source="torchrun",
        )
    if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        from submitit.helpers import TorchDistributedEnvironment

        job_id = env["SLURM_JOB_ID"]
        candidates: tuple[int, ...] = ()
        if "MASTER_PORT" not in env:  # a port the user set is used as it is, without retries
            candidates = tuple(slurm_master_port(job_id, k) for k in range(PORT_TRIES))
        # submitit picks its Slurm environment only when SUBMITIT_EXECUTOR says so (it does for
        # its own jobs); without MASTER_PORT it would draw a random port from the job id.
        os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")
        os.environ.setdefault("MASTER_PORT", str(slurm_master_port(job_id)))
        tde = TorchDistributedEnvironment()
        return DistEnv(
            rank=tde.rank,
            world_size=tde.world_size,
            local_rank=tde.local_rank,
            master_addr=tde.master_addr,
            master_port=tde.master_port,
            source="slurm",
            port_candidates=candidates,
            token=f"{job_id}.{env['SLURM_STEP_ID']}",
        )
    return DistEnv()


def _port_taken(err: Exception) -> bool:
    text = str(err)
    return "EADDRINUSE" in text or "ddress already in use" in text


def rendezvous(
    env: DistEnv, log: Callable[[str], None], owner_wait: datetime.timedelta = OWNER_WAIT
) -> dist.Store:
    """The job's TCPStore, moving to the next candidate port when one is taken.

    Rank 0 binds the first free candidate and writes the job's token there; the other ranks connect to
    each candidate in turn and keep the one holding the token (a store of another job never has it).
    Keys live under a per-job prefix, so even a store reached by mistake is never written into.
    """
    ports = env.port_candidates or (env.master_port,)
    key = "hpclaunch-owner"
    if env.main:
        for i, port in enumerate(ports):
            try:
                store = dist.TCPStore(
                    env.master_addr, port, env.world_size, is_master=True, timeout=TIMEOUT,
                    wait_for_workers=False,
                )  # fmt: skip
            except RuntimeError as e:
                if not _port_taken(e) or i + 1 == len(ports):
                    raise
                log(f"rendezvous port {port} is taken (EADDRINUSE); trying {ports[i + 1]}")
                continue
            store.set(f"{key}-{port}", env.token)
            return dist.PrefixStore(f"hpclaunch/{env.token}/", store)
    deadline = datetime.datetime.now() + TIMEOUT
    while datetime.datetime.now() < deadline:  # rank 0 may come up late: keep cycling until the timeout
        for port in ports:
            try:
                store = dist.TCPStore(
                    env.master_addr, port, env.world_size, is_master=False, timeout=owner_wait
                )
                store.wait([f"{key}-{port}"], owner_wait)
                if store.get(f"{key}-{port}").decode() == env.token:
                    return dist.PrefixStore(f"hpclaunch/{env.token}/", store)
            except (RuntimeError, dist.DistError):  # nobody there yet, or not this job's store
                pass
            if len(ports) > 1:
                log(f"rank {env.rank}: rendezvous port {port} is not this job's; trying the next")
    raise DataError(f"rank {env.rank}: no rendezvous with rank 0 on {env.master_addr} ports {list(ports)}")


# ----------------------------------------------------------------------------------------------
# Devices
# ----------------------------------------------------------------------------------------------


def gpu_index(local_rank: int, visible: int) -> int:
    """Which of the visible GPUs this rank takes: its own when each task sees one, else its local rank's."""
    if visible == 1:
        return 0
    if 0 <= local_rank < visible:
        return local_rank
    raise DataError(
        f"local rank {local_rank} but this task sees {visible} GPUs: more tasks than GPUs on the node; "
        "start one task per GPU (hpclaunch train --gpus N sets N tasks per node)"
    )


def pick_device(env: DistEnv, want: str) -> torch.device:
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DataError("--device cuda given but torch sees no CUDA device")
    device = torch.device("cuda", gpu_index(env.local_rank, torch.cuda.device_count()))
    torch.cuda.set_device(device)
    return device


def gpu_identity(device: torch.device) -> tuple[str, str]:
    """(node, GPU UUID): what tells two ranks' GPUs apart whatever CUDA_VISIBLE_DEVICES says."""
    props = torch.cuda.get_device_properties(device)
    uuid = str(getattr(props, "uuid", "")) or f"pci {props.pci_bus_id}:{props.pci_device_id}"
    return socket.gethostname(), uuid


def check_one_gpu_per_rank(identities: list[tuple[str, str]]) -> None:
    """Refuse two ranks on one GPU (a site's --gpu-bind, more tasks than GPUs): it runs, but slowly."""
    owner: dict[tuple[str, str], int] = {}
    for rank, ident in enumerate(identities):
        if ident in owner:
            raise DataError(
                f"ranks {owner[ident]} and {rank} share GPU {ident[1]} on {ident[0]}: give each task its "
                "own GPU (one task per GPU, e.g. srun --gpus-per-task=1, or fewer tasks per node)"
            )
        owner[ident] = rank


def set_cpu_threads() -> None:
    """Respect the CPUs Slurm gave us: torch would otherwise start a thread per core of the node."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if "SLURM_CPUS_PER_TASK" in os.environ:
        n = min(n, int(os.environ["SLURM_CPUS_PER_TASK"]))
    torch.set_num_threads(max(1, n))


def rank_seed(seed: int, rank: int) -> int:
    """Seed of a rank's own random streams (augmentation): distinct per rank, rank 0 keeps --seed."""
    return seed + 1_000_003 * rank


def init_distributed(
    env: DistEnv, device: torch.device, log: Callable[[str], None]
) -> dist.ProcessGroup | None:
    """Process group up, GPUs checked; returns the CPU group for control messages (None: one process)."""
    if not env.distributed:
        return None
    backend = "nccl" if device.type == "cuda" else "gloo"
    common = {"rank": env.rank, "world_size": env.world_size, "timeout": TIMEOUT}
    device_id = device if device.type == "cuda" else None
    if env.source == "slurm":
        dist.init_process_group(backend, store=rendezvous(env, log), device_id=device_id, **common)
    else:  # torchrun (or the same variables set by hand): its MASTER_ADDR/MASTER_PORT as given
        init = f"tcp://{env.master_addr}:{env.master_port}"
        dist.init_process_group(backend, init_method=init, device_id=device_id, **common)
    # Stop flags, RNG states and GPU identities are host data: a gloo group never waits for the GPU.
    control = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
    assert control is not None
    if device.type == "cuda":
        identities: list[tuple[str, str]] = [("", "")] * env.world_size
        dist.all_gather_object(identities, gpu_identity(device), group=control)
        check_one_gpu_per_rank(identities)
    return control


# ----------------------------------------------------------------------------------------------
# Preemption
# ----------------------------------------------------------------------------------------------


class StopFlag:
    """Set by SIGUSR2/SIGTERM; the loop polls it between steps (handlers must not do real work).

    SIGUSR2 is the preemption / time-limit warning (the only one --requeue-on-signal requeues on);
    SIGTERM is what Slurm sends on scancel, at the time limit and on preemption without a warning.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR2)  # ordered by priority: USR2 wins when both arrive

    def __init__(self) -> None:
        self.signum: int | None = None  # what this process received
        self.stop_signum: int | None = None  # what the job agreed to stop on

    def install(self) -> None:
        for s in self.SIGNALS:
            signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is None or self.SIGNALS.index(signum) > self.SIGNALS.index(self.signum):
            self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.stop_signum).name if self.stop_signum is not None else "none"

    def agreed(self, group: dist.ProcessGroup | None) -> bool:
        """True on every rank as soon as any rank got a signal (a collective on the CPU group, if any)."""
        code = 0 if self.signum is None else 1 + self.SIGNALS.index(self.signum)
        if group is not None:
            flag = torch.tensor([code])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
            code = int(flag)
        self.stop_signum = None if code == 0 else self.SIGNALS[code - 1]
        return code != 0


def requeue_decision(environ: dict[str, str] | os._Environ[str], max_requeues: int) -> tuple[str | None, str]:
    """(job id to requeue or None, why) for --requeue-on-signal."""
    job_id = environ.get("SLURM_JOB_ID")
    if not job_id:
        return None, "not requeueing: no SLURM_JOB_ID (not a Slurm job)"
    restarts = int(environ.get("SLURM_RESTART_COUNT", "0") or "0")
    if restarts >= max_requeues:
        return (
            None,
            f"not requeueing job {job_id}: restart count {restarts} reached --max-requeues {max_requeues}",
        )
    return job_id, f"requeueing job {job_id} (restart {restarts + 1} of at most {max_requeues})"


def requeue(job_id: str) -> str:
    try:
        proc = subprocess.run(
            ["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"scontrol requeue {job_id} failed: {e}"
    if proc.returncode != 0:
        return f"scontrol requeue {job_id} failed (exit {proc.returncode}): {proc.stderr.strip()}"
    return f"scontrol requeue {job_id} done"
