"""Shared machinery of the bundled training jobs (``mnist_lenet5.py``, ``cifar10_resnet.py``).

Staged next to the job scripts together with ``hpctrain_data.py`` (files -> uint8 tensors),
``hpctrain_dist.py`` (ranks, rendezvous, GPUs, preemption) and ``hpctrain_io.py`` (checkpoint, metrics,
plot), so that a job runs anywhere with plain ``python``. This module is the run itself: set-up, the
training step (eager, compiled with a fallback, or one CUDA graph), evaluation and the epoch loop.

Why this file is still ~900 lines: what is left is one concern, the run, in pieces that read on their
own (``make_parser`` ~170 lines of flags and their help, ``setup``, ``load_data``, ``Trainer`` for the
step variants and the warm-up, ``evaluate``, ``Run`` for the epoch loop and rank 0's files). Files,
devices, ranks and checkpoints already live in the three modules above; splitting the run further
would spread one control flow over files that must be read together.

Contract with the Slurm template (tried on the dev cluster, Slurm 22.05):
  * one process per task with ``srun``; rank, world size, local rank and the master node come from
    SLURM_* variables through submitit's TorchDistributedEnvironment; the rendezvous port comes from
    the job id (``hpctrain_dist.slurm_master_port``) unless MASTER_PORT is set. Only an srun step
    (SLURM_STEP_ID set) counts: python started straight from the batch shell is one process whatever
    --ntasks says. torchrun's RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT win when present.
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
    keeps the first attempt's log. The compile cache lives there too, so a requeued run starts warm.

metrics.csv has one row per completed epoch: mean train loss, test accuracy, training images/s
(all ranks, steady steps only), elapsed_s (training + evaluation time of the whole run across restarts)
and compile_s (the warm-up of this start: compiling, cuDNN autotuning; counted in no other column).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from hpctrain_data import (  # noqa: F401  (re-exported: the jobs and tests use hpctrain.*)
    CIFAR10_TEST_FILE,
    CIFAR10_TRAIN_FILES,
    DIGITS_FILES,
    MNIST_FILES,
    DataError,
    DeviceData,
    Split,
    load_cifar10,
    load_digits,
    load_mnist,
    read_cifar_batch,
    read_idx,
    synthetic_split,
)
from hpctrain_dist import (  # noqa: F401
    DistEnv,
    StopFlag,
    check_one_gpu_per_rank,
    gpu_index,
    init_distributed,
    pick_device,
    rank_seed,
    read_dist_env,
    requeue,
    requeue_decision,
    set_cpu_threads,
    slurm_master_port,
)
from hpctrain_io import (  # noqa: F401
    CHECKPOINT,
    FINAL_MODEL,
    METRIC_FIELDS,
    METRICS,
    PLOT,
    Progress,
    Writer,
    all_rng_states,
    append_metrics,
    atomic_torch_save,
    checkpoint_state,
    indices_sha256,
    load_checkpoint,
    weights_sha256,
    write_metrics,
    write_plot,
)
from torch import nn

#: Exit status after a preemption signal, once the checkpoint is written. 75 is EX_TEMPFAIL of
#: sysexits.h ("temporary failure, try again"): distinct from errors (1), usage/data errors (2),
#: `timeout` (124) and death by signal (128+N), so a batch script can requeue on exactly this code.
EXIT_PREEMPTED = 75
#: Exit status for bad arguments or missing/malformed data (same as argparse's usage errors).
EXIT_USAGE = 2

#: In a multi-process run the ranks agree on stopping every this many steps (on the CPU group: no GPU
#: sync), and ranks must take the same decision at the same step.
STOP_SYNC_EVERY = 16

#: The clock of every timing here (a test replaces it).
clock = time.perf_counter


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------
# Task description and command line
# ----------------------------------------------------------------------------------------------


@dataclass
class Task:
    """What differs between jobs; everything else lives here."""

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
    #: epochs, batch_size (CPU), gpu_batch_size, lr (at the global batch lr_batch), lr_scaling
    defaults: dict[str, Any] = field(default_factory=dict)
    #: other datasets with the same shape: name -> loader (MNIST LeNet-5 also trains on "digits")
    extra_datasets: dict[str, Callable[[Path], tuple[Split, Split]]] = field(default_factory=dict)
    #: options a dataset needs other values of, where the command line does not give them (a small set
    #: takes more epochs): dataset -> {argparse dest: value}
    dataset_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)


def scaled_lr(lr: float, global_batch: int, ref_batch: int, rule: str) -> float:
    """--lr is for a global batch of ref_batch; scale it to this run's (sqrt for Adam, linear for SGD)."""
    ratio = global_batch / ref_batch
    if rule == "linear":  # Goyal et al. 2017, SGD
        return lr * ratio
    if rule == "sqrt":  # Adam-type optimizers (Malladi et al. 2022; Krizhevsky 2014)
        return lr * math.sqrt(ratio)
    return lr


