"""Data files -> uint8 tensors, and the compact on-device copy the training loop indexes.

Part of the bundled jobs' shared code (staged with ``hpctrain.py``). Readers: MNIST IDX (raw or gzip),
CIFAR-10 python batches, scikit-learn's bundled handwritten digits (``--dataset digits``), and
synthetic data for smoke runs. Every split stays uint8 until a batch is drawn: a quarter of the
memory and of the bytes each gather moves, normalised per batch (fused with the gather under
torch.compile).

    python hpctrain_data.py export-digits DIR   # digits as IDX files, for nodes without scikit-learn
"""

from __future__ import annotations

import argparse
import gzip
import math
import pickle
import struct
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
#: scikit-learn's load_digits as IDX: the 1,797 8x8 scans (values 0-16) and their labels.
DIGITS_FILES = ("digits-images-idx3-ubyte", "digits-labels-idx1-ubyte")
#: 80/20 split of the 1,797 digits by a fixed permutation (the file is sorted by writer).
DIGITS_TEST = 360
DIGITS_SPLIT_SEED = 0


class DataError(Exception):
    """Data or checkpoint files missing or malformed; printed as one line, exit status 2."""


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


def _digits_from_sklearn() -> tuple[torch.Tensor, torch.Tensor] | None:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        return None
    bunch = load_digits()  # ships inside the package: no download
    images = torch.as_tensor(bunch.images, dtype=torch.uint8)  # (1797, 8, 8), values 0..16
    return images, torch.as_tensor(bunch.target, dtype=torch.long)


def write_idx_gz(path: Path, array: torch.Tensor) -> Path:
    """A uint8 tensor as a gzip IDX file (what read_idx reads)."""
    header = struct.pack(f">BBBB{array.dim()}I", 0, 0, 0x08, array.dim(), *array.shape)
    path.write_bytes(gzip.compress(header + array.contiguous().numpy().tobytes(), mtime=0))
    return path


def export_digits(directory: Path) -> Path:
    """Write scikit-learn's digits as two gzip IDX files, for nodes where scikit-learn is not installed."""
    found = _digits_from_sklearn()
    if found is None:
        raise DataError("exporting the digits needs scikit-learn here: pip install scikit-learn")
    directory.mkdir(parents=True, exist_ok=True)
    images, labels = found
    write_idx_gz(directory / f"{DIGITS_FILES[0]}.gz", images)
    write_idx_gz(directory / f"{DIGITS_FILES[1]}.gz", labels.to(torch.uint8))
    return directory


def digits_to_28(images: torch.Tensor) -> torch.Tensor:
    """8x8 scans (0-16) -> 28x28 uint8 framed as MNIST is: the digit scaled to 20x20, 4-pixel margin."""
    x = images.float().unsqueeze(1) * (255 / 16)
    x = F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False)
    return F.pad(x, (4, 4, 4, 4)).clamp_(0, 255).round_().to(torch.uint8)


def load_digits(data_dir: Path) -> tuple[Split, Split]:
    """Real handwritten digits: exported IDX files in data_dir if there, else scikit-learn's copy."""
    dirs = [data_dir, data_dir / "digits"]
    paths = [_find(dirs, name) for name in DIGITS_FILES]
    if paths[0] is not None and paths[1] is not None:
        images, labels = read_idx(paths[0]), read_idx(paths[1]).long()
        if images.dim() != 3 or images.shape[1:] != (8, 8) or images.shape[0] != labels.shape[0]:
            raise DataError(
                f"digits files in {data_dir} disagree: {tuple(images.shape)}, {tuple(labels.shape)}"
            )
    else:
        found = _digits_from_sklearn()
        if found is None:
            raise DataError(
                f"--dataset digits needs scikit-learn, or {' and '.join(DIGITS_FILES)} (.gz) in {data_dir}: "
                "write them with `python hpctrain_data.py export-digits DIR` where scikit-learn is installed"
            )
        images, labels = found
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    x, y = digits_to_28(images[perm]), labels[perm]
    n_train = len(y) - DIGITS_TEST
    return Split(x[:n_train], y[:n_train]), Split(x[n_train:], y[n_train:])


# ----------------------------------------------------------------------------------------------
# On the device: uint8, channels_last, normalised per batch
# ----------------------------------------------------------------------------------------------


@dataclass
class DeviceData:
    """A split on the training device, uint8 (channels_last when asked), with its normalisation."""

    images: torch.Tensor
    labels: torch.Tensor
    scale: torch.Tensor  # 1 / (255 std), per channel, shaped (1, C, 1, 1)
    shift: torch.Tensor  # mean / std

    @classmethod
    def put(
        cls,
        split: Split,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        channels_last: bool,
    ) -> DeviceData:
        images = split.images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)  # gathers keep the layout
        m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        s = torch.tensor(std, device=device).view(1, -1, 1, 1)
        return cls(images, split.labels.to(device, non_blocking=True), 1 / (255 * s), m / s)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def normalise(self, xb: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 batch -> normalised dtype (bf16 under autocast: the conv would cast it anyway)."""
        return (xb.to(torch.float32) * self.scale - self.shift).to(dtype)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Data helpers of the bundled jobs.")
    sub = p.add_subparsers(dest="cmd", required=True)
    exp = sub.add_parser("export-digits", help="write scikit-learn's digits as IDX files into DIR")
    exp.add_argument("dir", type=Path)
    args = p.parse_args(argv)
    try:
        print(f"wrote {', '.join(DIGITS_FILES)} (.gz) to {export_digits(args.dir)}")
    except DataError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
