"""The :class:`Wrapper`: start a :class:`~ddpw.trainer.Trainer` or a function on a platform."""

from __future__ import annotations

import os
import pickle
import traceback
import warnings
from collections.abc import Callable
from typing import Any

from accelerate.utils import gather_object

from .artefacts import ArtefactsConfig
from .errors import ConfigError, WorkerError
from .launcher import launch, ship
from .plan import LaunchMode, MachineFacts, resolve_plan
from .platform import PlatformConfig
from .trainer import Trainer
from .worker import Job, run


class Wrapper:
    """Runs jobs on the platform that ``p_config`` describes.

    :param p_config: where to run.
    :param a_config: the model and data, for :class:`~ddpw.trainer.Trainer` jobs; functions need
        none.
    """

    def __init__(self, p_config: PlatformConfig, a_config: ArtefactsConfig | None = None) -> None:
        if not isinstance(p_config, PlatformConfig):
            raise ConfigError(f"Wrapper(p_config={p_config!r}): needs a "
                              f"ddpw.platform.PlatformConfig.")
        if a_config is not None and not isinstance(a_config, ArtefactsConfig):
            raise ConfigError(f"Wrapper(a_config={type(a_config).__name__}): needs a "
                              f"ddpw.artefacts.ArtefactsConfig or None.")
        self.p_config = p_config
        self.a_config = a_config

    def start(self, target: Trainer | Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``target`` on every process of the platform and wait for it to finish.

        Everything is checked before any process starts. A world of one process runs here, in
        the calling process; a larger one starts its processes with ``accelerate launch``. When
        this script is itself one rank of a launch (``accelerate launch``, ``torchrun``,
        ``ddpw-launch``, a multi-task ``srun``), the job runs in place, on every rank, and
        nothing more is launched.

        :param target: a :class:`~ddpw.trainer.Trainer`, or a function to run on every rank
            (:func:`ddpw.utils.world` tells it its rank).
        :param args: positional arguments for a function target.
        :param kwargs: keyword arguments for a function target.
        :returns: for a Trainer, the main process's metrics as plain floats (the evaluation
            metrics for ``EVALUATE``, the last epoch's for ``TRAIN`` and ``RESUME``); for a
            function, the list of what it returned on each rank, in rank order.
        :raises ConfigError: for anything that cannot run, before any process starts.
        :raises WorkerError: when a rank raises or dies; the job's processes are all ended.
        """
        plan = resolve_plan(self.p_config, MachineFacts.probe())
        if isinstance(target, Trainer):
            if args or kwargs:
                raise ConfigError("Wrapper.start(trainer, ...): a Trainer takes no arguments; "
                                  "put what it needs in its own attributes.")
            target.check(self.p_config, self.a_config, world_size=plan.world_size)
        elif not callable(target):
            raise ConfigError(f"Wrapper.start({target!r}): the target must be a ddpw Trainer or "
                              f"a function.")
        job = Job(target=target, p_config=self.p_config, a_config=self.a_config, plan=plan,
                  args=args, kwargs=kwargs)
        if plan.mode is LaunchMode.ACCELERATE:
            results = launch(job)
        elif plan.mode is LaunchMode.SLURM:
            from .slurm import submit

            results = submit(job)
        elif plan.mode is LaunchMode.IN_PLACE:
            if plan.world_size != self.p_config.world_size:
                warnings.warn(f"ddpw runs in place, in the existing launch's world of "
                              f"{plan.world_size} processes; PlatformConfig asks for "
                              f"{self.p_config.world_size}.", stacklevel=2)
            launched_precision = os.environ.get("ACCELERATE_MIXED_PRECISION")
            if launched_precision not in (None, self.p_config.mixed_precision):
                warnings.warn(f"the launch asks for mixed precision {launched_precision!r}; "
                              f"this job uses PlatformConfig.mixed_precision="
                              f"{self.p_config.mixed_precision!r}.", stacklevel=2)
            results = gather_object([run(job)])
        else:
            results = [_run_here(job)]
        return results[0] if isinstance(target, Trainer) else results


def _run_here(job: Job) -> Any:
    """Run a world of one in this process, as a launched process would run it.

    The job runs on a copy, as it does in launched processes, so the caller's model and trainer
    come out of a job untouched whatever the world size; and a failure is a
    :class:`~ddpw.errors.WorkerError` here too.
    """
    copy = pickle.loads(ship(job))
    try:
        return run(copy)
    except Exception as error:
        raise WorkerError("rank 0 of 1 raised an exception", rank=0,
                          details=traceback.format_exc().rstrip()) from error