def _base_defaults(task: Task) -> dict[str, Any]:
    return {"epochs": 10, "batch_size": 128, "test_batch_size": 1000, "lr": 1e-3, **task.defaults}


def _per_dataset(task: Task, dest: str) -> str:
    """``; digits: 20`` for help texts: the datasets that take another default for ``dest``."""
    found = [f"{name}: {values[dest]:g}" for name, values in task.dataset_defaults.items() if dest in values]
    return "; " + "; ".join(found) if found else ""


def make_parser(task: Task, description: str) -> argparse.ArgumentParser:
    d = _base_defaults(task)
    gpu_batch = d.get("gpu_batch_size", d["batch_size"])
    rule = d.get("lr_scaling", "none")
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    extra = ", ".join(
        f"{name}: {(fn.__doc__ or '').splitlines()[0]}" for name, fn in task.extra_datasets.items()
    )
    p.add_argument(
        "--dataset",
        choices=[task.name, *task.extra_datasets, "synthetic"],
        default=task.name,
        help="synthetic: generated in memory with the real shapes, for smoke runs without files"
        + (f"; {extra}" if extra else ""),
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
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"number of epochs to train (default: {d['epochs']}{_per_dataset(task, 'epochs')})%(default).0s",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"training batch size per process (default: {d['batch_size']} on CPU, {gpu_batch} on a GPU, "
        "where small batches leave it waiting for kernel launches)%(default).0s",
    )
    p.add_argument("--test-batch-size", type=int, default=d["test_batch_size"], help="evaluation batch size")
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"learning rate (at epoch 1) for a global batch of {d['batch_size']}; scaled to batch x "
        f"processes ({rule} rule) unless --no-scale-lr (default: {d['lr']:g}{_per_dataset(task, 'lr')})"
        "%(default).0s",
    )
    p.add_argument(
        "--scale-lr",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="scale --lr with the global batch (batch size x world size)",
    )
    p.add_argument(
        "--seed", type=int, default=1, help="random seed (model init, shuffling; +rank for augmentation)"
    )
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
        help="torch.compile the model; a compile failure falls back to eager with one log line. Default: on "
        "with CUDA (off with --cuda-graphs); off on CPU, where it does not pay: on a 2-core CPU compiling "
        "LeNet-5 took ~17 s and the compiled steps were no faster%(default).0s",
    )
    p.add_argument(
        "--compile-mode",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        default="default",
        help="torch.compile mode (reduce-overhead: CUDA graphs for forward and backward)",
    )
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="capture the whole training step (gather, forward, backward, optimizer) as one CUDA graph: "
        "for small models, whose steps are kernel-launch bound; one process on a GPU only",
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


def apply_dataset_defaults(task: Task, args: argparse.Namespace) -> None:
    """Options left at None on the command line: the dataset's own value, else the task's."""
    base = _base_defaults(task)
    values: dict[str, Any] = {"epochs": base["epochs"], "lr": base["lr"]}
    values.update({k: base[k] for ds in task.dataset_defaults.values() for k in ds if k in base})
    values.update(task.dataset_defaults.get(args.dataset, {}))
    for dest, value in values.items():
        if getattr(args, dest, None) is None:
            setattr(args, dest, value)


