"""How a :class:`~ddpw.trainer.Trainer` steps its learning-rate scheduler once an epoch
(``ArtefactsConfig.scheduler_interval="epoch"``).

A :class:`~torch.optim.lr_scheduler.ReduceLROnPlateau` steps on a metric of the epoch
(:func:`plateau_metric`: ``JobConfig.monitor``, else ``val_loss`` with a validation set, else
``loss``), and an epoch that lacks it (one not validated, with ``validate_every``) does not
count towards the plateau. Every other scheduler steps without one. ``OneCycleLR`` and
``CyclicLR``, whose schedules are written in optimiser steps, get a warning when they are
stepped once an epoch (:func:`check`).
"""

from __future__ import annotations

import warnings
from typing import Any

from torch.optim.lr_scheduler import CyclicLR, OneCycleLR, ReduceLROnPlateau

from .errors import ConfigError

#: Schedulers that their own documentation steps after every batch.
PER_STEP = (OneCycleLR, CyclicLR)


def plateau_metric(monitor: str | None, validates: bool) -> str:
    """The epoch metric that a ``ReduceLROnPlateau`` steps on: ``monitor`` (the job's
    ``JobConfig.monitor``) when given, else ``val_loss`` when the job has a validation set,
    else ``loss`` (what Lightning users name in ``"monitor"``)."""
    return monitor or ("val_loss" if validates else "loss")


def check(scheduler: Any, interval: str, warn: bool) -> None:
    """Check that ``scheduler`` can step as ``interval`` says.

    :param warn: whether this process warns (the main one), when a per-step schedule is
        stepped once an epoch.
    :raises ConfigError: for a ``ReduceLROnPlateau`` stepped with every optimiser step: it
        needs an epoch's metric, which each rank would otherwise measure on its own batches.
    """
    name = type(scheduler).__name__
    if isinstance(scheduler, ReduceLROnPlateau) and interval == "step":
        raise ConfigError(f"ArtefactsConfig.scheduler_interval='step' is not valid for a "
                          f"{name}: it steps on an epoch's metric; use 'epoch'.")
    if isinstance(scheduler, PER_STEP) and interval == "epoch" and warn:
        warnings.warn(f"ArtefactsConfig.scheduler_interval='epoch' steps this {name} once an "
                      f"epoch, while its schedule counts optimiser steps: set "
                      f"scheduler_interval='step' unless that is what you want.",
                      UserWarning, stacklevel=2)


def step_epoch(scheduler: Any, metrics: dict[str, Any], metric: str) -> None:
    """Step ``scheduler`` (the scheduler itself, not Accelerate's wrapper, which would step it
    once per process) after an epoch whose ``metrics`` are given; a ``ReduceLROnPlateau``
    on ``metrics[metric]``, if the epoch has it."""
    if not isinstance(scheduler, ReduceLROnPlateau):
        scheduler.step()
    elif metric in metrics:
        scheduler.step(metrics[metric])
