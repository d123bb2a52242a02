"""The :class:`Trainer` base class: a training and evaluation loop you can read top to bottom.

Subclass it, define :meth:`Trainer.train_step` and :meth:`Trainer.evaluate_step`, and start it
with :meth:`ddpw.wrapper.Wrapper.start`::

    class MyTrainer(Trainer):
        def train_step(self, batch):
            x, y = batch
            return F.cross_entropy(self.model(x), y)

        def evaluate_step(self, batch):
            x, y = batch
            logits = self.model(x)
            return {"loss": F.cross_entropy(logits, y, reduction="none"),
                    "accuracy": (logits.argmax(1) == y).float()}

The base class does the rest with an :class:`accelerate.Accelerator`: device placement, DDP,
data sharding, gradient accumulation, mixed precision, checkpoints, pausing and exact metrics.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader

from . import environment, hang, progress, resume, schedules, sharding, stragglers
from .artefacts import ArtefactsConfig
from .checkpoint import Position
from .checkpoint.state import TrainingState
from .contract import check_job, step_values
from .errors import ConfigError, JobPaused
from .job import JobConfig, JobMode
from .machinery import Machinery
from .metrics import ExactMeans, check_per_sample, clip_gradients
from .platform import PlatformConfig


class Trainer:
    """Trains and evaluates ``ArtefactsConfig.model`` as a :class:`~ddpw.job.JobConfig` says.

    Override :meth:`train_step` and :meth:`evaluate_step`; override :meth:`train` or
    :meth:`evaluate` for a loop of your own. While the job runs, these attributes are set on every
    rank:

    - ``accelerator``: the :class:`accelerate.Accelerator`;
    - ``model``, ``optimiser``, ``scheduler``: prepared by the accelerator (``scheduler`` and, when
      evaluating, ``optimiser`` may be ``None``);
    - ``train_loader``, ``validation_loader``, ``test_loader``: sharded across ranks (or ``None``);
    - ``epoch``: the epoch being trained (or, between epochs, the last one completed);
      ``epochs_done``: epochs completed; ``batch``: batches done in the current epoch;
      ``global_step``: optimiser steps so far;
    - ``global_rank``, ``local_rank``, ``world_size``, ``device``;
    - ``j_config``, ``p_config``, ``a_config``: the three configs.

    What the loop does around the steps is set in the configs:

    - :class:`~ddpw.job.JobConfig`: ``epochs``, ``gradient_accumulation_steps``,
      ``max_grad_norm`` (clipping), ``validate_every``, ``save_every``, ``keep_last`` and
      ``async_checkpoint`` (checkpoints), ``monitor``, ``keep_best`` and
      ``early_stopping_patience`` (the best epoch), ``log_with`` and ``log_every_n_steps``
      (trackers), ``pause_signals``;
    - :class:`~ddpw.artefacts.ArtefactsConfig`: ``scheduler_loader`` and
      ``scheduler_interval``, ``model_has_batch_norm``;
    - :class:`~ddpw.platform.PlatformConfig`: ``strategy`` (``"fsdp"`` shards the model:
      :mod:`ddpw.sharding`), ``mixed_precision``, ``torch_compile``, ``seed``.

    :param j_config: what the job does.
    """

    def __init__(self, j_config: JobConfig) -> None:
        if not isinstance(j_config, JobConfig):
            raise ConfigError(f"Trainer(j_config={j_config!r}) needs a ddpw.job.JobConfig.")
        self.j_config = j_config
        self.p_config: PlatformConfig | None = None
        self.a_config: ArtefactsConfig | None = None
        self.accelerator: Accelerator | None = None
        self.model: torch.nn.Module | None = None
        self.optimiser: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.train_loader: DataLoader | None = None
        self.validation_loader: DataLoader | None = None
        self.test_loader: DataLoader | None = None
        self.epoch = self.epochs_done = self.batch = self.global_step = 0
        self.metrics: dict[str, float] = {}
        #: The checkpoint this job starts from: chosen by :meth:`check` before any process
        #: starts, and set on every rank from the payload before :meth:`setup`.
        self.resume_from: str | None = None
        self._ddpw = Machinery.of(j_config)

    # --- what a subclass writes ----------------------------------------------------------------

    def train_step(self, batch: Any) -> torch.Tensor | dict[str, torch.Tensor]:
        """Compute the loss of one batch (already on the device).

        Return the loss, a scalar tensor with its graph (not ``loss.item()``), or a dict with it
        under ``"loss"`` beside any other one-value tensors to average over the epoch
        (:func:`ddpw.contract.step_values`). The base class does the backward pass and the
        optimiser step. With mixed precision, the model's forward pass runs under autocast (what
        follows it, such as the loss, in full precision), as Accelerate arranges.
        """
        raise NotImplementedError(f"{type(self).__name__} must define train_step(batch) to train.")

    def evaluate_step(self, batch: Any) -> dict[str, torch.Tensor]:
        """Compute per-sample metrics of one batch (already on the device), without gradients.

        Return a dict of 1-D tensors with one value per sample, such as
        ``F.cross_entropy(logits, y, reduction="none")``. The base class gathers them from every
        rank, drops the samples that the last uneven batch repeats, and averages over the data
        set exactly, so the same values give the same numbers whatever the world size.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must define evaluate_step(batch) to evaluate.")

    # --- checks made before any process starts ------------------------------------------------

    def check(self, p_config: PlatformConfig, a_config: ArtefactsConfig | None,
              world_size: int | None = None, elastic: bool = False) -> str | None:
        """Check that the configs allow this job to run (:func:`ddpw.contract.check_job`), and
        choose the checkpoint to start from (:func:`ddpw.resume.choose`, which checks it but for
        the hashes, which the ranks check as they read it: :meth:`restore_checkpoint`). Called
        by :class:`~ddpw.wrapper.Wrapper` before it starts any process; the choice goes to every
        rank in the payload (:attr:`ddpw.jobfolder.Payload.resume_from`).

        :param world_size: the number of processes the job will have (the launch's, when it runs
            inside one); ``p_config.world_size`` by default.
        :param elastic: the job's machines meet in an elastic rendezvous: its size is known only
            when a world forms, which checks the data position then (:func:`ddpw.resume.decide`).
        :returns: the checkpoint's name, also set as :attr:`resume_from`; ``None`` to start
            from scratch.
        :raises ConfigError: naming the field or file and what would be valid.
        """
        a_config = check_job(self, Trainer, p_config, a_config)
        self.resume_from = resume.choose(self.j_config, a_config,
                                         None if elastic else world_size or p_config.world_size,
                                         requeued=os.environ.get(environment.RESUME_FROM))
        return self.resume_from

    # --- set-up, run on every rank -------------------------------------------------------------

    def accelerator_kwargs(self, p_config: PlatformConfig) -> dict[str, Any]:
        """The :class:`~accelerate.Accelerator` arguments this job adds to the platform's.

        The data order is seeded with ``p_config.seed`` on every rank alike (so the shards never
        overlap) and follows the epoch (``set_epoch``), which makes a resumed run see the same
        batches as an uninterrupted one.
        """
        training = self.j_config.job_type is not JobMode.EVALUATE
        return {
            "gradient_accumulation_steps": self.j_config.gradient_accumulation_steps,
            "dataloader_config": DataLoaderConfiguration(use_seedable_sampler=True,
                                                         data_seed=p_config.seed),
            **(self._ddpw.tracking.accelerator_kwargs() if training else {}),
        }

    def setup(self, accelerator: Accelerator, p_config: PlatformConfig,
              a_config: ArtefactsConfig) -> None:
        """Prepare the model, optimiser, scheduler and loaders and restore :attr:`resume_from`."""
        self.accelerator, self.p_config, self.a_config = accelerator, p_config, a_config
        j = self.j_config
        set_seed(p_config.seed, device_specific=True)
        self.model, self.optimiser, self.scheduler = a_config.prepare_model(
            accelerator, training=j.job_type is not JobMode.EVALUATE, p_config=p_config)
        self.train_loader, self.validation_loader, self.test_loader = a_config.prepare_loaders(
            accelerator, p_config.seed)
        self._ddpw.open_checkpoints(j, self.global_rank, self.world_size, self.device,
                                    on_failure=self.request_pause)
        runs = self.restore_checkpoint(self.resume_from) if self.resume_from is not None else None
        stragglers.start(self._ddpw.pace, self.model, self.device, p_config, self.global_rank)
        self._ddpw.start(accelerator, j, self.global_step, runs,
                         {"job": j, "platform": p_config, "artefacts": a_config}, self.resume_from)

    @property
    def global_rank(self) -> int:
        """This process's rank in the job."""
        return self.accelerator.process_index

    @property
    def local_rank(self) -> int:
        """This process's rank on its node."""
        return self.accelerator.local_process_index

    @property
    def world_size(self) -> int:
        """Number of processes in the job."""
        return self.accelerator.num_processes

    @property
    def device(self) -> torch.device:
        """The device this process computes on."""
        return self.accelerator.device

    @property
    def verbose(self) -> bool:
        """Whether this process prints ddpw's progress (main process, ``verbose=True``)."""
        return bool(self.p_config.verbose and self.accelerator.is_main_process)

    # --- the job --------------------------------------------------------------------------------

    def run(self) -> dict[str, float]:
        """Train or evaluate as ``j_config.job_type`` says; return the metrics as plain floats."""
        j = self.j_config
        if self.verbose:
            self.accelerator.print(progress.starting(j, self.p_config, self.resume_from))
        try:  # in the goodput account: an evaluation's own time is counted in evaluate()
            with self._ddpw.phase("training"):
                metrics = self.evaluate() if j.job_type is JobMode.EVALUATE else self.train()
        except BaseException as error:
            hang.settle(error)  # before the wait for a save in flight, which may be long
            self._ddpw.end(self.global_step, self.verbose, error)
            raise
        with hang.busy("publishing the last checkpoint"), self._ddpw.phase("checkpoint"):
            self._ddpw.checkpoints.close()  # success only once the last checkpoint is published
        self._ddpw.end(self.global_step, self.verbose)  # the goodput summary, the trackers
        return metrics

    def train(self) -> dict[str, float]:
        """Train up to epoch ``epochs``, validating and saving as configured.

        A pause (a signal from ``j_config.pause_signals``, or :meth:`request_pause`) stops every
        rank at the same step boundary, saves a checkpoint and raises
        :class:`~ddpw.errors.JobPaused`. With ``j_config.early_stopping_patience``, training
        ends after the epoch that used up the patience (:mod:`ddpw.monitor`).

        :returns: the last epoch's metrics: ``epoch``, the mean of each :meth:`train_step` value
            over the samples of every rank (:mod:`ddpw.metrics`; ``skipped_steps`` under fp16),
            ``lr`` (when the epoch's training ended), and ``val_*`` with a validation set.
        """
        j, monitor = self.j_config, self._ddpw.monitor
        while self.epochs_done < j.epochs and not monitor.stops:
            self.epoch = self.epochs_done + 1
            self.metrics = {"epoch": self.epoch, **self.train_epoch(),
                            "lr": float(self.optimiser.param_groups[0]["lr"])}
            self.epochs_done, self.batch = self.epoch, 0
            validates = self.validation_loader is not None and j.validates_after(self.epoch)
            if validates:
                validation = self.evaluate(self.validation_loader)
                self.metrics.update({f"val_{k}": v for k, v in validation.items()})
            monitor.judge(self.epoch, self.metrics, validates)
            if self.scheduler is not None and self.a_config.scheduler_interval == "epoch":
                metric = schedules.plateau_metric(j.monitor, self.validation_loader is not None)
                schedules.step_epoch(self.scheduler.scheduler, self.metrics, metric)
            self.log_metrics(self.metrics)
            saves = (j.saves_after(self.epoch) or (monitor.stops and j.save_every > 0)
                     or monitor.unknown is not None)
            if saves:
                monitor.refuse_unknown(self.save_checkpoint())
            if monitor.stops:
                if self.verbose:
                    self.accelerator.print(f"[ddpw] {monitor.why_stopped(self.epoch)}")
            elif self.epochs_done < j.epochs and self._ddpw.vote.agreed(self.world_size):
                self._pause(saved=saves)
        self._ddpw.vote.settle()  # the last epoch's last step boundary started a vote
        return dict(self.metrics)

    def train_epoch(self) -> dict[str, float]:
        """Train on the rest of epoch ``self.epoch``; return the mean of each step metric.

        A run resumed mid-epoch skips the batches already done, without loading them; a stream
        (an :class:`~torch.utils.data.IterableDataset`), which cannot seek, is read through them
        and they are dropped. The epoch ends when the data ends, on every rank at the same batch.
        """
        self.model.train()
        self.train_loader.set_epoch(self.epoch)
        loader, sums, tracking = self.train_loader, self._ddpw.sums, self._ddpw.tracking
        pace = self._ddpw.pace  # each phase's time, for ddpw.stragglers
        tracking.begin_epoch()
        if self.batch:
            loader = self.accelerator.skip_first_batches(loader, self.batch)
        else:
            sums.clear()
        samples_per_batch = self.a_config.batch_size * self.world_size
        bar = progress.bar(loader, f"epoch {self.epoch}/{self.j_config.epochs}", self.verbose,
                           initial=self.batch)
        hang.enter("training", f"loading batch {self.batch + 1} (epoch {self.epoch})")
        for batch in bar:
            # Where the hang watch (ddpw.hang) says this rank stood, if it stops here.
            at = f"(epoch {self.epoch}, batch {self.batch + 1})"
            pace.mark("train_step", f"in train_step {at}")
            with sharding.accumulate(self.accelerator, self.model):
                values = step_values(self.train_step(batch), type(self).__name__)
                pace.mark("backward", f"in the backward pass {at}")
                self.accelerator.backward(values["loss"])
                if self.j_config.max_grad_norm is not None and self.accelerator.sync_gradients:
                    values = {**values, **clip_gradients(self.accelerator, self.model,
                                                         self.j_config.max_grad_norm)}
                pace.mark("optimiser", f"in the optimiser step {at}")
                self.optimiser.step()
                if self.scheduler is not None and self.a_config.scheduler_interval == "step":
                    self.scheduler.step()
                self.optimiser.zero_grad()
            pace.mark("end", f"at the step boundary {at}", unit_done=True)
            self.batch += 1
            if self.accelerator.sync_gradients and self.accelerator.optimizer_step_was_skipped:
                values = sums.skip(values)
            sums.add(values, self.a_config.batch_size)
            tracking.batch_done()
            bar.note(self.batch, values["loss"], samples_per_batch)
            if self.accelerator.sync_gradients:
                self.global_step += 1
                self._ddpw.step_done(self.global_step, values,
                                     float(self.optimiser.param_groups[0]["lr"]), samples_per_batch)
                # Only here, after an optimiser step, is there no half-accumulated gradient to
                # lose; the last batch of the epoch is left to the epoch boundary. Accelerate's
                # loaders read a batch ahead, so they know the last one, in a stream too.
                last = self.accelerator.gradient_state.end_of_dataloader
                if not last and self._ddpw.vote.agreed(self.world_size, overlap=True):
                    self._pause(saved=False)
            pace.mark("data", f"loading the batch after {self.batch} {at}")
        hang.progress(f"averaging epoch {self.epoch}'s metrics")
        return sums.means(self.accelerator)

    @torch.no_grad()
    def evaluate(self, loader: DataLoader | None = None) -> dict[str, float]:
        """Average :meth:`evaluate_step` over ``loader`` (the test set by default), exactly
        (:class:`ddpw.metrics.ExactMeans`): the same per-sample values give the same numbers, to
        the last bit, on 1 or N processes. (The values themselves are computed in batches that
        differ with the world size, which can round them differently in their last bits.)
        """
        loader = loader if loader is not None else self.test_loader
        self.model.eval()
        means = ExactMeans()
        hang.enter("evaluation", "loading evaluation batch 1")  # a first compile, too
        with self._ddpw.phase("validation"):
            for number, batch in enumerate(progress.bar(loader, "evaluate", self.verbose), 1):
                hang.progress(f"in evaluate_step (evaluation batch {number})")
                output = self.evaluate_step(batch)
                check_per_sample(output, type(self).__name__)
                hang.progress(f"gathering evaluation batch {number}'s metrics")
                means.add(self.accelerator.gather_for_metrics(output))
                hang.progress(f"loading evaluation batch {number + 1}", unit_done=True)
            sharding.after_evaluation(self.model)
        return means.means()

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """Log an epoch's ``metrics`` to the trackers (``JobConfig.log_with``) at this optimiser
        step and append them to ``{training_logs_path}/metrics.jsonl`` (main process only), on
        a line that begins with the run's identity (:mod:`ddpw.tracking`)."""
        self._ddpw.tracking.log_epoch(self.global_step, metrics)
        if self.verbose:
            self.accelerator.print(progress.epoch_metrics(metrics))

    # --- pausing --------------------------------------------------------------------------------

    def request_pause(self) -> None:
        """Ask the job to pause at the next step boundary, as a pause signal does.

        Safe to call from a signal handler or another thread; any one rank asking is enough.
        """
        self._ddpw.vote.request()

    def pause_on_signals(self) -> contextlib.AbstractContextManager[None]:
        """While the block (``with trainer.pause_on_signals():``) runs, each of
        ``j_config.pause_signals`` asks for a pause.

        :func:`ddpw.worker.run` wraps the whole job (set-up included) in it. Signal handlers
        belong to the main thread: elsewhere the signals keep their own handlers.
        """
        return self._ddpw.vote.on_signals(self.j_config.pause_signals)

    def _pause(self, saved: bool) -> None:
        # A save that failed in the background asked for this pause: its error is raised here,
        # on every rank at the same step boundary.
        self.wait_for_checkpoint()
        folder = (self._ddpw.checkpoints.root / Position(self.epochs_done, self.batch).name(
            self.j_config.checkpoint_name_prefix) if saved else self.save_checkpoint())
        self.wait_for_checkpoint()
        if self.verbose:
            self.accelerator.print(f"\n[ddpw] paused at epoch {self.epoch}, batch {self.batch}: "
                                   f"saved {folder}")
        raise JobPaused(str(folder))

    # --- checkpoints ----------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the current position; every rank must call it at the same point.

        Between epochs it is the checkpoint of ``epochs_done`` (replacing one of that position);
        within an epoch, of ``epochs_done`` and ``batch`` batches (``{prefix}_{k}_batch{b}``).
        Resuming is exact only right after an optimiser step, where ddpw itself saves. With
        ``j_config.async_checkpoint`` (the default), it returns once each rank has copied its
        share into host buffers, and the checkpoint is published in the background
        (:mod:`ddpw.checkpoint.checkpointer`); :meth:`wait_for_checkpoint` waits for it.

        :returns: the checkpoint's folder (where it is, or will be, published).
        :raises PeerFailed: on the ranks whose own part went well when another rank's failed,
            with that rank's error (on a full disk, the file it could not write); the rank
            that failed raises its own error. From a background save, the error is raised at
            the next step boundary on every rank, or by the next save or wait.
        """
        p, position = self.p_config, Position(self.epochs_done, self.batch)
        state = TrainingState(self.epochs_done, self.batch, self.global_step,
                              self.a_config.batch_size, self.world_size, p.seed,
                              self.j_config.gradient_accumulation_steps, self.metrics)
        contents = self._ddpw.contents(
            # The plain model under DDP and torch.compile: no "module." or "_orig_mod." in names.
            self.accelerator.unwrap_model(self.model, keep_torch_compile=False), self._parts(),
            state, self.device, p)
        kept = self._ddpw.kept(self.j_config, position, self.metrics)
        with hang.busy("saving a checkpoint"), self._ddpw.phase("checkpoint"):
            return self._ddpw.checkpoints.save(position, contents,
                                               protect=(self.resume_from, *kept))

    def wait_for_checkpoint(self) -> None:
        """Block until the save in flight, if any, is published; raise its error if it failed.

        Pausing, the end of :meth:`run` and an exception out of it all wait, so a job never
        ends, successfully or not, with a checkpoint half written in the background.
        """
        with hang.busy("waiting for a checkpoint to be published"), self._ddpw.phase("checkpoint"):
            self._ddpw.checkpoints.wait()

    def restore_checkpoint(self, name: str) -> dict[str, str]:
        """Load checkpoint ``name`` into the model, optimiser, scheduler, scaler, RNGs and
        position; every rank must call it at the same point.

        Each rank checks the hashes of a share of its files as it maps them into memory
        (:meth:`check` has checked the manifest and sizes). Written by a run of another world
        size, batch size or accumulation, it goes on from the same sample of the epoch
        (:mod:`ddpw.machinery`).

        :returns: the ids of the tracker runs that wrote it (:meth:`ddpw.tracking.Tracking.runs`),
            ``None`` when it was written before ddpw kept them.
        :raises ConfigError: on every rank, naming a file that is damaged.
        """
        acc = self.accelerator
        with hang.busy(f"restoring checkpoint {name}"), self._ddpw.phase("restore"):
            restored = self._ddpw.checkpoints.restore(
                name, acc.unwrap_model(self.model, keep_torch_compile=False), self._parts(),
                self.a_config.batch_size, self.j_config.gradient_accumulation_steps)
        state = restored.state
        self.epochs_done = self.epoch = state.epochs_done
        self.global_step, self.metrics = state.global_step, state.metrics
        self.batch = self._ddpw.take_back(restored, self.p_config.seed, self.a_config.batch_size,
                                          self.world_size, self.device, acc.is_main_process)
        return state.trackers

    def _parts(self) -> dict[str, Any]:
        """The parts of a checkpoint besides the model that every rank holds alike."""
        parts = {"optimiser": self.optimiser, "scheduler": self.scheduler,
                 "scaler": self.accelerator.scaler}
        return {name: obj for name, obj in parts.items() if obj is not None}
