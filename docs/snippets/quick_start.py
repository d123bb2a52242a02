"""Train a small classifier on 2 CPU processes, then evaluate its checkpoint on 1."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from ddpw import ArtefactsConfig, JobConfig, JobMode, Platform, PlatformConfig, Trainer, Wrapper


def blobs(n: int, seed: int) -> TensorDataset:
    """``n`` points in the plane, labelled 1 where ``x + y > 0``."""
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x, (x.sum(1) > 0).long())


class Classifier(Trainer):
    def train_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.model(x), y)  # ddpw does the backward pass and the step

    def evaluate_step(self, batch):
        x, y = batch
        logits = self.model(x)
        return {"loss": F.cross_entropy(logits, y, reduction="none"),  # one value per sample
                "accuracy": (logits.argmax(1) == y).float()}


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.5)


if __name__ == "__main__":
    torch.manual_seed(0)  # the model's first weights: PlatformConfig.seed seeds only the job
    a_config = ArtefactsConfig(train_set=blobs(512, seed=0), test_set=blobs(256, seed=1),
                               batch_size=32, model=nn.Linear(2, 2), optimiser_loader=sgd)

    # train epochs 1 to 3 on 2 CPU processes, with a checkpoint after every epoch
    two = PlatformConfig(platform=Platform.CPU, n_procs=2)
    metrics = Wrapper(two, a_config).start(Classifier(JobConfig(epochs=3, save_every=1)))
    print("trained:", metrics)

    # evaluate the checkpoint of epoch 3 on one process
    one = PlatformConfig(platform=Platform.CPU)
    j_config = JobConfig(job_type=JobMode.EVALUATE, start_at=3)
    metrics = Wrapper(one, a_config).start(Classifier(j_config))
    print("evaluated:", metrics)
