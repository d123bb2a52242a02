"""ddpw's own state on a :class:`~ddpw.trainer.Trainer`, as :class:`Machinery`: the trackers, the
monitored metric, the pause vote, the epoch's running sums, the checkpoints and the goodput
account, and what a checkpoint keeps of them besides the
:class:`~ddpw.checkpoint.state.TrainingState`.

A checkpoint's ``state`` part holds the tracker runs' ids and the early-stopping count; each
rank's own part holds its RNG states and its running sums. Restored by a run of the same shape
(:meth:`~ddpw.checkpoint.state.TrainingState.same_run`), a rank takes its own part back as it
was; by a run of another world size, batch size or accumulation, it goes on from the same
sample of the epoch, with RNGs seeded from the seed and the position, and the running sums of
every rank (they are over samples: :class:`~ddpw.metrics.RunningSums`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from . import goodput, stragglers
from .checkpoint import Position
from .checkpoint.checkpointer import Checkpointer, Contents, Restored
from .checkpoint.rng import rng_state, set_rng_state
from .checkpoint.state import TrainingState
from .errors import JobPaused
from .job import JobConfig, JobMode
from .metrics import RunningSums
from .monitor import Monitor, best, earlier_scores
from .pace import Pace
from .platform import PlatformConfig
from .tracking import Tracking
from .vote import PauseVote


@dataclass
class Machinery:
    """All of ddpw's own state on a Trainer, under one attribute (``_ddpw``) that a subclass
    will not take by chance. The checkpoints are there once :meth:`open_checkpoints` ran."""

    tracking: Tracking
    monitor: Monitor
    vote: PauseVote = field(default_factory=PauseVote)
    sums: RunningSums = field(default_factory=RunningSums)
    pace: Pace = field(default_factory=Pace)
    checkpoints: Checkpointer | None = None
    account: goodput.Account = field(default_factory=goodput.Account)

    @classmethod
    def of(cls, j_config: JobConfig) -> Machinery:
        """The machinery of a job that ``j_config`` describes, before it is set up."""
        return cls(Tracking(j_config), Monitor(j_config.monitor, j_config.monitor_mode,
                                               j_config.early_stopping_patience))

    def open_checkpoints(self, j_config: JobConfig, rank: int, world_size: int,
                         device: torch.device, on_failure: Callable[[], None]) -> None:
        """Make and open the job's :class:`~ddpw.checkpoint.checkpointer.Checkpointer`; every
        rank must call it at the same point (``on_failure``: the pause request)."""
        j = j_config
        self.checkpoints = Checkpointer(
            Path(j.checkpoint_path), j.checkpoint_name_prefix, j.keep_last, j.async_checkpoint,
            rank, world_size, device, on_failure=on_failure)
        self.checkpoints.open(writes=j.job_type is not JobMode.EVALUATE)
        self.account = goodput.Account()  # afresh: a Trainer run in place may start again
        self.account.open(rank == 0, j.training_logs_path)

    def start(self, accelerator: Accelerator, j_config: JobConfig, step: int,
              runs: dict[str, str] | None, configs: dict[str, Any],
              resumed_from: str | None) -> None:
        """Start a job at optimiser step ``step``, restored from checkpoint ``resumed_from``
        (``None`` for none): the monitored metric's values of the checkpoints that lead up to
        it (:func:`ddpw.monitor.earlier_scores`), and, to train, the trackers in the runs
        ``runs`` (:meth:`ddpw.tracking.Tracking.start`, with the job's ``configs``)."""
        j = j_config
        if resumed_from is not None and j.monitor is not None:
            self.monitor.values = earlier_scores(j.checkpoint_path, j.checkpoint_name_prefix,
                                                 j.monitor, resumed_from)
        if j.job_type is not JobMode.EVALUATE:
            self.tracking.start(accelerator, step, runs, configs, resumed_from)
        # An evaluation is a job of its own, not an attempt of the run that it evaluates.
        self.account.begin(self.tracking.identity["run"], resumed_from if
                           j.job_type is not JobMode.EVALUATE else None, step)

    def phase(self, part: str) -> contextlib.AbstractContextManager[None]:
        """Count the block's time on the main rank as ``part`` of the job's time
        (:data:`ddpw.goodput.PARTS`)."""
        return self.account.phase(part)

    def step_done(self, step: int, values: dict[str, torch.Tensor], lr: float,
                  samples_per_batch: int) -> None:
        """After optimiser step ``step``: log its ``values`` when due (every rank must call
        it), and note it in the goodput account."""
        if self.tracking.due(step):
            self.tracking.log_step(step, values, lr, samples_per_batch)
        self.account.step_done(step)

    def end(self, step: int, verbose: bool, error: BaseException | None = None) -> None:
        """End the job's attempt at optimiser step ``step``, once its checkpoints are closed:
        the goodput account's record (the summary printed, when ``verbose``, and logged), then
        the trackers. After an ``error`` (a pause too), close the checkpoints first, and raise
        nothing more."""
        if error is not None:
            with self.phase("checkpoint"):
                self.checkpoints.close(raising=False)  # the job's own error is the one to raise
        ended = ("completed" if error is None else
                 "paused" if isinstance(error, JobPaused) else "failed")
        paces = stragglers.report()
        totals = self.account.end(ended, self.checkpoints.blocked_s, paces)
        if totals is not None and error is None:
            if verbose:
                print("\n".join(filter(None, (goodput.lines(totals), stragglers.line(paces)))),
                      flush=True)
            self.tracking.log_values(goodput.tracked(totals), step)
        self.tracking.end(raising=error is None)

    def contents(self, model: torch.nn.Module, parts: dict[str, Any], state: TrainingState,
                 device: torch.device, p_config: PlatformConfig) -> Contents:
        """What a checkpoint of ``state`` holds, with the tracker runs' ids and the
        early-stopping count in it, this rank's RNG states and running sums, and the platform
        and mixed precision for its manifest.

        :param parts: the objects besides the model that every rank holds alike.
        """
        state.trackers, state.monitor = self.tracking.runs(), self.monitor.state()
        self.account.mark(state.global_step)
        return Contents(model=model, state=state,
                        parts={name: obj.state_dict() for name, obj in parts.items()},
                        own={"rng": rng_state(device), **self.sums.state()},
                        manifest={"platform": p_config.platform.name,
                                  "mixed_precision": p_config.mixed_precision})

    def kept(self, j_config: JobConfig, position: Position,
             metrics: dict[str, Any]) -> list[str]:
        """The best checkpoints (``JobConfig.keep_best``) that pruning must keep, the one of
        ``position`` with its ``metrics`` among the candidates when it is a whole epoch's."""
        j = j_config
        if not position.batches:
            self.monitor.saved(position.name(j.checkpoint_name_prefix), metrics)
        return best(self.monitor.values, j.checkpoint_name_prefix, j.monitor_mode, j.keep_best)

    def take_back(self, restored: Restored, seed: int, batch_size: int, world_size: int,
                  device: torch.device, main: bool) -> int:
        """Take back the early-stopping count and this rank's own part of a restored
        checkpoint (see the module's description) for a run of ``batch_size`` over
        ``world_size`` processes; return the batch of the epoch that it goes on from."""
        state = restored.state
        self.monitor.load(state.monitor)
        if restored.own is not None:
            set_rng_state(restored.own["rng"], device)
            self.sums.load(restored.own, state.batch_size, device)
            return state.batches
        batch = state.batches_at(batch_size, world_size)
        set_seed(state.seed_at(seed, batch), device_specific=True)
        self.sums.carry(restored.every_own, state.batch_size, device, main)
        return batch
