"""The checkpoint transaction: how the ranks of a :class:`~ddpw.trainer.Trainer` write a
checkpoint together, and how each rank loads one back.

A checkpoint is written in three steps, each ending with every rank learning whether any rank
failed, so that a failure (a full disk, say) never leaves the others waiting at a barrier:

1. the main rank cleans up after interrupted writes and makes the staging folder;
2. every rank writes its own part (its RNG states and running sums), and the main rank the
   model, optimiser, scheduler, scaler and data position;
3. the main rank publishes the checkpoint (:func:`ddpw.checkpoint.publish`), notes it in the
   SLURM job's record (:data:`ddpw.environment.CHECKPOINT_RECORD`) and prunes old ones.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from accelerate.utils import set_seed

from .. import environment, jobfolder
from ..errors import PeerFailed
from ..metrics import RunningSums
from ..vote import PauseVote
from .manifest import publish
from .names import Position, prune, staging_path, tidy
from .rng import rng_state, set_rng_state
from .tensors import read_model, read_part, write_all

if TYPE_CHECKING:
    from ..trainer import Trainer


def position_folder(trainer: Trainer) -> Path:
    """The folder of the checkpoint of ``trainer``'s current position (``epochs_done`` and
    ``batch``)."""
    j = trainer.j_config
    return (Path(j.checkpoint_path) /
            Position(trainer.epochs_done, trainer.batch).name(j.checkpoint_name_prefix))


def save(trainer: Trainer, vote: PauseVote, sums: RunningSums) -> Path:
    """Write the checkpoint of ``trainer``'s current position; every rank must call it at the
    same point (:meth:`ddpw.trainer.Trainer.save_checkpoint`).

    :param vote: the trainer's pause vote, whose group tells every rank whether a step failed.
    :param sums: the running sums of the epoch, which this rank's part keeps.
    :returns: the checkpoint's folder.
    :raises PeerFailed: on the ranks whose own part went well when another rank's failed,
        with that rank's error.
    """
    folder = position_folder(trainer)
    staging = staging_path(folder)
    _agree(trainer, vote, folder, lambda: _begin(trainer, staging), main_only=True)
    digests = _agree(trainer, vote, folder, lambda: _write_files(trainer, sums, staging))
    _agree(trainer, vote, folder, lambda: _publish(trainer, staging, folder, digests),
           main_only=True)
    return folder


def _agree(trainer: Trainer, vote: PauseVote, folder: Path, step: Callable[[], Any],
           main_only: bool = False) -> Any:
    """Run ``step`` (on the main rank alone with ``main_only``) and learn whether it failed
    on any rank; every rank must call it at the same point.

    :raises PeerFailed: on a rank whose step went well when another's failed, naming each
        failed rank and its error (``[Errno 28] No space left on device: PATH``, say).
    """
    result, error = None, None
    main = trainer.accelerator.is_main_process
    if main or not main_only:
        try:
            result = step()
        except Exception as caught:
            error = caught
    if vote.any_rank(error is not None, trainer.world_size):
        if main:
            shutil.rmtree(staging_path(folder), ignore_errors=True)
        # Only when a step failed: every rank learns what failed and where, so that each
        # rank's own error names the cause (a full disk, say), not merely another rank.
        reason = None if error is None else f"{type(error).__name__}: {error}"
        reasons = vote.gather(reason, trainer.world_size)
        if error is not None:
            raise error
        failed = "; ".join(f"rank {rank} failed with {why}"
                           for rank, why in enumerate(reasons) if why is not None)
        raise PeerFailed(f"checkpoint {folder} was not written: {failed}")
    return result


def _begin(trainer: Trainer, staging: Path) -> None:
    j = trainer.j_config
    tidy(j.checkpoint_path, j.checkpoint_name_prefix)
    staging.mkdir(parents=True)


def _write_files(trainer: Trainer, sums: RunningSums, staging: Path) -> dict[str, str]:
    acc = trainer.accelerator
    parts: dict[str, Any] = {
        f"rank-{trainer.global_rank}": {"rng": rng_state(trainer.device), **sums.state()}}
    if not acc.is_main_process:
        return write_all(staging, parts)
    if trainer.optimiser is not None:
        parts["optimiser"] = trainer.optimiser.state_dict()
    if trainer.scheduler is not None:
        parts["scheduler"] = trainer.scheduler.state_dict()
    if acc.scaler is not None:
        parts["scaler"] = acc.scaler.state_dict()
    parts["state"] = {
        "epochs_done": trainer.epochs_done, "batches": trainer.batch,
        "global_step": trainer.global_step, "batch_size": trainer.a_config.batch_size,
        "world_size": trainer.world_size, "data_seed": trainer.p_config.seed,
        "gradient_accumulation_steps": trainer.j_config.gradient_accumulation_steps,
        "metrics": trainer.metrics}
    return write_all(staging, parts, model=acc.unwrap_model(trainer.model))


def _publish(trainer: Trainer, staging: Path, folder: Path, digests: dict[str, str]) -> None:
    j = trainer.j_config
    publish(staging, folder, digests, {
        "prefix": j.checkpoint_name_prefix, "epochs_done": trainer.epochs_done,
        "batches": trainer.batch, "world_size": trainer.world_size,
        "platform": trainer.p_config.platform.name,
        "mixed_precision": trainer.p_config.mixed_precision})
    record = os.environ.get(environment.CHECKPOINT_RECORD)
    if record:
        jobfolder.note_checkpoint(Path(record), folder)
    if j.keep_last:
        prune(j.checkpoint_path, j.checkpoint_name_prefix, j.keep_last,
              protect=(trainer.resume_from, folder.name))


def samples_into_epoch(state: dict[str, Any]) -> int:
    """How many samples of its unfinished epoch a checkpoint's ``state`` part has consumed, over
    all ranks: what stays the same when it is resumed with another world or batch size."""
    return state["batches"] * state["batch_size"] * state["world_size"]


def restore(trainer: Trainer, name: str, sums: RunningSums) -> None:
    """Load checkpoint ``name`` into ``trainer``'s model, optimiser, scheduler, scaler, RNGs and
    position, and its running sums into ``sums``
    (:meth:`ddpw.trainer.Trainer.restore_checkpoint`).

    With the world size, batch size and gradient accumulation it was written with, this rank's
    RNG states and running sums come back as they were; with others, the RNGs are seeded from
    the seed and the position, and the batch position is converted to this run's batches.
    """
    acc, j = trainer.accelerator, trainer.j_config
    folder = Path(j.checkpoint_path) / name
    read_model(folder, acc.unwrap_model(trainer.model), trainer.device)
    if trainer.optimiser is not None and (folder / "optimiser.json").is_file():
        trainer.optimiser.load_state_dict(read_part(folder, "optimiser"))
    if trainer.scheduler is not None and (folder / "scheduler.json").is_file():
        trainer.scheduler.load_state_dict(read_part(folder, "scheduler"))
    if acc.scaler is not None and (folder / "scaler.json").is_file():
        acc.scaler.load_state_dict(read_part(folder, "scaler"))
    state = read_part(folder, "state")
    trainer.epochs_done = trainer.epoch = state["epochs_done"]
    trainer.global_step, trainer.metrics = state["global_step"], state["metrics"]
    same_run_shape = (
        (state["world_size"], state["batch_size"], state.get("gradient_accumulation_steps"))
        == (trainer.world_size, trainer.a_config.batch_size, j.gradient_accumulation_steps))
    if same_run_shape:
        rank_state = read_part(folder, f"rank-{trainer.global_rank}")  # RNGs live on the CPU
        set_rng_state(rank_state["rng"], trainer.device)
        sums.load(rank_state, trainer.device)
        trainer.batch = state["batches"]
    else:
        # Another world size or batch size: the saved RNG streams do not fit, so derive one
        # from the seed and the position; the same samples remain to be seen in the epoch.
        trainer.batch = samples_into_epoch(state) // (trainer.a_config.batch_size
                                                      * trainer.world_size)
        set_seed(trainer.p_config.seed + 7919 * trainer.epochs_done + trainer.batch,
                 device_specific=True)
        sums.clear()
