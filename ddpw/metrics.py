"""How a :class:`~ddpw.trainer.Trainer` averages what its steps return.

:meth:`~ddpw.trainer.Trainer.train_step` values are summed over the samples of an epoch on each
rank (:class:`RunningSums`, saved with a checkpoint so that a resumed epoch averages as an
uninterrupted one would, at any world size), without the gradient norms of the optimiser steps
that fp16's GradScaler skipped; :meth:`~ddpw.trainer.Trainer.evaluate_step` returns per-sample
values (:func:`check_per_sample`), which the trainer averages exactly over the data set
(:class:`ExactMeans`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from accelerate import Accelerator

#: The values that clipping adds to an optimiser step's (:func:`clip_gradients`).
GRADIENT_NORMS = ("grad_norm", "grad_norm_unclipped")


def clip_gradients(accelerator: Accelerator, model: torch.nn.Module, limit: float
                   ) -> dict[str, torch.Tensor]:
    """Clip the gradients of ``model`` to the norm ``limit``; return their norm after and before.

    Under fp16, when the GradScaler finds the gradients overflowed, both are inf or NaN: that
    step is skipped (:meth:`RunningSums.skip`).
    """
    before = accelerator.clip_grad_norm_(model.parameters(), limit)
    # torch scales by limit / (norm + 1e-6) when that is below 1: the norm it leaves.
    after = before * torch.clamp(limit / (before + 1e-6), max=1.0)
    return {"grad_norm": after, "grad_norm_unclipped": before}


class RunningSums:
    """The sum of each training step value over this rank's samples of the epoch so far (each
    batch's value weighs its ``batch_size`` samples), and how many samples gave it (a value that
    only some steps give, such as the gradient norm of an optimiser step under gradient
    accumulation, averages over those); and the optimiser steps that fp16's GradScaler skipped.

    Sums over samples add up across ranks: a checkpoint's sums, whatever world or batch size
    wrote them, go on in a run of another (:meth:`carry`).
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.skipped = 0

    def clear(self) -> None:
        """Start from nothing, as at the start of an epoch."""
        self.sums, self.counts, self.skipped = {}, {}, 0

    def add(self, values: dict[str, torch.Tensor], samples: int) -> None:
        """Add one batch's values (scalar tensors, detached here), each the mean over its
        ``samples`` samples."""
        for key, value in values.items():
            value = value.detach().float() * samples
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] = self.counts.get(key, 0) + samples

    def skip(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Count an optimiser step that the GradScaler skipped (its gradients overflowed, as
        fp16's do now and then while the scale settles); return its values without the
        gradient norms, which are inf or NaN and measure nothing that was applied. Its loss
        and other values stay: the batch was seen."""
        self.skipped += 1
        return {k: v for k, v in values.items() if k not in GRADIENT_NORMS}

    def means(self, accelerator: Accelerator) -> dict[str, float]:
        """The mean of each value over the samples of every rank, and ``skipped_steps`` under
        a GradScaler (every rank must call it)."""
        keys = sorted(self.sums)  # one order on every rank
        device = accelerator.device
        totals = accelerator.reduce(torch.stack(
            [self.sums[k].to(device).reshape(()) for k in keys]
            + [torch.tensor(float(self.counts[k]), device=device) for k in keys]
            + [torch.tensor(float(self.skipped), device=device)]), reduction="sum").tolist()
        means = {k: totals[i] / totals[len(keys) + i] for i, k in enumerate(keys)}
        result = {k: means[k] for k in self.sums}
        if accelerator.scaler is not None:
            # Every rank skips the same steps (the gradients are all-reduced).
            result["skipped_steps"] = round(totals[-1] / accelerator.num_processes)
        return result

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of them, in this rank's part."""
        return {"sample_sums": self.sums, "sample_counts": self.counts,
                "skipped_steps": self.skipped}

    def load(self, part: dict[str, Any], batch_size: int, device: torch.device) -> None:
        """Take back this rank's sums from its part of a checkpoint of this run's shape, onto
        ``device``; ``batch_size``: the checkpoint's."""
        sums, self.counts = _sample_sums(part, batch_size)
        self.sums = {k: v.to(device) for k, v in sums.items()}
        self.skipped = part.get("skipped_steps", 0)

    def carry(self, parts: list[dict[str, Any]], batch_size: int, device: torch.device,
              main: bool) -> None:
        """Go on from the sums of every rank's part of a checkpoint that another world or
        batch size (``batch_size``, the checkpoint's) wrote: their totals on the ``main``
        rank, nothing on the others (each value's key on every rank, for :meth:`means`)."""
        self.clear()
        for part in parts:
            sums, counts = _sample_sums(part, batch_size)
            for key, value in sums.items():
                value = value.to(device) if main else torch.zeros_like(value, device=device)
                self.sums[key] = self.sums[key] + value if key in self.sums else value
                self.counts[key] = self.counts.get(key, 0) + (counts[key] if main else 0)
            self.skipped = max(self.skipped, part.get("skipped_steps", 0))


def _sample_sums(part: dict[str, Any], batch_size: int
                 ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The sums over samples and their counts in a rank's part of a checkpoint. (Older
    checkpoints summed batch means, ``sums``, over ``sum_counts`` batches, or, before the
    counts were kept, over all of ``sum_batches``.)"""
    if "sample_sums" in part:
        return part["sample_sums"], part["sample_counts"]
    sums = part.get("sums", {})
    counts = part.get("sum_counts") or dict.fromkeys(sums, part.get("sum_batches", 0))
    return ({k: v * batch_size for k, v in sums.items()},
            {k: n * batch_size for k, n in counts.items()})


class ExactMeans:
    """The means of per-sample values over a whole data set, exactly: the values of every
    batch, gathered from every rank without the repeats that pad an uneven last batch, are
    kept (as float64, on the CPU) and summed with :func:`math.fsum`, whose result does not
    depend on their order."""

    def __init__(self) -> None:
        self.values: dict[str, list[torch.Tensor]] = {}

    def add(self, gathered: dict[str, torch.Tensor]) -> None:
        """Keep one batch's values, gathered from every rank (``gather_for_metrics``)."""
        for key, value in gathered.items():
            self.values.setdefault(key, []).append(value.detach().double().cpu())

    def means(self) -> dict[str, float]:
        """The mean of each value over every sample added."""
        result = {}
        for key, chunks in self.values.items():
            flat = torch.cat(chunks).tolist()
            result[key] = math.fsum(flat) / len(flat)
        return result


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
