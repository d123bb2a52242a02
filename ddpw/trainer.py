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
import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.data_loader import DataLoaderDispatcher
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import checkpoint, environment, jobfolder, process
from .artefacts import ArtefactsConfig
from .batchnorm import synchronise_batch_norm
from .checkpoint import Position
from .errors import ConfigError, JobPaused, PeerFailed
from .job import JobConfig, JobMode
from .network import gloo_interface_chosen
from .platform import Platform, PlatformConfig


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
        self.epoch = 0
        self.epochs_done = 0
        self.batch = 0
        self.global_step = 0
        self.metrics: dict[str, float] = {}
        #: The checkpoint this job starts from, chosen by :meth:`check` before any process starts.
        self.resume_from: str | None = None
        self._sums: dict[str, torch.Tensor] = {}
        self._sum_batches = 0
        self._pause_requested = False
        self._flag_group: Any = None
        #: The pause flags' all-reduce started at the last step boundary, not yet read.
        self._flag_in_flight: tuple[Any, torch.Tensor] | None = None

    # --- what a subclass writes ----------------------------------------------------------------

    def train_step(self, batch: Any) -> torch.Tensor | dict[str, torch.Tensor]:
        """Compute the loss of one batch (already on the device).

        Return the loss, or a dict with ``"loss"`` and any other scalar metrics to average over
        the epoch. The base class does the backward pass and the optimiser step. With mixed
        precision, the model's forward pass runs under autocast (what follows it, such as the
        loss, in full precision), as Accelerate arranges.
        """
        raise NotImplementedError(f"{type(self).__name__} must define train_step(batch) to train.")

    def evaluate_step(self, batch: Any) -> dict[str, torch.Tensor]:
        """Compute per-sample metrics of one batch (already on the device), without gradients.

        Return a dict of 1-D tensors with one value per sample, such as
        ``F.cross_entropy(logits, y, reduction="none")``. The base class gathers them from every
        rank, drops the samples that the last uneven batch repeats, and averages over the data
        set, so the numbers are the same whatever the world size.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must define evaluate_step(batch) to evaluate.")

    # --- checks made before any process starts ------------------------------------------------

    def check(self, p_config: PlatformConfig, a_config: ArtefactsConfig | None,
              world_size: int | None = None) -> None:
        """Check that the configs and the checkpoints on disk allow this job to run, and choose
        the checkpoint to start from (:attr:`resume_from`), verifying every file of it.

        Called by :class:`~ddpw.wrapper.Wrapper` before it starts any process.

        :param world_size: the number of processes the job will have (the launch's, when it runs
            inside one); ``p_config.world_size`` by default.
        :raises ConfigError: naming the field or file and what would be valid.
        """
        j = self.j_config
        if a_config is None:
            raise ConfigError("Wrapper(p_config, a_config): a Trainer needs an ArtefactsConfig.")
        if a_config.model is None:
            raise ConfigError("ArtefactsConfig.model=None: a Trainer needs a torch.nn.Module.")
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
        self.resume_from = self._requeued_from() if training else None
        if self.resume_from is None and j.restores:
            self.resume_from = checkpoint.resolve(j.checkpoint_path, j.checkpoint_name_prefix,
                                                  j.start_at)
        if self.resume_from is None:
            if not training and j.start_at == checkpoint.LATEST:
                raise ConfigError(f"JobConfig.start_at='latest': there is no checkpoint with "
                                  f"prefix '{j.checkpoint_name_prefix}' in {j.checkpoint_path} "
                                  f"to evaluate.")
            return
        folder = Path(j.checkpoint_path) / self.resume_from
        checkpoint.verify(folder)
        checkpoint.check_fits(folder, a_config.model)
        if training:
            self._check_position(folder, a_config, world_size or p_config.world_size)

    def _requeued_from(self) -> str | None:
        """In a SLURM job that requeued itself: the newest checkpoint that this trainer wrote
        before, which the job resumes from whatever ``start_at`` says."""
        j, noted = self.j_config, os.environ.get(environment.RESUME_FROM)
        if not noted:
            return None
        folder = Path(noted)
        mine = folder.parent == Path(j.checkpoint_path).resolve()
        return folder.name if mine and Position.parse(folder.name, j.checkpoint_name_prefix) \
            else None

    def _check_position(self, folder: Path, a_config: ArtefactsConfig, world_size: int) -> None:
        state = json.loads((folder / "state.json").read_text())
        position = Position(state["epochs_done"], state["batches"])
        if position.epochs > self.j_config.epochs:
            raise ConfigError(f"JobConfig.epochs={self.j_config.epochs} is before the checkpoint "
                              f"{folder.name}, which has {position.epochs} epochs done: ask for "
                              f"at least {position.epochs}.")
        consumed = position.batches * state["batch_size"] * state["world_size"]
        per_batch = a_config.batch_size * world_size
        if consumed % per_batch:
            raise ConfigError(
                f"checkpoint {folder.name} paused after {consumed} samples of epoch "
                f"{position.epochs + 1}, which is no whole number of this job's batches of "
                f"{a_config.batch_size} x {world_size} processes: resume it with "
                f"batch_size x world size dividing {consumed} (it was written with "
                f"{state['batch_size']} x {state['world_size']}), or from an end-of-epoch "
                f"checkpoint.")

    # --- set-up, run on every rank -------------------------------------------------------------

    def accelerator_kwargs(self, p_config: PlatformConfig) -> dict[str, Any]:
        """The :class:`~accelerate.Accelerator` arguments this job adds to the platform's.

        The data order is seeded with ``p_config.seed`` on every rank alike (so the shards never
        overlap) and follows the epoch (``set_epoch``), which makes a resumed run see the same
        batches as an uninterrupted one.
        """
        return {
            "gradient_accumulation_steps": self.j_config.gradient_accumulation_steps,
            "dataloader_config": DataLoaderConfiguration(use_seedable_sampler=True,
                                                         data_seed=p_config.seed),
        }

    def setup(self, accelerator: Accelerator, p_config: PlatformConfig,
              a_config: ArtefactsConfig) -> None:
        """Prepare the model, optimiser, scheduler and loaders and restore :attr:`resume_from`."""
        self.accelerator, self.p_config, self.a_config = accelerator, p_config, a_config
        j = self.j_config
        set_seed(p_config.seed, device_specific=True)
        model = a_config.model
        if a_config.model_has_batch_norm and accelerator.num_processes > 1:
            model = synchronise_batch_norm(model, accelerator.device)
        if j.job_type is JobMode.EVALUATE:
            self.model = accelerator.prepare(model)
        else:
            optimiser = a_config.optimiser_loader(model)
            scheduler = a_config.scheduler_loader(optimiser) if a_config.scheduler_loader else None
            if scheduler is None:
                self.model, self.optimiser = accelerator.prepare(model, optimiser)
            else:
                self.model, self.optimiser, self.scheduler = accelerator.prepare(
                    model, optimiser, scheduler)
        for name in ("train", "validation", "test"):
            data = getattr(a_config, f"{name}_set")
            if data is not None:
                # A generator of the loader's own: drawing its workers' seeds must not move the
                # global RNG, or a run resumed mid-epoch would drift from an uninterrupted one.
                generator = torch.Generator().manual_seed(p_config.seed)
                loader = accelerator.prepare(
                    a_config.make_loader(data, train=name == "train", generator=generator))
                if isinstance(loader, DataLoaderDispatcher):
                    # A stream, which the main rank reads and deals out: Accelerate leaves the
                    # generator out of the loader it reads from, which would then draw on the
                    # global RNG at every pass (skip_first_batches copies it from there).
                    loader.base_dataloader.generator = generator
                setattr(self, f"{name}_loader", loader)
        if self.resume_from is not None:
            self.restore_checkpoint(self.resume_from)

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
            source = f"checkpoint {self.resume_from}" if self.resume_from else "the model"
            what = (f"evaluate {source}" if j.job_type is JobMode.EVALUATE else
                    f"train from {source if self.resume_from else 'scratch'} to epoch "
                    f"{j.epochs}, save every {j.save_every} to {j.checkpoint_path}")
            self.accelerator.print(f"[ddpw] {self.p_config.summary()}; {j.job_type.name}: {what}")
        if j.job_type is JobMode.EVALUATE:
            return self.evaluate()
        return self.train()

    def train(self) -> dict[str, float]:
        """Train up to epoch ``epochs``, validating and saving as configured.

        A pause (a signal from ``j_config.pause_signals``, or :meth:`request_pause`) stops every
        rank at the same step boundary, saves a checkpoint and raises
        :class:`~ddpw.errors.JobPaused`.

        :returns: the last epoch's metrics: ``epoch``, the mean of each :meth:`train_step` value
            across batches and ranks, and ``val_*`` metrics when there is a validation set.
        """
        j = self.j_config
        while self.epochs_done < j.epochs:
            self.epoch = self.epochs_done + 1
            self.metrics = {"epoch": self.epoch, **self.train_epoch()}
            self.epochs_done, self.batch = self.epoch, 0
            if self.validation_loader is not None:
                validation = self.evaluate(self.validation_loader)
                self.metrics.update({f"val_{k}": v for k, v in validation.items()})
            self.log_metrics(self.metrics)
            if j.saves_after(self.epoch):
                self.save_checkpoint()
            if self.epochs_done < j.epochs and self._pause_agreed():
                self._pause(saved=j.saves_after(self.epoch))
        if self._flag_in_flight is not None:  # from the last epoch's last step boundary
            self._flag_in_flight[0].wait()
            self._flag_in_flight = None
        return dict(self.metrics)

    def train_epoch(self) -> dict[str, float]:
        """Train on the rest of epoch ``self.epoch``; return the mean of each step metric.

        A run resumed mid-epoch skips the batches already done, without loading them; a stream
        (an :class:`~torch.utils.data.IterableDataset`), which cannot seek, is read through them
        and they are dropped. The epoch ends when the data ends, on every rank at the same batch.
        """
        self.model.train()
        self.train_loader.set_epoch(self.epoch)
        loader = self.train_loader
        if self.batch:
            loader = self.accelerator.skip_first_batches(loader, self.batch)
        else:
            self._sums, self._sum_batches = {}, 0
        samples_per_batch = self.a_config.batch_size * self.world_size
        started, first = time.perf_counter(), self.batch
        # Nothing asks for len(loader): a stream (an IterableDataset without __len__) has none,
        # and its progress bar counts batches without a total.
        bar = self._progress(loader, f"epoch {self.epoch}/{self.j_config.epochs}",
                             initial=self.batch)
        for batch in bar:
            with self.accelerator.accumulate(self.model):
                output = self.train_step(batch)
                values = output if isinstance(output, dict) else {"loss": output}
                self.accelerator.backward(values["loss"])
                self.optimiser.step()
                if self.scheduler is not None:
                    self.scheduler.step()
                self.optimiser.zero_grad()
            self.batch += 1
            for key, value in values.items():
                value = value.detach().float()
                self._sums[key] = self._sums[key] + value if key in self._sums else value
            self._sum_batches += 1
            if self.verbose and self.batch % 10 == 0:
                rate = (self.batch - first) * samples_per_batch / (time.perf_counter() - started)
                bar.set_postfix(loss=f"{values['loss'].item():.4f}", samples_s=f"{rate:.0f}")
            if self.accelerator.sync_gradients:
                self.global_step += 1
                # Only here, after an optimiser step, is there no half-accumulated gradient to
                # lose; the last batch of the epoch is left to the epoch boundary. Accelerate's
                # loaders read a batch ahead, so they know the last one, in a stream too.
                last = self.accelerator.gradient_state.end_of_dataloader
                if not last and self._pause_agreed(overlap=True):
                    self._pause(saved=False)
        means = {k: self.accelerator.reduce(v / max(self._sum_batches, 1), reduction="mean")
                 for k, v in self._sums.items()}
        return {k: float(v) for k, v in means.items()}

    @torch.no_grad()
    def evaluate(self, loader: DataLoader | None = None) -> dict[str, float]:
        """Average :meth:`evaluate_step` over ``loader`` (the test set by default), exactly.

        Per-sample values are gathered from every rank without the repeats that pad an uneven
        last batch, and summed with :func:`math.fsum`, whose result does not depend on the order:
        the same checkpoint gives the same numbers on 1 or N processes.
        """
        loader = loader if loader is not None else self.test_loader
        self.model.eval()
        values: dict[str, list[torch.Tensor]] = {}
        for batch in self._progress(loader, "evaluate"):
            output = self.evaluate_step(batch)
            _check_per_sample(output, type(self).__name__)
            for key, value in self.accelerator.gather_for_metrics(output).items():
                values.setdefault(key, []).append(value.detach().double().cpu())
        self.model.train()
        result = {}
        for key, chunks in values.items():
            flat = torch.cat(chunks).tolist()
            result[key] = math.fsum(flat) / len(flat)
        return result

    # --- pausing --------------------------------------------------------------------------------

    def request_pause(self) -> None:
        """Ask the job to pause at the next step boundary, as a pause signal does.

        Safe to call from a signal handler or another thread; any one rank asking is enough.
        """
        self._pause_requested = True

    @contextlib.contextmanager
    def pause_on_signals(self) -> Iterator[None]:
        """While the block runs, each of ``j_config.pause_signals`` asks for a pause.

        :func:`ddpw.worker.run` wraps the whole job (set-up included) in it. Signal handlers
        belong to the main thread: elsewhere the signals keep their own handlers.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            # Only a flag: the work happens at the next step boundary, where all ranks agree.
            self._pause_requested = True

        if process.requeue_signal_came():  # SLURM's warning came while the process started
            self._pause_requested = True

        previous = {}
        for name in self.j_config.pause_signals:
            sig = getattr(signal, name)
            previous[sig] = signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _pause_agreed(self, overlap: bool = False) -> bool:
        """Whether any rank has been asked to pause: all ranks get the same answer at the same
        step boundary.

        With ``overlap`` (within an epoch), the answer is the all-reduce of the flags started
        at the last step boundary, and this boundary's starts without waiting: the message
        travels while the next step computes, so a step never waits for it, and a pause comes
        one step later than it could. Without (between epochs), the answer includes this very
        moment's flags.
        """
        earlier = False
        if self._flag_in_flight is not None:
            work, value = self._flag_in_flight
            self._flag_in_flight = None
            work.wait()
            earlier = bool(value.item() > 0)
        if earlier or not overlap or self.world_size == 1:
            return earlier or self._any_rank(self._pause_requested)
        self._flag_in_flight = self._reduce_flag(self._pause_requested, wait=False)
        return False

    def _any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (every rank must call it at the same point).

        The flag travels on the CPU, through a gloo group when the job's own backend is another,
        so that asking costs no device synchronisation; :mod:`ddpw.network` chooses the
        group's network interface.
        """
        if self.world_size == 1:
            return flag
        return bool(self._reduce_flag(flag, wait=True)[1].item() > 0)

    def _reduce_flag(self, flag: bool, wait: bool) -> tuple[Any, torch.Tensor]:
        """Start (and with ``wait``, finish) the sum of ``flag`` over the ranks; return the
        all-reduce's handle and the tensor that holds the sum once it is done."""
        import torch.distributed as dist

        if self._flag_group is None and dist.get_backend() != "gloo":
            # Gloo would bind the interface that the hostname resolves to, which the other
            # machines may not reach (NCCL may have been told another): choose it.
            with gloo_interface_chosen():
                self._flag_group = dist.new_group(backend="gloo")
        value = torch.tensor([float(flag)])
        work = dist.all_reduce(value, group=self._flag_group, async_op=not wait)
        return work, value

    def _pause(self, saved: bool) -> None:
        folder = self._position_folder() if saved else self.save_checkpoint()
        if self.verbose:
            self.accelerator.print(f"\n[ddpw] paused at epoch {self.epoch}, batch {self.batch}: "
                                   f"saved {folder}")
        raise JobPaused(str(folder))

    # --- checkpoints ----------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the current position; every rank must call it at the same point.

        Between epochs it is the checkpoint of ``epochs_done`` (replacing one of that position);
        within an epoch, of ``epochs_done`` and ``batch`` batches (``{prefix}_{k}_batch{b}``).
        Resuming is exact only from a position right after an optimiser step, which is where
        ddpw itself saves.

        :returns: the checkpoint's folder.
        :raises PeerFailed: on the ranks whose own part went well when another rank's failed,
            with that rank's error (on a full disk, the file it could not write).
        """
        folder = self._position_folder()
        staging = checkpoint.staging_path(folder)
        # Three steps, each ending with every rank learning whether any rank failed, so that a
        # failure (a full disk, say) never leaves the others waiting at a barrier.
        self._agree(folder, lambda: self._begin_checkpoint(staging), main_only=True)
        digests = self._agree(folder, lambda: self._write_checkpoint_files(staging))
        self._agree(folder, lambda: self._publish_checkpoint(staging, folder, digests),
                    main_only=True)
        return folder

    def _position_folder(self) -> Path:
        """The folder of the checkpoint of the current position."""
        j = self.j_config
        return (Path(j.checkpoint_path) /
                Position(self.epochs_done, self.batch).name(j.checkpoint_name_prefix))

    def _agree(self, folder: Path, step: Callable[[], Any], main_only: bool = False) -> Any:
        """Run ``step`` (on the main rank alone with ``main_only``) and learn whether it failed
        on any rank; every rank must call it at the same point.

        :raises PeerFailed: on a rank whose step went well when another's failed, naming each
            failed rank and its error (``[Errno 28] No space left on device: PATH``, say).
        """
        result, error = None, None
        if self.accelerator.is_main_process or not main_only:
            try:
                result = step()
            except Exception as caught:
                error = caught
        if self._any_rank(error is not None):
            if self.accelerator.is_main_process:
                shutil.rmtree(checkpoint.staging_path(folder), ignore_errors=True)
            # Only when a step failed: every rank learns what failed and where, so that each
            # rank's own error names the cause (a full disk, say), not merely another rank.
            reason = None if error is None else f"{type(error).__name__}: {error}"
            reasons = [reason]
            if self.world_size > 1:
                import torch.distributed as dist

                reasons = [None] * self.world_size
                dist.all_gather_object(reasons, reason, group=self._flag_group)
            if error is not None:
                raise error
            failed = "; ".join(f"rank {rank} failed with {why}"
                               for rank, why in enumerate(reasons) if why is not None)
            raise PeerFailed(f"checkpoint {folder} was not written: {failed}")
        return result

    def _begin_checkpoint(self, staging: Path) -> None:
        j = self.j_config
        checkpoint.tidy(j.checkpoint_path, j.checkpoint_name_prefix)
        staging.mkdir(parents=True)

    def _publish_checkpoint(self, staging: Path, folder: Path, digests: dict[str, str]) -> None:
        j = self.j_config
        checkpoint.publish(staging, folder, digests, {
            "prefix": j.checkpoint_name_prefix, "epochs_done": self.epochs_done,
            "batches": self.batch, "world_size": self.world_size,
            "platform": self.p_config.platform.name,
            "mixed_precision": self.p_config.mixed_precision})
        record = os.environ.get(environment.CHECKPOINT_RECORD)
        if record:
            jobfolder.note_checkpoint(Path(record), folder)
        if j.keep_last:
            checkpoint.prune(j.checkpoint_path, j.checkpoint_name_prefix, j.keep_last,
                             protect=(self.resume_from, folder.name))

    def _write_checkpoint_files(self, staging: Path) -> dict[str, str]:
        acc = self.accelerator
        parts: dict[str, Any] = {f"rank-{self.global_rank}": {
            "rng": checkpoint.rng_state(self.device), "sums": self._sums,
            "sum_batches": self._sum_batches}}
        if not acc.is_main_process:
            return checkpoint.write_all(staging, parts)
        if self.optimiser is not None:
            parts["optimiser"] = self.optimiser.state_dict()
        if self.scheduler is not None:
            parts["scheduler"] = self.scheduler.state_dict()
        if acc.scaler is not None:
            parts["scaler"] = acc.scaler.state_dict()
        parts["state"] = {
            "epochs_done": self.epochs_done, "batches": self.batch,
            "global_step": self.global_step, "batch_size": self.a_config.batch_size,
            "world_size": self.world_size, "data_seed": self.p_config.seed,
            "gradient_accumulation_steps": self.j_config.gradient_accumulation_steps,
            "metrics": self.metrics}
        return checkpoint.write_all(staging, parts, model=acc.unwrap_model(self.model))

    def restore_checkpoint(self, name: str) -> None:
        """Load checkpoint ``name`` into the model, optimiser, scheduler, RNGs and position.

        Its files are verified against the manifest by :meth:`check`, which
        :class:`~ddpw.wrapper.Wrapper` calls before the job starts.
        """
        acc, j = self.accelerator, self.j_config
        folder = Path(j.checkpoint_path) / name
        checkpoint.read_model(folder, acc.unwrap_model(self.model), self.device)
        if self.optimiser is not None and (folder / "optimiser.json").is_file():
            self.optimiser.load_state_dict(checkpoint.read_part(folder, "optimiser"))
        if self.scheduler is not None and (folder / "scheduler.json").is_file():
            self.scheduler.load_state_dict(checkpoint.read_part(folder, "scheduler"))
        if acc.scaler is not None and (folder / "scaler.json").is_file():
            acc.scaler.load_state_dict(checkpoint.read_part(folder, "scaler"))
        state = checkpoint.read_part(folder, "state")
        self.epochs_done = self.epoch = state["epochs_done"]
        self.global_step, self.metrics = state["global_step"], state["metrics"]
        rank_file = f"rank-{self.global_rank}"
        same_run_shape = (
            (state["world_size"], state["batch_size"], state.get("gradient_accumulation_steps"))
            == (self.world_size, self.a_config.batch_size, j.gradient_accumulation_steps))
        if same_run_shape:
            rank_state = checkpoint.read_part(folder, rank_file)  # RNG states live on the CPU
            checkpoint.set_rng_state(rank_state["rng"], self.device)
            self._sums = {k: v.to(self.device) for k, v in rank_state["sums"].items()}
            self._sum_batches = rank_state["sum_batches"]
            self.batch = state["batches"]
        else:
            # Another world size or batch size: the saved RNG streams do not fit, so derive one
            # from the seed and the position; the same samples remain to be seen in the epoch.
            consumed = state["batches"] * state["batch_size"] * state["world_size"]
            self.batch = consumed // (self.a_config.batch_size * self.world_size)
            set_seed(self.p_config.seed + 7919 * self.epochs_done + self.batch,
                     device_specific=True)
            self._sums, self._sum_batches = {}, 0

    # --- output ---------------------------------------------------------------------------------

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """Append ``metrics`` to ``{training_logs_path}/metrics.jsonl`` (main process only)."""
        if not self.accelerator.is_main_process:
            return
        folder = Path(self.j_config.training_logs_path)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.verbose:
            shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in metrics.items())
            self.accelerator.print(f"[ddpw] {shown}")

    def _progress(self, loader: Iterable[Any], description: str, initial: int = 0) -> Any:
        return tqdm(loader, desc=description, disable=not self.verbose, leave=False,
                    dynamic_ncols=True, unit="batch", initial=initial)


def _check_per_sample(output: Any, owner: str) -> None:
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
