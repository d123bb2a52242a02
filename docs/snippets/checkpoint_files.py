"""Look inside the checkpoints of a job, check one, load its weights without ddpw, and see a
damaged copy refused."""

import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

from ddpw import ArtefactsConfig, ConfigError, JobConfig, Platform, PlatformConfig, Trainer, Wrapper
from ddpw.checkpoint import latest, verify


class Regression(Trainer):
    def train_step(self, batch):
        x, y = batch
        return F.mse_loss(self.model(x).squeeze(1), y)


def adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=0.1)


if __name__ == "__main__":
    x = torch.randn(64, 3)
    a_config = ArtefactsConfig(train_set=TensorDataset(x, x.sum(1)), batch_size=16,
                               model=nn.Linear(3, 1), optimiser_loader=adam)
    j_config = JobConfig(epochs=2, save_every=1, checkpoint_path="runs")
    p_config = PlatformConfig(platform=Platform.CPU, verbose=False)
    Wrapper(p_config, a_config).start(Regression(j_config))

    print(sorted(path.name for path in Path("runs").iterdir()))
    folder = Path("runs") / latest("runs", "ckpt")  # the latest marker names ckpt_2
    manifest = verify(folder)  # every file's size and hash, or ConfigError
    print(sorted(manifest["files"]))
    print(json.loads((folder / "state.json").read_text())["epochs_done"])

    # the weights are a plain safetensors file: no ddpw needed to read them
    model = nn.Linear(3, 1)
    model.load_state_dict(load_file(folder / "model.safetensors"))

    # one changed byte, and the checkpoint is refused before anything is loaded
    damaged = Path("damaged") / folder.name
    shutil.copytree(folder, damaged)
    data = bytearray((damaged / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (damaged / "model.safetensors").write_bytes(data)
    try:
        verify(damaged)
    except ConfigError as error:
        print(error)
