"""A training sweep: two learning rates (against one seed; add seeds to the list), two points
at a time, each a job of its own with its own checkpoints and metrics, and a table of the
results at the end."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from ddpw import ArtefactsConfig, JobConfig, Platform, PlatformConfig, Trainer, Wrapper


def blobs(n: int, seed: int) -> TensorDataset:
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x, (x.sum(1) > 0).long())


class Classifier(Trainer):
    def train_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def evaluate_step(self, batch):
        x, y = batch
        return {"accuracy": (self.model(x).argmax(1) == y).float()}


def train(lr: float, seed: int) -> dict[str, float]:
    """One point: runs on every process of the point's job, and trains there, in place."""
    torch.manual_seed(seed)
    a_config = ArtefactsConfig(
        train_set=blobs(256, seed=0), test_set=blobs(128, seed=1), batch_size=32,
        model=nn.Linear(2, 2),
        optimiser_loader=lambda model: torch.optim.SGD(model.parameters(), lr=lr))
    name = f"lr{lr}-seed{seed}"  # each point its own folders: a shared one is refused
    j_config = JobConfig(epochs=2, checkpoint_path=f"checkpoints/{name}",
                         training_logs_path=f"logs/training_logs/{name}")
    platform = PlatformConfig(platform=Platform.CPU)  # the point's world, whatever it is
    return Wrapper(platform, a_config).start(Classifier(j_config))


if __name__ == "__main__":
    p_config = PlatformConfig(platform=Platform.CPU, n_procs=1)  # each point's width
    grid = {"lr": [0.5, 0.05], "seed": [0]}
    results = Wrapper(p_config).sweep(train, grid, parallelism=2)  # in grid order
    for (lr, seed), per_rank in zip([(lr, s) for lr in grid["lr"] for s in grid["seed"]],
                                    results, strict=True):
        print(f"lr={lr} seed={seed}: epoch {per_rank[0]['epoch']}")
