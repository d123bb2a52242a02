"""Train on 2 CPU processes with TensorBoard, keep the 2 best checkpoints by the validation loss
beside the latest, stop when the validation loss has not improved for 3 epochs, and read back
what TensorBoard shows."""

import json

import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import TensorDataset

from ddpw import ArtefactsConfig, JobConfig, Platform, PlatformConfig, Trainer, Wrapper, checkpoint


class MyTrainer(Trainer):
    def train_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def evaluate_step(self, batch):
        x, y = batch
        logits = self.model(x)
        return {"loss": F.cross_entropy(logits, y, reduction="none"),
                "accuracy": (logits.argmax(1) == y).float()}


def adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=3e-2)


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(320, 8)
    y = (x[:, :4].sum(1) + 0.5 * torch.randn(320) > 0).long()  # noisy labels: it overfits
    a_config = ArtefactsConfig(
        train_set=TensorDataset(x[:192], y[:192]), validation_set=TensorDataset(x[192:], y[192:]),
        batch_size=16, model=nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 2)),
        optimiser_loader=adam)
    j_config = JobConfig(
        epochs=30, save_every=1, keep_last=1, checkpoint_path="checkpoint",
        monitor="val_loss", monitor_mode="min", keep_best=2, early_stopping_patience=3,
        log_with="tensorboard", log_every_n_steps=2, training_logs_path="logs")
    p_config = PlatformConfig(platform=Platform.CPU, n_procs=2, verbose=False)
    metrics = Wrapper(p_config, a_config).start(MyTrainer(j_config))

    print("stopped after epoch", metrics["epoch"])
    print("kept:", " ".join(checkpoint.available("checkpoint", "ckpt")))
    with open("logs/metrics.jsonl") as lines:
        print("val_loss by epoch:", [round(json.loads(line)["val_loss"], 4) for line in lines])
    events = EventAccumulator("logs/ddpw")  # TensorBoard's own reader of its event files
    events.Reload()
    tags = sorted(events.Tags()["scalars"])
    print("tags:", " ".join(tag for tag in tags if not tag.startswith("goodput/")))
    print("goodput/:", " ".join(t.removeprefix("goodput/") for t in tags if "goodput/" in t))
    print("step/loss logged at steps:", [e.step for e in events.Scalars("step/loss")][:5], "...")


if __name__ == "__main__":
    main()
