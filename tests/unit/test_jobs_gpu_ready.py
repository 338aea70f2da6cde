"""What the bundled jobs need on real multi-GPU Slurm nodes, shown on the CPU (issue 13).

Each test names the old behaviour it catches. Small data and in-process runs where possible: CI is short.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]
JOBS = ROOT / "jobs"
sys.path.insert(0, str(JOBS))
_dont_write = sys.dont_write_bytecode
sys.dont_write_bytecode = True
import hpctrain  # noqa: E402
import hpctrain_dist  # noqa: E402
import mnist_lenet5  # noqa: E402

sys.dont_write_bytecode = _dont_write

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "HPCLAUNCH_RUN_DIR")


# ------------------------------------------------------------------------------ 1. CPUs per GPU task


def test_train_script_hands_srun_the_cpus_per_task(tmp_path: Path) -> None:
    """Old: `srun python ...` with no --cpus-per-task: under Slurm 22.05+ each task got ONE core."""
    from hpclaunch.cluster import Cluster
    from hpclaunch.config import Profile

    context = {
        "train": {
            "script": "/run/code/job.py",
            "args": ["--epochs", "1"],
            "python": "python3",
            "signal_lead": 90,
            "max_requeues": 3,
        }
    }
    text = Cluster(Profile(name="t", job={})).render(
        "train", run_dir=str(tmp_path), context=context, cpus_per_task=8, gpus=4, ntasks_per_node=4
    )
    assert "#SBATCH --cpus-per-task=8" in text
    # Run the script with a stand-in srun that reports what it was given.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "srun").write_text(
        '#!/bin/sh\necho "srun-args: $*"\necho "srun-env: ${SRUN_CPUS_PER_TASK:-unset}"\n'
    )
    (bindir / "srun").chmod(0o755)
    script = tmp_path / "job.sh"
    script.write_text(text)
    env = {"PATH": f"{bindir}:{os.environ['PATH']}", "SLURM_CPUS_PER_TASK": "8", "SLURM_JOB_ID": "5"}
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=30).stdout
    assert "srun-args: --kill-on-bad-exit=1 --cpus-per-task=8 python3 /run/code/job.py --epochs 1" in out
    assert "srun-env: 8" in out


def test_cpus_per_gpu_share_from_sinfo() -> None:
    """Old: `hpclaunch train --gpus N` kept the cpus_per_task default of 1 for every GPU process."""
    from hpclaunch.slurm.parse import parse_sinfo_cpus_per_gpu as cpus_per_gpu

    assert cpus_per_gpu("16 gpu:2\n") == 8
    assert cpus_per_gpu("64 gpu:a100:4(S:0-1)\n128+ gpu:h100:8\n") == 16  # the tighter node type wins
    assert cpus_per_gpu("32 (null)\n") is None


# ------------------------------------------------------------------ in-process runs of the MNIST job


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A single-process environment; the job's signal handlers are put back afterwards."""
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    for var in [v for v in os.environ if v.startswith("SLURM_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))  # leave pytest's threads alone
    handlers = {s: signal.getsignal(s) for s in hpctrain.StopFlag.SIGNALS}
    yield
    for s, h in handlers.items():
        signal.signal(s, h)


def run_mnist(task: hpctrain.Task, *argv: str | Path) -> int:
    parser = hpctrain.make_parser(task, "test")
    parser.add_argument("--gamma", type=float, default=0.7)
    args = parser.parse_args([str(a) for a in argv])
    return hpctrain.run(task, args)


class FakeClock:
    """Advances 1 ms a reading; jump() adds more. Timing assertions without timing anything."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.001
        return self.now

    def jump(self, seconds: float) -> None:
        self.now += seconds


SMALL = ("--dataset", "synthetic", "--limit-train", "512", "--limit-test", "100", "--batch-size", "64")


def test_warm_up_is_outside_the_timed_steps_and_files_leave_the_epoch_path(
    in_process: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Old: the first (compiling) step counted in epoch 1's images/s; rank 0 wrote the checkpoint and
    drew plot.png inside every epoch while the other ranks waited."""
    clock = FakeClock()
    monkeypatch.setattr(hpctrain, "clock", clock)
    first_call = [True]

    def slow_first_forward(module: torch.nn.Module, inputs: Any) -> None:
        if first_call[0]:  # as compiling would be
            first_call[0] = False
            clock.jump(1000.0)

    def build(args: Any) -> torch.nn.Module:
        model = mnist_lenet5.LeNet5()
        model.register_forward_pre_hook(slow_first_forward)
        return model

    plots: list[int] = []
    saves: list[tuple[str, str]] = []
    real_plot, real_save = hpctrain.write_plot, hpctrain.atomic_torch_save
    monkeypatch.setattr(hpctrain, "write_plot", lambda p, h, t: (plots.append(len(h)), real_plot(p, h, t)))

    def save(obj: Any, path: Path) -> None:
        saves.append((path.name, threading.current_thread().name))
        real_save(obj, path)

    monkeypatch.setattr(hpctrain, "atomic_torch_save", save)
    task = dataclasses.replace(mnist_lenet5.TASK, build_model=build)
    assert run_mnist(task, *SMALL, "--epochs", "3", "--run-dir", tmp_path) == 0

    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    header, first = rows[0].split(","), dict(zip(rows[0].split(","), rows[1].split(","), strict=True))
    assert header[-1] == "compile_s" and float(first["compile_s"]) >= 1000
    assert float(first["images_per_s"]) > 512 / 1000  # the 1000 s warm-up is not in the steps' time
    assert plots == [3]  # one plot, at the end
    assert [t for name, t in saves if name == "checkpoint.pt"] == ["hpctrain-writer"] * 3
    assert ("model.pt", "MainThread") in saves


def test_compile_failure_falls_back_to_eager_with_one_line(tmp_path: Path) -> None:
    """Old: torch.compile without a working C compiler killed the run at its first step."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("g++", "gcc", "cc", "c++", "clang"):  # every compiler inductor or triton would try
        (bindir / name).write_text("#!/bin/sh\nexit 1\n")
        (bindir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env.update(PATH=f"{bindir}:{env['PATH']}", PYTHONDONTWRITEBYTECODE="1", CXX="", CC="")
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "cache")  # nothing cached from another run
    proc = subprocess.run(
        [sys.executable, str(JOBS / "mnist_lenet5.py"), *SMALL, "--compile", "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fallback = [line for line in proc.stdout.splitlines() if "torch.compile failed" in line]
    assert len(fallback) == 1 and fallback[0].endswith("training eager"), proc.stdout
    assert "dry run ok" in proc.stdout


def test_evaluation_batches_all_have_one_shape() -> None:
    """Old: the last test batch was shorter, so a compiled model recompiled at the end of epoch 1."""
    shapes: list[tuple[int, ...]] = []

    class Recorder(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shapes.append(tuple(x.shape))
            return torch.zeros(x.shape[0], 10)

    split = hpctrain.Split(torch.zeros(250, 1, 28, 28, dtype=torch.uint8), torch.zeros(250, dtype=torch.long))
    data = hpctrain.DeviceData.put(split, (0.5,), (0.5,), torch.device("cpu"), channels_last=True)
    s = hpctrain.Setup(
        env=hpctrain.DistEnv(),
        device=torch.device("cpu"),
        stop=hpctrain.StopFlag(),
        amp=False,
        channels_last=True,
        use_compile=False,
        cuda_graphs=False,
        run_dir=Path("."),
    )
    assert hpctrain.evaluate(Recorder(), data, 100, s) == 1.0  # every label is 0; padding not counted
    assert shapes == [(100, 1, 28, 28)] * 3


# ------------------------------------------------------------------------- 6. ports and rendezvous


def test_rendezvous_moves_on_from_a_taken_port() -> None:
    """Old: one fixed port from the job id; a port in use (EADDRINUSE) failed the whole job."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        base = probe.getsockname()[1]
    ports = (base, base + 1, base + 2)
    # Another job's store holds the first candidate.
    foreign = torch.distributed.TCPStore("127.0.0.1", ports[0], 1, is_master=True, wait_for_workers=False)
    foreign.set(f"hpclaunch-owner-{ports[0]}", "other-job")
    env0 = hpctrain.DistEnv(0, 2, 0, "127.0.0.1", ports[0], "slurm", ports, "77.0")
    env1 = dataclasses.replace(env0, rank=1, local_rank=1)
    stores: dict[int, Any] = {}
    logs: list[str] = []

    def join(env: hpctrain.DistEnv) -> None:
        stores[env.rank] = hpctrain_dist.rendezvous(env, logs.append, datetime.timedelta(seconds=2))

    threads = [threading.Thread(target=join, args=(e,)) for e in (env0, env1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(stores) == {0, 1}, logs
    stores[0].set("hello", "from rank 0")
    assert stores[1].get("hello") == b"from rank 0"  # the two ranks share one store
    assert not foreign.check(["hello"])  # and never wrote into the other job's
    assert any("EADDRINUSE" in line for line in logs), logs


# --------------------------------------------------------------------------------- 5. GPU per rank


def test_gpu_index_refuses_more_ranks_than_gpus() -> None:
    """Old: `local_rank % device_count()` silently put two ranks on one GPU."""
    assert hpctrain.gpu_index(3, 1) == 0  # each task sees its own GPU
    assert hpctrain.gpu_index(2, 4) == 2
    with pytest.raises(hpctrain.DataError, match="more tasks than GPUs"):
        hpctrain.gpu_index(4, 4)


def test_two_ranks_on_one_gpu_is_a_clear_error() -> None:
    hpctrain.check_one_gpu_per_rank([("n1", "GPU-a"), ("n1", "GPU-b"), ("n2", "GPU-a")])
    with pytest.raises(hpctrain.DataError, match="ranks 0 and 2 share GPU GPU-a on n1"):
        hpctrain.check_one_gpu_per_rank([("n1", "GPU-a"), ("n1", "GPU-b"), ("n1", "GPU-a")])


# ------------------------------------------------------------------------------ 8. seeds and the LR


def test_each_rank_draws_its_own_augmentation() -> None:
    """Old: every rank seeded the same, so all ranks drew identical crops and flips."""
    seeds = {hpctrain.rank_seed(1, r) for r in range(64)}
    assert len(seeds) == 64 and hpctrain.rank_seed(1, 0) == 1
    draws = []
    for rank in range(2):
        torch.manual_seed(hpctrain.rank_seed(1, rank))
        draws.append(torch.rand(4))
    assert not torch.equal(draws[0], draws[1])


def test_learning_rate_scales_with_the_global_batch() -> None:
    """Old: --batch-size is per process and the LR stayed the same on 1 or 64 GPUs."""
    assert hpctrain.scaled_lr(0.1, 256 * 8, 256, "linear") == pytest.approx(0.8)
    assert hpctrain.scaled_lr(2e-3, 1024, 128, "sqrt") == pytest.approx(2e-3 * 8**0.5)
    assert hpctrain.scaled_lr(2e-3, 1024, 128, "none") == 2e-3


# ------------------------------------------------------------------------------ 9. compact data


def test_device_data_stays_uint8_channels_last() -> None:
    """Old: the whole split was fp32 NCHW on the device, four times the bytes per gather."""
    split = hpctrain.synthetic_split(32, (3, 8, 8), seed=0)
    data = hpctrain.DeviceData.put(split, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), torch.device("cpu"), True)
    assert data.images.dtype == torch.uint8
    assert data.images.is_contiguous(memory_format=torch.channels_last)
    xb = data.normalise(data.images[torch.tensor([3, 1])])
    expected = (split.images[[3, 1]].float() / 255 - 0.5) / 0.25
    assert torch.allclose(xb, expected, atol=1e-5)


# ----------------------------------------------------------------------------------- 10. real data


def test_digits_are_real_and_the_same_from_sklearn_or_from_exported_files(tmp_path: Path) -> None:
    """Old: accuracy was only ever checked on synthetic digits that every model gets 100 % right."""
    pytest.importorskip("sklearn")
    train, test = hpctrain.load_digits(tmp_path / "nothing-here")  # scikit-learn's bundled copy
    assert (len(train), len(test)) == (1437, 360)
    assert train.images.shape[1:] == (1, 28, 28) and train.images.dtype == torch.uint8
    assert sorted(set(test.labels.tolist())) == list(range(10))
    import hpctrain_data

    assert hpctrain_data.main(["export-digits", str(tmp_path / "d")]) == 0
    train2, test2 = hpctrain.load_digits(tmp_path / "d")
    assert torch.equal(train.images, train2.images) and torch.equal(test.labels, test2.labels)


# --------------------------------------------------------------------------- the prepared GPU check


@pytest.mark.slow
def test_gpu_check_tiny_runs_on_the_cpu(tmp_path: Path) -> None:
    """bench/gpu_check.py is one command for a GPU machine; --tiny proves the script on the CPU."""
    pytest.importorskip("sklearn")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env.update(OUT=str(tmp_path), PYTHONDONTWRITEBYTECODE="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--deadline", "240"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json

    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["summary"]["errors"] == [] and results["preemption"]["ok"] is True
    assert results["preemption"]["first_exit"] == 75 and results["gloo_1rank"]["ok"] is True
    assert (tmp_path / "logs" / "preempt_resumed.log").is_file()


def test_digits_takes_its_own_defaults_unless_given() -> None:
    """1,437 real digits need 20 epochs at 4e-3 and gamma 0.9 for 95 %+; MNIST keeps 10 at 2e-3 and 0.7;
    a flag wins."""
    parser = hpctrain.make_parser(mnist_lenet5.TASK, "test")
    parser.add_argument("--gamma", type=float, default=None)

    def resolved(*argv: str) -> tuple[int, float, float]:
        args = parser.parse_args(list(argv))
        hpctrain.apply_dataset_defaults(mnist_lenet5.TASK, args)
        return args.epochs, args.lr, args.gamma

    assert resolved("--dataset", "digits") == (20, 4e-3, 0.9)
    assert resolved() == (10, 2e-3, 0.7)
    assert resolved("--dataset", "synthetic") == (10, 2e-3, 0.7)
    assert resolved("--dataset", "digits", "--epochs", "3", "--lr", "1e-3", "--gamma", "0.5") == (
        3,
        1e-3,
        0.5,
    )


def test_train_throughput_prints_the_ratio_and_both_accuracies_on_real_digits() -> None:
    """The CPU benchmark runs both pipelines on the real digits; its numbers are not asserted (noisy
    machines), only that it measured both and that both learned."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "real digits (scikit-learn)" in result.stdout
    ratio = [ln for ln in result.stdout.splitlines() if ln.startswith("speed-up bundled/textbook:")]
    assert len(ratio) == 1, result.stdout
    found = re.search(r"test accuracy bundled (0\.\d+), textbook (0\.\d+)", ratio[0])
    assert found, ratio[0]
    assert min(float(found.group(1)), float(found.group(2))) > 0.5, ratio[0]  # 3 epochs: learning
