"""Shared machinery of the bundled training jobs (``mnist_lenet5.py``, ``cifar10_resnet.py``).

One module, staged next to the job scripts, so that a job runs anywhere with plain ``python``:
data files -> tensors (loaded once, normalised once, kept on the GPU when there is one),
distributed setup (torchrun env, else Slurm via submitit, else one process), the training loop,
atomic checkpoints with resume, preemption by signal, ``metrics.csv`` and ``plot.png``.

Contract with the Slurm template (tried on the dev cluster, Slurm 22.05):
  * one process per task with ``srun``; rank, world size, local rank and the master node come from
    SLURM_* variables through submitit's TorchDistributedEnvironment, the rendezvous port is
    ``20000 + SLURM_JOB_ID % 20000`` unless MASTER_PORT is set. Only an srun step (SLURM_STEP_ID
    set) counts: python started straight from the batch shell is one process whatever --ntasks says.
    torchrun's RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT win when present.
  * SIGUSR2 (preemption / time-limit warning) or SIGTERM: every rank stops after the current step
    (ranks agree every ``STOP_SYNC_EVERY`` steps), rank 0 writes ``checkpoint.pt`` and all exit
    with ``EXIT_PREEMPTED`` (75). A restart with the same --run-dir continues at that very step.
  * ``--signal=B:USR2@90`` signals only the batch shell: the template forwards it to the step, whose
    srun relays it to every task::

        srun python job.py ... &
        pid=$!
        trap 'kill -USR2 $pid' USR2
        while :; do wait $pid; rc=$?; kill -0 $pid 2>/dev/null || break; done
        [ $rc -eq 75 ] && scontrol requeue "$SLURM_JOB_ID"   # unless the job has --requeue-on-signal
        exit $rc

  * the run directory must be the same after a requeue (HPCLAUNCH_RUN_DIR), and ``--open-mode=append``
    keeps the first attempt's log.

metrics.csv has one row per completed epoch: mean train loss, test accuracy, training images/s
(all ranks), and elapsed_s, the training + evaluation time of the whole run across restarts.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import gzip
import hashlib
import io
import math
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

#: Exit status after a preemption signal, once the checkpoint is written. 75 is EX_TEMPFAIL of
#: sysexits.h ("temporary failure, try again"): distinct from errors (1), usage/data errors (2),
#: `timeout` (124) and death by signal (128+N), so a batch script can requeue on exactly this code.
EXIT_PREEMPTED = 75
#: Exit status for bad arguments or missing/malformed data (same as argparse's usage errors).
EXIT_USAGE = 2

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"
PLOT = "plot.png"
FINAL_MODEL = "model.pt"
METRIC_FIELDS = ("epoch", "loss", "accuracy", "images_per_s", "elapsed_s")

#: In a multi-process run the ranks agree on stopping every this many steps: a collective per step
#: would stall the GPU pipeline, and ranks must take the same decision at the same step.
STOP_SYNC_EVERY = 16

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"


class DataError(Exception):
    """Data or checkpoint files missing or malformed; printed as one line, exit status 2."""


# ----------------------------------------------------------------------------------------------
# Data files -> uint8 tensors
# ----------------------------------------------------------------------------------------------


@dataclass
class Split:
    """A whole split in memory: images uint8 (N, C, H, W), labels int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def head(self, n: int | None) -> Split:
        return self if n is None else Split(self.images[:n], self.labels[:n])


def _read_maybe_gzip(path: Path) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    # Sniff the gzip magic rather than trusting the suffix: mirrors sometimes serve either.
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt gzip file ({e})") from None
    return raw


