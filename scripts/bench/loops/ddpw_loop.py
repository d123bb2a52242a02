"""The benchmarks' training loop as a ddpw :class:`~ddpw.Trainer`, started with
``Wrapper.start`` on 2 CPU processes::

    python ddpw_loop.py --model mlp --size 256 --samples 4096 --epochs 4

The Trainer's own loop does the work; the subclass only defines ``train_step`` and notes times.
No validation or test set (so nothing is evaluated) and ``save_every=0`` (so nothing is saved),
unless ``--save DIR`` (a checkpoint after the last epoch) or ``--resume DIR`` (resume from the
latest checkpoint in ``DIR``). Each rank writes its measurements to ``rank-{rank}.json`` (see
:mod:`workload`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from workload import (
    BATCH_SIZE,
    PROCESSES,
    SEED,
    arguments,
    make_data,
    make_model,
    make_optimiser,
    note_first_step,
    report,
)

from ddpw import ArtefactsConfig, JobConfig, Platform, PlatformConfig, Trainer, Wrapper


class BenchTrainer(Trainer):
    """Cross-entropy training, timed from the start of epoch 2 to the end of the last."""

    def __init__(self, j_config: JobConfig, samples: int) -> None:
        super().__init__(j_config)
        self.samples = samples
        self.started = 0.0
        self.restore_s: float | None = None
        self.restore_began = 0.0

    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, labels = batch
        return F.cross_entropy(self.model(inputs), labels)

    def check(self, *args: Any, **kwargs: Any) -> str | None:
        # Runs in the calling process before any worker starts; choosing the checkpoint (and
        # checking its files' sizes; the ranks hash them as they read) is part of what
        # resuming costs.
        started = time.perf_counter()
        chosen = super().check(*args, **kwargs)
        Path("verify.json").write_text(json.dumps({"verify_s": time.perf_counter() - started}))
        return chosen

    def restore_checkpoint(self, name: str) -> None:
        self.restore_began = time.time()
        started = time.perf_counter()
        super().restore_checkpoint(name)
        self.restore_s = time.perf_counter() - started

    def setup(self, *args: Any, **kwargs: Any) -> None:
        if os.environ.get("DDPW_BENCH_UNTIMED"):
            # The Trainer without the step timing of ddpw.stragglers, to measure its cost.
            with mock.patch("ddpw.stragglers.start"):
                super().setup(*args, **kwargs)
        else:
            super().setup(*args, **kwargs)
        if self.j_config.restores:
            if self.resume_from is None:
                raise RuntimeError(f"no checkpoint to resume in {self.j_config.checkpoint_path}")
            # The first resumed step is done when the optimiser has stepped once.
            handle = None

            def first_step(optimiser: Any, args: Any, kwargs: Any) -> None:
                note_first_step(self.global_rank, time.time())
                handle.remove()

            handle = self.optimiser.optimizer.register_step_post_hook(first_step)

    def train_epoch(self) -> dict[str, float]:
        timed = not self.j_config.restores and self.epoch >= 2
        if timed and self.epoch == 2:
            # Steady state only, as in the hand-written loops; between-epoch work (the metrics
            # log, the pause check) falls inside the timed span.
            self.accelerator.wait_for_everyone()
            self.started = time.perf_counter()
        means = super().train_epoch()
        if self.epoch == self.j_config.epochs:
            self.accelerator.wait_for_everyone()
            values: dict[str, Any] = {"loss": means["loss"]}
            if timed:
                values.update(seconds=time.perf_counter() - self.started,
                              samples=(self.epoch - 1) * self.samples)
            if self.restore_s is not None:
                values.update(restore_s=self.restore_s, restore_began=self.restore_began)
            report(self.global_rank, **values)
        return means


def main(trainer_class: type[BenchTrainer] = BenchTrainer) -> None:
    """Train as the options say, with ``trainer_class`` (a subclass to diagnose ddpw's loop)."""
    args = arguments(__doc__)
    p_config = PlatformConfig(platform=Platform.CPU, n_procs=PROCESSES,
                              cpus_per_task=args.threads, seed=SEED, verbose=False,
                              torch_compile=args.compile, strategy=args.strategy)
    a_config = ArtefactsConfig(train_set=make_data(args.model, args.samples),
                               batch_size=BATCH_SIZE, model=make_model(args.model, args.size),
                               optimiser_loader=make_optimiser)
    if args.save:
        j_config = JobConfig(epochs=args.epochs, save_every=args.epochs,
                             checkpoint_path=args.save)
    elif args.resume:
        j_config = JobConfig(start_at="latest", epochs=args.epochs, save_every=0,
                             checkpoint_path=args.resume)
    else:
        j_config = JobConfig(epochs=args.epochs, save_every=0, checkpoint_path="checkpoint")
    Wrapper(p_config, a_config).start(trainer_class(j_config, args.samples))


if __name__ == "__main__":
    main()
