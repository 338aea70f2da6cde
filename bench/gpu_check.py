#!/usr/bin/env python3
"""One prepared run for a GPU machine: the bundled jobs' speed on one GPU, on synthetic files.

Writes synthetic MNIST (IDX) and CIFAR-10 (python batches) of the real sizes into a temporary
directory with tests/datagen.py, then runs the shipped job scripts as a user would and reads their
metrics.csv:

* MNIST LeNet-5: seconds per epoch and images/s, with the defaults (torch.compile, bf16 autocast,
  channels_last on CUDA) and with --no-compile; the first epoch includes compiling;
* CIFAR-10 ResNet-20: images/s with the defaults;
* the textbook MNIST pipeline (DataLoader + per-sample transforms, batch 64) for one epoch, for scale.

Without CUDA it runs the same steps tiny and slow on the CPU, as a sanity check of the script:

    python bench/gpu_check.py            # GPU: ~2-4 min, most of it compiling and data generation
    python bench/gpu_check.py --tiny     # CPU sanity check, ~1 min

Results are printed and, with --json PATH (or $OUT/gpu_check.json when OUT is set), saved as JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
import datagen  # noqa: E402


def run_job(script: str, args: list[str], run_dir: Path, timeout: float) -> dict[str, Any]:
    """Run a bundled job; per-epoch numbers from its metrics.csv, plus wall time and the log tail."""
    cmd = [sys.executable, str(ROOT / "jobs" / script), "--run-dir", str(run_dir), "--no-resume", *args]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    wall = time.perf_counter() - t0
    print(proc.stdout, proc.stderr, sep="", end="", flush=True)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}", "stderr": proc.stderr[-2000:]}
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    elapsed = [float(r["elapsed_s"]) for r in rows]
    epoch_s = [b - a for a, b in zip([0.0, *elapsed[:-1]], elapsed, strict=True)]
    return {
        "wall_s": round(wall, 2),
        "epoch_s": [round(e, 3) for e in epoch_s],
        "images_per_s": [round(float(r["images_per_s"])) for r in rows],
        "accuracy": [float(r["accuracy"]) for r in rows],
    }


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--tiny", action="store_true", help="small data, 1-2 epochs: the CPU sanity check")
    p.add_argument("--epochs", type=int, default=3, help="epochs per job run")
    p.add_argument("--timeout", type=float, default=240, help="seconds allowed to each job run")
    p.add_argument("--no-textbook", action="store_true", help="skip the textbook DataLoader epoch")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    tiny = args.tiny or not cuda
    sizes = (
        {"mnist": (2000, 500), "cifar10": (1000, 200)}
        if tiny
        else {"mnist": (60000, 10000), "cifar10": (50000, 10000)}
    )
    epochs = min(args.epochs, 2) if tiny else args.epochs
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    print(f"device: {device}, torch {torch.__version__}, sizes {sizes}, epochs {epochs}", flush=True)
    results: dict[str, Any] = {"device": device, "torch": torch.__version__, "sizes": sizes, "epochs": epochs}

    with tempfile.TemporaryDirectory(prefix="hpclaunch-gpucheck-") as tmp:
        t0 = time.perf_counter()
        mnist = datagen.write_mnist(Path(tmp) / "mnist", *sizes["mnist"], gz=True)
        cifar = datagen.write_cifar10(Path(tmp) / "cifar", *sizes["cifar10"])
        results["datagen_s"] = round(time.perf_counter() - t0, 1)
        common = ["--epochs", str(epochs)]
        cifar_extra = ["--blocks", "1"] if tiny else []
        runs = {
            "mnist_lenet5": ("mnist_lenet5.py", ["--data-dir", str(mnist), *common]),
            "mnist_lenet5_no_compile": (
                "mnist_lenet5.py",
                ["--data-dir", str(mnist), "--no-compile", *common],
            ),
            "cifar10_resnet": ("cifar10_resnet.py", ["--data-dir", str(cifar), *common, *cifar_extra]),
        }
        if not cuda:
            del runs["mnist_lenet5_no_compile"]  # compile is off on CPU anyway
        for name, (script, job_args) in runs.items():
            results[name] = run_job(script, job_args, Path(tmp) / name, args.timeout)

        if not args.no_textbook:
            from train_throughput import textbook

            r = textbook(mnist, 1, 2e-3, 0.7, 64, workers=1 if cuda else 0, device="cuda" if cuda else "cpu")
            results["mnist_textbook_1_epoch"] = {k: round(v, 4) for k, v in r.items()}

    print("\nsummary")
    for name, r in results.items():
        if isinstance(r, dict) and "images_per_s" in r:
            if "error" in r:
                print(f"  {name:28s} ERROR {r['error']}")
            elif isinstance(r["images_per_s"], list):
                print(
                    f"  {name:28s} epoch s {r['epoch_s']}  images/s {r['images_per_s']}  "
                    f"accuracy {r['accuracy'][-1]:.4f}  wall {r['wall_s']}s"
                )
            else:
                print(f"  {name:28s} images/s {r['images_per_s']:.0f}  accuracy {r['accuracy']:.4f}")
        elif isinstance(r, dict) and "error" in r:
            print(f"  {name:28s} ERROR {r['error']}")
    out = args.json or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)
    if out is not None:
        out.write_text(json.dumps(results, indent=2))
        print(f"wrote {out}")
    return 1 if any(isinstance(r, dict) and "error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
