"""What a job trains and evaluates: the :class:`ArtefactsConfig`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from . import schedules, sharding
from ._checks import check_choice, check_int, check_type, fail
from .batchnorm import synchronise_batch_norm
from .errors import ConfigError

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .platform import PlatformConfig

#: ``model -> optimiser``, called once on every rank; Accelerate then moves the model (and so the
#: optimiser's parameters) to the rank's device.
OptimiserLoader = Callable[[torch.nn.Module], torch.optim.Optimizer]
#: ``optimiser -> scheduler``, called once on every rank after the optimiser is built.
SchedulerLoader = Callable[[torch.optim.Optimizer], Any]


@dataclass
class ArtefactsConfig:
    """The model, the data and how to build the optimiser. Every field is checked when made.

    The objects are built once, in the calling process, and shipped to every worker process, so
    the model starts from the same weights on every rank.

    :param train_set: data for ``TRAIN`` and ``RESUME``: a map-style data set, shuffled every
        epoch (see ``shuffle``), or a stream (a :class:`~torch.utils.data.IterableDataset`,
        with or without ``__len__``), which the main rank reads and deals out in global batches
        (see :doc:`/guides/data`).
    :param validation_set: optional; evaluated after every training epoch, its metrics prefixed
        ``val_``.
    :param test_set: data for ``EVALUATE``.
    :param batch_size: samples per batch *per process*: a world of ``N`` takes ``N * batch_size``
        samples per optimiser step (times the gradient accumulation steps).
    :param model: the :class:`torch.nn.Module` to train or evaluate.
    :param optimiser_loader: ``model -> torch.optim.Optimizer``.
    :param scheduler_loader: optional ``optimiser -> scheduler``, stepped as
        ``scheduler_interval`` says.
    :param scheduler_interval: ``"epoch"`` (the default): the scheduler steps once after each
        epoch, after its validation and before its checkpoint, as a schedule written in epochs
        expects (``StepLR(step_size=30)`` for "every 30 epochs", as in PyTorch's own examples);
        a ``ReduceLROnPlateau`` steps on ``JobConfig.monitor``, else ``val_loss``, else
        ``loss`` (:mod:`ddpw.schedules`).
        ``"step"``: it steps with every optimiser step, and Accelerate steps it once per
        process, so that a schedule written in steps of one process (a warm-up,
        ``OneCycleLR``) follows the number of samples seen whatever the world size. Each
        epoch's metrics hold ``lr``, the first parameter group's learning rate when the
        epoch's training ended.
    :param model_has_batch_norm: in a world of more than one process, compute the statistics of
        the model's ``BatchNorm1d/2d/3d`` layers over the global batch, as one process with
        batches of ``N * batch_size`` would (running statistics included): on GPUs the layers
        become :class:`torch.nn.SyncBatchNorm`; on CPU worlds, where DDP refuses that class,
        :class:`ddpw.batchnorm.SynchronisedBatchNorm`, which synchronises through ``gloo`` and
        computes the statistics in float32 under ``bf16``. With one process the model is left
        unchanged. Without it, each rank normalises with its own batch's statistics, and DDP
        copies rank 0's running statistics to the other ranks at every forward pass.
    :param collate_fn: passed to every :class:`~torch.utils.data.DataLoader`.
    :param num_workers: data-loading worker processes per rank. Each worker of a stream gets a
        copy of it: shard it by :func:`torch.utils.data.get_worker_info`.
    :param pin_memory: pin host memory for faster copies to a GPU.
    :param drop_last: drop the last incomplete training batch.
    :param shuffle: shuffle a map-style training set (validation and test sets never are; a
        stream shuffles itself, if at all).
    :param dataloader_kwargs: any other :class:`~torch.utils.data.DataLoader` arguments.
    """

    train_set: Dataset | None = None
    validation_set: Dataset | None = None
    test_set: Dataset | None = None
    batch_size: int = 64
    model: torch.nn.Module | None = None
    optimiser_loader: OptimiserLoader | None = None
    scheduler_loader: SchedulerLoader | None = None
    scheduler_interval: str = "epoch"
    model_has_batch_norm: bool = False
    collate_fn: Callable[[list[Any]], Any] | None = None
    num_workers: int = 0
    pin_memory: bool = False
    drop_last: bool = False
    shuffle: bool = True
    dataloader_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        owner = "ArtefactsConfig"
        for name in ("train_set", "validation_set", "test_set"):
            data = getattr(self, name)
            if data is not None and (isinstance(data, (str, bytes, Path)) or (
                    not isinstance(data, IterableDataset)
                    and not (hasattr(data, "__getitem__") and hasattr(data, "__len__")))):
                fail(owner, name, type(data).__name__,
                     "a map-style dataset (with __getitem__ and __len__), an IterableDataset "
                     "or None")
        check_int(owner, "batch_size", self.batch_size, 1)
        if self.model is not None:
            if not isinstance(self.model, torch.nn.Module):
                fail(owner, "model", type(self.model).__name__, "a torch.nn.Module or None")
        # An optimiser's class cannot take the model; a scheduler's class takes the optimiser.
        _check_loader("optimiser_loader", self.optimiser_loader, torch.optim.Optimizer, "model",
                      "lambda model: torch.optim.Adam(model.parameters())", classes=True)
        _check_loader("scheduler_loader", self.scheduler_loader,
                      torch.optim.lr_scheduler.LRScheduler, "optimiser",
                      "lambda optimiser: torch.optim.lr_scheduler.StepLR(optimiser, 30)")
        for name in ("optimiser_loader", "scheduler_loader", "collate_fn"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                fail(owner, name, value, "a callable or None")
        check_choice(owner, "scheduler_interval", self.scheduler_interval, ("epoch", "step"))
        check_int(owner, "num_workers", self.num_workers, 0)
        for name in ("model_has_batch_norm", "pin_memory", "drop_last", "shuffle"):
            check_type(owner, name, getattr(self, name), bool, "True or False")
        check_type(owner, "dataloader_kwargs", self.dataloader_kwargs, dict, "a dict")
        owned = {"batch_size", "shuffle", "collate_fn", "num_workers", "pin_memory", "drop_last",
                 "sampler", "batch_sampler", "generator"}
        clashes = sorted(owned & set(self.dataloader_kwargs))
        if clashes:
            fail(owner, "dataloader_kwargs", clashes,
                 "no keys that ArtefactsConfig has fields for (set those fields instead), no "
                 "sampler (Accelerate shards the data itself) and no generator (ddpw seeds it)")

    def make_loader(self, dataset: Dataset, train: bool,
                    generator: torch.Generator | None = None) -> DataLoader:
        """A :class:`~torch.utils.data.DataLoader` for ``dataset``, before Accelerate shards it.

        Only the training loader shuffles and drops the last batch (when asked).
        """
        shuffle = train and self.shuffle and not isinstance(dataset, IterableDataset)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle,
                          collate_fn=self.collate_fn, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, drop_last=train and self.drop_last,
                          generator=generator, **self.dataloader_kwargs)

    def prepare_model(self, accelerator: Accelerator, training: bool,
                      p_config: PlatformConfig | None = None
                      ) -> tuple[torch.nn.Module, torch.optim.Optimizer | None, Any]:
        """The model, the optimiser and the scheduler, built on this rank and prepared by
        ``accelerator`` (no optimiser or scheduler when not ``training``; no scheduler without
        ``scheduler_loader``). With ``model_has_batch_norm`` on several processes, BatchNorm
        is synchronised across them (:mod:`ddpw.batchnorm`). With ``p_config.strategy="fsdp"``
        on several processes, the model is sharded (:func:`ddpw.sharding.shard`) before the
        optimiser is built on its shards, and Accelerate prepares all but the model.

        :raises ConfigError: for a scheduler that cannot step at ``scheduler_interval``
            (:func:`ddpw.schedules.check`).
        """
        model = self.model
        if self.model_has_batch_norm and accelerator.num_processes > 1:
            model = synchronise_batch_norm(model, accelerator.device)
        sharded = (p_config is not None and p_config.strategy == "fsdp"
                   and accelerator.num_processes > 1)
        if sharded:
            compiled = p_config.torch_compile_mode if p_config.torch_compile else None
            model = sharding.shard(model, p_config.shard_units, p_config.mixed_precision,
                                   accelerator.device, compiled)
        if not training:
            return (model if sharded else accelerator.prepare(model)), None, None
        optimiser = self.optimiser_loader(model)
        scheduler = self.scheduler_loader(optimiser) if self.scheduler_loader else None
        if scheduler is not None:
            schedules.check(scheduler, self.scheduler_interval, accelerator.is_main_process)
        parts = (model, optimiser) if scheduler is None else (model, optimiser, scheduler)
        if sharded:
            # Accelerate's DDP wrapping, autocast and compilation of the model are FSDP's here.
            others = accelerator.prepare(*parts[1:])
            parts = (model, *(others if scheduler is not None else (others,)))
        else:
            parts = accelerator.prepare(*parts)
        return parts[0], parts[1], parts[2] if scheduler is not None else None

    def prepare_loaders(self, accelerator: Accelerator, seed: int
                        ) -> tuple[DataLoader | None, DataLoader | None, DataLoader | None]:
        """The training, validation and test loaders, sharded across ranks by ``accelerator``
        (``None`` for a data set that is ``None``).

        Each has a generator of its own, seeded with ``seed``: drawing its workers' seeds must
        not move the global RNG, or a run resumed mid-epoch would drift from an uninterrupted
        one.
        """
        # Here, not above: a config is made, checked and shipped where Accelerate is not needed.
        from accelerate.data_loader import DataLoaderDispatcher

        loaders = []
        for name in ("train", "validation", "test"):
            data, loader = getattr(self, f"{name}_set"), None
            if data is not None:
                generator = torch.Generator().manual_seed(seed)
                loader = accelerator.prepare(
                    self.make_loader(data, train=name == "train", generator=generator))
                if isinstance(loader, DataLoaderDispatcher):
                    # A stream, which the main rank reads and deals out: Accelerate leaves the
                    # generator out of the loader it reads from, which would then draw on the
                    # global RNG at every pass (skip_first_batches copies it from there).
                    loader.base_dataloader.generator = generator
            loaders.append(loader)
        return loaders[0], loaders[1], loaders[2]


def _check_loader(field: str, value: Any, made: type, takes: str, example: str,
                  classes: bool = False) -> None:
    """Refuse what a loader makes (an instance of ``made``) given in the loader's place, and,
    with ``classes``, the class itself, which cannot be called with what the loader takes."""
    kind = field.removesuffix("_loader")
    if isinstance(value, made):
        given = f"{type(value).__name__}(...), the {kind} itself,"
    elif classes and isinstance(value, type) and issubclass(value, made):
        given = f"{value.__name__}, the {kind}'s class,"
    else:
        return
    raise ConfigError(f"ArtefactsConfig.{field}={given} is not valid: a function that takes the "
                      f"{takes} and returns its {kind}, such as {example}.")
