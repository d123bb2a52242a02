"""Trainers and functions that hang on purpose, for the hang tests (imported by the workers)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from jobs import BlobTrainer

from ddpw.utils import heartbeat, world


def note_hang(folder: Path) -> None:
    """Say when the hang began: the tests time the job's end from here."""
    (folder / "hang-began").write_text(f"{time.time()}\n")


class SleepingTrainer(BlobTrainer):
    """Rank ``rank`` sleeps for good in ``train_step`` at ``at`` (epoch, batch)."""

    def __init__(self, j_config, at: tuple[int, int] = (1, 4), rank: int = 1) -> None:
        super().__init__(j_config)
        self.at, self.sleeping_rank = at, rank

    def train_step(self, batch):
        if (self.epoch, self.batch) == self.at and self.global_rank == self.sleeping_rank:
            note_hang(Path(self.j_config.checkpoint_path).parent)
            time.sleep(3600)
        return super().train_step(batch)


class SkippingTrainer(BlobTrainer):
    """Rank 0 alone makes an all-reduce at ``at``: rank 1 skips a collective."""

    def __init__(self, j_config, at: tuple[int, int] = (1, 4)) -> None:
        super().__init__(j_config)
        self.at = at

    def train_step(self, batch):
        if (self.epoch, self.batch) == self.at and self.global_rank == 0:
            note_hang(Path(self.j_config.checkpoint_path).parent)
            total = torch.ones(1)
            torch.distributed.all_reduce(total)
        return super().train_step(batch)


class SlowStepTrainer(BlobTrainer):
    """Every step of every rank takes ``seconds``."""

    def __init__(self, j_config, seconds: float) -> None:
        super().__init__(j_config)
        self.seconds = seconds

    def train_step(self, batch):
        time.sleep(self.seconds)
        return super().train_step(batch)


def beating_then_sleeping(folder: str, steps: int) -> int:
    """A function that beats for ``steps`` all-reduces, then rank 1 sleeps in the next."""
    w = world()
    for step in range(steps + 1):
        if step == steps and w.global_rank == 1:
            note_hang(Path(folder))
            time.sleep(3600)
        w.accelerator.reduce(torch.ones(1), reduction="sum")
        heartbeat(f"after all-reduce {step}")
    return w.global_rank
