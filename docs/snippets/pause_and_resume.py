"""Pause a 2-process training job in the middle of an epoch, run it again to resume, and compare
the result with a run that never stopped: the weights and the metrics are bitwise equal."""

import torch
import torch.nn.functional as F
from accelerate import load_checkpoint_in_model
from torch import nn
from torch.utils.data import TensorDataset

from ddpw import ArtefactsConfig, JobConfig, JobPaused, Platform, PlatformConfig, Trainer, Wrapper


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # dropout: the result depends on every rank's random numbers as well as on the data
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class PausingTrainer(Trainer):
    """Asks for a pause, as a pause signal would, when it reaches ``(epoch, batch)``."""

    def __init__(self, j_config: JobConfig, pause_at: tuple[int, int] | None = None) -> None:
        super().__init__(j_config)
        self.pause_at = pause_at

    def train_step(self, batch):
        if (self.epoch, self.batch) == self.pause_at:
            self.request_pause()  # the job stops after the next step, on every rank
        x, y = batch
        return F.cross_entropy(self.model(x), y)


def adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-2)


def train(folder: str, pause_at: tuple[int, int] | None = None) -> dict[str, float]:
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    data = TensorDataset(x, (x[:, :4].sum(1) > 0).long())
    a_config = ArtefactsConfig(train_set=data, batch_size=16, model=Net(), optimiser_loader=adam)
    p_config = PlatformConfig(platform=Platform.CPU, n_procs=2, verbose=False)
    # "latest": the first run starts fresh, a run after a pause resumes from its checkpoint
    j_config = JobConfig(start_at="latest", epochs=2, save_every=1, checkpoint_path=folder)
    return Wrapper(p_config, a_config).start(PausingTrainer(j_config, pause_at))


if __name__ == "__main__":
    uninterrupted = train("uninterrupted")

    try:
        train("interrupted", pause_at=(2, 4))
    except JobPaused as paused:
        print("paused:", paused.checkpoint)  # interrupted/ckpt_1_batch6
    resumed = train("interrupted")  # the same call again

    print("metrics:", uninterrupted, resumed)
    assert resumed == uninterrupted
    # 2 processes wrote a share each: model-00001-of-00002.safetensors and -00002-of-00002
    before, after = Net(), Net()
    load_checkpoint_in_model(before, "uninterrupted/ckpt_2")  # reads the index of the shares
    load_checkpoint_in_model(after, "interrupted/ckpt_2")
    assert all(torch.equal(before.state_dict()[name], tensor)
               for name, tensor in after.state_dict().items())
    print("the resumed run is bitwise the run that never stopped")
