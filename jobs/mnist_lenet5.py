#!/usr/bin/env python3
"""LeNet-5 on MNIST, read from the four standard IDX files (raw or .gz) in --data-dir.

Runs with plain `python`, under `torchrun`, or as one process per task under `srun`; see hpctrain.py
(next to this file) for the distributed, checkpoint and preemption behaviour. Exit status: 0 done,
2 bad arguments or missing data, 75 stopped by SIGUSR2/SIGTERM after writing checkpoint.pt.

    python mnist_lenet5.py --data-dir ~/data/mnist --epochs 5
    python mnist_lenet5.py --dataset digits --epochs 10   # scikit-learn's 1,797 real digits, 28x28
    python mnist_lenet5.py --dataset synthetic --epochs 1 --limit-train 5000   # smoke run, no files
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# The shared module is staged next to this script; make it importable from any working directory,
# without leaving a __pycache__ in the (shared, staged) job directory.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.dont_write_bytecode = True
import hpctrain  # noqa: E402

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


class LeNet5(nn.Module):
    """LeCun et al. 1998 with ReLU and max pooling: conv5x5(6) -> pool -> conv5x5(16) -> pool -> 120-84-10."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, kernel_size=5, padding=2)  # 28x28 in, as the paper's 32x32 with padding
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # relu(pool(x)) == pool(relu(x)) (relu is monotonic), on a quarter of the values.
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def build_model(args: argparse.Namespace) -> nn.Module:
    return LeNet5()


def build_optimizer(
    params: Iterable[nn.Parameter], args: argparse.Namespace, device: torch.device
) -> torch.optim.Optimizer:
    # Fused on CUDA (one kernel for all parameters); foreach on CPU: the per-parameter Python loop
    # Adam defaults to there costs ~15 % of a LeNet-5 step.
    # A captured CUDA graph needs capturable state and the learning rate as a tensor it can read.
    cuda = device.type == "cuda"
    if cuda and args.cuda_graphs:
        lr = torch.tensor(args.lr, device=device)
        return torch.optim.Adam(params, lr=lr, fused=True, capturable=True)
    return torch.optim.Adam(params, lr=args.lr, fused=cuda, foreach=None if cuda else True)


def lr_at(epoch: int, args: argparse.Namespace) -> float:
    """Step decay per epoch, as pytorch/examples' MNIST (StepLR, step 1, gamma 0.7)."""
    return float(args.lr * args.gamma ** (epoch - 1))


TASK = hpctrain.Task(
    name="mnist",
    title="MNIST LeNet-5",
    shape=(1, 28, 28),
    sizes=(60_000, 10_000),
    mean=MNIST_MEAN,
    std=MNIST_STD,
    load=hpctrain.load_mnist,
    build_model=build_model,
    build_optimizer=build_optimizer,
    lr_at=lr_at,
    # Batch 128 on CPU; on a GPU LeNet-5 is kernel-launch bound below ~1024. --lr is for batch 128 and
    # scales with the square root of the global batch (Adam).
    defaults={
        "epochs": 10,
        "batch_size": 128,
        "gpu_batch_size": 1024,
        "lr": 2e-3,
        "lr_scaling": "sqrt",
        "gamma": 0.7,
    },
    extra_datasets={"digits": hpctrain.load_digits},
    # 1,437 images are 11 steps an epoch at batch 128: they need more epochs, larger steps and a slower
    # decay (10 epochs at 2e-3 and 0.7 stop at about 94 %; these reach 97.5-98.9 % over seeds 0-3).
    dataset_defaults={"digits": {"epochs": 20, "lr": 4e-3, "gamma": 0.9}},
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = hpctrain.make_parser(TASK, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--gamma",
        type=float,
        default=None,
        help="learning-rate decay per epoch (Adam) (default: 0.7; digits: 0.9)%(default).0s",
    )
    return hpctrain.main(TASK, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