def read_idx(path: Path) -> torch.Tensor:
    """Parse an IDX file (raw or gzip) of unsigned bytes, as MNIST ships, into a uint8 tensor."""
    data = _read_maybe_gzip(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise DataError(f"{path}: IDX element type 0x{dtype_code:02x} unsupported (MNIST uses 0x08)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != math.prod(dims):
        raise DataError(f"{path}: IDX size mismatch: header says {dims}, payload {len(data) - header} bytes")
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(dims)


def _find(dirs: Sequence[Path], name: str) -> Path | None:
    for d in dirs:
        for candidate in (d / name, d / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _require_dir(data_dir: Path, what: str) -> None:
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist: {what}, or use --dataset synthetic")


def load_mnist(data_dir: Path) -> tuple[Split, Split]:
    """MNIST from the four standard IDX files in data_dir (or data_dir/MNIST/raw, torchvision's layout)."""
    what = f"put {', '.join(MNIST_FILES)} (raw or .gz) in it (or pass --data-dir DIR)"
    _require_dir(data_dir, what)
    dirs = [data_dir, data_dir / "MNIST" / "raw", data_dir / "mnist"]
    found = {name: _find(dirs, name) for name in MNIST_FILES}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        lead = "no MNIST files" if len(missing) == len(MNIST_FILES) else f"missing {', '.join(missing)}"
        raise DataError(
            f"{lead} in {data_dir}: put {', '.join(MNIST_FILES)} (raw or .gz) there "
            f"(or pass --data-dir DIR), or use --dataset synthetic"
        )
    arrays = {name: read_idx(path) for name, path in found.items() if path is not None}
    splits = []
    for prefix in ("train", "t10k"):
        images, labels = arrays[f"{prefix}-images-idx3-ubyte"], arrays[f"{prefix}-labels-idx1-ubyte"]
        if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            raise DataError(
                f"MNIST {prefix} files in {data_dir} disagree: images {tuple(images.shape)}, "
                f"labels {tuple(labels.shape)}"
            )
        splits.append(Split(images.unsqueeze(1), labels.long()))
    return splits[0], splits[1]


def read_cifar_batch(path: Path) -> Split:
    """One CIFAR-10 python batch: a pickled dict with data (N, 3072) uint8 and labels."""
    try:
        with open(path, "rb") as f:
            # The dataset's own format is a pickle; only read files you placed yourself.
            batch = pickle.load(f, encoding="bytes")  # noqa: S301
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"{path}: not a CIFAR-10 python batch ({e})") from None
    # Files pickled by Python 2 (the official ones) give bytes keys; Python 3 writers give str.
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DataError(f"{path}: not a CIFAR-10 python batch (no data/labels keys)")
    data = torch.as_tensor(batch["data"], dtype=torch.uint8)
    labels = torch.as_tensor(list(batch["labels"]), dtype=torch.long)
    if data.dim() != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise DataError(f"{path}: unexpected shapes data {tuple(data.shape)}, labels {tuple(labels.shape)}")
    return Split(data.reshape(-1, 3, 32, 32), labels)


def load_cifar10(data_dir: Path) -> tuple[Split, Split]:
    """CIFAR-10 from data_batch_1..5 and test_batch, in data_dir or data_dir/cifar-10-batches-py."""
    names = (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE)
    what = f"put cifar-10-batches-py/ (holding {', '.join(names)}) in it (or pass --data-dir DIR)"
    _require_dir(data_dir, what)
    dirs = [data_dir / "cifar-10-batches-py", data_dir]
    found = {}
    for name in names:
        for d in dirs:
            if (d / name).is_file():
                found[name] = d / name
                break
    missing = [n for n in names if n not in found]
    if missing:
        lead = "no CIFAR-10 batches" if len(missing) == len(names) else f"missing {', '.join(missing)}"
        raise DataError(
            f"{lead} in {data_dir}: put {', '.join(names)} (python version) in "
            f"{data_dir / 'cifar-10-batches-py'} (or pass --data-dir DIR), or use --dataset synthetic"
        )
    train = [read_cifar_batch(found[n]) for n in CIFAR10_TRAIN_FILES]
    test = read_cifar_batch(found[CIFAR10_TEST_FILE])
    return Split(torch.cat([s.images for s in train]), torch.cat([s.labels for s in train])), test


def synthetic_split(n: int, shape: tuple[int, int, int], seed: int, classes: int = 10) -> Split:
    """Learnable fake data for smoke runs: a fixed smooth pattern per class, plus noise.

    The class patterns come from a fixed seed, so every rank and every restart sees the same data.
    """
    c, h, w = shape
    protos = torch.rand(
        classes, c, max(h // 4, 1), max(w // 4, 1), generator=torch.Generator().manual_seed(0)
    )
    protos = F.interpolate(protos, size=(h, w), mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    images = torch.empty(n, c, h, w, dtype=torch.uint8)
    for lo in range(0, n, 8192):  # chunks keep the float temporaries small for 50k x 3072
        hi = min(lo + 8192, n)
        gain = 0.6 + 0.4 * torch.rand(hi - lo, 1, 1, 1, generator=g)
        x = protos[labels[lo:hi]] * gain + 0.25 * torch.randn(hi - lo, c, h, w, generator=g)
        images[lo:hi] = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return Split(images, labels)


# ----------------------------------------------------------------------------------------------
# Distributed environment
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job; source is "torchrun", "slurm" or "single"."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def slurm_master_port(job_id: str) -> int:
    """Rendezvous port from the job id: two jobs sharing a node never pick the same port."""
    digits = "".join(ch for ch in job_id if ch.isdigit()) or "0"
    return 20000 + int(digits) % 20000


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

        # submitit picks its Slurm environment only when SUBMITIT_EXECUTOR says so (it does for
        # its own jobs); without MASTER_PORT it would draw a random port from the job id.
        os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")
        os.environ.setdefault("MASTER_PORT", str(slurm_master_port(env["SLURM_JOB_ID"])))
        tde = TorchDistributedEnvironment()
        return DistEnv(
            rank=tde.rank,
            world_size=tde.world_size,
            local_rank=tde.local_rank,
            master_addr=tde.master_addr,
            master_port=tde.master_port,
            source="slurm",
        )
    return DistEnv()


def pick_device(env: DistEnv, want: str) -> torch.device:
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DataError("--device cuda given but torch sees no CUDA device")
    # With --gpus-per-task each task sees one GPU (index 0); with a shared list, take ours.
    device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def set_cpu_threads() -> None:
    """Respect the CPUs Slurm gave us: torch would otherwise start a thread per core of the node."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if "SLURM_CPUS_PER_TASK" in os.environ:
        n = min(n, int(os.environ["SLURM_CPUS_PER_TASK"]))
    torch.set_num_threads(max(1, n))


def init_distributed(env: DistEnv, device: torch.device) -> None:
    if not env.distributed:
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(minutes=10),
        device_id=device if device.type == "cuda" else None,
    )


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

    def agreed(self, env: DistEnv, device: torch.device) -> bool:
        """True on every rank as soon as any rank got a signal (a collective: all ranks must call)."""
        code = 0 if self.signum is None else 1 + self.SIGNALS.index(self.signum)
        if env.distributed:
            flag = torch.tensor([code], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            code = int(flag.item())
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


# ----------------------------------------------------------------------------------------------
# Run directory: checkpoint, metrics, plot
# ----------------------------------------------------------------------------------------------


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write then rename: a reader (or a restart after a kill) never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def write_metrics(path: Path, history: Sequence[dict[str, float]]) -> None:
    """Rewrite metrics.csv from the history (used at start: after a restart it matches the checkpoint)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow(_metric_row(row))
    atomic_write_bytes(path, buf.getvalue().encode())


def append_metrics(path: Path, row: dict[str, float]) -> None:
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, fieldnames=METRIC_FIELDS, lineterminator="\n").writerow(_metric_row(row))


def _metric_row(row: dict[str, float]) -> dict[str, str]:
    return {
        "epoch": str(int(row["epoch"])),
        "loss": f"{row['loss']:.6f}",
        "accuracy": f"{row['accuracy']:.6f}",
        "images_per_s": f"{row['images_per_s']:.1f}",
        "elapsed_s": f"{row['elapsed_s']:.3f}",
    }


def write_plot(path: Path, history: Sequence[dict[str, float]], title: str) -> None:
    """Loss and test accuracy per epoch, headless (Figure + Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [int(r["epoch"]) for r in history]
    fig = Figure(figsize=(8, 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [r["loss"] for r in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="loss")
    ax_acc.plot(epochs, [100 * r["accuracy"] for r in history], marker="o", color="tab:green")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="accuracy")
    lo, _ = ax_acc.get_ylim()
    ax_acc.set_ylim(min(lo, 99.0), 100.5)  # never an axis above 100 %
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())


def weights_sha256(model: nn.Module) -> str:
    """Hash of all parameters in logical order (independent of channels_last memory layout)."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def indices_sha256(idx: torch.Tensor) -> str:
    return hashlib.sha256(torch.sort(idx.cpu()).values.numpy().tobytes()).hexdigest()


# ----------------------------------------------------------------------------------------------
# Task description and command line
# ----------------------------------------------------------------------------------------------


@dataclass
class Task:
    """What differs between jobs; everything else lives in run()."""

    name: str  # dataset name: "mnist" or "cifar10"
    title: str
    shape: tuple[int, int, int]
    sizes: tuple[int, int]  # (train, test) sizes of the real dataset, also used for synthetic data
    mean: tuple[float, ...]
    std: tuple[float, ...]
    load: Callable[[Path], tuple[Split, Split]]
    build_model: Callable[[argparse.Namespace], nn.Module]
    build_optimizer: Callable[
        [Iterable[nn.Parameter], argparse.Namespace, torch.device], torch.optim.Optimizer
    ]
    lr_at: Callable[[int, argparse.Namespace], float]  # learning rate of epoch (1-based)
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None
    defaults: dict[str, Any] = field(default_factory=dict)


def make_parser(task: Task, description: str) -> argparse.ArgumentParser:
    d = {"epochs": 10, "batch_size": 128, "test_batch_size": 1000, "lr": 1e-3, **task.defaults}
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--dataset",
        choices=[task.name, "synthetic"],
        default=task.name,
        help="synthetic: generated in memory with the real shapes, for smoke runs without files",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("HPCLAUNCH_DATA_DIR", "data")),
        help="directory with the dataset files (env HPCLAUNCH_DATA_DIR)",
    )
    p.add_argument(
        "--run-dir",
        type=Path,
        default=Path(os.environ.get("HPCLAUNCH_RUN_DIR", ".")),
        help=f"where {CHECKPOINT}, {METRICS}, {PLOT} and {FINAL_MODEL} go (env HPCLAUNCH_RUN_DIR)",
    )
    p.add_argument("--epochs", type=int, default=d["epochs"], help="number of epochs to train")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="training batch size per process")
    p.add_argument("--test-batch-size", type=int, default=d["test_batch_size"], help="evaluation batch size")
    p.add_argument("--lr", type=float, default=d["lr"], help="learning rate (at epoch 1)")
    p.add_argument("--seed", type=int, default=1, help="random seed (model init, shuffling)")
    p.add_argument(
        "--limit-train",
        type=int,
        default=None,
        metavar="N",
        help="use the first N training images (default: all)%(default).0s",
    )
    p.add_argument(
        "--limit-test",
        type=int,
        default=None,
        metavar="N",
        help="use the first N test images (default: all)%(default).0s",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="one training batch and one evaluation batch, then exit (no files written)",
    )
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when available"
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the model. Default: on with CUDA; off on CPU, where it does not pay: on a "
        "2-core CPU compiling LeNet-5 took ~17 s and the compiled steps were no faster%(default).0s",
    )
    p.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bf16 autocast (CUDA only; ignored on CPU)",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="channels_last memory format for images and model (faster convolutions on "
        "CPU oneDNN and GPU tensor cores)",
    )
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"resume from {CHECKPOINT} in --run-dir when present (--no-resume starts over)",
    )
    p.add_argument(
        "--requeue-on-signal",
        action="store_true",
        help="on SIGUSR2, rank 0 runs `scontrol requeue $SLURM_JOB_ID` after checkpointing",
    )
    p.add_argument(
        "--max-requeues",
        type=int,
        default=3,
        help="with --requeue-on-signal: requeue only while SLURM_RESTART_COUNT is below this",
    )
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size", "test_batch_size", "limit_train", "limit_test"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.lr <= 0:
        p.error(f"--lr must be positive, got {args.lr}")


