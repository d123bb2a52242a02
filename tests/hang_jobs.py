"""Trainers and functions that hang on purpose, for the hang tests (imported by the workers)."""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

import torch
from jobs import Blobs, BlobTrainer

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


class EvaluationSleepingTrainer(BlobTrainer):
    """Rank 1 sleeps for good in ``evaluate_step`` at (epoch, evaluation batch) ``at``."""

    def __init__(self, j_config, at: tuple[int, int]) -> None:
        super().__init__(j_config)
        self.at, self.batches = at, 0

    def evaluate_step(self, batch):
        self.batches = 1 if self.epoch != getattr(self, "evaluated", None) else self.batches + 1
        self.evaluated = self.epoch
        if (self.epoch, self.batches) == self.at and self.global_rank == 1:
            note_hang(Path(self.j_config.checkpoint_path).parent)
            time.sleep(3600)
        return super().evaluate_step(batch)


class SlowStartTrainer(BlobTrainer):
    """Slow where the pace is not known yet, and nowhere else: rank 0 takes ``seconds`` more
    over its set-up, after the model is prepared, and every rank's first step takes
    ``seconds``."""

    def __init__(self, j_config, seconds: float) -> None:
        super().__init__(j_config)
        self.seconds, self.stepped = seconds, False

    def setup(self, accelerator, p_config, a_config) -> None:
        super().setup(accelerator, p_config, a_config)
        if self.global_rank == 0:
            time.sleep(self.seconds)

    def train_step(self, batch):
        if not self.stepped:
            time.sleep(self.seconds)
            self.stepped = True
        return super().train_step(batch)


class SlowFirstBlobs(Blobs):
    """Blobs whose first sample takes ``seconds`` in each process (a data source that warms up)."""

    def __init__(self, n: int, seconds: float) -> None:
        super().__init__(n, seed=2)
        self.seconds, self.warm = seconds, False

    def __getitem__(self, i: int):
        if not self.warm:
            time.sleep(self.seconds)
            self.warm = True
        return super().__getitem__(i)


def beating_then_holding_the_gil(folder: str, steps: int) -> int:
    """A function that beats for ``steps`` all-reduces; then rank 0 sleeps in native code that
    holds the GIL (so its watch thread stops too), and rank 1 waits in the next all-reduce."""
    w = world()
    for step in range(steps + 1):
        if step == steps and w.global_rank == 0:
            note_hang(Path(folder))
            time.sleep(2)  # its watch thread publishes its last beat
            ctypes.PyDLL(None).sleep(3600)  # libc's sleep, called without releasing the GIL
        w.accelerator.reduce(torch.ones(1), reduction="sum")
        heartbeat(f"after all-reduce {step}")
    return w.global_rank
