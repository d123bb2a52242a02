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
data sharding, gradient accumulation, mixed precision, checkpoints and exact metrics.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import checkpoint
from .artefacts import ArtefactsConfig
from .errors import ConfigError
from .job import JobConfig, JobMode
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
    - ``epoch`` (the epoch being trained, or the last one completed), ``global_step`` (optimiser
      steps so far);
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
        self.global_step = 0
        self.metrics: dict[str, float] = {}

    # --- what a subclass writes ----------------------------------------------------------------

    def train_step(self, batch: Any) -> torch.Tensor | dict[str, torch.Tensor]:
        """Compute the loss of one batch (already on the device).

        Return the loss, or a dict with ``"loss"`` and any other scalar metrics to average over
        the epoch. The base class does the backward pass and the optimiser step.
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

    def check(self, p_config: PlatformConfig, a_config: ArtefactsConfig | None) -> None:
        """Check that the configs and the checkpoints on disk allow this job to run.

        Called by :class:`~ddpw.wrapper.Wrapper` before it starts any process.

        :raises ConfigError: naming the field and what would be valid.
        """
        j = self.j_config
        if a_config is None:
            raise ConfigError("Wrapper(p_config, a_config): a Trainer needs an ArtefactsConfig.")
        if a_config.model is None:
            raise ConfigError("ArtefactsConfig.model=None: a Trainer needs a torch.nn.Module.")
        training = j.job_type is not JobMode.EVALUATE
        if training and a_config.train_set is None:
            raise ConfigError(f"ArtefactsConfig.train_set=None: JobMode.{j.job_type.name} needs "
                              f"a training set.")
        if training and a_config.optimiser_loader is None:
            raise ConfigError(f"ArtefactsConfig.optimiser_loader=None: JobMode.{j.job_type.name} "
                              f"needs a callable model -> torch.optim.Optimizer.")
        if not training and a_config.test_set is None:
            raise ConfigError("ArtefactsConfig.test_set=None: JobMode.EVALUATE needs a test set.")
        if j.restores:
            folder = checkpoint.require(j.checkpoint_path, j.checkpoint_name_prefix, j.start_at)
            checkpoint.check_fits(folder, a_config.model)

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
        """Prepare the model, optimiser, scheduler and loaders and restore ``start_at``."""
        self.accelerator, self.p_config, self.a_config = accelerator, p_config, a_config
        j = self.j_config
        set_seed(p_config.seed, device_specific=True)
        model = a_config.model
        if a_config.model_has_batch_norm and accelerator.num_processes > 1:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
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
                loader = a_config.make_loader(data, train=name == "train")
                setattr(self, f"{name}_loader", accelerator.prepare(loader))
        if j.restores:
            self.restore_checkpoint(j.start_at)

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
            what = (f"evaluate {'checkpoint ' + str(j.start_at) if j.restores else 'the model'}"
                    if j.job_type is JobMode.EVALUATE else
                    f"train epochs {j.first_epoch}..{j.epochs}, save every {j.save_every} to "
                    f"{j.checkpoint_path}")
            self.accelerator.print(f"[ddpw] {self.p_config.summary()}; {j.job_type.name}: {what}")
        if j.job_type is JobMode.EVALUATE:
            return self.evaluate()
        return self.train()

    def train(self) -> dict[str, float]:
        """Train epochs ``first_epoch..epochs``, validating and saving as configured.

        :returns: the last epoch's metrics: ``epoch``, the mean of each :meth:`train_step` value
            across steps and ranks, and ``val_*`` metrics when there is a validation set.
        """
        j = self.j_config
        for epoch in range(j.first_epoch, j.epochs + 1):
            self.epoch = epoch
            self.metrics = {"epoch": epoch, **self.train_epoch()}
            if self.validation_loader is not None:
                validation = self.evaluate(self.validation_loader)
                self.metrics.update({f"val_{k}": v for k, v in validation.items()})
            self.log_metrics(self.metrics)
            if j.saves_after(epoch):
                self.save_checkpoint()
        return dict(self.metrics)

    def train_epoch(self) -> dict[str, float]:
        """One pass over the training set; returns the mean of each step metric."""
        self.model.train()
        loader = self.train_loader
        loader.set_epoch(self.epoch)
        sums: dict[str, torch.Tensor] = {}
        steps = 0
        samples_per_batch = self.a_config.batch_size * self.world_size
        started = time.perf_counter()
        bar = self._progress(loader, f"epoch {self.epoch}/{self.j_config.epochs}")
        for batch in bar:
            with self.accelerator.accumulate(self.model):
                output = self.train_step(batch)
                values = output if isinstance(output, dict) else {"loss": output}
                self.accelerator.backward(values["loss"])
                self.optimiser.step()
                if self.scheduler is not None:
                    self.scheduler.step()
                self.optimiser.zero_grad()
            if self.accelerator.sync_gradients:
                self.global_step += 1
            for key, value in values.items():
                value = value.detach().float()
                sums[key] = sums[key] + value if key in sums else value
            steps += 1
            if self.verbose and steps % 10 == 0:
                rate = steps * samples_per_batch / (time.perf_counter() - started)
                bar.set_postfix(loss=f"{values['loss'].item():.4f}", samples_s=f"{rate:.0f}")
        means = {k: self.accelerator.reduce(v / max(steps, 1), reduction="mean")
                 for k, v in sums.items()}
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

    # --- checkpoints ----------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write the checkpoint of the current epoch; every rank must call it.

        :returns: the checkpoint's folder.
        """
        acc, j = self.accelerator, self.j_config
        folder = checkpoint.path_of(j.checkpoint_path, j.checkpoint_name_prefix, self.epoch)
        staging = checkpoint.staging_path(folder)
        if acc.is_main_process:
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
        acc.wait_for_everyone()
        checkpoint.write_part(staging, f"rng-{self.global_rank}", checkpoint.rng_state())
        if acc.is_main_process:
            model = acc.unwrap_model(self.model)
            safetensors.torch.save_model(model, str(staging / "model.safetensors"))
            if self.optimiser is not None:
                checkpoint.write_part(staging, "optimiser", self.optimiser.state_dict())
            if self.scheduler is not None:
                checkpoint.write_part(staging, "scheduler", self.scheduler.state_dict())
            if acc.scaler is not None:
                checkpoint.write_part(staging, "scaler", acc.scaler.state_dict())
            checkpoint.write_part(staging, "state", {"epoch": self.epoch, "step": 0,
                                                     "global_step": self.global_step,
                                                     "metrics": self.metrics})
        acc.wait_for_everyone()
        if acc.is_main_process:
            checkpoint.publish(staging, folder, {
                "epoch": self.epoch, "world_size": self.world_size,
                "platform": self.p_config.platform.name,
                "mixed_precision": self.p_config.mixed_precision})
        acc.wait_for_everyone()
        return folder

    def restore_checkpoint(self, epoch: int) -> None:
        """Load the checkpoint of ``epoch`` into the model, optimiser, scheduler and RNGs."""
        acc, j = self.accelerator, self.j_config
        folder = checkpoint.require(j.checkpoint_path, j.checkpoint_name_prefix, epoch)
        manifest = checkpoint.read_manifest(folder)
        missing, unexpected = safetensors.torch.load_model(
            acc.unwrap_model(self.model), str(folder / "model.safetensors"), strict=False,
            device="cpu" if self.device.type == "cpu" else str(self.device))
        if missing or unexpected:
            raise ConfigError(f"checkpoint {folder} does not fit the model: missing {missing}, "
                              f"unexpected {unexpected}.")
        if self.optimiser is not None and (folder / "optimiser.json").is_file():
            self.optimiser.load_state_dict(checkpoint.read_part(folder, "optimiser"))
        if self.scheduler is not None and (folder / "scheduler.json").is_file():
            self.scheduler.load_state_dict(checkpoint.read_part(folder, "scheduler"))
        if acc.scaler is not None and (folder / "scaler.json").is_file():
            acc.scaler.load_state_dict(checkpoint.read_part(folder, "scaler"))
        state = checkpoint.read_part(folder, "state")
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.metrics = state["metrics"]
        rng = folder / f"rng-{self.global_rank}.json"
        if manifest["world_size"] == self.world_size and rng.is_file():
            checkpoint.set_rng_state(checkpoint.read_part(folder, f"rng-{self.global_rank}"))
        else:
            # Another world size: no saved stream belongs to this rank, so derive a fresh one
            # that is still a function of the seed, the epoch and the rank.
            set_seed(self.p_config.seed + 7919 * epoch, device_specific=True)

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

    def _progress(self, loader: Iterable[Any], description: str) -> Any:
        return tqdm(loader, desc=description, disable=not self.verbose, leave=False,
                    dynamic_ncols=True, unit="batch")


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
