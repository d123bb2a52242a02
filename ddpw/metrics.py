"""How a :class:`~ddpw.trainer.Trainer` averages what its steps return.

:meth:`~ddpw.trainer.Trainer.train_step` values are summed over an epoch on each rank
(:class:`RunningSums`, saved with a checkpoint so that a resumed epoch averages as an
uninterrupted one would); :meth:`~ddpw.trainer.Trainer.evaluate_step` returns per-sample values
(:func:`check_per_sample`), which the trainer averages exactly over the data set.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator


class RunningSums:
    """The sum of each training step value over this rank's batches of the epoch so far, and
    how many batches gave it (a value that only some steps give, such as the gradient norm of
    an optimiser step under gradient accumulation, averages over those)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def clear(self) -> None:
        """Start from nothing, as at the start of an epoch."""
        self.sums, self.counts = {}, {}

    def add(self, values: dict[str, torch.Tensor]) -> None:
        """Add one batch's values (scalar tensors, detached here)."""
        for key, value in values.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] = self.counts.get(key, 0) + 1

    def means(self, accelerator: Accelerator) -> dict[str, float]:
        """The mean of each value over the batches and the ranks (every rank must call it)."""
        means = {k: accelerator.reduce(v / self.counts[k], reduction="mean")
                 for k, v in self.sums.items()}
        return {k: float(v) for k, v in means.items()}

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of them, in this rank's part."""
        return {"sums": self.sums, "sum_counts": self.counts}

    def load(self, state: dict[str, Any], device: torch.device) -> None:
        """Take back what :meth:`state` returned, onto ``device``. (Checkpoints written before
        the counts were kept counted every value over all the batches: ``sum_batches``.)"""
        self.sums = {k: v.to(device) for k, v in state["sums"].items()}
        self.counts = state.get("sum_counts") or dict.fromkeys(self.sums,
                                                                state.get("sum_batches", 0))


def check_per_sample(output: Any, owner: str) -> None:
    """Check that ``output`` of ``owner.evaluate_step`` is a non-empty dict of 1-D tensors of one
    length, one value per sample.

    :raises TypeError: saying what is wrong with it.
    """
    if not isinstance(output, dict) or not output:
        raise TypeError(f"{owner}.evaluate_step must return a non-empty dict of per-sample "
                        f"tensors, not {type(output).__name__}.")
    sizes = set()
    for key, value in output.items():
        if not isinstance(value, torch.Tensor) or value.dim() != 1:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise TypeError(f"{owner}.evaluate_step returned {key!r} of shape {shape}: metrics "
                            f"must be 1-D, one value per sample (e.g. reduction='none'), so "
                            f"that they average exactly across ranks.")
        sizes.add(value.shape[0])
    if len(sizes) > 1:
        raise TypeError(f"{owner}.evaluate_step returned metrics of different lengths {sizes}: "
                        f"each must have one value per sample of the batch.")
