"""Where a :class:`~ddpw.trainer.Trainer` job's time went, across all its attempts: its goodput.

A job may take several attempts: a pause and a later resume, a SLURM requeue, an elastic
restart, a kill and a resume from the last checkpoint. The main rank (rank 0) keeps an
:class:`Account` of its own attempt, a state machine on its own clock (:func:`time.monotonic`)
in which every moment of the attempt is in exactly one part:

- ``startup``: from the launch (:data:`ddpw.environment.LAUNCH_TIME`) to the first step, less
  the restore;
- ``training``, ``validation`` (an EVALUATE job's evaluation too), ``restore``;
- ``checkpoint``: the main thread blocked in a save, a wait for one, or the last publication;
- ``other``: what follows the training until the attempt ends (after a pause or an error).

The attempt's record (its parts, the steps it started from and reached, and the training time
at each checkpoint it saved) goes to ``{training_logs_path}/goodput-{job}.json``, rewritten
atomically at every checkpoint, at most once a second at step boundaries, and at the end; so a
killed attempt's record is at most about a second stale, and its unseen tail falls into the
wait before the next attempt. The file holds every attempt's record and the :func:`summary`,
whose parts add up to the wall time by construction: the attempts' parts, the waits between
them, and ``lost``, the training time of steps that a later attempt recomputed (it resumed from
a checkpoint before the step that the earlier attempt had reached), taken out of ``training``.

Attempts are tied into one job by the run id that checkpoints keep
(``Tracking.identity["run"]``), or, for a restart from scratch, by the launch id
(:data:`ddpw.environment.LAUNCH_ID`: the SLURM job's id across its requeues, one id per launch
across an elastic job's restarts). The other ranks keep nothing: no collective is added.

A function or a script has two parts, from its main rank's clock: its start-up, from the launch
to its first :func:`ddpw.utils.heartbeat` (or to its start), and its run
(:func:`function_times`), which the process that launched it prints (:func:`function_lines`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import environment
from .files import write_atomically

#: The parts of an attempt, in the order they are shown.
PARTS = ("startup", "training", "validation", "checkpoint", "restore", "other")

#: The least time between two writes of the record at step boundaries, in seconds.
WRITE_EVERY_S = 1.0


def launch_environment(launch_id: str | None = None) -> dict[str, str]:
    """The variables that tell a launch's processes when, and as which launch, they started:
    now, and ``launch_id`` (a new random id by default)."""
    return {environment.LAUNCH_ID: launch_id or secrets.token_hex(6),
            environment.LAUNCH_TIME: repr(time.time())}


class Account:
    """Rank 0's account of one attempt of a job; inert on the other ranks and until
    :meth:`open`."""

    def __init__(self) -> None:
        #: The job's ``training_logs_path``, and the job's file in it once :meth:`begin` ran.
        self.folder: Path | None = None
        self.path: Path | None = None
        #: This attempt's record; empty off the main rank, where the account is inert (and
        #: written nowhere until :meth:`begin`).
        self.record: dict[str, Any] = {}
        self.earlier: list[dict[str, Any]] = []
        self.part, self._since, self._written, self._trained = "startup", 0.0, 0.0, False
        self._warned = False

    def open(self, main: bool, folder: str) -> None:
        """Start the account on the main rank, at the launch (now, without one) and in
        ``startup`` until then; ``folder`` is the job's ``training_logs_path``."""
        if not main:
            return
        now = time.time()
        self._since = time.monotonic()
        launched = float(os.environ.get(environment.LAUNCH_TIME, now))
        start = min(launched, now)
        self.folder = Path(folder).absolute()
        self.record = {"run": None, "launch": os.environ.get(environment.LAUNCH_ID),
                       "resumed_from": None, "start": start, "end": now, "ended": "running",
                       "start_step": 0, "end_step": 0, "end_training_s": 0.0, "marks": {},
                       "seconds": {**dict.fromkeys(PARTS, 0.0), "startup": now - start}}

    def begin(self, run: str | None, resumed_from: str | None, step: int) -> None:
        """Tie the attempt to its job: the run ``run`` that the checkpoint ``resumed_from``
        (at optimiser step ``step``) kept, or this launch; write the first record."""
        if not self.record:
            return
        record = self.record
        record.update(run=run, resumed_from=resumed_from, start_step=step, end_step=step)
        record["marks"] = {str(step): 0.0}
        found = _find_job(self.folder, run if resumed_from is not None else None,
                          record["launch"])
        job = run or secrets.token_hex(6)
        if found is not None:
            job, self.earlier = found["job"], found["attempts"]
            # An elastic restart keeps its launch's time: it began when the last attempt ended.
            late = min(max(0.0, self.earlier[-1]["end"] - record["start"]),
                       record["seconds"]["startup"])
            record["start"] += late
            record["seconds"]["startup"] -= late
        self.path = self.folder / f"goodput-{job}.json"
        self._write()

    @contextlib.contextmanager
    def phase(self, part: str) -> Iterator[None]:
        """Count the block's time as ``part``, then go back to the part before it (``other``
        once training or evaluation began: start-up is over then)."""
        before = self.part
        self._switch(part)
        try:
            yield
        finally:
            self._trained = self._trained or part in ("training", "validation")
            self._switch("other" if before == "startup" and self._trained else before)

    def mark(self, step: int) -> None:
        """Note the training time at optimiser step ``step``, where a checkpoint is saved."""
        if self.path is not None:
            self._switch(self.part)
            self.record["marks"][str(step)] = self.record["seconds"]["training"]
            self.step_done(step, write=True)

    def step_done(self, step: int, write: bool = False) -> None:
        """Note that optimiser step ``step`` is done; write the record if a second passed."""
        if self.path is None:
            return
        self._switch(self.part)
        record = self.record
        record["end_step"], record["end_training_s"] = step, record["seconds"]["training"]
        if write or self._since - self._written >= WRITE_EVERY_S:
            self._write()

    def end(self, ended: str, blocked_s: float | None = None,
            paces: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """End the attempt (``completed``, ``paused`` or ``failed``) with the seconds that
        the checkpointer measured it blocked and every rank's pace (:func:`ddpw.stragglers.
        report`); return the job's summary (``None`` off rank 0)."""
        if self.path is None:
            return None
        self._switch(self.part)
        self.record.update(ended=ended, checkpointer_blocked_s=blocked_s, stragglers=paces)
        return self._write()

    def _switch(self, part: str) -> None:
        if not self.record:
            return
        now = time.monotonic()
        seconds = self.record["seconds"]
        seconds[self.part] += now - self._since
        self.part, self._since = part, now
        self.record["end"] = self.record["start"] + sum(seconds.values())

    def _write(self) -> dict[str, Any]:
        self._written = self._since
        attempts = [*self.earlier, self.record]
        totals = summary(attempts)
        data = {"job": self.path.stem.removeprefix("goodput-"), "summary": totals,
                "attempts": attempts}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomically(self.path, json.dumps(data, indent=1).encode())
        except OSError as error:  # an account is no reason to stop training (a full disk)
            if not self._warned:
                print(f"[ddpw] could not write {self.path}: {error}", file=sys.stderr)
            self._warned = True
        return totals


def _find_job(folder: Path, run: str | None, launch: str | None) -> dict[str, Any] | None:
    """The job in ``folder`` that an attempt of run ``run`` (resumed) or of launch ``launch``
    (restarted from scratch, after an unfinished attempt) goes on."""
    for path in sorted(folder.glob("goodput-*.json")):
        try:
            job = json.loads(path.read_text())
            last = job["attempts"][-1]
            runs = {attempt["run"] for attempt in job["attempts"]}
            if (run is not None and run in runs) or (launch is not None and last["launch"] ==
                                                     launch and last["ended"] != "completed"):
                return job
        except (OSError, ValueError, LookupError, TypeError):  # not a record of this ddpw's
            continue
    return None


def summary(attempts: list[dict[str, Any]]) -> dict[str, Any]:
    """The parts of a job of ``attempts`` (in order) over all of them, in seconds.

    ``training`` is productive training: the training time of steps that a later attempt
    recomputed is ``lost`` instead (``lost_steps`` of them); ``waiting`` is the time between
    attempts. ``goodput_percent`` is training over the wall time; ``held_goodput_percent``,
    over the time the job held its processes (the wall time less the waiting).
    """
    parts = {**dict.fromkeys(PARTS, 0.0), "lost": 0.0, "waiting": 0.0}
    lost_steps = 0
    for k, attempt in enumerate(attempts):
        for part in PARTS:
            parts[part] += attempt["seconds"][part]
        if k:
            parts["waiting"] += max(0.0, attempt["start"] - attempts[k - 1]["end"])
        if k + 1 < len(attempts):
            # Steps past the earliest step that any later attempt went back to were redone.
            back_to = min(later["start_step"] for later in attempts[k + 1:])
            kept = min(max(back_to, attempt["start_step"]), attempt["end_step"])
            lost_steps += attempt["end_step"] - kept
            lost = max(0.0, attempt["end_training_s"] - _training_at(attempt, kept))
            parts["lost"] += lost
            parts["training"] -= lost
    wall = sum(parts.values())
    held = wall - parts["waiting"]
    return {"wall_s": wall, "attempts": len(attempts), "lost_steps": lost_steps,
            "goodput_percent": 100 * parts["training"] / wall if wall > 0 else 0.0,
            "held_goodput_percent": 100 * parts["training"] / held if held > 0 else 0.0,
            "seconds": parts}


def _training_at(attempt: dict[str, Any], step: int) -> float:
    """An attempt's training time at optimiser step ``step``: noted at its checkpoints, and
    between them (a checkpoint of an earlier attempt) in proportion to the steps."""
    known = sorted((int(s), t) for s, t in attempt["marks"].items())
    known.append((attempt["end_step"], attempt["end_training_s"]))
    below = max((m for m in known if m[0] <= step), default=known[0])
    above = min((m for m in known if m[0] >= step), default=known[-1])
    if above[0] == below[0]:
        return below[1]
    return below[1] + (above[1] - below[1]) * (step - below[0]) / (above[0] - below[0])


def lines(totals: dict[str, Any]) -> str:
    """The summary as a few lines for the console."""
    s, n = totals["seconds"], totals["attempts"]
    return "\n".join((
        f"[ddpw] goodput {totals['goodput_percent']:.1f}%: training {s['training']:.1f} s of "
        f"{totals['wall_s']:.1f} s over {n} attempt{'s' if n > 1 else ''} "
        f"({totals['held_goodput_percent']:.1f}% of the {totals['wall_s'] - s['waiting']:.1f} s "
        f"that the processes ran)",
        f"[ddpw]   start-up {s['startup']:.1f} s, validation {s['validation']:.1f} s, "
        f"checkpoints {s['checkpoint']:.1f} s, restores {s['restore']:.1f} s, "
        f"other {s['other']:.1f} s",
        f"[ddpw]   lost {s['lost']:.1f} s ({totals['lost_steps']} steps recomputed), "
        f"waiting between attempts {s['waiting']:.1f} s"))


def tracked(totals: dict[str, Any]) -> dict[str, float]:
    """The summary as the trackers' ``goodput/...`` values."""
    return {"goodput/percent": totals["goodput_percent"],
            "goodput/held_percent": totals["held_goodput_percent"],
            "goodput/wall_s": totals["wall_s"], "goodput/attempts": totals["attempts"],
            "goodput/lost_steps": totals["lost_steps"],
            **{f"goodput/{part}_s": v for part, v in totals["seconds"].items()}}


# --- functions and scripts ------------------------------------------------------------------------

#: When this process's function or script first called :func:`ddpw.utils.heartbeat`.
_first_heartbeat: float | None = None


def heartbeat() -> None:
    """Note this process's first heartbeat: where a function's or script's start-up ends."""
    global _first_heartbeat
    if _first_heartbeat is None:
        _first_heartbeat = time.time()


def function_times(started: float) -> dict[str, float | None]:
    """The times, now at its end, of a function or script that began at ``started``: its
    launch, its first heartbeat (``None`` without one) and its end; then forget the heartbeat
    (a world of one runs in the caller's process, which may run another)."""
    global _first_heartbeat
    ended, first, _first_heartbeat = time.time(), _first_heartbeat, None
    if first is not None and first < started:  # an earlier function's, which failed
        first = None
    launched = min(float(os.environ.get(environment.LAUNCH_TIME, started)), started)
    return {"launch": launched, "started": started, "heartbeat": first, "ended": ended}


def function_lines(times: dict[str, float | None]) -> str:
    """A function's or script's summary for the console: its start-up, from the launch to its
    first heartbeat (or, without one, to its start), and its run, from there to its end."""
    began = times["heartbeat"] or times["started"]
    wall, run = times["ended"] - times["launch"], times["ended"] - began
    until = "its first heartbeat()" if times["heartbeat"] else "its start"
    return (f"[ddpw] goodput {100 * run / wall if wall > 0 else 0.0:.1f}%: run {run:.1f} s "
            f"of {wall:.1f} s (start-up {began - times['launch']:.1f} s, from the launch to "
            f"{until})")
