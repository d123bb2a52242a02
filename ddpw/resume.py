"""The resume decision: which checkpoint a job starts from, decided in one place.

:func:`choose` is called before any process starts (by :meth:`ddpw.trainer.Trainer.check`, which
:class:`~ddpw.wrapper.Wrapper` calls), and again at the start of a requeued SLURM attempt, when
the job has checkpoints of its own (:data:`ddpw.environment.RESUME_FROM`). On several machines
without SLURM, it is decided again as each world of the job forms, for that world's size, by
its rank 0 for every rank (:func:`agree`): the newest checkpoint written since the job began
(:func:`decide`), after a machine was lost or joined, else the one chosen before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import checkpoint
from .artefacts import ArtefactsConfig
from .checkpoint import Position
from .checkpoint.names import sequence
from .checkpoint.state import TrainingState
from .errors import ConfigError
from .job import JobConfig, JobMode
from .monitor import best, scores


def choose(j_config: JobConfig, a_config: ArtefactsConfig, world_size: int | None,
           requeued: str | None = None) -> str | None:
    """The name of the checkpoint in ``j_config.checkpoint_path`` that the job starts from, or
    ``None`` to start from scratch, after checking its manifest, the size of every file and
    that its weights fit the model. (The hashes are checked as the ranks read the files:
    :meth:`ddpw.checkpoint.checkpointer.Checkpointer.restore`.)

    A training job resumes from ``requeued`` whatever ``start_at`` says, when that is one of its
    own checkpoints; otherwise ``j_config.start_at`` chooses (:func:`ddpw.checkpoint.resolve`;
    ``"best"``: :func:`ddpw.monitor.best`).

    :param a_config: the job's artefacts, with a model (checked before).
    :param world_size: the number of processes the job will have; ``None`` where that is
        known only when the world forms (an elastic job's), which then checks the data position
        itself (:func:`decide`).
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
    if training and world_size is not None:
        _check_position(j, folder, a_config, world_size)
    return name


def last_written(j_config: JobConfig) -> int:
    """The write order (manifest ``sequence``) of the newest checkpoint in the job's folder, 0
    when there is none: a job's own checkpoints are those written after it."""
    names = checkpoint.available(j_config.checkpoint_path, j_config.checkpoint_name_prefix)
    return max((sequence(Path(j_config.checkpoint_path) / name) for name in names),
               default=0)


def decide(j_config: JobConfig, a_config: ArtefactsConfig, world_size: int, since: int,
           planned: str | None) -> str | None:
    """The checkpoint that a world of ``world_size`` processes of a training job on several
    machines starts from: the newest written after the write order ``since`` (when the job
    began) that this world can go on from, else ``planned`` (the payload's choice); checked for
    this world's size, which an elastic job knows only now. (A checkpoint that paused after a
    number of samples that is no whole number of this world's batches is passed over for an
    older one: the samples after it are trained again.)

    :raises ConfigError: as :func:`choose` does.
    """
    root = Path(j_config.checkpoint_path).resolve()
    own = [(sequence(root / name), name) for name in
           checkpoint.available(root, j_config.checkpoint_name_prefix)]
    for _, name in sorted((pair for pair in own if pair[0] > since), reverse=True):
        if TrainingState.read(root / name).whole_batches(a_config.batch_size, world_size):
            return choose(j_config, a_config, world_size, requeued=str(root / name))
    if planned is not None and j_config.job_type is not JobMode.EVALUATE:
        _check_position(j_config, Path(j_config.checkpoint_path) / planned, a_config, world_size)
    return planned


@dataclass(frozen=True)
class Agreed:
    """What every rank of a world of a job on several machines starts with.

    :param world: the world's number in the job, 1 for the first.
    :param before: the size of the world before it, ``None`` for the first.
    :param checkpoint: the name of the checkpoint that a Trainer starts from, ``None`` for none.
    """

    world: int
    before: int | None
    checkpoint: str | None


def agree(rank: int, world_size: int, since: int,
          decide_here: Callable[[int], tuple[int, int | None, str | None]],
          folder: Path | None) -> Agreed:
    """Decide on rank 0 and tell every rank: a world's number and its checkpoint. Ranks that
    chose alone could restore different checkpoints from a shared file system that caches what
    it lists; here each rank checks that it sees rank 0's choice as rank 0 does (its write
    order). Every rank of the world calls it, once its process group is up.

    :param since: this rank's write order when its machine began the job; rank 0 gets the
        earliest of all (a machine that joined later began later).
    :param decide_here: on rank 0, ``since -> (world, size before, checkpoint)``.
    :param folder: the job's checkpoint folder, or ``None`` for a job that has none.
    :raises ConfigError: on every rank, when rank 0 could not decide or a rank does not see the
        checkpoint that rank 0 chose.
    """
    import torch.distributed as dist

    starts: list[int | None] = [None] * world_size
    dist.all_gather_object(starts, since)
    said: list[object] = [None]
    if rank == 0:
        try:
            world, before, name = decide_here(min(s for s in starts if s is not None))
            written = sequence(folder / name) if folder is not None and name else 0
            said = [(world, before, name, written, None)]
        except Exception as error:  # every rank must hear of it, or the others wait
            said = [(0, None, None, 0, str(error) if isinstance(error, ConfigError) else
                     f"rank 0 could not decide where the job starts: "
                     f"{type(error).__name__}: {error}")]
    dist.broadcast_object_list(said, src=0)
    world, before, name, written, error = said[0]  # type: ignore[misc]
    if error is None and name and folder is not None and sequence(folder / name) != written:
        error = (f"rank {rank} does not see checkpoint {name} in {folder} as rank 0 does "
                 f"(written {sequence(folder / name) or 'never'} here, {written} there): every "
                 f"machine must see the same checkpoint_path, up to date (on NFS, without "
                 f"attribute caching: actimeo=0).")
    errors: list[str | None] = [None] * world_size
    dist.all_gather_object(errors, error)
    found = next((e for e in errors if e), None)
    if found:
        raise ConfigError(found)
    return Agreed(world, before, name)


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
    state = TrainingState.read(folder)
    if state.epochs_done > j_config.epochs:
        raise ConfigError(f"JobConfig.epochs={j_config.epochs} is before the checkpoint "
                          f"{folder.name}, which has {state.epochs_done} epochs done: ask for "
                          f"at least {state.epochs_done}.")
    if not state.whole_batches(a_config.batch_size, world_size):
        consumed = state.samples_into_epoch
        raise ConfigError(
            f"checkpoint {folder.name} paused after {consumed} samples of epoch "
            f"{state.epochs_done + 1}, which is no whole number of this job's batches of "
            f"{a_config.batch_size} x {world_size} processes: resume it with "
            f"batch_size x world size dividing {consumed} (it was written with "
            f"{state.batch_size} x {state.world_size}), or from an end-of-epoch "
            f"checkpoint.")
