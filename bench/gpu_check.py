#!/usr/bin/env python3
"""One prepared command for a GPU machine: environment, ceilings, NCCL, preemption, and the jobs' speed.

Everything lands under $OUT (or --out): ``gpu_check.json`` (all results, rewritten after every check, so
a kill still leaves what was measured) and ``logs/`` (each job's output and metrics.csv). A hard overall
deadline (--deadline, 8 minutes) skips whatever no longer fits and a watchdog ends the process if a
check hangs past it. Checks, most important first:

* environment: GPU, driver, torch, CUDA, cuDNN, NCCL, CPU cores;
* ceilings: an 8192^3 bf16 matmul (TFLOP/s) and a device-to-device copy (GB/s);
* a 1-rank NCCL process group: init + all-reduce;
* preemption: SIGUSR2 during training -> exit 75 -> resume -> the same final accuracy (real digits);
* LeNet-5 (MNIST-sized data) eager / compiled / CUDA graph at batch 128, 1024 and 8192: compile_s,
  median steady epoch, images/s, accuracy, peak memory, wall time; real-digits accuracy at batch 1024;
* ResNet-20 (CIFAR-10-sized data) at batch 256 and 1024; the textbook DataLoader pipeline, one epoch;
* a summary against the targets of issue 13.

    OUT=/tmp/out python bench/gpu_check.py          # on the GPU machine, ~6-8 min
    python bench/gpu_check.py --tiny                # CPU sanity check of this script, < 2 min
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
import datagen  # noqa: E402

TARGETS = {
    "lenet_steady_epoch_s": 0.1,  # one H200, MNIST-sized epoch
    "resnet20_images_per_s": 100_000,
    "cpu_ratio_vs_textbook": 4.0,
}


class Check:
    """Runs the checks in order under one deadline and keeps the JSON on disk up to date."""

    def __init__(self, out: Path, deadline_s: float) -> None:
        self.out, self.t0, self.deadline_s = out, time.monotonic(), deadline_s
        self.results: dict[str, Any] = {"started": datetime.datetime.now().isoformat(timespec="seconds")}
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.deadline_s - (time.monotonic() - self.t0)

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        tmp = self.out / ".gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=2, default=str))
        tmp.replace(self.out / "gpu_check.json")

    def run(self, name: str, fn: Callable[[], Any], need_s: float = 10) -> Any:
        if self.left() < need_s:
            self.results[name] = {"skipped": f"deadline ({self.left():.0f}s left, needs ~{need_s:.0f}s)"}
        else:
            print(f"\n== {name} ({self.left():.0f}s left)", flush=True)
            try:
                self.results[name] = fn()
            except Exception as e:  # one failing check must not hide the others
                self.results[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            print(f"   {json.dumps(self.results[name], default=str)[:600]}", flush=True)
        self.save()
        return self.results[name]


# ---------------------------------------------------------------------------------------- the checks


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_cores": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "host": platform.node(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            cudnn=torch.backends.cudnn.version(),
            nccl=".".join(map(str, torch.cuda.nccl.version())),
        )
        try:
            smi = [
                "nvidia-smi",
                "--query-gpu=driver_version,clocks.max.sm,power.limit",
                "--format=csv,noheader",
            ]
            info["nvidia_smi"] = subprocess.run(
                smi, capture_output=True, text=True, timeout=20
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            info["nvidia_smi"] = f"unavailable: {e}"
    return info


def _timed(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def ceilings(tiny: bool) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    n = 8192 if cuda and not tiny else 512
    dtype = torch.bfloat16 if cuda else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    mm_s = _timed(lambda: a @ b, device, 20 if cuda else 3)
    size = (2**30 if cuda and not tiny else 2**24) // 4  # float32 elements: 1 GiB on the GPU
    src, dst = torch.empty(size, device=device), torch.empty(size, device=device)
    copy_s = _timed(lambda: dst.copy_(src), device, 20 if cuda else 3)
    return {
        "matmul": f"{n}^3 {str(dtype).removeprefix('torch.')}",
        "matmul_tflops": round(2 * n**3 / mm_s / 1e12, 1),
        "copy_gb_per_s": round(2 * size * 4 / copy_s / 1e9, 1),  # read + write
    }


def one_rank_collective() -> dict[str, Any]:
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    t0 = time.perf_counter()
    store = dist.HashStore()
    dist.init_process_group(backend, store=store, rank=0, world_size=1, device_id=device if cuda else None)
    init_s = time.perf_counter() - t0
    x = torch.ones(2**20, device=device)
    t0 = time.perf_counter()
    dist.all_reduce(x)
    if cuda:
        torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    ok = bool(torch.all(x == 1))
    dist.destroy_process_group()
    return {"backend": backend, "init_s": round(init_s, 3), "all_reduce_first_s": round(first_s, 4), "ok": ok}


def job(script: str, args: list[str], run_dir: Path, out: Path, name: str, timeout: float) -> dict[str, Any]:
    """A bundled job as a user runs it; per-epoch figures from its metrics.csv, its log under out/logs."""
    cmd = [sys.executable, str(ROOT / "jobs" / script), "--run-dir", str(run_dir), "--no-resume", *args]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    wall = time.perf_counter() - t0
    (out / "logs" / f"{name}.log").write_text(" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}", "stderr": proc.stderr[-1500:]}
    metrics = run_dir / "metrics.csv"
    (out / "logs" / f"{name}.metrics.csv").write_text(metrics.read_text())
    with open(metrics) as f:
        rows = list(csv.DictReader(f))
    elapsed = [float(r["elapsed_s"]) for r in rows]
    epoch_s = [b - a for a, b in zip([0.0, *elapsed[:-1]], elapsed, strict=True)]
    steady = epoch_s[1:] or epoch_s
    peak = re.search(r"peak memory (\d+) MiB", proc.stdout)
    fallback = [line for line in proc.stdout.splitlines() if "failed" in line and "training" in line]
    return {
        "compile_s": round(float(rows[0]["compile_s"]), 2),
        "median_steady_epoch_s": round(statistics.median(steady), 4),
        "images_per_s": round(float(rows[-1]["images_per_s"])),
        "accuracy": float(rows[-1]["accuracy"]),
        "peak_memory_mib": int(peak.group(1)) if peak else None,
        "wall_s": round(wall, 1),
        "train_s_over_wall": round(sum(epoch_s) / wall, 3),  # how much of the wall time is training
        **({"fallback": fallback} if fallback else {}),
    }


def preemption(run_root: Path, out: Path, tiny: bool, timeout: float) -> dict[str, Any]:
    """USR2 while training -> exit 75 with a checkpoint -> resume -> the uninterrupted run's accuracy."""
    args = ["--dataset", "digits", "--epochs", "2" if tiny else "12", "--batch-size", "16", "--seed", "4"]
    script = str(ROOT / "jobs" / "mnist_lenet5.py")
    straight = job("mnist_lenet5.py", args, run_root / "straight", out, "preempt_straight", timeout)
    run_dir = run_root / "preempted"
    cmd = [sys.executable, script, *args, "--run-dir", str(run_dir)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        seen = ""
        for line in proc.stdout:
            seen += line
            if line.startswith("rank 0 shard epoch"):
                time.sleep(0.2)
                proc.send_signal(signal.SIGUSR2)
                break
        rest, _ = proc.communicate(timeout=timeout)
    (out / "logs" / "preempt_first.log").write_text(seen + rest)
    ckpt = (
        torch.load(run_dir / "checkpoint.pt", weights_only=True)
        if (run_dir / "checkpoint.pt").exists()
        else {}
    )
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    (out / "logs" / "preempt_resumed.log").write_text(resumed.stdout + resumed.stderr)
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    acc = float(rows[-1]["accuracy"]) if rows else None
    ref = straight.get("accuracy")
    return {
        "first_exit": proc.returncode,
        "stopped_at": {"epoch": ckpt.get("epoch"), "step": ckpt.get("step")},
        "resumed_exit": resumed.returncode,
        "epochs": [int(r["epoch"]) for r in rows],
        "accuracy": acc,
        "straight_accuracy": ref,
        "ok": proc.returncode == 75
        and resumed.returncode == 0
        and acc is not None
        and ref is not None
        and abs(acc - ref) <= 0.01,
    }


def summary(results: dict[str, Any], cuda: bool) -> dict[str, Any]:
    def get(name: str, key: str) -> Any:
        r = results.get(name)
        return r.get(key) if isinstance(r, dict) else None

    lenet = {
        k: v
        for k, v in results.items()
        if k.startswith("lenet5_") and isinstance(v, dict) and "median_steady_epoch_s" in v
    }
    best_epoch = min((v["median_steady_epoch_s"], k) for k, v in lenet.items()) if lenet else None
    resnet = [
        v["images_per_s"] for k, v in results.items() if k.startswith("resnet20_") and "images_per_s" in v
    ]
    out: dict[str, Any] = {
        "device": "cuda" if cuda else "cpu (tiny: a check of this script, not of the targets)",
        "lenet_best_steady_epoch": best_epoch,
        "lenet_target_epoch_s": TARGETS["lenet_steady_epoch_s"],
        "resnet20_best_images_per_s": max(resnet) if resnet else None,
        "resnet20_target_images_per_s": TARGETS["resnet20_images_per_s"],
        "preemption_ok": get("preemption", "ok"),
        "digits_accuracy": get("digits_lenet5", "accuracy"),
        "errors": sorted(k for k, v in results.items() if isinstance(v, dict) and "error" in v),
        "skipped": sorted(k for k, v in results.items() if isinstance(v, dict) and "skipped" in v),
    }
    if cuda and best_epoch is not None:
        out["lenet_epoch_target_met"] = best_epoch[0] <= TARGETS["lenet_steady_epoch_s"]
    if cuda and resnet:
        out["resnet20_target_met"] = max(resnet) >= TARGETS["resnet20_images_per_s"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--tiny", action="store_true", help="small data, few runs: the CPU sanity check")
    p.add_argument("--deadline", type=float, default=480, help="hard limit for everything, seconds")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: $OUT, else a temp dir)")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    tiny = args.tiny or not cuda
    out = args.out or Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu-check-out-"))
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, args.deadline)

    # The watchdog: a hung check (a stuck NCCL init, a compile that never ends) cannot pass the deadline.
    def watchdog() -> None:
        time.sleep(max(0.0, check.left()) + 15)
        check.results["watchdog"] = "deadline passed: stopped"
        check.save()
        os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    env = check.run("environment", environment, need_s=1)
    print(json.dumps(env, indent=2), flush=True)
    check.run("ceilings", lambda: ceilings(tiny), need_s=5)
    check.run("nccl_1rank" if cuda else "gloo_1rank", one_rank_collective, need_s=5)

    sizes = (
        {"mnist": (2000, 500), "cifar10": (512, 128)}
        if tiny
        else {"mnist": (60000, 10000), "cifar10": (50000, 10000)}
    )
    with tempfile.TemporaryDirectory(prefix="hpclaunch-gpucheck-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        mnist = datagen.write_mnist(root / "mnist", *sizes["mnist"], gz=True)
        cifar = datagen.write_cifar10(root / "cifar", *sizes["cifar10"])
        check.results["data"] = {"sizes": sizes, "datagen_s": round(time.perf_counter() - t0, 1)}

        def run(name: str, script: str, job_args: list[str], need: float) -> None:
            timeout = max(10.0, min(240.0, check.left() - 5))
            check.run(name, lambda: job(script, job_args, root / name, out, name, timeout), need_s=need)

        check.run(
            "preemption", lambda: preemption(root / "preempt", out, tiny, max(10.0, check.left() / 2)), 30
        )
        epochs = ["--epochs", "2" if tiny else "4"]
        modes = {
            "eager": ["--no-compile"],
            "compiled": ["--compile"],
            "cudagraph": ["--cuda-graphs", "--no-compile"],
        }
        batches = [128] if tiny else [1024, 128, 8192]
        for bs in batches:
            for mode, flags in modes.items():
                if not cuda and mode != "eager":
                    check.results[f"lenet5_{mode}_b{bs}"] = {"skipped": "needs CUDA"}
                    continue
                need = 60 if mode == "compiled" else 20
                run(f"lenet5_{mode}_b{bs}", "mnist_lenet5.py", ["--data-dir", str(mnist), *flags, *epochs,
                    "--batch-size", str(bs)], need)  # fmt: skip
        # Accuracy on real scans (LeNet-5's default schedule; tiny: 2 epochs, just that it runs).
        digits = ["--dataset", "digits", *(["--epochs", "2"] if tiny else [])]  # else the digits defaults
        run("digits_lenet5", "mnist_lenet5.py", [*digits, "--batch-size", "128" if tiny else "1024"], 20)
        cifar_extra = ["--blocks", "1"] if tiny else []
        for bs in [64] if tiny else [256, 1024]:
            run(f"resnet20_b{bs}", "cifar10_resnet.py", ["--data-dir", str(cifar), *epochs, *cifar_extra,
                "--batch-size", str(bs)], 90 if cuda else 20)  # fmt: skip

        def textbook_epoch() -> dict[str, Any]:
            from train_throughput import textbook

            r = textbook(mnist, 1, 2e-3, 0.7, 64, workers=1 if cuda else 0, device="cuda" if cuda else "cpu")
            return {k: round(v, 4) for k, v in r.items()}

        check.run("textbook_1_epoch_b64", textbook_epoch, need_s=40 if cuda else 15)

    check.results["summary"] = summary(check.results, cuda)
    check.save()
    print("\nsummary " + json.dumps(check.results["summary"], indent=2, default=str))
    print(f"wrote {out / 'gpu_check.json'} and {out / 'logs'}/")
    failed = check.results["summary"]["errors"] or check.results.get("preemption", {}).get("ok") is False
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
