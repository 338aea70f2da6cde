"""Run directory of the bundled jobs: checkpoint, metrics.csv, plot.png, written off the training path.

Part of the bundled jobs' shared code (staged with ``hpctrain.py``). Rank 0 snapshots the state to host
memory (a copy, so training can go on) and a background thread writes it: the other ranks never wait for
a disk, a CSV or matplotlib. Files are written then renamed, so a kill never leaves half a file.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import os
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from hpctrain_data import DataError
from hpctrain_dist import DistEnv, rank_seed
from torch import nn

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"
PLOT = "plot.png"
FINAL_MODEL = "model.pt"
METRIC_FIELDS = ("epoch", "loss", "accuracy", "images_per_s", "elapsed_s", "compile_s")


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


class Writer:
    """One background thread for rank 0's files; at most one write in flight, errors re-raised here."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, fn: Callable[[], None]) -> None:
        self.wait()  # a write slower than an epoch throttles training instead of piling up snapshots

        def work() -> None:
            try:
                fn()
            except BaseException as e:  # handed to the training thread by wait()
                self._error = e

        self._thread = threading.Thread(target=work, name="hpctrain-writer", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def _to_host(obj: Any) -> Any:
    """A deep copy with every tensor on the CPU: training may change the originals meanwhile."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_host(v) for v in obj)
    return obj


def rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def all_rng_states(
    env: DistEnv, device: torch.device, group: dist.ProcessGroup | None
) -> list[dict[str, Any]] | None:
    """Every rank's RNG states, on rank 0 (None elsewhere): each rank draws its own augmentation."""
    mine = rng_state(device)
    if group is None:
        return [mine]
    states: list[dict[str, Any]] | None = [{} for _ in range(env.world_size)] if env.main else None
    dist.gather_object(mine, states, dst=0, group=group)
    return states


def checkpoint_state(
    task_name: str,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    prog: Progress,
    env: DistEnv,
    rng: list[dict[str, Any]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    return _to_host(
        {
            "format": 2,
            "task": task_name,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "epoch": prog.epoch,
            "step": prog.step,
            "partial": {"loss_sum": prog.loss_sum, "seen": prog.seen, "train_s": prog.train_s},
            "elapsed_s": prog.elapsed_s,
            "history": list(prog.history),
            "world_size": env.world_size,
            "batch_size": args.batch_size,
            "rng": rng,  # one entry per rank
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        }
    )


def load_checkpoint(
    path: Path,
    task_name: str,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    env: DistEnv,
    device: torch.device,
    batch_size: int,
    seed: int,
    log: Callable[[str], None],
) -> Progress:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn or foreign file: say which one, not a traceback
        raise DataError(f"cannot read checkpoint {path}: {e}; delete it or pass --no-resume") from None
    if ckpt.get("task") != task_name:
        raise DataError(
            f"checkpoint {path} is from a {ckpt.get('task')!r} run, not {task_name!r}; "
            "use another --run-dir or pass --no-resume"
        )
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    prog = Progress(
        epoch=int(ckpt["epoch"]), elapsed_s=float(ckpt["elapsed_s"]), history=list(ckpt["history"])
    )
    rng = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]  # format 1: rank 0's only
    if len(rng) == env.world_size:
        set_rng_state(rng[env.rank], device)
    else:  # another world size: fresh per-rank streams, still reproducible from (seed, rank, epoch)
        torch.manual_seed(rank_seed(seed, env.rank) + 7919 * prog.epoch)
    same_steps = ckpt["world_size"] == env.world_size and ckpt.get("batch_size") == batch_size
    if ckpt["step"] and same_steps:
        prog.step = int(ckpt["step"])
        prog.train_s = float(ckpt["partial"]["train_s"])
        # The partial sums are global: one rank carries them, the epoch's all_reduce adds the rest.
        if env.main:
            prog.loss_sum = float(ckpt["partial"]["loss_sum"])
            prog.seen = int(ckpt["partial"]["seen"])
    elif ckpt["step"] and env.main:
        # Another world size or batch size cuts the epoch into other steps: "step N" means nothing now.
        log(
            f"checkpoint stopped inside epoch {prog.epoch + 1} with {ckpt['world_size']} process(es) x "
            f"batch {ckpt.get('batch_size')}, now {env.world_size} x {batch_size}: redoing that epoch"
        )
    return prog


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
        "compile_s": f"{row.get('compile_s', 0.0):.3f}",
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
