"""Experiment trackers: what a :class:`~ddpw.trainer.Trainer` logs to TensorBoard, MLflow, W&B
and the other trackers of Accelerate (:mod:`accelerate.tracking`), and how a resumed run goes on
in the same run at the right step.

One :class:`Tracking` per job, on every rank; the trackers themselves live on the main rank only
(Accelerate's rule). What is logged:

- every ``JobConfig.log_every_n_steps`` optimiser steps, ``step/<key>`` for each value that
  :meth:`~ddpw.trainer.Trainer.train_step` returned at that step (``loss`` and any other, the
  gradient norms when clipping), averaged over the ranks, with ``step/lr`` and
  ``step/samples_per_s`` (samples of the whole world per second of training since the last
  log);
- after every epoch, its metrics under the names of ``metrics.jsonl`` (``loss``, ``lr``,
  ``val_*``, ...);
- once, when a run starts from scratch, the three configs as hyper-parameters
  (:func:`hyperparameters`);
- once, at the end, the job's goodput summary, ``goodput/...`` (:func:`ddpw.goodput.tracked`).

``metrics.jsonl`` gets each epoch's metrics too, as one line that begins with the run's
identity: ``run``, an id made when the run starts from scratch and kept in its checkpoints, so
that a resumed run goes on with its own run's id, and ``resumed_from``, the checkpoint that this
part of the run started from (``null`` from scratch). Runs that share the file are told apart by
``run``; an epoch that appears twice in one run (resumed from an earlier checkpoint) by
``resumed_from``.

Every value is logged at its optimiser step (``Trainer.global_step``), so a resumed run goes on
where its checkpoint stands. The checkpoint keeps the run ids (:meth:`Tracking.runs`), so that
MLflow and W&B go on in the same run; TensorBoard hides what an earlier attempt logged past the
checkpoint (``purge_step``). Each tracker's files sit under ``JobConfig.training_logs_path``.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from .job import JobConfig

#: The trackers that ``JobConfig.log_with`` may name (Accelerate's), and the package each needs:
#: ``pip install`` the value.
TRACKERS = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "comet_ml": "comet_ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "trackio": "trackio",
}


#: The key of the run's own id among :meth:`Tracking.runs`.
JSONL = "metrics.jsonl"


def missing(names: tuple[str, ...]) -> list[str]:
    """The packages of the trackers ``names`` that are not installed here."""
    return [TRACKERS[name] for name in names if importlib.util.find_spec(TRACKERS[name]) is None]


def hyperparameters(configs: dict[str, Any]) -> dict[str, bool | int | float | str]:
    """The configs as flat hyper-parameters: ``{"job.epochs": 10, "artefacts.model": "Net",
    ...}`` for ``configs={"job": j_config, "artefacts": a_config, ...}``.

    Numbers, strings and booleans stay as they are; enums give their name; a data set gives
    its class and length; any other object, its class or function name (a tracker takes only
    plain values).
    """
    flat: dict[str, bool | int | float | str] = {}
    for prefix, config in configs.items():
        if config is None:
            continue
        for item in dataclasses.fields(config):
            value = getattr(config, item.name)
            flat[f"{prefix}.{item.name}"] = _plain(value)
    return flat


def _plain(value: Any) -> bool | int | float | str:
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return value.name
    if value is None or isinstance(value, (tuple, list, dict)):
        return str(value)
    if hasattr(value, "__len__") and hasattr(value, "__getitem__"):
        return f"{type(value).__name__}(len={len(value)})"
    return getattr(value, "__qualname__", type(value).__name__)


class Tracking:
    """The trackers of one job, seen from one rank (every rank calls every method at the same
    point; only the main rank writes).

    :param j_config: the job's ``log_with``, ``log_every_n_steps``, ``project_name`` and
        ``training_logs_path``.
    """

    def __init__(self, j_config: JobConfig) -> None:
        self.names = j_config.log_with
        self.every = j_config.log_every_n_steps
        self.project = j_config.project_name
        self.folder = Path(j_config.training_logs_path).absolute()
        self.accelerator: Accelerator | None = None
        self._window = (time.perf_counter(), 0)
        #: This run's identity in ``metrics.jsonl``: its id and the checkpoint it resumed.
        self.identity: dict[str, str | None] = {"run": None, "resumed_from": None}

    def accelerator_kwargs(self) -> dict[str, Any]:
        """What the :class:`~accelerate.Accelerator` needs to make the trackers."""
        if not self.names:
            return {}
        return {"log_with": list(self.names), "project_dir": str(self.folder)}

    def start(self, accelerator: Accelerator, step: int, runs: dict[str, str] | None,
              configs: dict[str, Any], resumed_from: str | None = None) -> None:
        """Open the trackers at optimiser step ``step``: in the runs ``runs`` of the checkpoint
        ``resumed_from`` that the job resumed (:meth:`runs`), or, when ``None``, in new runs
        that record ``configs`` as hyper-parameters."""
        self.accelerator = accelerator
        # A time to sort by, and random digits that draw on no generator a resume restores.
        new = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        self.identity = {"run": (runs or {}).get(JSONL, new), "resumed_from": resumed_from}
        if not self.names:
            return
        resumed, runs = runs is not None, runs or {}
        init: dict[str, dict[str, Any]] = {
            # Events at or after the first step this run logs are an earlier attempt's, which
            # went past the checkpoint before it ended: hidden, so no step appears twice.
            "tensorboard": {"purge_step": step + 1 if step else 0},
            "wandb": {"dir": str(self.folder), "resume": "allow",
                      **({"id": runs["wandb"]} if "wandb" in runs else {})},
            "mlflow": {"logging_dir": (self.folder / "mlflow-artefacts").as_uri(),
                       **({"run_id": runs["mlflow"]} if "mlflow" in runs else {})},
        }
        if accelerator.is_main_process:
            self.folder.mkdir(parents=True, exist_ok=True)
            if "mlflow" in self.names and "MLFLOW_TRACKING_URI" not in os.environ:
                import mlflow

                # A database in the folder: MLflow 3 refuses its file store by default.
                mlflow.set_tracking_uri(f"sqlite:///{self.folder / 'mlflow.db'}")
        accelerator.init_trackers(self.project, config=None if resumed else
                                  hyperparameters(configs),
                                  init_kwargs={k: v for k, v in init.items() if k in self.names})
        self.begin_epoch()

    def runs(self) -> dict[str, str]:
        """The ids of the runs that a resumed job goes on in, for its checkpoint: the run's own
        (under :data:`JSONL`) and the main rank's trackers' (the other ranks have none)."""
        ids: dict[str, str] = {JSONL: self.identity["run"]}
        if self.names and self.accelerator.is_main_process:
            for tracker in self.accelerator.trackers:
                if tracker.name == "wandb":
                    ids["wandb"] = tracker.run.id
                elif tracker.name == "mlflow":
                    ids["mlflow"] = tracker.active_run.info.run_id
        return ids

    def begin_epoch(self) -> None:
        """Start timing the training of an epoch (samples per second leave out validation and
        checkpoints between epochs)."""
        self._window = (time.perf_counter(), 0)

    def batch_done(self) -> None:
        """Count a batch towards samples per second."""
        self._window = (self._window[0], self._window[1] + 1)

    def due(self, step: int) -> bool:
        """Whether optimiser step ``step`` is logged."""
        return bool(self.names) and step % self.every == 0

    def log_step(self, step: int, values: dict[str, torch.Tensor], lr: float,
                 samples_per_batch: int) -> None:
        """Log ``values`` of optimiser step ``step``, averaged over the ranks (every rank must
        call it), with the learning rate and samples per second."""
        import torch  # here: JobConfig imports this module, and must not import torch

        keys = list(values)
        mean = self.accelerator.reduce(
            torch.stack([values[k].detach().float().reshape(()) for k in keys]),
            reduction="mean")
        started, batches = self._window
        elapsed = time.perf_counter() - started
        logged = {f"step/{k}": float(v) for k, v in zip(keys, mean.tolist(), strict=True)}
        logged["step/lr"] = lr
        if batches and elapsed > 0:
            logged["step/samples_per_s"] = batches * samples_per_batch / elapsed
        self.accelerator.log(logged, step=step)
        self._window = (time.perf_counter(), 0)

    def log_epoch(self, step: int, metrics: dict[str, float]) -> None:
        """Log an epoch's metrics at optimiser step ``step``, and append them to
        ``metrics.jsonl`` after the run's identity (main rank only)."""
        if self.names:
            self.accelerator.log(dict(metrics), step=step)
        if self.accelerator.is_main_process:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(self.folder / JSONL, "a", encoding="utf-8") as f:
                f.write(json.dumps({**self.identity, **metrics}) + "\n")

    def log_values(self, values: dict[str, float], step: int) -> None:
        """Log ``values`` at optimiser step ``step``, once the trackers are open (a training
        job's: an evaluation opens none); from the main rank alone, too."""
        if self.names and self.accelerator is not None:
            self.accelerator.log(values, step=step)

    def end(self, raising: bool = True) -> None:
        """Flush and close the trackers (the job's end, pause or error). Not through
        :meth:`accelerate.Accelerator.end_training`, which would also destroy the process
        group: the results are gathered through it afterwards, and a job that runs in the
        caller's own launch leaves the caller's group up.

        :param raising: raise what closing them raised; otherwise (when the job is already
            failing) only print it, so that it does not hide the job's own error.
        """
        try:
            if self.names and self.accelerator is not None:
                for tracker in self.accelerator.trackers:
                    tracker.finish()
                self.accelerator.trackers = []
        except Exception as closing:
            if raising:
                raise
            print(f"[ddpw] closing the trackers failed too: {closing!r}", file=sys.stderr)
