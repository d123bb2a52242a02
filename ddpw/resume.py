"""The resume decision: which checkpoint a job starts from, decided in one place.

:func:`choose` is called before any process starts (by :meth:`ddpw.trainer.Trainer.check`, which
:class:`~ddpw.wrapper.Wrapper` calls), and again at the start of a requeued SLURM attempt, when
the job has checkpoints of its own (:data:`ddpw.environment.RESUME_FROM`), or after an
elastic restart, from the newest checkpoint written since the job began (:func:`written_since`).
"""

from __future__ import annotations

from pathlib import Path

from . import checkpoint
from .artefacts import ArtefactsConfig
from .checkpoint import Position
from .checkpoint.checkpointer import samples_into_epoch
from .checkpoint.names import sequence
from .errors import ConfigError
from .job import JobConfig, JobMode
from .monitor import best, scores


def choose(j_config: JobConfig, a_config: ArtefactsConfig, world_size: int,
           requeued: str | None = None) -> str | None:
    """The name of the checkpoint in ``j_config.checkpoint_path`` that the job starts from, or
    ``None`` to start from scratch, after checking its manifest, the size of every file and
    that its weights fit the model. (The hashes are checked as the ranks read the files:
    :meth:`ddpw.checkpoint.checkpointer.Checkpointer.restore`.)

    A training job resumes from ``requeued`` whatever ``start_at`` says, when that is one of its
    own checkpoints; otherwise ``j_config.start_at`` chooses (:func:`ddpw.checkpoint.resolve`;
    ``"best"``: :func:`ddpw.monitor.best`).

    :param a_config: the job's artefacts, with a model (checked before).
    :param world_size: the number of processes the job will have.
    :param requeued: in a requeued SLURM attempt, the absolute path of the newest checkpoint
        that the job published.
    :raises ConfigError: when the checkpoint asked for does not exist, is damaged, does not fit
        the model, or stands where this job cannot resume it.
    """
    j = j_config
    training = j.job_type is not JobMode.EVALUATE
    name = _own(j, requeued) if training else None
    if name is None and j.start_at == "best":
        ranked = best(scores(j.checkpoint_path, j.checkpoint_name_prefix, j.monitor),
                      j.checkpoint_name_prefix, j.monitor_mode, 1)
        name = ranked[0] if ranked else None
    elif name is None and j.restores:
        name = checkpoint.resolve(j.checkpoint_path, j.checkpoint_name_prefix, j.start_at)
    if name is None:
        if not training and j.start_at in (checkpoint.LATEST, "best"):
            what = "checkpoint" if j.start_at == checkpoint.LATEST else \
                f"checkpoint of a whole epoch with {j.monitor} in its metrics"
            raise ConfigError(f"JobConfig.start_at={j.start_at!r}: there is no {what} with "
                              f"prefix '{j.checkpoint_name_prefix}' in {j.checkpoint_path} "
                              f"to evaluate.")
        return None
    folder = Path(j.checkpoint_path) / name
    checkpoint.check(folder)
    checkpoint.check_fits(folder, a_config.model)
    if training:
        _check_position(j, folder, a_config, world_size)
    return name


def last_written(j_config: JobConfig) -> int:
    """The write order (manifest ``sequence``) of the newest checkpoint in the job's folder, 0
    when there is none: a job's own checkpoints are those written after it."""
    names = checkpoint.available(j_config.checkpoint_path, j_config.checkpoint_name_prefix)
    return max((sequence(Path(j_config.checkpoint_path) / name) for name in names),
               default=0)


def written_since(j_config: JobConfig, after: int) -> str | None:
    """The absolute path of the newest checkpoint written after the write order ``after``
    (:func:`last_written` when the job began), or ``None``."""
    folder = checkpoint.latest(j_config.checkpoint_path, j_config.checkpoint_name_prefix)
    if folder is None:
        return None
    path = Path(j_config.checkpoint_path).resolve() / folder
    return str(path) if sequence(path) > after else None


def _own(j_config: JobConfig, requeued: str | None) -> str | None:
    """The name of ``requeued`` if it is one of this job's checkpoints (its folder and prefix)."""
    if not requeued:
        return None
    folder = Path(requeued)
    mine = folder.parent == Path(j_config.checkpoint_path).resolve()
    return folder.name if mine and Position.parse(folder.name, j_config.checkpoint_name_prefix) \
        else None


def _check_position(j_config: JobConfig, folder: Path, a_config: ArtefactsConfig,
                    world_size: int) -> None:
    """Check that this job can go on from where checkpoint ``folder`` stands in the data."""
    state = checkpoint.read_part(folder, "state")
    position = Position(state["epochs_done"], state["batches"])
    if position.epochs > j_config.epochs:
        raise ConfigError(f"JobConfig.epochs={j_config.epochs} is before the checkpoint "
                          f"{folder.name}, which has {position.epochs} epochs done: ask for "
                          f"at least {position.epochs}.")
    consumed = samples_into_epoch(state)
    per_batch = a_config.batch_size * world_size
    if consumed % per_batch:
        raise ConfigError(
            f"checkpoint {folder.name} paused after {consumed} samples of epoch "
            f"{position.epochs + 1}, which is no whole number of this job's batches of "
            f"{a_config.batch_size} x {world_size} processes: resume it with "
            f"batch_size x world size dividing {consumed} (it was written with "
            f"{state['batch_size']} x {state['world_size']}), or from an end-of-epoch "
            f"checkpoint.")
