#!/usr/bin/env python3
"""A small ResNet (3 stages, ResNet-20 by default) on CIFAR-10 from the python-version batch files.

Reads data_batch_1..5 and test_batch from --data-dir or --data-dir/cifar-10-batches-py (as the
official cifar-10-python.tar.gz unpacks). Augmentation (random crop with 4-pixel padding, horizontal
flip) runs batched on the device. Runs with plain `python`, under `torchrun`, or one process per task
under `srun`; see hpctrain.py next to this file. Exit status: 0 done, 2 bad arguments or missing data,
75 stopped by SIGUSR2/SIGTERM after writing checkpoint.pt.

    python cifar10_resnet.py --data-dir ~/data --epochs 30
    python cifar10_resnet.py --dataset synthetic --epochs 1 --limit-train 2000   # smoke run, no files
"""

from __future__ import annotations

import argparse
import dataclasses
import math
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

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:  # projection shortcut where the shape changes
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """He et al. 2016's CIFAR ResNet: 3x3 stem, three stages at 32/16/8 pixels, widths w/2w/4w."""

    def __init__(self, blocks_per_stage: int = 3, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        layers: list[nn.Module] = []
        c_in = width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            for i in range(blocks_per_stage):
                layers.append(BasicBlock(c_in, c_out, stride=2 if stage > 0 and i == 0 else 1))
                c_in = c_out
        self.stages = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def random_crop_flip(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Per-image random crop of the zero-padded batch and random horizontal flip, as one gather.

    Zero padding in normalised space is the mean colour. The result is (N, C, H, W) in
    channels_last layout already (a permuted (N, H, W, C) gather).
    """
    n, _, h, w = x.shape
    dev = x.device
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = torch.randint(0, 2 * pad + 1, (n, 1), device=dev) + torch.arange(h, device=dev)
    cols = torch.randint(0, 2 * pad + 1, (n, 1), device=dev) + torch.arange(w, device=dev)
    flip = torch.rand(n, 1, device=dev) < 0.5
    cols = torch.where(flip, cols.flip(1), cols)
    batch = torch.arange(n, device=dev).view(n, 1, 1)
    return xp[batch, :, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)


def build_model(args: argparse.Namespace) -> nn.Module:
    return ResNet(blocks_per_stage=args.blocks, width=args.width)


def build_optimizer(
    params: Iterable[nn.Parameter], args: argparse.Namespace, device: torch.device
) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        params,
        lr=args.lr,
        momentum=0.9,
        nesterov=True,
        weight_decay=args.weight_decay,
        fused=device.type == "cuda",
    )


def lr_at(epoch: int, args: argparse.Namespace) -> float:
    """Cosine decay over --epochs, a function of the epoch alone so a resumed run continues it."""
    return float(args.lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / args.epochs)))


TASK = hpctrain.Task(
    name="cifar10",
    title="CIFAR-10 ResNet",
    shape=(3, 32, 32),
    sizes=(50_000, 10_000),
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
    load=hpctrain.load_cifar10,
    build_model=build_model,
    build_optimizer=build_optimizer,
    lr_at=lr_at,
    augment=random_crop_flip,
    # --lr is for a global batch of 256 and scales linearly with it (SGD, Goyal et al. 2017).
    defaults={"epochs": 30, "batch_size": 256, "lr": 0.1, "lr_scaling": "linear"},
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = hpctrain.make_parser(TASK, description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=3, help="residual blocks per stage (3: ResNet-20)")
    parser.add_argument(
        "--width", type=int, default=16, help="channels of the first stage (doubles per stage)"
    )
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    parser.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="random crop + horizontal flip on the device",
    )
    args = parser.parse_args(argv)
    task = TASK if args.augment else dataclasses.replace(TASK, augment=None)
    return hpctrain.main(task, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
