"""The pause vote: every rank learns, at the same step boundary, whether any rank was asked to
pause.

A pause is asked for on one rank (a signal of ``JobConfig.pause_signals``, or
:meth:`ddpw.trainer.Trainer.request_pause`) by setting a flag; at a step boundary the ranks sum
their flags. The flags travel on the CPU, through a gloo group when the job's own backend is
another, so that asking costs no device synchronisation; :mod:`ddpw.network` chooses that
group's network interface. The same group tells every rank why a checkpoint step failed
(:meth:`PauseVote.gather`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from . import process
from .network import gloo_group


class PauseVote:
    """One rank's side of the vote. It holds no process group until the first vote, so that a
    :class:`~ddpw.trainer.Trainer` that holds one still pickles before the job starts."""

    def __init__(self) -> None:
        #: Whether this rank has been asked to pause.
        self.requested = False
        self._group: Any = None
        #: The flags' all-reduce started at the last step boundary, not yet read.
        self._in_flight: tuple[Any, torch.Tensor] | None = None

    def request(self) -> None:
        """Ask for a pause at the next step boundary: only a flag, safe in a signal handler or
        another thread."""
        self.requested = True

    @contextlib.contextmanager
    def on_signals(self, names: Iterable[str]) -> Iterator[None]:
        """While the block runs, each signal of ``names`` (such as ``"SIGTERM"``) asks for a
        pause. Signal handlers belong to the main thread: elsewhere the signals keep their own.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            # Only a flag: the work happens at the next step boundary, where all ranks agree.
            self.requested = True
            process.note_pause_signal()

        if process.requeue_signal_came():  # SLURM's warning came while the process started
            self.requested = True

        previous = {}
        for name in names:
            sig = getattr(signal, name)
            previous[sig] = signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def agreed(self, world_size: int, overlap: bool = False) -> bool:
        """Whether any rank has been asked to pause: all ranks get the same answer at the same
        step boundary, where every rank must call it.

        With ``overlap`` (within an epoch), the answer is the all-reduce of the flags started
        at the last step boundary, and this boundary's starts without waiting: the message
        travels while the next step computes, so a step never waits for it, and a pause comes
        one step later than it could. Without (between epochs), the answer includes this very
        moment's flags.
        """
        earlier = False
        if self._in_flight is not None:
            work, value = self._in_flight
            self._in_flight = None
            work.wait()
            earlier = bool(value.item() > 0)
        if earlier or not overlap or world_size == 1:
            return earlier or self.any_rank(self.requested, world_size)
        self._in_flight = self._reduce(self.requested, wait=False)
        return False

    def settle(self) -> None:
        """Wait for the all-reduce that the last step boundary started, if any (at the end of
        training, where no boundary reads it)."""
        if self._in_flight is not None:
            self._in_flight[0].wait()
            self._in_flight = None

    def any_rank(self, flag: bool, world_size: int) -> bool:
        """Whether ``flag`` is true on any rank (every rank must call it at the same point)."""
        if world_size == 1:
            return flag
        return bool(self._reduce(flag, wait=True)[1].item() > 0)

    def gather(self, obj: Any, world_size: int) -> list[Any]:
        """Every rank's ``obj``, by rank, through the vote's group (every rank must call it at
        the same point, after :meth:`any_rank`, which makes the group)."""
        if world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, obj, group=self._group)
        return gathered

    def _reduce(self, flag: bool, wait: bool) -> tuple[Any, torch.Tensor]:
        """Start (and with ``wait``, finish) the sum of ``flag`` over the ranks; return the
        all-reduce's handle and the tensor that holds the sum once it is done."""
        if self._group is None and dist.get_backend() != "gloo":
            self._group = gloo_group()
        value = torch.tensor([float(flag)])
        work = dist.all_reduce(value, group=self._group, async_op=not wait)
        return work, value
