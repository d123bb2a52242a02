"""The artefacts of the MNIST example: a data set, a small CNN, a Trainer and an optimiser.

The data are MNIST when its IDX files are at hand (``MyDataset(train, root=FOLDER)``) and
otherwise scikit-learn's bundled handwritten digits (1,797 real 8x8 images, no download).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ddpw import Trainer


class MyDataset(Dataset):
    """Handwritten digits as ``(image, label)``: images ``1 x H x W`` in [0, 1], labels 0-9.

    :param train: the training split, else the test split.
    :param root: a folder with MNIST's IDX files (``train-images-idx3-ubyte[.gz]`` and the
        three others); without it, scikit-learn's digits, 80% for training and 20% for testing.
    """

    def __init__(self, train: bool, root: str | None = None) -> None:
        if root is not None:
            split = "train" if train else "t10k"
            images = _read_idx(Path(root), f"{split}-images-idx3-ubyte").astype(np.float32) / 255
            labels = _read_idx(Path(root), f"{split}-labels-idx1-ubyte")
        else:
            from sklearn.datasets import load_digits

            digits = load_digits()
            order = np.random.default_rng(0).permutation(len(digits.target))
            cut = int(0.8 * len(order))
            chosen = order[:cut] if train else order[cut:]
            images = digits.images[chosen].astype(np.float32) / 16
            labels = digits.target[chosen]
        self.images = torch.from_numpy(images).unsqueeze(1)
        self.labels = torch.from_numpy(labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]


def _read_idx(root: Path, name: str) -> np.ndarray:
    path = root / name if (root / name).is_file() else root / f"{name}.gz"
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


class MyModel(nn.Module):
    """Two convolutions and two linear layers; works on 8x8 and 28x28 images alike."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.25), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MyTrainer(Trainer):
    """Cross-entropy training; loss and accuracy per sample for evaluation."""

    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, labels = batch
        logits = self.model(images)
        accuracy = (logits.argmax(1) == labels).float().mean()
        return {"loss": F.cross_entropy(logits, labels), "accuracy": accuracy}

    def evaluate_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, labels = batch
        logits = self.model(images)
        return {"loss": F.cross_entropy(logits, labels, reduction="none"),
                "accuracy": (logits.argmax(1) == labels).float()}


def my_optimiser(model: nn.Module) -> torch.optim.Optimizer:
    """Adam with a learning rate that suits this small model."""
    return torch.optim.Adam(model.parameters(), lr=3e-3)
