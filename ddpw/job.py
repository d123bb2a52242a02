"""What a training job does: :class:`JobMode` and :class:`JobConfig`.

Epochs count from 1. The checkpoint for epoch ``k`` holds the state after ``k`` completed epochs,
so resuming from it trains epochs ``k + 1`` to ``epochs``.
"""

from __future__ import annotations

import math
import re
import signal
from dataclasses import dataclass
from enum import Enum

from ._checks import check_choice, check_int, check_type, fail
from .checkpoint import Position
from .errors import ConfigError
from .jobfolder import DEFAULT_ROOT
from .monitor import MODES
from .tracking import TRACKERS


class JobMode(Enum):
    """What a :class:`~ddpw.trainer.Trainer` does when started."""

    #: Train from scratch (``start_at=0``) or from checkpoint ``start_at``.
    TRAIN = 0
    #: Train on from checkpoint ``start_at`` (which must be given, > 0).
    RESUME = 1
    #: Restore checkpoint ``start_at`` (when > 0) and evaluate the test set.
    EVALUATE = 2


#: Signals that pause a training job by default.
PAUSE_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR2")


@dataclass
class JobConfig:
    """How far to train, when to save and where files go. Every field is checked when made.

    :param job_type: a :class:`JobMode`.
    :param start_at: the checkpoint to start from. ``0`` starts fresh; ``k > 0`` restores the
        checkpoint of epoch ``k`` and trains epochs ``k + 1`` to ``epochs`` (``TRAIN``, ``RESUME``)
        or evaluates it (``EVALUATE``); ``"latest"`` restores the most recent checkpoint, paused
        mid-epoch or not, and starts fresh when there is none (``EVALUATE`` then fails);
        ``"best"`` restores the best checkpoint by ``monitor`` (likewise); a
        checkpoint's folder name (``"ckpt_3_batch40"``) restores that one; a negative value
        restores nothing, for jobs with no model state to restore.
    :param epochs: the epoch at which training stops (not the number of epochs still to run).
    :param save_every: ``s > 0`` saves a checkpoint after epochs ``s``, ``2s``, ... and after the
        last epoch; ``0`` saves nothing (a pause still saves its checkpoint).
    :param keep_last: keep only the ``k`` most recent checkpoints (``0`` keeps all); the one the
        job started from is never deleted, nor are the ``keep_best`` best.
    :param pause_signals: signals that pause training: every rank stops at the same step
        boundary, a checkpoint is written and :class:`~ddpw.errors.JobPaused` ends the job.
    :param checkpoint_path: folder holding the checkpoints.
    :param checkpoint_name_prefix: checkpoint ``k`` is the folder ``{prefix}_{k}``.
    :param console_logs_path: folder for the processes' console logs (SLURM jobs):
        ``./logs/console_logs`` (:data:`ddpw.jobfolder.DEFAULT_ROOT`) unless given.
    :param training_logs_path: folder for the per-epoch metrics (``metrics.jsonl``, whose lines
        each name their run: :mod:`ddpw.tracking`) and the trackers' files.
    :param gradient_accumulation_steps: batches whose gradients add up before one optimiser step.
    :param async_checkpoint: write checkpoints in the background: a save blocks training only
        while each rank copies its share of the state into host buffers, and every pause, end
        and error of the job waits for the save in flight
        (:meth:`~ddpw.trainer.Trainer.save_checkpoint`). ``False`` writes in the training loop.
    :param validate_every: ``v >= 1`` evaluates ``ArtefactsConfig.validation_set`` after epochs
        ``v``, ``2v``, ... and after the last epoch (its ``val_*`` metrics are in those epochs'
        metrics only).
    :param max_grad_norm: clip the gradients to this total norm (the 2-norm over every
        parameter) once per optimiser step, after they are accumulated, all-reduced and, under
        ``fp16``, unscaled (:meth:`accelerate.Accelerator.clip_grad_norm_`); ``None`` clips
        nothing. The step metrics then hold ``grad_norm``, the norm the optimiser stepped with
        (at most ``max_grad_norm``), and ``grad_norm_unclipped``, the norm before clipping,
        which shows how often and how far the limit bites; each epoch's metrics hold their
        means over its optimiser steps.
    :param log_with: a tracker or several (``"tensorboard"``, ``"wandb"``, ``"mlflow"``, or
        another of Accelerate's: :data:`ddpw.tracking.TRACKERS`) that the main rank logs to,
        beside ``metrics.jsonl``: each epoch's metrics, the step metrics every
        ``log_every_n_steps`` and, once, the configs as hyper-parameters (:mod:`ddpw.tracking`).
        Their files go under ``training_logs_path``; a resumed run goes on in the same runs.
        Training jobs log; ``EVALUATE`` returns its metrics and logs them nowhere. ``None``
        writes ``metrics.jsonl`` alone, which needs nothing installed.
    :param log_every_n_steps: log ``step/loss``, ``step/lr``, ``step/samples_per_s`` and the
        other step values to the trackers after every ``n``-th optimiser step.
    :param project_name: the trackers' project: TensorBoard's folder under
        ``training_logs_path``, MLflow's experiment, W&B's project.
    :param monitor: the epoch metric (a name in ``metrics.jsonl``, such as ``"val_loss"``) by
        which ``keep_best``, ``early_stopping_patience`` and ``start_at="best"`` judge the
        epochs. A name that the first validated epoch's metrics lack stops the job with a
        :class:`~ddpw.errors.ConfigError` that lists them (:mod:`ddpw.monitor`), once that epoch
        is saved (with ``save_every=0`` too), so that ``start_at="latest"`` goes on from it.
    :param monitor_mode: ``"min"``: the smaller value is the better; ``"max"``: the larger.
    :param keep_best: beside the ``keep_last`` most recent checkpoints, keep the ``k`` best
        checkpoints of whole epochs by ``monitor`` (ties: the earlier epoch), which
        ``keep_last`` never prunes; needs ``keep_last >= 1``.
    :param early_stopping_patience: ``p >= 1`` ends training after ``p`` judged epochs in a
        row without an improvement of ``monitor`` (epochs that do not validate are not judged);
        that epoch is saved as a last one (when ``save_every > 0``), and its checkpoint keeps
        the count, so that a resumed run stops where an uninterrupted one would. ``0`` never
        stops early.
    """

    job_type: JobMode = JobMode.TRAIN
    start_at: int | str = 0
    epochs: int = 25
    save_every: int = 5
    keep_last: int = 0
    pause_signals: tuple[str, ...] = PAUSE_SIGNALS
    checkpoint_path: str = "./checkpoint"
    checkpoint_name_prefix: str = "ckpt"
    console_logs_path: str = DEFAULT_ROOT
    training_logs_path: str = "./logs/training_logs"
    gradient_accumulation_steps: int = 1
    async_checkpoint: bool = True
    validate_every: int = 1
    max_grad_norm: float | None = None
    log_with: str | tuple[str, ...] | None = None
    log_every_n_steps: int = 50
    project_name: str = "ddpw"
    monitor: str | None = None
    monitor_mode: str = "min"
    keep_best: int = 0
    early_stopping_patience: int = 0

    def __post_init__(self) -> None:
        owner = "JobConfig"
        if not isinstance(self.job_type, JobMode):
            names = ", ".join(f"JobMode.{m}" for m in JobMode.__members__)
            fail(owner, "job_type", self.job_type, f"one of {names}")
        for name in ("checkpoint_path", "checkpoint_name_prefix", "console_logs_path",
                     "training_logs_path", "project_name"):
            check_type(owner, name, getattr(self, name), str, "a string")
        if not re.fullmatch(r"[\w.-]+", self.checkpoint_name_prefix):
            fail(owner, "checkpoint_name_prefix", self.checkpoint_name_prefix,
                 "a non-empty name of letters, digits, '_', '.' or '-'")
        if isinstance(self.start_at, str):
            prefix = self.checkpoint_name_prefix
            if (self.start_at not in ("latest", "best")
                    and Position.parse(self.start_at, prefix) is None):
                fail(owner, "start_at", self.start_at, f"an epoch number, 'latest', 'best' or "
                     f"a checkpoint name such as '{prefix}_3' or '{prefix}_3_batch40'")
        elif not isinstance(self.start_at, int) or isinstance(self.start_at, bool):
            fail(owner, "start_at", self.start_at,
                 "an epoch number (0 starts fresh, < 0 restores nothing), 'latest' or a "
                 "checkpoint name")
        check_int(owner, "epochs", self.epochs, 0)
        check_int(owner, "save_every", self.save_every, 0)
        check_int(owner, "keep_last", self.keep_last, 0)
        check_int(owner, "validate_every", self.validate_every, 1)
        check_int(owner, "gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        check_type(owner, "async_checkpoint", self.async_checkpoint, bool, "True or False")
        norm = self.max_grad_norm
        if norm is not None and (isinstance(norm, bool) or not isinstance(norm, (int, float))
                                 or not 0 < norm < math.inf):
            fail(owner, "max_grad_norm", norm,
                 "a positive number (the largest total gradient norm), or None to clip nothing")
        check_int(owner, "log_every_n_steps", self.log_every_n_steps, 1)
        self._check_trackers()
        self._check_monitor()
        self.pause_signals = tuple(self.pause_signals)
        for name in self.pause_signals:
            if not (isinstance(name, str) and name.startswith("SIG") and hasattr(signal, name)):
                fail(owner, "pause_signals", self.pause_signals,
                     "names of signals of this system, such as ('SIGINT', 'SIGTERM', 'SIGUSR2')")
        if self.job_type is JobMode.RESUME and not self.restores:
            fail(owner, "start_at", self.start_at,
                 "the checkpoint to resume from (an epoch > 0, 'latest' or a checkpoint name) "
                 "with JobMode.RESUME; use JobMode.TRAIN to start fresh")
        if (self.job_type is not JobMode.EVALUATE and isinstance(self.start_at, int)
                and self.epochs < self.start_at):
            fail(owner, "epochs", self.epochs,
                 f"at least start_at={self.start_at}: epochs is the epoch at which training "
                 f"stops, not the number of epochs to add")

    def _check_trackers(self) -> None:
        names = (self.log_with,) if isinstance(self.log_with, str) else self.log_with
        if names is not None:
            if (not isinstance(names, (tuple, list)) or not names
                    or any(name not in TRACKERS for name in names)):
                fail("JobConfig", "log_with", self.log_with,
                     f"None, or one or more of {', '.join(map(repr, TRACKERS))}")
            names = tuple(dict.fromkeys(names))
        self.log_with = names

    def _check_monitor(self) -> None:
        owner = "JobConfig"
        if self.monitor is not None and (not isinstance(self.monitor, str) or not self.monitor):
            fail(owner, "monitor", self.monitor, "an epoch metric's name, such as 'val_loss', "
                 "or None")
        check_choice(owner, "monitor_mode", self.monitor_mode, MODES)
        check_int(owner, "keep_best", self.keep_best, 0)
        check_int(owner, "early_stopping_patience", self.early_stopping_patience, 0)
        if self.monitor is None:
            for name, value in (("keep_best", self.keep_best), ("early_stopping_patience",
                                                               self.early_stopping_patience),
                                ("start_at", self.start_at if self.start_at == "best" else 0)):
                if value:
                    raise ConfigError(f"JobConfig.{name}={value!r} needs JobConfig.monitor: "
                                      f"the metric that says which epoch is best, such as "
                                      f"monitor='val_loss'.")
        if self.keep_best and not self.keep_last:
            fail(owner, "keep_last", 0, f"at least 1 with keep_best={self.keep_best}: keep_last"
                 f"=0 keeps every checkpoint, so none would be pruned; 1 keeps the latest "
                 f"(to resume from) beside the {self.keep_best} best")

    @property
    def restores(self) -> bool:
        """Whether the job starts by restoring a checkpoint (if one exists, for ``"latest"``)."""
        return isinstance(self.start_at, str) or self.start_at > 0

    def validates_after(self, epoch: int) -> bool:
        """Whether the validation set is evaluated after ``epoch``."""
        return epoch % self.validate_every == 0 or epoch == self.epochs

    def saves_after(self, epoch: int) -> bool:
        """Whether a checkpoint is written after ``epoch``."""
        if self.save_every == 0:
            return False
        return epoch % self.save_every == 0 or epoch == self.epochs
