"""The MNIST example's training loop written by hand with Accelerate: the baseline for ddpw.

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 handwritten_accelerate.py

Same data, model, optimiser, batch size, seeding and epochs as ``examples/mnist/main.py
--mode train``, with checkpoints written by ``accelerator.save_state`` at the same epochs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "mnist"))
from src import MyDataset, MyModel, my_optimiser


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--save-every", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--checkpoint-path", default="./checkpoint-accelerate")
    args = parser.parse_args()

    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True,
                                                                        data_seed=1889))
    set_seed(1889, device_specific=True)
    model = MyModel()
    optimiser = my_optimiser(model)
    train = DataLoader(MyDataset(train=True), batch_size=args.batch_size, shuffle=True)
    test = DataLoader(MyDataset(train=False), batch_size=args.batch_size)
    model, optimiser, train, test = accelerator.prepare(model, optimiser, train, test)

    first_step = os.environ.get("BENCH_FIRST_STEP")
    for epoch in range(1, args.epochs + 1):
        model.train()
        train.set_epoch(epoch)
        total = torch.zeros((), device=accelerator.device)
        for images, labels in train:
            loss = F.cross_entropy(model(images), labels)
            accelerator.backward(loss)
            optimiser.step()
            optimiser.zero_grad()
            total += loss.detach()
            if first_step and accelerator.is_main_process:
                # For scripts/bench/slurm.py: when the first step was done.
                Path(first_step).write_text(repr(time.time()))
                first_step = None
        mean = accelerator.reduce(total / len(train), reduction="mean")
        accelerator.print(f"epoch {epoch}, loss {mean.item():.4f}")
        if epoch % args.save_every == 0 or epoch == args.epochs:
            accelerator.save_state(f"{args.checkpoint_path}/epoch_{epoch}")

    model.eval()
    correct = []
    with torch.no_grad():
        for images, labels in test:
            correct.append(accelerator.gather_for_metrics(
                (model(images).argmax(1) == labels).float()))
    accelerator.print(f"accuracy {torch.cat(correct).mean().item():.4f}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