def main(task: Task, parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse, run, and turn DataError into one line on stderr with exit status 2."""
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        code = run(task, args)
    except DataError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr, flush=True)
        code = EXIT_USAGE
    except BaseException:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        raise
    if dist.is_available() and dist.is_initialized():
        gc.collect()  # drop DDP's reducer (reference cycles) while the process group still exists
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        # gloo's threads can abort() the process during interpreter teardown when the peer has already
        # gone ("terminate called without an active exception"): leave without that teardown.
        os._exit(code)
    return code


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def normalise(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float], device: torch.device
) -> torch.Tensor:
    """uint8 -> float32 normalised, once for the whole split (on the target device: fast on GPU)."""
    x = images.to(device, non_blocking=True).float().div_(255)
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Same permutation on every rank and every restart: seeded by (seed, epoch) only."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def shard(perm: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """DistributedSampler's split: equal shards (tail dropped), rank r takes every world_size-th index."""
    per_rank = len(perm) // env.world_size
    return perm[: per_rank * env.world_size][env.rank :: env.world_size]


def num_batches(n: int, batch_size: int) -> int:
    # Full batches only (static shapes for torch.compile and cuDNN); the epoch permutation changes,
    # so no sample is left out for good. A shard smaller than a batch is one batch.
    return max(1, n // batch_size)


@dataclass
class Progress:
    """Everything the checkpoint needs to continue exactly where a run stopped."""

    epoch: int = 0  # epochs completed
    step: int = 0  # batches of epoch+1 already done (non-zero only after a mid-epoch stop)
    loss_sum: float = 0.0  # partial-epoch accumulators
    seen: int = 0
    train_s: float = 0.0
    elapsed_s: float = 0.0  # training time of the whole run, across restarts
    history: list[dict[str, float]] = field(default_factory=list)


def log(msg: str) -> None:
    print(msg, flush=True)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(
    path: Path,
    task: Task,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    prog: Progress,
    env: DistEnv,
    device: torch.device,
    args: argparse.Namespace,
) -> None:
    atomic_torch_save(
        {
            "format": 1,
            "task": task.name,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "epoch": prog.epoch,
            "step": prog.step,
            "partial": {"loss_sum": prog.loss_sum, "seen": prog.seen, "train_s": prog.train_s},
            "elapsed_s": prog.elapsed_s,
            "history": prog.history,
            "world_size": env.world_size,
            "batch_size": args.batch_size,
            "rng": _rng_state(device),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        },
        path,
    )


def load_checkpoint(
    path: Path,
    task: Task,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    env: DistEnv,
    device: torch.device,
    batch_size: int,
) -> Progress:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn or foreign file: say which one, not a traceback
        raise DataError(f"cannot read checkpoint {path}: {e}; delete it or pass --no-resume") from None
    if ckpt.get("task") != task.name:
        raise DataError(
            f"checkpoint {path} is from a {ckpt.get('task')!r} run, not {task.name!r}; "
            "use another --run-dir or pass --no-resume"
        )
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    _set_rng_state(ckpt["rng"], device)
    prog = Progress(
        epoch=int(ckpt["epoch"]), elapsed_s=float(ckpt["elapsed_s"]), history=list(ckpt["history"])
    )
    same_steps = ckpt["world_size"] == env.world_size and ckpt.get("batch_size") == batch_size
    if ckpt["step"] and same_steps:
        prog.step = int(ckpt["step"])
        prog.train_s = float(ckpt["partial"]["train_s"])
        if (
            env.main
        ):  # the partial sums are global: one rank carries them, the epoch's all_reduce adds the rest
            prog.loss_sum = float(ckpt["partial"]["loss_sum"])
            prog.seen = int(ckpt["partial"]["seen"])
    elif ckpt["step"] and env.main:
        # Another world size or batch size cuts the epoch into other steps: "step N" means nothing now.
        log(
            f"checkpoint stopped inside epoch {prog.epoch + 1} with {ckpt['world_size']} process(es) x "
            f"batch {ckpt.get('batch_size')}, now {env.world_size} x {batch_size}: redoing that epoch"
        )
    return prog


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    env: DistEnv,
    amp: bool,
    channels_last: bool,
    max_batches: int | None = None,
) -> float:
    """Test accuracy; each rank scores a contiguous slice and the counts are summed."""
    model.eval()
    idx = torch.tensor_split(torch.arange(len(y)), env.world_size)[env.rank]
    lo, hi = (int(idx[0]), int(idx[-1]) + 1) if len(idx) else (0, 0)
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    total = 0
    for i, start in enumerate(range(lo, hi, batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        xb, yb = x[start : min(start + batch_size, hi)], y[start : min(start + batch_size, hi)]
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            correct += (model(xb).argmax(1) == yb).sum()
        total += len(yb)
    counts = torch.tensor([float(correct.item()), float(total)], device=x.device)
    if env.distributed:
        dist.all_reduce(counts)
    model.train()
    return float(counts[0] / counts[1]) if counts[1] > 0 else 0.0


def run(task: Task, args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    stop = StopFlag()
    stop.install()  # before the slow start-up: a signal during data loading still checkpoints
    env = read_dist_env()
    set_cpu_threads()
    device = pick_device(env, args.device)
    cuda = device.type == "cuda"
    amp = args.amp and cuda
    use_compile = args.compile if args.compile is not None else cuda
    channels_last = args.channels_last
    if not cuda:
        # Tiny gradients late in training turn denormal, and x86 is many times slower on those.
        torch.set_flush_denormal(True)
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv kernels once
        torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in fp32
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    # Data: read once, cut, moved and normalised once; batches are index lookups from here on.
    if args.dataset == "synthetic":
        train = synthetic_split(args.limit_train or task.sizes[0], task.shape, seed=1)
        test = synthetic_split(args.limit_test or task.sizes[1], task.shape, seed=2)
    else:
        train, test = task.load(args.data_dir.expanduser())
        train, test = train.head(args.limit_train), test.head(args.limit_test)
    x_train = normalise(train.images, task.mean, task.std, device)
    y_train = train.labels.to(device)
    x_test = normalise(test.images, task.mean, task.std, device)
    y_test = test.labels.to(device)

    init_distributed(env, device)
    run_dir: Path = args.run_dir.expanduser()
    if env.main and not args.dry_run:
        run_dir.mkdir(parents=True, exist_ok=True)
    if env.main:
        log(
            f"{task.title}: dataset {args.dataset} ({len(train)} train, {len(test)} test images), "
            f"device {device}, {env.world_size} process(es) via {env.source}, batch {args.batch_size}, "
            f"lr {args.lr}, amp {'bf16' if amp else 'off'}, compile {'on' if use_compile else 'off'}, "
            f"channels_last {'on' if channels_last else 'off'}, threads {torch.get_num_threads()}"
        )
    if env.distributed:
        log(
            f"rank {env.rank}/{env.world_size} local_rank {env.local_rank} device {device} "
            f"master {env.master_addr}:{env.master_port}"
        )

    model = task.build_model(args).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = task.build_optimizer(model.parameters(), args, device)

    ckpt_path = run_dir / CHECKPOINT
    prog = Progress()
    if args.resume and not args.dry_run and ckpt_path.is_file():
        prog = load_checkpoint(ckpt_path, task, model, opt, env, device, args.batch_size)
        if env.main:
            where = f" (continuing inside epoch {prog.epoch + 1} at step {prog.step})" if prog.step else ""
            log(f"resumed from epoch {prog.epoch}{where}")
    if env.main and not args.dry_run:
        # After a restart metrics.csv must agree with the checkpoint: rewrite it from the history.
        write_metrics(run_dir / METRICS, prog.history)

    fast = cast(nn.Module, torch.compile(model)) if use_compile else model
    # DDP wraps the (compiled) module; evaluation bypasses DDP so uneven eval slices cannot stall
    # its buffer broadcasts.
    train_model: nn.Module = fast
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(fast, device_ids=[device.index] if cuda else None)

    def train_step(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(train_model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    def batch(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xb = x_train[idx]
        if task.augment is not None:
            xb = task.augment(xb)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        return xb, y_train[idx]

    if args.dry_run:
        idx = shard(epoch_permutation(len(train), args.seed, 1), env)[: args.batch_size].to(device)
        loss = float(train_step(*batch(idx)))
        acc = evaluate(fast, x_test, y_test, args.test_batch_size, env, amp, channels_last, max_batches=1)
        if env.main:
            log(
                f"dry run ok: 1 training batch (loss {loss:.4f}), 1 evaluation batch "
                f"(accuracy {acc:.4f}), {time.perf_counter() - t_start:.1f}s"
            )
        return 0

    def stop_now(epoch: int) -> int:
        """All ranks: the checkpoint is written (by rank 0); maybe requeue; leave with EXIT_PREEMPTED."""
        if env.distributed:
            dist.barrier()  # nobody exits (and lets srun tear the step down) before the file is there
        if env.main:
            log(f"preempted at epoch {epoch}, checkpoint written ({stop.name})")
            if args.requeue_on_signal and stop.stop_signum == signal.SIGUSR2:
                job_id, why = requeue_decision(os.environ, args.max_requeues)
                log(why)
                if job_id is not None:
                    log(requeue(job_id))
        return EXIT_PREEMPTED

    if env.main and prog.epoch >= args.epochs:
        log(f"nothing to train: the checkpoint is at epoch {prog.epoch}, --epochs is {args.epochs}")
    logged_shard = False
    for epoch in range(prog.epoch + 1, args.epochs + 1):
        lr = task.lr_at(epoch, args)
        for group in opt.param_groups:
            group["lr"] = lr
        my_idx = shard(epoch_permutation(len(train), args.seed, epoch), env)
        if not logged_shard:
            log(
                f"rank {env.rank} shard epoch {epoch} size {len(my_idx)} first {my_idx[:5].tolist()} "
                f"sha256 {indices_sha256(my_idx)}"
            )
            logged_shard = True
        my_idx = my_idx.to(device)
        n_batches = num_batches(len(my_idx), args.batch_size)
        bs = min(args.batch_size, len(my_idx))
        loss_sum = torch.tensor(prog.loss_sum, device=device)  # on device: no sync per step
        seen = prog.seen
        t0 = time.perf_counter()
        stopped = False
        for step in range(prog.step, n_batches):
            xb, yb = batch(my_idx[step * bs : (step + 1) * bs])
            loss_sum += train_step(xb, yb).float() * len(yb)
            seen += len(yb)
            due = not env.distributed or (step + 1) % STOP_SYNC_EVERY == 0
            if due and step + 1 < n_batches and stop.agreed(env, device):
                stopped = True
                prog.step = step + 1
                break
        if cuda:
            torch.cuda.synchronize(device)
        train_s = prog.train_s + time.perf_counter() - t0
        if stopped:
            partial = torch.tensor([float(loss_sum), float(seen)], device=device)
            if env.distributed:
                dist.all_reduce(partial)  # the checkpoint keeps the global partial sums (rank 0 resumes them)
            prog.loss_sum, prog.seen, prog.train_s = float(partial[0]), int(partial[1]), train_s
            prog.elapsed_s += time.perf_counter() - t0
            if env.main:
                save_checkpoint(ckpt_path, task, model, opt, prog, env, device, args)
            return stop_now(epoch)

        acc = evaluate(fast, x_test, y_test, args.test_batch_size, env, amp, channels_last)
        stats = torch.tensor([float(loss_sum), float(seen)], device=device)
        if env.distributed:
            dist.all_reduce(stats)
        prog.elapsed_s += time.perf_counter() - t0
        row = {
            "epoch": epoch,
            "loss": float(stats[0] / stats[1]),
            "accuracy": acc,
            "images_per_s": float(stats[1]) / train_s if train_s > 0 else 0.0,
            "elapsed_s": prog.elapsed_s,
        }
        prog.history.append(row)
        prog.epoch, prog.step, prog.loss_sum, prog.seen, prog.train_s = epoch, 0, 0.0, 0, 0.0
        if env.main:
            # Checkpoint first, then the CSV: a kill in between is repaired by the rewrite at start.
            save_checkpoint(ckpt_path, task, model, opt, prog, env, device, args)
            append_metrics(run_dir / METRICS, row)
            write_plot(run_dir / PLOT, prog.history, task.title)
            log(
                f"epoch {epoch}/{args.epochs} loss {row['loss']:.4f} test_acc {acc:.4f} "
                f"images/s {row['images_per_s']:.0f} elapsed {prog.elapsed_s:.1f}s"
            )
        if epoch < args.epochs and stop.agreed(env, device):
            return stop_now(epoch)

    if env.main:
        atomic_torch_save(model.state_dict(), run_dir / FINAL_MODEL)
        log(
            f"wrote {run_dir / FINAL_MODEL} after {prog.epoch} epochs in {time.perf_counter() - t_start:.1f}s"
        )
    log(f"rank {env.rank} final-weights-sha256 {weights_sha256(model)}")
    return 0
