"""The monitored metric (``JobConfig.monitor``): which checkpoints are the best, and when
training stops early.

Only the checkpoints of whole epochs whose metrics hold the metric take part (a pause's
checkpoint holds the metrics of the epoch before it). Among equal values the earlier epoch is
the better. The early-stopping count goes into every checkpoint (:meth:`Monitor.state`), so a
resumed run stops where an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .checkpoint.names import Position, available, sequence
from .checkpoint.state import FILE, TrainingState
from .errors import ConfigError

#: What ``JobConfig.monitor_mode`` may be: the better value is the smaller, or the larger.
MODES = ("min", "max")


def _rank(value: float, position: Position, mode: str) -> tuple[float, Position]:
    return (value if mode == "min" else -value), position


def scores(checkpoint_path: str | Path, prefix: str, metric: str) -> dict[str, float]:
    """The value of ``metric`` in each whole-epoch checkpoint on disk that holds it (read from
    its ``state.json``, unverified: the one chosen is checked before it is loaded)."""
    found = {}
    for name in available(checkpoint_path, prefix):
        if Position.parse(name, prefix).batches:
            continue
        try:
            text = (Path(checkpoint_path) / name / FILE).read_text()
            value = float(TrainingState.from_dict(json.loads(text)).metrics[metric])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not math.isnan(value):
            found[name] = value
    return found


def earlier_scores(checkpoint_path: str | Path, prefix: str, metric: str,
                   name: str) -> dict[str, float]:
    """The :func:`scores` of the checkpoints that lead up to checkpoint ``name``: at or before
    its position, written no later. (A fresh start, or a line of training abandoned by resuming
    from an earlier checkpoint, competes for no place.)"""
    root = Path(checkpoint_path)
    until, last = Position.parse(name, prefix), sequence(root / name)
    return {other: value for other, value in scores(root, prefix, metric).items()
            if Position.parse(other, prefix) <= until and sequence(root / other) <= last}


def best(values: dict[str, float], prefix: str, mode: str, k: int) -> list[str]:
    """The names of the ``k`` best checkpoints among ``values`` (name -> value), best first."""
    ranked = sorted(values, key=lambda name: _rank(values[name], Position.parse(name, prefix),
                                                   mode))
    return ranked[:k]


class Monitor:
    """Follows ``metric`` over the epochs of one job, the same on every rank.

    :param metric: an epoch metric, such as ``"val_loss"``; ``None`` follows nothing.
    :param mode: ``"min"`` or ``"max"``.
    :param patience: stop after this many judged epochs in a row without improvement (``0``:
        never).
    """

    def __init__(self, metric: str | None, mode: str, patience: int) -> None:
        self.metric, self.mode, self.patience = metric, mode, patience
        self.best: float | None = None
        self.best_epoch = 0
        self.waited = 0
        #: The metric's value in each whole-epoch checkpoint, on disk or being saved.
        self.values: dict[str, float] = {}
        #: Set by :meth:`judge` when an epoch lacks the metric: the start of the error that
        #: :meth:`refuse_unknown` raises once the epoch is saved.
        self.unknown: str | None = None

    def judge(self, epoch: int, metrics: dict[str, Any], validated: bool) -> None:
        """Take epoch ``epoch``'s ``metrics`` into account. An epoch that did not validate
        (``JobConfig.validate_every``) has no ``val_*`` metric to judge, and is skipped.

        An epoch that should have the metric and does not sets :attr:`unknown`: only an epoch's
        metrics name them all (a step may return a value that others do not), and the epoch is
        saved before :meth:`refuse_unknown` ends the job, so that none is lost to the mistake.
        """
        if self.metric is None:
            return
        if self.metric not in metrics:
            if validated or not self.metric.startswith("val_"):
                self.unknown = (f"JobConfig.monitor={self.metric!r} is not among epoch {epoch}'s "
                                f"metrics: {', '.join(sorted(metrics))}. Monitor one of these")
            return
        value = float(metrics[self.metric])
        if not math.isnan(value) and (self.best is None or _rank(
                value, Position(epoch), self.mode) < _rank(self.best, Position(self.best_epoch),
                                                           self.mode)):
            self.best, self.best_epoch, self.waited = value, epoch, 0
        else:
            self.waited += 1

    def refuse_unknown(self, saved: Path) -> None:
        """Raise the error that :meth:`judge` found, if any, once the epoch is saved in
        ``saved``.

        :raises ConfigError: naming the metrics that the epoch has, and the checkpoint to
            resume from.
        """
        if self.unknown is not None:
            raise ConfigError(f"{self.unknown}; the epoch is saved in {saved}: resume from it "
                              f"with start_at='latest'.")

    @property
    def stops(self) -> bool:
        """Whether training stops early: ``patience`` judged epochs without improvement."""
        return bool(self.patience) and self.waited >= self.patience

    def why_stopped(self, epoch: int) -> str:
        """What a job that stops early after epoch ``epoch`` says."""
        best = (f"best {self.best:.4g}, epoch {self.best_epoch}" if self.best is not None
                else "never a number")
        return (f"early stop after epoch {epoch}: {self.metric} has not improved for "
                f"{self.waited} epochs ({best})")

    def saved(self, name: str, metrics: dict[str, Any]) -> None:
        """Note the metric of a whole-epoch checkpoint ``name`` that is being saved (a NaN
        makes it no candidate, as on disk: :func:`scores`)."""
        if self.metric is not None and self.metric in metrics:
            value = float(metrics[self.metric])
            if math.isnan(value):
                self.values.pop(name, None)
            else:
                self.values[name] = value

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the early-stopping count."""
        return {"metric": self.metric, "mode": self.mode, "best": self.best,
                "best_epoch": self.best_epoch, "waited": self.waited}

    def load(self, state: dict[str, Any] | None) -> None:
        """Take back what :meth:`state` returned, if it followed the same metric the same
        way (a new metric or mode starts counting afresh)."""
        if state and (state.get("metric"), state.get("mode", "min")) == (self.metric,
                                                                          self.mode):
            self.best, self.best_epoch = state["best"], state["best_epoch"]
            self.waited = state["waited"]
