"""The training state that a checkpoint keeps in ``state.json``: where the job stands in the
data and what it has learnt about its epochs, as :class:`TrainingState`.

Every reader of ``state.json`` goes through it: the Trainer that writes and restores it, the
checkpointer that decides whether a rank's own part fits, the resume decision
(:mod:`ddpw.resume`) that checks where a checkpoint stands before any process starts, and the
monitored metric's ranking of the checkpoints (:func:`ddpw.monitor.scores`). The keys
on disk are those of format version 1 on; a key added since is optional when read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The file that holds it, in every checkpoint.
FILE = "state.json"

#: Where the RNGs of a run of another shape start: ``seed + SEED_STRIDE * epochs + batch``.
SEED_STRIDE = 7919


@dataclass
class TrainingState:
    """The ``state`` part of a checkpoint.

    :param epochs_done: whole epochs trained; ``batches``: batches done in the next one.
    :param global_step: optimiser steps so far.
    :param batch_size: the batch size per process; ``world_size``: the number of processes.
    :param data_seed: the seed of the data order (``PlatformConfig.seed``).
    :param gradient_accumulation_steps: ``None`` in checkpoints written before it was kept.
    :param metrics: the last whole epoch's metrics.
    :param trackers: the ids of the tracker runs (:meth:`ddpw.tracking.Tracking.runs`),
        ``None`` before ddpw kept them.
    :param monitor: the early-stopping count (:meth:`ddpw.monitor.Monitor.state`), ``None``
        before ddpw kept it.
    """

    epochs_done: int
    batches: int
    global_step: int
    batch_size: int
    world_size: int
    data_seed: int | None = None
    gradient_accumulation_steps: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    trackers: dict[str, str] | None = None
    monitor: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The state as ``state.json`` holds it."""
        return {"epochs_done": self.epochs_done, "batches": self.batches,
                "global_step": self.global_step, "batch_size": self.batch_size,
                "world_size": self.world_size, "data_seed": self.data_seed,
                "gradient_accumulation_steps": self.gradient_accumulation_steps,
                "metrics": self.metrics, "trackers": self.trackers, "monitor": self.monitor}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> TrainingState:
        """The state that ``state.json`` holds, of any format version."""
        return cls(state["epochs_done"], state["batches"], state["global_step"],
                   state["batch_size"], state["world_size"], state.get("data_seed"),
                   state.get("gradient_accumulation_steps"), state.get("metrics", {}),
                   state.get("trackers"), state.get("monitor"))

    @classmethod
    def read(cls, folder: Path) -> TrainingState:
        """The state of checkpoint ``folder``, read without checking its hash.

        :raises ConfigError: when ``state.json`` is not what it should be.
        """
        # Here, not above: ddpw.monitor, which a JobConfig imports without torch, reads the
        # metrics of a state too.
        from .tensors import MappedFile

        return cls.from_dict(MappedFile(folder / FILE).json())

    def same_run(self, world_size: int, batch_size: int, accumulation: int) -> bool:
        """Whether a run of this shape wrote it, so that each rank's own part (RNG states,
        running sums) fits the rank of the same number."""
        return (self.world_size, self.batch_size,
                self.gradient_accumulation_steps) == (world_size, batch_size, accumulation)

    @property
    def samples_into_epoch(self) -> int:
        """How many samples of its unfinished epoch the job had consumed, over all ranks: what
        stays the same when it is resumed with another world or batch size."""
        return self.batches * self.batch_size * self.world_size

    def whole_batches(self, batch_size: int, world_size: int) -> bool:
        """Whether :attr:`samples_into_epoch` is a whole number of batches of ``batch_size``
        over ``world_size`` processes (a run of that shape can go on from here)."""
        return self.samples_into_epoch % (batch_size * world_size) == 0

    def batches_at(self, batch_size: int, world_size: int) -> int:
        """The batch that a run of ``batch_size`` over ``world_size`` processes starts from:
        the same samples remain to be seen in the epoch."""
        return self.samples_into_epoch // (batch_size * world_size)

    def seed_at(self, seed: int, batch: int) -> int:
        """The seed of a run of another shape that starts at ``batch`` of the next epoch: the
        saved RNG streams do not fit it, so they are derived from the seed and the position."""
        return seed + SEED_STRIDE * self.epochs_done + batch
