"""How long each rank spends on its own share of every training step, apart from the time it
waits for the others: what :mod:`ddpw.stragglers` compares across ranks.

A step (one batch, with gradient accumulation too) has four phases of a rank's own work:

- ``data``: loading the batch (Accelerate's loader, the copy to the device included);
- ``train_step``: :meth:`~ddpw.trainer.Trainer.train_step`, the forward pass and the loss;
- ``backward``: the backward pass up to the gradient synchronisation: under DDP, until the last
  bucket of gradients is ready to be all-reduced (a communication hook notes when; DDP's
  all-reduce of the buffers before the forward pass is left out of ``train_step`` in the
  same way);
- ``optimiser``: the optimiser and scheduler steps.

What is left of the step's wall time is waiting for the other ranks (the end of the all-reduce,
the pause vote). A rank that is slow in its own work makes every other rank wait there, and
only there, so its phases stand out against theirs. On a CUDA device the marks are CUDA events,
read a few steps later once the device has passed them, so that timing never makes the host
wait for the device: the phases are then the device's time.

Some collectives run inside a phase, where waiting cannot be told from work: FSDP's gathers
and reductions (in ``train_step`` and ``backward``), and synchronised batch norm (in
``train_step``). Those phases are timed but not compared (:attr:`Pace.compared`).

Each rank keeps the phases of its last :data:`WINDOW` steps; the hang watch's thread publishes
their statistics with its beat (:mod:`ddpw.hang`), so no collective is added to the steps. Only a
world of several processes with a hang watch (``PlatformConfig.hang_timeout_s``) is timed.
"""

from __future__ import annotations

import bisect
import collections
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from . import hang

#: The phases of a step, in order; ``wall`` is the whole step, waiting included.
PHASES = ("data", "train_step", "backward", "optimiser")
#: How many of a rank's last steps its window holds at least, and over how many of the last
#: seconds at least.
WINDOW, SPAN_S = 10, 1.0
#: The most steps that a rank keeps.
KEPT = 4096


class Pace:
    """One rank's step timings. The trainer marks where each phase begins (:meth:`mark`); the
    hang watch's thread reads :meth:`published`. It holds nothing of torch until
    :meth:`attach`, so that a Trainer still pickles before the job starts."""

    def __init__(self) -> None:
        self.active = False
        #: The phases that :mod:`ddpw.stragglers` compares across ranks for this model.
        self.compared: tuple[str, ...] = PHASES
        self.steps = 0
        #: Each finished step's ``(data, train_step, backward, optimiser, wall)``, in seconds,
        #: and when it ended (:func:`time.monotonic`).
        self.window: collections.deque[tuple[float, ...]] = collections.deque(maxlen=KEPT)
        #: The sum of each over every step of this process.
        self.totals = [0.0] * (len(PHASES) + 1)
        self._cuda = False
        self._marks: dict[str, Any] = {}
        self._pending: collections.deque[dict[str, Any]] = collections.deque()

    def attach(self, model: torch.nn.Module, device: torch.device, strategy: str,
               observer: Callable[[list[dict[str, Any]]], None] | None = None) -> None:
        """Time this rank's steps from now on, if a hang watch publishes them (a world of
        several processes); ``model``: as prepared, for DDP's hooks; ``observer``: who reads
        every rank's beats on rank 0 (:func:`ddpw.hang.carry`)."""
        if not hang.carry(self.published, observer):
            return
        self.active, self._cuda = True, device.type == "cuda"
        from torch.nn.parallel import DistributedDataParallel

        synchronised = any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
        if strategy == "fsdp":
            self.compared = ("data", "optimiser")
        elif synchronised:
            self.compared = ("data", "backward", "optimiser")
        compiled = getattr(model, "_orig_mod", None)  # torch.compile's wrapper, around DDP's
        ddp = compiled if compiled is not None else model
        if isinstance(ddp, DistributedDataParallel):
            self._hook(ddp, forward=compiled is None)
        else:  # no all-reduce of DDP's to stop the backward pass's time at
            self._uncompare("backward")

    def _hook(self, model: torch.nn.Module, forward: bool) -> None:
        """Note when DDP hands each bucket of gradients to its all-reduce and, with
        ``forward``, how long its forward pass spends before the model's (all-reducing the
        buffers; not in a compiled model, where the hooks would break the graph)."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        # No annotations: DDP checks them against its own types, which these would be the
        # strings of (postponed annotations).
        def ready(group, bucket):
            self._marks["ready"] = self._now()
            return allreduce_hook(group, bucket)

        try:
            model.register_comm_hook(model.process_group, ready)
        except RuntimeError:  # the user's own hook: the backward pass includes the wait
            self._uncompare("backward")
        if forward:
            model.register_forward_pre_hook(lambda *_: self._note("forward"))
            model.module.register_forward_pre_hook(lambda *_: self._note("model"))

    def _uncompare(self, phase: str) -> None:
        self.compared = tuple(p for p in self.compared if p != phase)

    def _note(self, name: str) -> None:
        if self.active:
            self._marks[name] = self._now()

    def mark(self, phase: str, where: str, unit_done: bool = False) -> None:
        """This rank begins ``phase`` (one of :data:`PHASES`, or ``"end"`` when the step is
        done) and is ``where``, as :func:`ddpw.hang.progress` says (which this calls)."""
        hang.progress(where, unit_done)
        if not self.active:
            return
        self._marks[phase] = self._now()
        if phase == "end":
            if "data" in self._marks and "train_step" in self._marks:
                self._pending.append(self._marks)
            self._marks = {}
            self._settle()

    def _now(self) -> Any:
        if not self._cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _settle(self) -> None:
        """Turn the marks of the steps that are over (on the device too) into phases."""
        while self._pending and (not self._cuda or self._pending[0]["end"].query()):
            marks = self._pending.popleft()
            span = _elapsed if self._cuda else _difference
            backward_end = marks.get("ready", marks["optimiser"])
            waited = (span(marks["forward"], marks["model"])
                      if "forward" in marks and "model" in marks else 0.0)
            phases = (span(marks["data"], marks["train_step"]),
                      span(marks["train_step"], marks["backward"]) - waited,
                      span(marks["backward"], backward_end),
                      span(marks["optimiser"], marks["end"]),
                      span(marks["data"], marks["end"]))
            self.window.append((*phases, time.monotonic()))
            self.totals = [total + value for total, value in zip(self.totals, phases,
                                                                 strict=True)]
            self.steps += 1

    def published(self) -> dict[str, Any]:
        """What the hang watch's thread publishes of this rank's pace: over its window, the
        median and the lower quartile of each phase and of the wall time; how many steps the
        window holds; every step's totals; and the phases compared."""
        kept = tuple(self.window)  # one C call: the main thread's appends cannot interleave
        since = time.monotonic() - SPAN_S
        recent = bisect.bisect_left(kept, since, key=lambda step: step[-1])
        window = kept[min(recent, max(len(kept) - WINDOW, 0)):]
        columns = [sorted(step[i] for step in window) for i in range(len(PHASES) + 1)]
        return {"medians": [statistics.median(c) for c in columns] if window else [],
                "quartiles": [c[len(c) // 4] for c in columns] if window else [],
                "window": len(window), "steps": self.steps, "totals": list(self.totals),
                "compared": list(self.compared)}


def _difference(start: float, end: float) -> float:
    return end - start


def _elapsed(start: torch.cuda.Event, end: torch.cuda.Event) -> float:
    return start.elapsed_time(end) / 1000.0
