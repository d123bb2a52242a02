"""Train on two SLURM nodes; run it on a login node: ``python slurm_job.py PARTITION``.

The job waits for its turn, shows its state and the main rank's output, and survives
preemptions and time limits: each one pauses it, requeues it and resumes it where it stopped.
"""

import sys

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ddpw import ArtefactsConfig, JobConfig, Platform, PlatformConfig, Trainer, Wrapper


class Regression(Trainer):
    def train_step(self, batch):
        x, y = batch
        return nn.functional.mse_loss(self.model(x).squeeze(-1), y)

    def evaluate_step(self, batch):
        x, y = batch
        return {"squared_error": (self.model(x).squeeze(-1) - y) ** 2}


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05)


if __name__ == "__main__":
    x = torch.randn(512, 4, generator=torch.Generator().manual_seed(0))
    data = TensorDataset(x, x @ torch.tensor([1.0, -2.0, 3.0, 0.5]))

    p_config = PlatformConfig(
        platform=Platform.SLURM, name="regression", partition=sys.argv[1],
        n_nodes=2, n_gpus=0, n_procs=1,       # on a GPU partition: n_gpus=4 (per node)
        timeout_min=60, mem_gb=4,
        requeue_limit=5)                      # preemptions and time limits it may survive
    a_config = ArtefactsConfig(train_set=data, test_set=data, batch_size=32,
                               model=nn.Linear(4, 1), optimiser_loader=sgd)
    j_config = JobConfig(epochs=5, save_every=1, checkpoint_path="./checkpoint/regression")

    metrics = Wrapper(p_config, a_config).start(Regression(j_config))
    print(f"epoch {metrics['epoch']}: loss {metrics['loss']:.4f}")
