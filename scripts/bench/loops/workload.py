"""The work that every training loop of the benchmarks does, defined once so that the ddpw
Trainer, the Accelerate loop and the raw DDP loop train exactly the same thing.

Synthetic data made in code (no downloads): Gaussian inputs labelled by a fixed random linear
"teacher", so that the loss falls and the final losses of the variants can be compared. Models
are a small MLP (``size`` = hidden width), a small CNN (``size`` = channels of its first
convolution) and a stack of repeated blocks for sharding (``size`` = the blocks' width), all
built from the same seed, and trained with Adam.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

#: Seeds the data, the model's weights and the data order (ddpw's default ``PlatformConfig.seed``).
SEED = 1889
#: Processes of every variant's world.
PROCESSES = 2
#: Samples per batch per process.
BATCH_SIZE = 64
#: Classes of the synthetic task.
CLASSES = 10
#: MLP inputs: features per sample.
FEATURES = 256
#: CNN inputs: channels x side x side images.
IMAGE = (3, 16, 16)
#: Repeated blocks of the ``blocks`` model: at width 2048, 51M parameters.
BLOCKS = 12


def make_data(kind: str, samples: int) -> TensorDataset:
    """``samples`` (input, label) pairs, the same on every call and in every process."""
    generator = torch.Generator().manual_seed(SEED)
    shape = IMAGE if kind == "cnn" else (FEATURES,)
    inputs = torch.randn(samples, *shape, generator=generator)
    teacher = torch.randn(inputs[0].numel(), CLASSES, generator=generator)
    labels = (inputs.flatten(1) @ teacher).argmax(1)
    return TensorDataset(inputs, labels)


class Blocks(nn.Module):
    """A model as sharding sees a transformer: an input layer, :data:`BLOCKS` repeated blocks
    (a ``width x width`` linear layer and a ReLU each) in a ``ModuleList``, and a head."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.embed = nn.Linear(FEATURES, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU())
                                    for _ in range(BLOCKS))
        self.head = nn.Linear(width, CLASSES)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(inputs)
        for block in self.blocks:
            hidden = block(hidden)
        return self.head(hidden)


def make_model(kind: str, size: int) -> nn.Module:
    """The MLP (two hidden layers of width ``size``), the CNN (``size`` channels, then
    ``2 * size``) or the :class:`Blocks` of width ``size``, with weights drawn from
    :data:`SEED` whatever the global RNG's state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        if kind == "blocks":
            return Blocks(size)
        if kind == "mlp":
            return nn.Sequential(nn.Linear(FEATURES, size), nn.ReLU(), nn.Linear(size, size),
                                 nn.ReLU(), nn.Linear(size, CLASSES))
        return nn.Sequential(
            nn.Conv2d(IMAGE[0], size, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(size, 2 * size, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
            nn.Flatten(), nn.Linear(2 * size * 16, CLASSES))


def make_optimiser(model: nn.Module) -> torch.optim.Optimizer:
    """Adam: it keeps two state tensors per parameter, so memory grows as a real job's does."""
    return torch.optim.Adam(model.parameters(), lr=1e-3)


def parameters(kind: str, size: int) -> int:
    """Number of parameters of :func:`make_model`'s model."""
    return sum(p.numel() for p in make_model(kind, size).parameters())


def arguments(description: str) -> argparse.Namespace:
    """The options that every loop script takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", choices=("mlp", "cnn", "blocks"), default="mlp")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--samples", type=int, default=4096, help="per epoch, all ranks together")
    parser.add_argument("--epochs", type=int, default=4, help="the epoch at which training stops")
    parser.add_argument("--threads", type=int, default=1, help="compute threads per process")
    parser.add_argument("--save", default=None, help="checkpoint folder to write at the end")
    parser.add_argument("--resume", default=None, help="checkpoint folder to resume from")
    parser.add_argument("--compile", action="store_true",
                        help="ddpw: PlatformConfig.torch_compile (the Accelerate loop takes "
                             "accelerate launch's --dynamo_backend instead)")
    parser.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp",
                        help="ddpw: PlatformConfig.strategy")
    return parser.parse_args()


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(rank: int, **values: Any) -> None:
    """Write this rank's measurements to ``rank-{rank}.json`` in the working folder, where the
    benchmark that started the command reads them."""
    values = {"rank": rank, "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads(),
              "pid": os.getpid(),
              # Pages the kernel had to map in, each a fault: what giving memory back costs.
              "minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt, **values}
    path = Path(f"rank-{rank}.json")
    path.with_suffix(".tmp").write_text(json.dumps(values))
    path.with_suffix(".tmp").replace(path)  # never a half-written file to read


def note_first_step(rank: int, when: float) -> None:
    """For the resume row: rank 0 notes when its first resumed training step was done."""
    if rank == 0:
        Path("first-step").write_text(repr(when))
