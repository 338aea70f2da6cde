"""Small datasets in the real on-disk formats, with learnable content, for tests and benchmarks.

Real MNIST / CIFAR-10 cannot be downloaded here, so these write the same files the jobs read:
MNIST as IDX (raw or gzip) and CIFAR-10 as python-pickle batches. Each class gets a fixed pattern
(the same in train and test); samples are that pattern, shifted by a pixel or two, scaled and noised,
so LeNet-5 gets above 90 % test accuracy within an epoch or two on a few thousand images.

Only numpy: no torch import, so a test can make data without paying for it.

    python tests/datagen.py mnist /tmp/mnist --train 4000 --test 1000 --gz
    python tests/datagen.py cifar10 /tmp/cifar --train 5000 --test 1000
"""

from __future__ import annotations

import argparse
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CIFAR_LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PROTO_SEED = 1234  # class patterns: identical for every split and call


def _prototypes(classes: int, channels: int, size: int) -> np.ndarray:
    """Smooth random patterns in [0, 1], (classes, channels, size, size): upsampled coarse noise."""
    rng = np.random.default_rng(PROTO_SEED + channels)
    coarse = rng.random((classes, channels, size // 4, size // 4))
    protos = coarse.repeat(4, axis=2).repeat(4, axis=3)
    # A 3x3 box blur softens the blocks so a one-pixel shift changes the picture only a little.
    padded = np.pad(protos, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    blurred = sum(padded[:, :, i : i + size, j : j + size] for i in range(3) for j in range(3)) / 9
    return np.asarray(blurred)


def make_images(
    n: int, channels: int, size: int, seed: int, classes: int = 10, noise: float = 0.3
) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, channels, size, size), labels uint8 (n,)), class-dependent and noisy."""
    protos = _prototypes(classes, channels, size)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n).astype(np.uint8)
    images = np.empty((n, channels, size, size), dtype=np.uint8)
    for lo in range(0, n, 4096):
        hi = min(lo + 4096, n)
        x = protos[labels[lo:hi]].copy()
        # Random translation by up to 2 pixels (np.roll per sample is slow; roll per shift group).
        dy = rng.integers(-2, 3, hi - lo)
        dx = rng.integers(-2, 3, hi - lo)
        for sy in range(-2, 3):
            for sx in range(-2, 3):
                sel = (dy == sy) & (dx == sx)
                if sel.any():
                    x[sel] = np.roll(x[sel], (sy, sx), axis=(2, 3))
        x *= rng.uniform(0.6, 1.0, (hi - lo, 1, 1, 1))
        x += noise * rng.standard_normal(x.shape)
        images[lo:hi] = (np.clip(x, 0, 1) * 255).round().astype(np.uint8)
    return images, labels


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """An IDX file of unsigned bytes: magic 0x0000 08 ndim, big-endian int32 dims, then the data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data, compresslevel=1)
    path.write_bytes(data)
    return path


def write_mnist(
    directory: Path, n_train: int = 4000, n_test: int = 1000, gz: bool = False, seed: int = 0
) -> Path:
    """The four MNIST IDX files (28x28 grey, labels 0-9) in directory; returns directory."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        images, labels = make_images(n, channels=1, size=28, seed=s)
        write_idx(directory / MNIST_FILES[f"{split}_images"], images[:, 0], gz=gz)
        write_idx(directory / MNIST_FILES[f"{split}_labels"], labels, gz=gz)
    return directory


def write_cifar_batch(path: Path, images: np.ndarray, labels: np.ndarray, label: str) -> None:
    """One python batch as the official files hold it (bytes keys: they were pickled by Python 2)."""
    batch = {
        b"batch_label": label.encode(),
        b"labels": [int(v) for v in labels],
        b"data": images.reshape(len(images), -1),  # (N, 3072): R plane, G plane, B plane, row-major
        b"filenames": [f"synthetic_{i:05d}.png".encode() for i in range(len(images))],
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def write_cifar10(
    directory: Path, n_train: int = 5000, n_test: int = 1000, seed: int = 0, subdir: bool = True
) -> Path:
    """data_batch_1..5, test_batch, batches.meta under directory[/cifar-10-batches-py]; returns directory."""
    out = directory / "cifar-10-batches-py" if subdir else directory
    out.mkdir(parents=True, exist_ok=True)
    images, labels = make_images(n_train, channels=3, size=32, seed=seed)
    for i, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        write_cifar_batch(out / f"data_batch_{i}", images[part], labels[part], f"training batch {i} of 5")
    images, labels = make_images(n_test, channels=3, size=32, seed=seed + 1)
    write_cifar_batch(out / "test_batch", images, labels, "testing batch 1 of 1")
    meta = {
        b"label_names": [n.encode() for n in CIFAR_LABEL_NAMES],
        b"num_cases_per_batch": -(-n_train // 5),
        b"num_vis": 3072,
    }
    with open(out / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return directory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=["mnist", "cifar10"])
    p.add_argument("directory", type=Path)
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--gz", action="store_true", help="gzip the MNIST IDX files")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.kind == "mnist":
        write_mnist(args.directory, args.train, args.test, gz=args.gz, seed=args.seed)
    else:
        write_cifar10(args.directory, args.train, args.test, seed=args.seed)
    print(f"wrote {args.kind} ({args.train} train, {args.test} test) to {args.directory}")


if __name__ == "__main__":
    main()
