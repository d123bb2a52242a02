"""Rank information for code that runs on every process, and small helpers around it.

A function started with ``Wrapper(p_config).start(fn, ...)`` runs on every rank; inside it,
:func:`world` says which rank it is and gives the :class:`accelerate.Accelerator` to talk to the
others::

    from ddpw.utils import world

    def count_samples(shard: list[int]) -> int:
        w = world()
        total = w.accelerator.reduce(torch.tensor(len(shard), device=w.device),
                                     reduction="sum")
        return int(total)

A function or a script whose ranks wait for each other calls :func:`heartbeat` as it goes, so
that a rank that stops is called hung after ``PlatformConfig.hang_timeout_s`` (:mod:`ddpw.hang`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from . import goodput, hang

if TYPE_CHECKING:  # the SLURM node runner reads restartable() without importing torch
    import torch
    from accelerate import Accelerator


@dataclass(frozen=True)
class World:
    """Where the current process stands in the job.

    :param global_rank: this process's rank among all processes, 0 to ``world_size - 1``.
    :param local_rank: its rank among the processes of its node.
    :param node_rank: the rank of its node.
    :param world_size: number of processes in the job.
    :param device: the device this process computes on.
    :param accelerator: the job's :class:`accelerate.Accelerator`, for collectives
        (``reduce``, ``gather``, ``wait_for_everyone``) and device placement.
    """

    global_rank: int
    local_rank: int
    node_rank: int
    world_size: int
    device: torch.device
    accelerator: Accelerator

    @property
    def is_main(self) -> bool:
        """Whether this is global rank 0."""
        return self.global_rank == 0

    @classmethod
    def of(cls, accelerator: Accelerator) -> World:
        """The world as ``accelerator`` sees it."""
        state = accelerator.state
        # torchrun (and so accelerate launch) exports the number of processes per node; a world
        # without it is a single process or a single node.
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))
        return cls(global_rank=state.process_index, local_rank=state.local_process_index,
                   node_rank=state.process_index // max(1, per_node),
                   world_size=state.num_processes, device=accelerator.device,
                   accelerator=accelerator)


_current: World | None = None


def world() -> World:
    """The :class:`World` of the job running in this process.

    :raises RuntimeError: outside a job started by :class:`~ddpw.wrapper.Wrapper`.
    """
    if _current is None:
        raise RuntimeError("ddpw.utils.world() is only available inside a job started by "
                           "ddpw.wrapper.Wrapper.start (in the function or Trainer it runs).")
    return _current


@contextmanager
def current_world(w: World) -> Iterator[World]:
    """Make ``w`` what :func:`world` returns for the duration of the block."""
    global _current
    previous, _current = _current, w
    try:
        yield w
    finally:
        _current = previous


def heartbeat(where: str | None = None) -> None:
    """Say that this rank is alive and has done a unit of work: in a function that
    :class:`~ddpw.wrapper.Wrapper` runs, or a script under ``ddpw-launch``, on several
    processes. A rank that goes ``PlatformConfig.hang_timeout_s`` seconds without one while the
    others wait is called hung (:mod:`ddpw.hang`), once every rank has made its first (before
    that, the process group's collective timeout judges: torch's 30 minutes, or the caller's
    own); the report says where it stood. Cheap enough for every step; without a watch (one
    process, or ``hang_timeout_s=None``), it does nothing but note the first one, where the
    start-up ends in the job's goodput summary (:func:`ddpw.goodput.function_lines`).

    ::

        for step, batch in enumerate(loader):
            ...
            heartbeat(f"after step {step}")

    :param where: where the rank now is, for the report (``"after step 12"``).
    """
    goodput.heartbeat()
    hang.progress(where or "after its last heartbeat()", unit_done=True)


F = TypeVar("F", bound=Callable[..., Any])


def restartable(fn: F) -> F:
    """Mark a function as safe to start again from its beginning.

    On SLURM, a preemption or the time limit then ends the job's processes and requeues it, and
    the function runs again (it may look for work it saved itself). An unmarked function runs on
    after the warning signal, and its job is never requeued: SLURM ends it.

    ::

        @restartable
        def embed_corpus(shard_folder: str) -> int: ...
    """
    fn.__ddpw_restartable__ = True  # type: ignore[attr-defined]
    return fn


def is_trainer(target: Any) -> bool:
    """Whether ``target`` is a :class:`~ddpw.trainer.Trainer`, asked without importing the
    trainer's module, which a function's job does without: whoever made a Trainer has imported
    it."""
    module = sys.modules.get("ddpw.trainer")
    return module is not None and isinstance(target, module.Trainer)


def is_restartable(fn: Any) -> bool:
    """Whether ``fn`` was marked with :func:`restartable`."""
    return bool(getattr(fn, "__ddpw_restartable__", False))