def main(task: Task, parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse, run, and turn DataError into one line on stderr with exit status 2."""
    args = parser.parse_args(argv)
    apply_dataset_defaults(task, args)
    check_args(parser, args)
    try:
        code = run(task, args)
    except DataError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr, flush=True)
        code = EXIT_USAGE
        if not (dist.is_available() and dist.is_initialized()):
            return code
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
# Set-up
# ----------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """Where and how this process trains; decided once, before any data is read."""

    env: DistEnv
    device: torch.device
    stop: StopFlag
    amp: bool
    channels_last: bool
    use_compile: bool
    cuda_graphs: bool
    run_dir: Path
    group: dist.ProcessGroup | None = None  # CPU group for control messages, once distributed

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def input_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.amp else torch.float32


def setup(task: Task, args: argparse.Namespace) -> Setup:
    stop = StopFlag()
    stop.install()  # before the slow start-up: a signal during data loading still checkpoints
    env = read_dist_env()
    set_cpu_threads()
    device = pick_device(env, args.device)
    cuda = device.type == "cuda"
    d = task.defaults
    if args.batch_size is None:
        args.batch_size = d.get("gpu_batch_size", d["batch_size"]) if cuda else d["batch_size"]
    args.base_lr = args.lr
    if args.scale_lr:
        args.lr = scaled_lr(
            args.lr, args.batch_size * env.world_size, d["batch_size"], d.get("lr_scaling", "")
        )
    cuda_graphs = args.cuda_graphs and cuda and not env.distributed
    if args.cuda_graphs and not cuda_graphs and env.main:
        log("--cuda-graphs needs one process on a GPU: training without")
    use_compile = args.compile if args.compile is not None else (cuda and not args.cuda_graphs)
    if not cuda:
        # Tiny gradients late in training turn denormal, and x86 is many times slower on those.
        torch.set_flush_denormal(True)
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv kernels once
        torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in fp32
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    return Setup(
        env=env,
        device=device,
        stop=stop,
        amp=args.amp and cuda,
        channels_last=args.channels_last,
        use_compile=use_compile,
        cuda_graphs=cuda_graphs,
        run_dir=args.run_dir.expanduser(),
    )


def load_data(task: Task, args: argparse.Namespace, s: Setup) -> tuple[DeviceData, DeviceData]:
    """Read once, cut, and put on the device as uint8: batches are index lookups from here on."""
    if args.dataset == "synthetic":
        train = synthetic_split(args.limit_train or task.sizes[0], task.shape, seed=1)
        test = synthetic_split(args.limit_test or task.sizes[1], task.shape, seed=2)
    else:
        loader = task.extra_datasets.get(args.dataset, task.load)
        train, test = loader(args.data_dir.expanduser())
        train, test = train.head(args.limit_train), test.head(args.limit_test)
    put = DeviceData.put
    return (
        put(train, task.mean, task.std, s.device, s.channels_last),
        put(test, task.mean, task.std, s.device, s.channels_last),
    )


def compile_cache(run_dir: Path) -> None:
    """Inductor's and Triton's caches in the run directory: a requeued run finds its kernels there."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(run_dir / ".cache" / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(run_dir / ".cache" / "triton"))


def log_start(task: Task, args: argparse.Namespace, s: Setup, n_train: int, n_test: int) -> None:
    env = s.env
    if env.main:
        lr = f"lr {args.lr:.3g}" + (f" (--lr {args.base_lr:g} scaled)" if args.lr != args.base_lr else "")
        log(
            f"{task.title}: dataset {args.dataset} ({n_train} train, {n_test} test images), "
            f"device {s.device}, {env.world_size} process(es) via {env.source}, batch {args.batch_size}, "
            f"{lr}, amp {'bf16' if s.amp else 'off'}, compile {'on' if s.use_compile else 'off'}, "
            f"cuda_graphs {'on' if s.cuda_graphs else 'off'}, "
            f"channels_last {'on' if s.channels_last else 'off'}, threads {torch.get_num_threads()}"
        )
    if env.distributed:
        log(
            f"rank {env.rank}/{env.world_size} local_rank {env.local_rank} device {s.device} "
            f"master {env.master_addr}:{env.master_port}"
        )


# ----------------------------------------------------------------------------------------------
# The training step: eager, compiled (falling back to eager), or one CUDA graph
# ----------------------------------------------------------------------------------------------


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        if isinstance(group["lr"], torch.Tensor):  # a captured graph reads this very tensor
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _state_kept(model: nn.Module, opt: torch.optim.Optimizer | None = None) -> Any:
    """Run warm-up or capture steps without changing the run: restore everything in place afterwards
    (in place: a captured CUDA graph keeps reading these very tensors)."""
    saved = [t.detach().clone() for t in model.state_dict().values()]
    opt_saved: dict[Any, dict[str, torch.Tensor]] = {}
    if opt is not None:
        for param, st in opt.state.items():
            opt_saved[param] = {k: v.detach().clone() for k, v in st.items() if isinstance(v, torch.Tensor)}
    try:
        yield
    finally:
        with torch.no_grad():
            for t, v in zip(model.state_dict().values(), saved, strict=True):
                t.copy_(v)
            if opt is not None:
                for param, st in opt.state.items():
                    before = opt_saved.get(param, {})
                    for k, v in st.items():
                        if isinstance(v, torch.Tensor):  # state the warm-up created starts from zero
                            v.copy_(before[k]) if k in before else v.zero_()
        if opt is None:
            for p in model.parameters():
                p.grad = None


class Trainer:
    """The model as trained (maybe compiled, DDP-wrapped), the batch recipe and the step."""

    def __init__(
        self,
        task: Task,
        args: argparse.Namespace,
        s: Setup,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        train: DeviceData,
        test: DeviceData,
    ) -> None:
        self.task, self.args, self.s = task, args, s
        self.model, self.opt, self.train, self.test = model, opt, train, test
        self.fast: nn.Module = model  # what the steps and the evaluation call
        self.graph_step: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.compile_s = 0.0

    # -- pieces -------------------------------------------------------------------------------

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xb = self.train.normalise(
            self.train.images[idx], torch.float32 if self.task.augment else self.s.input_dtype
        )
        if self.task.augment is not None:
            xb = self.task.augment(xb)
        if self.s.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        return xb, self.train.labels[idx]

    def _step(self, net: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        xb, yb = self.batch(idx)
        with torch.autocast(self.s.device.type, dtype=torch.bfloat16, enabled=self.s.amp):
            loss = F.cross_entropy(net(xb), yb)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def _forward_backward(self, net: nn.Module, idx: torch.Tensor) -> None:
        xb, yb = self.batch(idx)
        with torch.autocast(self.s.device.type, dtype=torch.bfloat16, enabled=self.s.amp):
            loss = F.cross_entropy(net(xb), yb)
        loss.backward()

    # -- preparing ----------------------------------------------------------------------------

    def prepare(self, warm_idx: torch.Tensor) -> None:
        """Compile (or capture) and warm up before any timed step; compile_s is what that took.

        Warm-up runs the bare (not DDP-wrapped) model, so no collective is involved and a rank whose
        compiler fails cannot leave the others waiting; the ranks then agree on eager or compiled.
        Both the training and the evaluation graph are built here, not at the end of epoch 1.
        """
        s = self.s
        t0 = clock()
        failed = ""
        if s.use_compile:
            compile_cache(s.run_dir)
            mode = None if self.args.compile_mode == "default" else self.args.compile_mode
            compiled = cast(nn.Module, torch.compile(self.model, mode=mode))
            try:
                self._warm(compiled, warm_idx)
                self.fast = compiled
            except Exception as e:  # no C compiler, unwritable cache, no libcuda for Triton, ...
                failed = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
        else:
            self._warm(self.model, warm_idx)
        if s.group is not None and s.use_compile:
            flag = torch.tensor([1 if failed else 0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=s.group)
            if int(flag) and not failed:
                failed = "another rank could not compile"
        if failed:
            from torch import _dynamo

            _dynamo.reset()
            self.fast = self.model
            log(f"rank {s.env.rank}: torch.compile failed ({failed}); training eager")
        elif s.use_compile:
            from torch import _dynamo

            _dynamo.config.suppress_errors = True  # a later recompile that fails runs eager
        if s.cuda_graphs:
            try:
                self.graph_step = self._capture(warm_idx)
            except Exception as e:
                log(f"CUDA graph capture failed ({type(e).__name__}: {str(e)[:200]}); training without")
                self.graph_step = None
        _sync(s.device)
        self.compile_s = clock() - t0

    def _warm(self, net: nn.Module, idx: torch.Tensor) -> None:
        with _state_kept(self.model):
            self._forward_backward(net, idx)
            evaluate(net, self.test, self.args.test_batch_size, self.s, max_batches=1, reduce=False)
        _sync(self.s.device)

    def _capture(self, warm_idx: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """The whole step (gather from a static index tensor to optimizer step) as one CUDA graph."""
        static_idx = warm_idx.clone()
        net = self.fast
        with _state_kept(self.model, self.opt):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph wants
                for _ in range(3):
                    self._step(net, static_idx)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            self.opt.zero_grad(set_to_none=True)
            with torch.cuda.graph(graph):
                static_loss = self._step(net, static_idx)

        def step(idx: torch.Tensor) -> torch.Tensor:
            static_idx.copy_(idx)
            graph.replay()
            return static_loss

        return step

    def wrap_ddp(self) -> None:
        """DDP wraps the (compiled) module for training; evaluation bypasses DDP so uneven eval slices
        cannot stall its buffer broadcasts."""
        if self.s.env.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp: nn.Module = DDP(self.fast, device_ids=[self.s.device.index] if self.s.cuda else None)

    def step(self, idx: torch.Tensor) -> torch.Tensor:
        if self.graph_step is not None:
            return self.graph_step(idx)
        return self._step(self.ddp if self.s.env.distributed else self.fast, idx)


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: nn.Module,
    test: DeviceData,
    batch_size: int,
    s: Setup,
    max_batches: int | None = None,
    reduce: bool = True,
) -> float:
    """Test accuracy; each rank scores a contiguous slice and the counts are summed.

    Every batch has the same shape (the last one padded, its padding not counted), so a compiled
    model never recompiles for a short final batch.
    """
    was_training = model.training
    model.eval()
    n = len(test)
    mine = torch.tensor_split(torch.arange(n, device=test.labels.device), s.env.world_size)[s.env.rank]
    bs = min(batch_size, n)
    correct = torch.zeros((), dtype=torch.long, device=test.labels.device)
    total = 0
    for i, start in enumerate(range(0, len(mine), bs)):
        if max_batches is not None and i >= max_batches:
            break
        idx = mine[start : start + bs]
        k = len(idx)
        if k < bs:
            idx = torch.cat([idx, idx.new_zeros(bs - k)])
        xb = test.normalise(test.images[idx], s.input_dtype)
        if s.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=s.amp):
            pred = model(xb).argmax(1)
        correct += (pred[:k] == test.labels[idx[:k]]).sum()
        total += k
    counts = torch.stack(
        [correct.double(), torch.tensor(float(total), device=correct.device, dtype=torch.double)]
    )
    if reduce and s.env.distributed:
        dist.all_reduce(counts)
    model.train(was_training)
    c = counts.tolist()
    return c[0] / c[1] if c[1] > 0 else 0.0


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Same permutation on every rank and every restart: seeded by (seed, epoch) only."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def shard(perm: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """DistributedSampler's split: equal shards (tail dropped), rank r takes every world_size-th index."""
    per_rank = len(perm) // env.world_size
    return perm[: per_rank * env.world_size][env.rank :: env.world_size]


def num_batches(n: int, batch_size: int) -> int:
    # Full batches only (static shapes for torch.compile, CUDA graphs and cuDNN); the epoch permutation
    # changes, so no sample is left out for good. A shard smaller than a batch is one batch.
    return max(1, n // batch_size)


class Run:
    """The epoch loop and what rank 0 writes: checkpoints and CSV rows (in the background), the plot."""

    def __init__(self, task: Task, args: argparse.Namespace, s: Setup, tr: Trainer, prog: Progress) -> None:
        self.task, self.args, self.s, self.tr, self.prog = task, args, s, tr, prog
        self.writer = Writer()
        self.ckpt_path = s.run_dir / CHECKPOINT
        self.logged_shard = False
        self.first_epoch = prog.epoch + 1
        self._epoch_totals = torch.zeros(2, dtype=torch.double)
        self._epoch_t0 = 0.0

    def snapshot(self) -> dict[str, Any] | None:
        """All ranks call (the RNG states are gathered); rank 0 gets a host copy of the state."""
        rng = all_rng_states(self.s.env, self.s.device, self.s.group)
        if not self.s.env.main or rng is None:
            return None
        return checkpoint_state(
            self.task.name, self.tr.model, self.tr.opt, self.prog, self.s.env, rng, self.args
        )

    def save_in_background(self, row: dict[str, float]) -> None:
        state = self.snapshot()
        if state is None:
            return
        path, metrics = self.ckpt_path, self.s.run_dir / METRICS

        def write() -> None:
            # Checkpoint first, then the CSV: a kill in between is repaired by the rewrite at start.
            atomic_torch_save(state, path)
            append_metrics(metrics, row)

        self.writer.submit(write)

    def stop_now(self, epoch: int) -> int:
        """All ranks: the checkpoint is written (by rank 0); maybe requeue; leave with EXIT_PREEMPTED."""
        state = self.snapshot()
        if state is not None:
            self.writer.wait()
            atomic_torch_save(state, self.ckpt_path)
            write_plot(self.s.run_dir / PLOT, self.prog.history, self.task.title)
        if self.s.env.distributed:
            dist.barrier()  # nobody exits (and lets srun tear the step down) before the file is there
        stop = self.s.stop
        if self.s.env.main:
            log(f"preempted at epoch {epoch}, checkpoint written ({stop.name})")
            if self.args.requeue_on_signal and stop.stop_signum == signal.SIGUSR2:
                job_id, why = requeue_decision(os.environ, self.args.max_requeues)
                log(why)
                if job_id is not None:
                    log(requeue(job_id))
        return EXIT_PREEMPTED

    def train_epoch(self, epoch: int) -> bool:
        """Steps of one epoch from prog.step; False when the ranks agreed to stop inside it."""
        s, prog, args = self.s, self.prog, self.args
        my_idx = shard(epoch_permutation(len(self.tr.train), args.seed, epoch), s.env)
        if not self.logged_shard:
            log(
                f"rank {s.env.rank} shard epoch {epoch} size {len(my_idx)} first {my_idx[:5].tolist()} "
                f"sha256 {indices_sha256(my_idx)}"
            )
            self.logged_shard = True
        my_idx = my_idx.to(s.device)
        n_batches = num_batches(len(my_idx), args.batch_size)
        bs = min(args.batch_size, len(my_idx))
        loss_sum = torch.tensor(prog.loss_sum, device=s.device)  # on device: no sync per step
        seen = prog.seen
        t0 = clock()
        stopped = False
        for step in range(prog.step, n_batches):
            loss_sum += self.tr.step(my_idx[step * bs : (step + 1) * bs]).float() * bs
            seen += bs
            due = s.group is None or (step + 1) % STOP_SYNC_EVERY == 0
            if due and step + 1 < n_batches and s.stop.agreed(s.group):
                stopped = True
                prog.step = step + 1
                break
        _sync(s.device)
        prog.train_s += clock() - t0
        totals = torch.stack(
            [loss_sum.double(), torch.tensor(float(seen), device=s.device, dtype=torch.double)]
        )
        if stopped:
            if s.env.distributed:
                dist.all_reduce(totals)  # the checkpoint keeps the global partial sums (rank 0 resumes them)
            prog.loss_sum, prog.seen = totals.tolist()[0], int(totals.tolist()[1])
            prog.elapsed_s += clock() - t0
            return False
        self._epoch_totals = totals
        self._epoch_t0 = t0
        return True

    def finish_epoch(self, epoch: int) -> None:
        s, prog, args = self.s, self.prog, self.args
        acc = evaluate(self.tr.fast, self.tr.test, args.test_batch_size, s)
        totals = self._epoch_totals
        if s.env.distributed:
            dist.all_reduce(totals)
        loss_sum, seen = totals.tolist()
        prog.elapsed_s += clock() - self._epoch_t0
        row = {
            "epoch": epoch,
            "loss": loss_sum / seen,
            "accuracy": acc,
            "images_per_s": seen / prog.train_s if prog.train_s > 0 else 0.0,
            "elapsed_s": prog.elapsed_s,
            "compile_s": self.tr.compile_s if epoch == self.first_epoch else 0.0,
        }
        prog.history.append(row)
        prog.epoch, prog.step, prog.loss_sum, prog.seen, prog.train_s = epoch, 0, 0.0, 0, 0.0
        self.save_in_background(row)
        if s.env.main:
            log(
                f"epoch {epoch}/{args.epochs} loss {row['loss']:.4f} test_acc {acc:.4f} "
                f"images/s {row['images_per_s']:.0f} elapsed {prog.elapsed_s:.1f}s"
            )

    def loop(self) -> int:
        s, args, prog = self.s, self.args, self.prog
        if s.env.main and prog.epoch >= args.epochs:
            log(f"nothing to train: the checkpoint is at epoch {prog.epoch}, --epochs is {args.epochs}")
        if prog.epoch < args.epochs and s.stop.agreed(s.group):  # a signal during start-up or compiling
            return self.stop_now(prog.epoch + 1)
        for epoch in range(self.first_epoch, args.epochs + 1):
            set_lr(self.tr.opt, self.task.lr_at(epoch, args))
            if not self.train_epoch(epoch):
                return self.stop_now(epoch)
            self.finish_epoch(epoch)
            if epoch < args.epochs and s.stop.agreed(s.group):
                self.writer.wait()
                return self.stop_now(epoch)
        self.writer.wait()
        if s.env.main:
            atomic_torch_save(self.tr.model.state_dict(), s.run_dir / FINAL_MODEL)
            write_plot(s.run_dir / PLOT, prog.history, self.task.title)  # once, off the per-epoch path
        return 0


def dry_run(tr: Trainer, args: argparse.Namespace, s: Setup, t_start: float) -> int:
    idx = shard(epoch_permutation(len(tr.train), args.seed, 1), s.env)[: args.batch_size].to(s.device)
    loss = float(tr.step(idx))
    acc = evaluate(tr.fast, tr.test, args.test_batch_size, s, max_batches=1)
    if s.env.main:
        log(
            f"dry run ok: 1 training batch (loss {loss:.4f}), 1 evaluation batch "
            f"(accuracy {acc:.4f}), {clock() - t_start:.1f}s"
        )
    return 0


def run(task: Task, args: argparse.Namespace) -> int:
    t_start = clock()
    apply_dataset_defaults(task, args)  # idempotent: main did it already, a caller of run() may not
    s = setup(task, args)
    train, test = load_data(task, args, s)
    s.group = init_distributed(s.env, s.device, log)
    env = s.env
    if env.main and not args.dry_run:
        s.run_dir.mkdir(parents=True, exist_ok=True)
    log_start(task, args, s, len(train), len(test))

    model = task.build_model(args).to(s.device)
    if s.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = task.build_optimizer(model.parameters(), args, s.device)
    # Model init is the same on every rank (--seed); augmentation draws differ per rank from here on.
    torch.manual_seed(rank_seed(args.seed, env.rank))

    prog = Progress()
    ckpt_path = s.run_dir / CHECKPOINT
    if args.resume and not args.dry_run and ckpt_path.is_file():
        prog = load_checkpoint(
            ckpt_path, task.name, model, opt, env, s.device, args.batch_size, args.seed, log
        )
        if env.main:
            where = f" (continuing inside epoch {prog.epoch + 1} at step {prog.step})" if prog.step else ""
            log(f"resumed from epoch {prog.epoch}{where}")
    if env.main and not args.dry_run:
        # After a restart metrics.csv must agree with the checkpoint: rewrite it from the history.
        write_metrics(s.run_dir / METRICS, prog.history)

    tr = Trainer(task, args, s, model, opt, train, test)
    warm_idx = torch.arange(min(args.batch_size, len(train)), device=s.device)
    tr.prepare(warm_idx)
    tr.wrap_ddp()
    if env.main and (s.use_compile or s.cuda_graphs):
        log(f"warm-up (compile/capture) {tr.compile_s:.1f}s, not counted in images/s")
    if args.dry_run:
        return dry_run(tr, args, s, t_start)
    code = Run(task, args, s, tr, prog).loop()
    if code == 0 and env.main:
        log(f"wrote {s.run_dir / FINAL_MODEL} after {prog.epoch} epochs in {clock() - t_start:.1f}s")
    if code == 0 and s.cuda and env.main:
        log(f"peak memory {torch.cuda.max_memory_allocated(s.device) // 2**20} MiB")
    if code == 0:
        log(f"rank {env.rank} final-weights-sha256 {weights_sha256(model)}")
    return code
