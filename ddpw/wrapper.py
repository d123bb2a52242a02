"""The :class:`Wrapper`: start a :class:`~ddpw.trainer.Trainer` or a function on a platform."""

from __future__ import annotations

import os
import pickle
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from accelerate.utils import gather_object

from . import jobfolder, resume
from .artefacts import ArtefactsConfig
from .errors import ConfigError, WorkerError
from .jobfolder import Payload
from .launcher import launch
from .plan import LaunchMode, MachineFacts, resolve_plan
from .platform import Platform, PlatformConfig
from .shipping import ship
from .slurm import ON_INTERRUPT
from .sweep.folder import claim_for_this_point
from .sweep.grid import MAX_POINTS
from .utils import is_restartable, is_trainer
from .worker import run

if TYPE_CHECKING:
    from .trainer import Trainer


class Wrapper:
    """Runs jobs on the platform that ``p_config`` describes.

    :param p_config: where to run.
    :param a_config: the model and data, for :class:`~ddpw.trainer.Trainer` jobs; functions need
        none.
    :param wait: SLURM only: ``False`` makes :meth:`start` return a
        :class:`~ddpw.slurm.submission.Submission` as soon as the job is submitted, rather than
        wait for its result.
    :param on_interrupt: SLURM only: on Ctrl-C while :meth:`start` waits, ``"ask"`` whether to
        cancel the job (cancel it when there is no terminal to ask on), ``"cancel"`` it, or
        ``"keep"`` it running.
    """

    def __init__(self, p_config: PlatformConfig, a_config: ArtefactsConfig | None = None, *,
                 wait: bool = True, on_interrupt: str = "ask") -> None:
        if not isinstance(p_config, PlatformConfig):
            raise ConfigError(f"Wrapper(p_config={p_config!r}): needs a "
                              f"ddpw.platform.PlatformConfig.")
        if a_config is not None and not isinstance(a_config, ArtefactsConfig):
            raise ConfigError(f"Wrapper(a_config={type(a_config).__name__}): needs a "
                              f"ddpw.artefacts.ArtefactsConfig or None.")
        if not isinstance(wait, bool):
            raise ConfigError(f"Wrapper(wait={wait!r}): needs True or False.")
        if not wait and p_config.platform is not Platform.SLURM:
            raise ConfigError(f"Wrapper(wait=False): only SLURM jobs run on without the caller; "
                              f"PlatformConfig.platform is {p_config.platform}.")
        if on_interrupt not in ON_INTERRUPT:
            raise ConfigError(f"Wrapper(on_interrupt={on_interrupt!r}): one of "
                              f"{', '.join(map(repr, ON_INTERRUPT))}.")
        self.p_config = p_config
        self.a_config = a_config
        self.wait = wait
        self.on_interrupt = on_interrupt

    def start(self, target: Trainer | Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``target`` on every process of the platform and wait for it to finish.

        Everything is checked before any process starts. A world of one process runs here, in
        the calling process; a larger one starts its processes with ``accelerate launch``. When
        this script is itself one rank of a launch (``accelerate launch``, ``torchrun``,
        ``ddpw-launch``, a multi-task ``srun``, or any process of a ddpw SLURM job, a world of
        one included), the job runs in place, on every rank, and nothing more is launched or
        submitted. The launch's world is the job's: a warning says so when the config asks for
        another number of processes (as under ``srun --gpus-per-task=1``, where each rank sees
        one GPU of its own).

        On SLURM, the job is submitted (its folder is under ``JobConfig.console_logs_path``, or
        ``./logs/console_logs`` for a function) and, unless ``wait=False``, waited for: its state
        changes and main rank's output are shown as they come (with
        ``PlatformConfig.verbose``). A preemption or the time limit pauses a Trainer, and the
        job requeues itself and resumes from that checkpoint.

        :param target: a :class:`~ddpw.trainer.Trainer`, or a function to run on every rank
            (:func:`ddpw.utils.world` tells it its rank).
        :param args: positional arguments for a function target.
        :param kwargs: keyword arguments for a function target.
        :returns: for a Trainer, the main process's metrics as plain floats (the evaluation
            metrics for ``EVALUATE``, the last epoch's for ``TRAIN`` and ``RESUME``); for a
            function, the list of what it returned on each rank, in rank order; with
            ``wait=False``, the :class:`~ddpw.slurm.submission.Submission`.
        :raises ConfigError: for anything that cannot run, before any process starts.
        :raises WorkerError: when a rank raises or dies; the job's processes are all ended. A
            Trainer's job that fails removes the folders it made for its checkpoints and left
            empty.
        """
        if _is_trainer_class(target):
            raise ConfigError(f"Wrapper.start({target.__name__}): the class, not a Trainer; start "
                              f"an instance: Wrapper.start({target.__name__}(j_config)).")
        plan = resolve_plan(self.p_config, MachineFacts.probe())
        resume_from = None
        if is_trainer(target):
            if args or kwargs:
                raise ConfigError("Wrapper.start(trainer, ...): a Trainer takes no arguments; "
                                  "put what it needs in its own attributes.")
            elastic = plan.rendezvous is not None and plan.rendezvous.elastic
            resume_from = target.check(self.p_config, self.a_config,
                                       world_size=plan.world_size, elastic=elastic)
            claim_for_this_point(target.j_config.checkpoint_path)
        elif not callable(target):
            raise ConfigError(f"Wrapper.start({target!r}): the target must be a ddpw Trainer or "
                              f"a function.")
        if not is_trainer(target) and not is_restartable(target):
            plan = plan.without_restarts()  # it might do its work twice
        payload = Payload(target=target, p_config=self.p_config, a_config=self.a_config,
                          plan=plan, args=args, kwargs=kwargs, resume_from=resume_from,
                          written_before=(resume.last_written(target.j_config)
                                          if is_trainer(target) else 0))
        if not is_trainer(target):
            return self._start(payload)
        with _tidied(Path(target.j_config.checkpoint_path)):
            return self._start(payload)

    def sweep(self, fn: Callable[..., Any], grid: dict[str, list[Any]],
              parallelism: int | None = None, *, max_points: int = MAX_POINTS) -> list[Any]:
        """Run ``fn(**point)`` as a job of this platform's width for each point of ``grid``,
        the product of its lists (the last varying fastest), and return each point's result,
        what :meth:`start` returns for it, in grid order.

        On this machine the points run ``parallelism`` at a time (1 by default), each in a
        process of its own (with GPUs, each on GPUs of its own); on SLURM, as one job array of
        at most ``parallelism`` tasks at a time, in which each task requeues itself on a
        preemption. Each point's parameters, state and result are kept in the sweep's folder
        (``./logs/console_logs/sweeps/NAME-HASH``, see :mod:`ddpw.sweep.folder`): the same
        sweep run again runs only the points that are not done. A training sweep's ``fn``
        builds its configs and Trainer from the point and starts them with a ``Wrapper``, which
        runs in place in the point's world; two points whose Trainers share a
        ``JobConfig.checkpoint_path`` are refused.

        :param grid: each keyword argument's values, ``{"lr": [0.1, 0.01], "seed": [0, 1]}``.
        :param parallelism: how many points run at once [default: 1 here, every point on
            SLURM].
        :param max_points: the most points the grid may have (a guard against slips).
        :returns: the results in grid order; with ``wait=False`` on SLURM, the
            :class:`~ddpw.slurm.submission.Submission` of each point.
        :raises ConfigError: for a bad grid or function, before any point starts.
        :raises WorkerError: once every point has ended, naming the points that failed.
        """
        from .sweep.python import sweep  # not for a single job

        return sweep(self.p_config, self.a_config, fn, grid, parallelism, max_points,
                     wait=self.wait, on_interrupt=self.on_interrupt)

    def _start(self, payload: Payload) -> Any:
        """Run ``payload`` as its plan says: launched, submitted, in place or here."""
        plan, target = payload.plan, payload.target
        if plan.mode is LaunchMode.ACCELERATE:
            results = launch(payload)
        elif plan.mode is LaunchMode.SLURM:
            from .slurm.submission import submit  # only here: the rest submits nothing

            logs = (target.j_config.console_logs_path if is_trainer(target)
                    else jobfolder.DEFAULT_ROOT)
            submission = submit(self.p_config, plan, logs, payload=payload)
            return submission.wait(self.on_interrupt) if self.wait else submission
        elif plan.mode is LaunchMode.IN_PLACE:
            if plan.world_size != self.p_config.world_size:
                warnings.warn(f"ddpw runs in place, in the existing launch's world of "
                              f"{plan.world_size} processes; PlatformConfig asks for "
                              f"{self.p_config.world_size}.", stacklevel=3)
            launched_precision = os.environ.get("ACCELERATE_MIXED_PRECISION")
            if launched_precision not in (None, self.p_config.mixed_precision):
                warnings.warn(f"the launch asks for mixed precision {launched_precision!r}; "
                              f"this job uses PlatformConfig.mixed_precision="
                              f"{self.p_config.mixed_precision!r}.", stacklevel=3)
            results = gather_object([run(payload)])
        else:
            results = [_run_here(payload)]
        return results[0] if is_trainer(target) else results


@contextmanager
def _tidied(folder: Path) -> Iterator[None]:
    """Remove, when the block fails, the folders up to ``folder`` that it made and left empty
    (a job that failed before its first checkpoint leaves no empty checkpoint folder). Only
    empty folders go: ``rmdir`` refuses any other."""
    made = [path for path in (folder.absolute(), *folder.absolute().parents)
            if not path.exists()]
    try:
        yield
    except BaseException:
        for path in made:  # the deepest first
            with suppress(OSError):
                path.rmdir()
        raise


def _is_trainer_class(target: Any) -> bool:
    """Whether ``target`` is a subclass of :class:`~ddpw.trainer.Trainer` (asked as
    :func:`ddpw.utils.is_trainer` asks, without importing the trainer's module)."""
    module = sys.modules.get("ddpw.trainer")
    return isinstance(target, type) and module is not None and issubclass(target, module.Trainer)


def _run_here(payload: Payload) -> Any:
    """Run a world of one in this process, as a launched process would run it.

    The job runs on a copy, as it does in launched processes, so the caller's model and trainer
    come out of a job untouched whatever the world size; and a failure is a
    :class:`~ddpw.errors.WorkerError` here too, and bad input that only the job could see (a
    damaged checkpoint) a :class:`~ddpw.errors.ConfigError`, as from launched processes.
    """
    copy = pickle.loads(ship(payload))
    try:
        return run(copy)
    except ConfigError:
        raise
    except Exception as error:
        raise WorkerError("rank 0 of 1 raised an exception", rank=0,
                          details=traceback.format_exc().rstrip()) from error
