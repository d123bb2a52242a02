"""A slow rank is named while the job runs: which one, on which machine, in which phase.

In a job of several processes every rank waits for the slowest at each synchronisation, so one
slow GPU, a throttled node or a busy neighbour slows them all, and nothing says which. Each
rank times its own work in every step (:mod:`ddpw.pace`); the hang watch publishes the medians
of its last steps with its beat, about once a second (:mod:`ddpw.hang`); rank 0's watch thread
compares them here. No collective is added to the steps.

**The rule.** A rank's window is its last :data:`~ddpw.pace.WINDOW` steps, or all those of its
last :data:`~ddpw.pace.SPAN_S` seconds where they are more. A rank *looks slow* when the median
time of one of its phases over its window is at least :data:`RATIO` times the median of the
other ranks' medians of that phase, and the difference is at least :data:`FLOOR` of the median
step, so that a phase too short to matter (a fast data loader) is never named for its noise.
It is named once it looks slow at two judgements in a row, with steps done in between (about
a second apart: a busy machine slows one rank for a moment, a straggler for good), with the
phase that it loses most time in:

    [ddpw] rank 1 (node3) is slow: train_step takes 2.8x the median of the other 7 ranks over
    its last 10 steps (152.0 ms against 54.3 ms a step); every rank waits for it

It has *recovered* when no phase is even :data:`RECOVERED` times the others' (with the same
floor), which is said once too. Medians, not means, so that a single stall (a page fault, a
garbage collection) is not a straggler. A rank's scores over the whole job go into the job's
report (:func:`report`).
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from . import pace

if TYPE_CHECKING:
    from .platform import PlatformConfig

#: How many times the others' median a rank's phase must take to be slow, and below which it
#: has recovered.
RATIO, RECOVERED = 1.5, 1.2
#: The smallest difference from the others that counts, as a share of the median step.
FLOOR = 0.05


class Judge:
    """Rank 0's view of every rank's pace, fed with the beats that its hang watch reads."""

    def __init__(self) -> None:
        self.slow: dict[int, str] = {}
        #: The ranks that looked slow at the last judgement, and their steps then.
        self.suspects: dict[int, int] = {}
        #: Every naming and recovery, as the report keeps them.
        self.events: list[dict[str, Any]] = []
        #: The last beat's pace and host of every rank.
        self.last: dict[int, tuple[dict[str, Any], str]] = {}
        self._lock = threading.Lock()

    def observe(self, beats: list[dict[str, Any]]) -> None:
        """Judge the ranks on their last beats; say what changed."""
        with self._lock:
            for rank, beat in enumerate(beats):
                if beat.get("pace"):
                    self.last[rank] = (beat["pace"], beat["host"])
            worst = self._worst(RATIO)
            for rank, (phase, mine, others, k) in worst.items():
                steps = self.last[rank][0]["steps"]
                if rank not in self.slow and self.suspects.get(rank, steps) < steps:
                    self._say("slow", rank, phase, mine, others, k)
            self.suspects = {rank: self.suspects.get(rank, self.last[rank][0]["steps"])
                             for rank in worst}
            recovered = [rank for rank in self.slow if rank not in self._worst(RECOVERED)]
            for rank in recovered:
                self._say("recovered", rank, self.slow[rank], *self._phase(rank, self.slow[rank]))

    def _worst(self, ratio: float) -> dict[int, tuple[str, float, float, int]]:
        """The ranks whose phase is ``ratio`` times the others', each with the phase of the
        largest difference: ``{rank: (phase, its median, the others', how many others)}``."""
        judged = {rank: p for rank, (p, _) in self.last.items() if p["window"] >= pace.WINDOW}
        if len(judged) < 2:
            return {}
        step = statistics.median(p["medians"][-1] for p in judged.values())
        found = {}
        for rank in judged:
            worst = None
            for phase in judged[rank]["compared"]:
                mine, others, k = self._phase(rank, phase)
                if mine >= ratio * others and mine - others >= FLOOR * step and (
                        worst is None or mine - others > worst[1] - worst[2]):
                    worst = (phase, mine, others, k)
            if worst is not None:
                found[rank] = worst
        return found

    def _phase(self, rank: int, phase: str) -> tuple[float, float, int]:
        """Rank ``rank``'s median of ``phase``, the median of the other judged ranks' medians,
        and how many those are."""
        i = pace.PHASES.index(phase)
        others = [p["medians"][i] for other, (p, _) in self.last.items()
                  if other != rank and p["window"] >= pace.WINDOW]
        return self.last[rank][0]["medians"][i], statistics.median(others), len(others)

    def _say(self, event: str, rank: int, phase: str, mine: float, others: float,
             k: int) -> None:
        p, host = self.last[rank]
        ratio = mine / others if others > 0 else float("inf")
        ranks = f"the other {k} rank{'s' if k > 1 else ''}"
        if event == "slow":
            self.slow[rank] = phase
            line = (f"rank {rank} ({host}) is slow: {phase} takes {ratio:.1f}x the median of "
                    f"{ranks} over its last {p['window']} steps ({mine * 1e3:.1f} ms against "
                    f"{others * 1e3:.1f} ms a step); every rank waits for it")
        else:
            del self.slow[rank]
            line = (f"rank {rank} ({host}) has recovered: {phase} takes {ratio:.1f}x the median "
                    f"of {ranks} over its last {p['window']} steps")
        self.events.append({"event": event, "rank": rank, "host": host, "phase": phase,
                            "ratio": ratio, "seconds": mine, "others_seconds": others,
                            "step": p["steps"], "time": time.time(), "message": line})
        _print(f"[ddpw] {line}")

    def scores(self) -> list[dict[str, Any]]:
        """Every rank's pace over its whole job (as of its last beat): the mean seconds a step
        of each phase, of the wall time and of waiting for the others; ``score``, its own
        work's time a step against the median rank's (1.0 for a typical rank; 2.0 for a rank
        twice as slow)."""
        with self._lock:
            ranks = []
            for rank, (p, host) in sorted(self.last.items()):
                steps = max(p["steps"], 1)
                means = dict(zip((*pace.PHASES, "wall"), (t / steps for t in p["totals"]),
                                 strict=True))
                own = sum(means[phase] for phase in p["compared"])
                ranks.append({"rank": rank, "host": host, "steps": p["steps"],
                              "seconds_per_step": {**means, "waiting": means["wall"] - sum(
                                  means[phase] for phase in pace.PHASES)}, "own": own})
            typical = statistics.median(r["own"] for r in ranks) if ranks else 0.0
            for r in ranks:
                r["score"] = r.pop("own") / typical if typical > 0 else 1.0
            return ranks


def _print(line: str) -> None:
    # Through tqdm, which clears and redraws this process's progress bar around the line.
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stderr)
    sys.stderr.flush()


_judge: Judge | None = None


def start(rank_pace: pace.Pace, model: Any, device: Any, p_config: PlatformConfig,
          rank: int) -> None:
    """Time this rank's steps (:meth:`ddpw.pace.Pace.attach`) and, on rank 0, judge every
    rank's, when a hang watch runs (a world of several processes)."""
    global _judge
    judge = Judge() if rank == 0 else None
    rank_pace.attach(model, device, p_config.strategy,
                     judge.observe if judge is not None else None)
    _judge = judge if rank_pace.active else None


def report() -> dict[str, Any] | None:
    """On rank 0 of a judged job: every rank's scores (:meth:`Judge.scores`) and every naming
    and recovery; ``None`` elsewhere."""
    if _judge is None:
        return None
    return {"ranks": _judge.scores(), "events": list(_judge.events),
            "rule": {"ratio": RATIO, "recovered": RECOVERED, "window": pace.WINDOW,
                     "span_s": pace.SPAN_S, "floor": FLOOR}}
