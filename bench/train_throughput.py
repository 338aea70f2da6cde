#!/usr/bin/env python3
"""Training images/s: the bundled MNIST LeNet-5 job against the textbook DataLoader pipeline, on CPU.

Both train the same LeNet-5 with the same optimizer (Adam, same learning rate and per-epoch decay) on
the same files: scikit-learn's 1,797 real handwritten digits (``--dataset digits``'s 1,437/360 split,
28x28) written as MNIST IDX files to a temporary directory (``--synthetic``: tests/datagen.py's
generated MNIST instead), so the accuracy column is on real scans:

* bundled:  jobs/mnist_lenet5.py as shipped (run as a subprocess, numbers from its metrics.csv):
            the dataset is one normalised tensor, batches are index lookups of a permutation,
            channels_last, its default batch size;
* textbook: pytorch/examples' MNIST shape: torchvision's MNIST Dataset (uint8 array -> PIL image ->
            ToTensor -> Normalize, per sample), DataLoader(batch_size=64, shuffle=True,
            num_workers=0 as the examples use on CPU), loss.item() every 10 batches (log interval).

images/s counts training steps only (no evaluation, no start-up), as the job's metrics do.

    python bench/train_throughput.py --quick      # real digits, 3 epochs
    python bench/train_throughput.py              # real digits, the job's digits defaults (20 epochs)
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "jobs"))
sys.path.insert(0, str(ROOT / "tests"))
sys.dont_write_bytecode = True  # jobs/ ships in the wheel: no __pycache__ there
import datagen  # noqa: E402
import hpctrain  # noqa: E402
import mnist_lenet5  # noqa: E402


class ToTensor:
    """torchvision.transforms.ToTensor for a PIL image, as it is implemented there (torchvision is not
    installable beside this torch build, so the two transforms are restated)."""

    def __call__(self, pic: Image.Image) -> torch.Tensor:
        img = torch.from_numpy(np.array(pic, np.uint8, copy=True))
        img = img.view(pic.size[1], pic.size[0], len(pic.getbands())).permute((2, 0, 1)).contiguous()
        return img.to(dtype=torch.get_default_dtype()).div(255)


class Normalize:
    """torchvision.transforms.Normalize on a tensor (per sample)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean, self.std = mean, std

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        mean = torch.as_tensor(self.mean, dtype=t.dtype).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=t.dtype).view(-1, 1, 1)
        return t.sub_(mean).div_(std)


