"""The Trainer's contract: what a job needs of the configs together (:func:`check_job`) and the
steps it needs its :class:`~ddpw.trainer.Trainer` to define (:func:`check_steps`), checked
before any process starts, and what
:meth:`~ddpw.trainer.Trainer.train_step` must return, checked at every step
(:func:`step_values`). What :meth:`~ddpw.trainer.Trainer.evaluate_step` must return is checked by
:func:`ddpw.metrics.check_per_sample`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from . import sharding
from .errors import ConfigError
from .job import JobMode
from .platform import Platform, PlatformConfig
from .tracking import missing

if TYPE_CHECKING:
    from .artefacts import ArtefactsConfig
    from .trainer import Trainer

#: What ``train_step`` must return, as every error about it says.
TRAIN_STEP_RETURNS = ("the loss as a scalar tensor with a graph (not loss.item()), or a dict "
                      "holding one under 'loss'")


def check_job(trainer: Trainer, base: type, p_config: PlatformConfig,
              a_config: ArtefactsConfig | None) -> ArtefactsConfig:
    """Check that the three configs of ``trainer``'s job fit together, and that ``trainer``
    defines the steps the job calls (:func:`check_steps`); each config has checked its own
    fields when made.

    :param base: :class:`~ddpw.trainer.Trainer` itself, whose steps are placeholders.
    :returns: ``a_config``, which is there.
    :raises ConfigError: naming the field, what was given and what would be valid.
    """
    j = trainer.j_config
    if a_config is None:
        raise ConfigError("Wrapper(p_config, a_config): a Trainer needs an ArtefactsConfig.")
    if a_config.model is None:
        raise ConfigError("ArtefactsConfig.model=None: a Trainer needs a torch.nn.Module.")
    check_steps(trainer, base, a_config)
    training = j.job_type is not JobMode.EVALUATE
    if (p_config.platform is Platform.SLURM and training
            and p_config.requeue_signal not in j.pause_signals):
        raise ConfigError(f"JobConfig.pause_signals={j.pause_signals} lacks "
                          f"PlatformConfig.requeue_signal={p_config.requeue_signal!r}: the "
                          f"job could not pause and requeue before SLURM ends it.")
    if training and a_config.train_set is None:
        raise ConfigError(f"ArtefactsConfig.train_set=None: JobMode.{j.job_type.name} needs "
                          f"a training set.")
    if training and a_config.optimiser_loader is None:
        raise ConfigError(f"ArtefactsConfig.optimiser_loader=None: JobMode.{j.job_type.name} "
                          f"needs a callable model -> torch.optim.Optimizer.")
    if not training and a_config.test_set is None:
        raise ConfigError("ArtefactsConfig.test_set=None: JobMode.EVALUATE needs a test set.")
    if (training and j.monitor and j.monitor.startswith("val_")
            and a_config.validation_set is None):
        raise ConfigError(f"JobConfig.monitor={j.monitor!r} is a validation metric, and "
                          f"ArtefactsConfig.validation_set=None: give a validation set, or "
                          f"monitor a training metric such as 'loss'.")
    if p_config.strategy == "fsdp":
        check_sharding(p_config, a_config)
    if training and j.log_with and missing(j.log_with):
        packages = " ".join(missing(j.log_with))
        raise ConfigError(f"JobConfig.log_with={j.log_with}: {packages} is not installed "
                          f"here; pip install {packages}, or leave it out of log_with.")
    return a_config


def check_sharding(p_config: PlatformConfig, a_config: ArtefactsConfig) -> None:
    """Check that ``a_config.model`` can be sharded as ``p_config`` asks: it has parameters,
    the unit classes named are in it (:func:`ddpw.sharding.units`), and its BatchNorm layers,
    if any, are synchronised.

    :raises ConfigError: naming the field, what was given and what would be valid.
    """
    model = a_config.model
    sharding.units(model, p_config.shard_units)
    norms = sorted({type(m).__name__ for m in model.modules() if isinstance(m, _BatchNorm)})
    if norms and not a_config.model_has_batch_norm and p_config.world_size > 1:
        raise ConfigError(
            f"ArtefactsConfig.model_has_batch_norm=False with PlatformConfig.strategy='fsdp', "
            f"and the model has {', '.join(norms)}: sharded ranks share no buffers, so each "
            f"would keep running statistics of its own batches and a checkpoint one rank's. "
            f"Set model_has_batch_norm=True (statistics over the global batch, the same on "
            f"every rank).")


def _defines(trainer: Trainer, base: type, *names: str) -> bool:
    """Whether ``trainer``'s class defines any of the methods ``names`` over ``base``'s."""
    return any(getattr(type(trainer), name) is not getattr(base, name) for name in names)


def check_steps(trainer: Trainer, base: type, a_config: ArtefactsConfig) -> None:
    """Check that ``trainer`` defines the steps that its job calls: ``train_step`` to train,
    ``evaluate_step`` to validate (when there is a validation set) or to evaluate. A class
    that brings a loop of its own (``train``, ``train_epoch``, ``evaluate`` or ``run``) may
    do without the step that loop would call.

    :param base: :class:`~ddpw.trainer.Trainer` itself, whose steps are placeholders.
    :raises ConfigError: naming the step, what calls it and what it must return.
    """
    name, mode = type(trainer).__name__, trainer.j_config.job_type
    if _defines(trainer, base, "run"):
        return
    training = mode is not JobMode.EVALUATE
    if training and not _defines(trainer, base, "train_step", "train_epoch", "train"):
        raise ConfigError(f"{name} defines no train_step(batch), which JobMode.{mode.name} calls "
                          f"for every batch: define it to return {TRAIN_STEP_RETURNS}.")
    if _defines(trainer, base, "evaluate_step", "evaluate"):
        return
    if not training:
        raise ConfigError(f"{name} defines no evaluate_step(batch), with which JobMode.EVALUATE "
                          f"evaluates ArtefactsConfig.test_set: define it to return a dict of "
                          f"per-sample metrics.")
    if a_config.validation_set is not None and not _defines(trainer, base, "train"):
        raise ConfigError(f"{name} defines no evaluate_step(batch), with which "
                          f"ArtefactsConfig.validation_set is evaluated after the epochs: define "
                          f"it to return a dict of per-sample metrics, or leave "
                          f"validation_set=None.")


def _described(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (bool, int, float)):
        return f"the {type(value).__name__} {value!r}"
    return f"a {type(value).__name__}"


def step_values(output: Any, owner: str) -> dict[str, torch.Tensor]:
    """What ``owner.train_step`` returned, as a dict of one-value tensors with the loss under
    ``"loss"``.

    :raises TypeError: when it returned something else (a float such as ``loss.item()``, a
        loss without a graph, a dict without ``"loss"``), saying what it returned and what it
        must return.
    """
    values = output if isinstance(output, dict) else {"loss": output}
    where = f"{owner}.train_step returned"
    if "loss" not in values:
        raise TypeError(f"{where} a dict without 'loss' (keys: {', '.join(map(str, values))}): "
                        f"it must return {TRAIN_STEP_RETURNS}.")
    loss = values["loss"]
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shown = _described(loss) if loss is output else f"'loss' as {_described(loss)}"
        raise TypeError(f"{where} {shown}: it must return {TRAIN_STEP_RETURNS}.")
    if not loss.requires_grad:
        raise TypeError(f"{where} a loss without a graph (requires_grad=False: computed under "
                        f"torch.no_grad() or detached): it must return {TRAIN_STEP_RETURNS}.")
    for key, value in values.items():
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise TypeError(f"{where} {key!r} as {_described(value)}: each value must be a "
                            f"tensor of one value (torch.tensor(x) for a number x), averaged "
                            f"over the epoch.")
    return values