class TextbookMNIST(Dataset[tuple[torch.Tensor, int]]):
    """torchvision.datasets.MNIST's __getitem__: uint8 array -> PIL image -> transforms, per sample."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels
        self.transforms = [ToTensor(), Normalize(mnist_lenet5.MNIST_MEAN, mnist_lenet5.MNIST_STD)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img: Any = Image.fromarray(self.images[i], mode="L")
        for t in self.transforms:
            img = t(img)
        return img, int(self.labels[i])


def textbook(
    data_dir: Path,
    epochs: int,
    lr: float,
    gamma: float,
    batch_size: int = 64,
    workers: int = 0,
    device: str = "cpu",
) -> dict[str, float]:
    """Train and evaluate the textbook way (pytorch/examples mnist/main.py's loop).

    Returns images/s over all training steps, over the last epoch, and the final test accuracy.
    """
    torch.manual_seed(1)
    dev = torch.device(device)

    def split(prefix: str) -> TextbookMNIST:
        images = hpctrain.read_idx(data_dir / f"{prefix}-images-idx3-ubyte.gz").numpy()
        labels = hpctrain.read_idx(data_dir / f"{prefix}-labels-idx1-ubyte.gz").numpy()
        return TextbookMNIST(images, labels)

    pin = dev.type == "cuda"  # the examples' cuda_kwargs: pin_memory, one worker
    train_loader = DataLoader(
        split("train"), batch_size=batch_size, shuffle=True, num_workers=workers, pin_memory=pin
    )
    test_loader = DataLoader(split("t10k"), batch_size=1000, num_workers=workers, pin_memory=pin)
    model = mnist_lenet5.LeNet5().to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=gamma)
    seen = 0
    epoch_s: list[float] = []
    acc = 0.0
    for _ in range(epochs):
        model.train()
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(train_loader):
            x, y = x.to(dev), y.to(dev)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            if i % 10 == 0:
                loss.item()  # the examples log here; the value is what costs, not the print
            seen += len(y)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        epoch_s.append(time.perf_counter() - t0)
        sched.step()
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in test_loader:
                correct += int((model(x.to(dev)).argmax(1) == y.to(dev)).sum())
                total += len(y)
        acc = correct / total
    per_epoch = seen / epochs
    return {
        "images_per_s": seen / sum(epoch_s),
        "last_epoch_images_per_s": per_epoch / epoch_s[-1],
        "accuracy": acc,
    }


def bundled(data_dir: Path, run_dir: Path, epochs: int, extra: list[str]) -> dict[str, float]:
    """The shipped job, as a user runs it; images/s from its metrics.csv."""
    cmd = [sys.executable, str(ROOT / "jobs" / "mnist_lenet5.py"), "--data-dir", str(data_dir)]
    cmd += ["--run-dir", str(run_dir), "--epochs", str(epochs), "--no-resume", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"bundled job failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    rates = [float(r["images_per_s"]) for r in rows]
    return {
        # Every epoch trains the same number of images: the overall rate is the harmonic mean.
        "images_per_s": len(rates) / sum(1 / r for r in rates),
        "last_epoch_images_per_s": rates[-1],
        "accuracy": float(rows[-1]["accuracy"]),
        "wall_s": wall,
    }


def digits_as_mnist(directory: Path) -> tuple[Path, str]:
    """The job's digits split as the four MNIST IDX files, which both pipelines read."""
    train, test = hpctrain.load_digits(directory / "none")  # scikit-learn's bundled copy
    directory.mkdir(parents=True)
    for prefix, split in (("train", train), ("t10k", test)):
        datagen.write_idx(directory / f"{prefix}-images-idx3-ubyte", split.images[:, 0].numpy(), gz=True)
        datagen.write_idx(
            directory / f"{prefix}-labels-idx1-ubyte", split.labels.to(torch.uint8).numpy(), gz=True
        )
    return directory, f"real digits (scikit-learn) as MNIST IDX: {len(train)} train, {len(test)} test images"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="3 epochs")
    p.add_argument("--synthetic", action="store_true", help="generated MNIST files, not real digits")
    p.add_argument("--train", type=int, default=20_000, help="training images (--synthetic)")
    p.add_argument("--test", type=int, default=5_000, help="test images (--synthetic)")
    p.add_argument("--epochs", type=int, default=None, help="default: the job's for the data (digits: 20)")
    p.add_argument(
        "--repeat", type=int, default=1, help="alternate the runs this often, keep each one's best"
    )
    p.add_argument(
        "--workers", type=int, default=0, help="textbook DataLoader num_workers (examples: 0 on CPU)"
    )
    p.add_argument("--ablation", action="store_true", help="also run the bundled job with --no-channels-last")
    p.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="ARGS",
        help="also run the bundled job with these extra arguments, e.g. --also='--batch-size 256 --lr 4e-3'",
    )
    args = p.parse_args()
    # The job's defaults for the data at hand (the real digits take their own epochs and decay), the
    # same for both pipelines.
    task = mnist_lenet5.TASK
    job_defaults = {**task.defaults, **({} if args.synthetic else task.dataset_defaults["digits"])}
    if args.epochs is None:
        args.epochs = 3 if args.quick else job_defaults["epochs"]
    lr, gamma, bs = job_defaults["lr"], job_defaults["gamma"], job_defaults["batch_size"]
    same = ["--device", "cpu", "--lr", str(lr), "--gamma", str(gamma)]
    runs: dict[str, Callable[[Path, Path], dict[str, float]]] = {
        f"bundled (batch {bs})": lambda data, tmp: bundled(data, tmp / "run", args.epochs, same),
    }
    if args.ablation:
        runs[f"bundled --no-channels-last (batch {bs})"] = lambda data, tmp: bundled(
            data, tmp / "run-nocl", args.epochs, [*same, "--no-channels-last"]
        )
    for extra in args.also:
        runs[f"bundled {extra}"] = lambda data, tmp, extra=extra: bundled(
            data, tmp / "run-also", args.epochs, [*same, *extra.split()]
        )
    runs["textbook (DataLoader, batch 64)"] = lambda data, tmp: textbook(
        data, args.epochs, lr, gamma, 64, args.workers, "cpu"
    )

    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="hpclaunch-bench-") as tmp:
        if args.synthetic:
            data_dir = datagen.write_mnist(Path(tmp) / "mnist", args.train, args.test, gz=True)
            what = f"synthetic MNIST IDX: {args.train} train, {args.test} test images"
        else:
            data_dir, what = digits_as_mnist(Path(tmp) / "digits")
        print(
            f"{what}, {args.epochs} epochs, CPU threads {torch.get_num_threads()}, torch {torch.__version__}",
            flush=True,
        )
        for _ in range(args.repeat):
            for name, fn in runs.items():
                r = fn(data_dir, Path(tmp))
                print(f"  {name:40s} {_fmt(r)}", flush=True)
                if name not in results or r["images_per_s"] > results[name]["images_per_s"]:
                    results[name] = r

    print(f"best of {args.repeat} run(s) each (images/s over all epochs; last epoch alone):")
    for name, r in results.items():
        print(f"{name:42s} {_fmt(r)}")
    fast, slow = results[next(iter(runs))], results["textbook (DataLoader, batch 64)"]
    print(
        f"speed-up bundled/textbook: {fast['images_per_s'] / slow['images_per_s']:.1f}x overall, "
        f"{fast['last_epoch_images_per_s'] / slow['last_epoch_images_per_s']:.1f}x last epoch; "
        f"test accuracy bundled {fast['accuracy']:.4f}, textbook {slow['accuracy']:.4f}"
    )


def _fmt(r: dict[str, float]) -> str:
    return (
        f"{r['images_per_s']:8.0f} images/s ({r['last_epoch_images_per_s']:6.0f} last epoch)  "
        f"test accuracy {r['accuracy']:.4f}"
    )


if __name__ == "__main__":
    main()
