"""A slow rank is named while the job runs: which one, on which machine, in which phase.

In a job of several processes every rank waits for the slowest at each synchronisation, so one
slow GPU, a throttled node or a busy neighbour slows them all, and nothing says which. Each
rank times its own work in every step (:mod:`ddpw.pace`); the hang watch publishes the medians
of its last steps with its beat, about once a second (:mod:`ddpw.hang`); rank 0's watch thread
compares them here. No collective is added to the steps.

**The rule.** A rank's window is its last :data:`~ddpw.pace.WINDOW` steps, or all those of its
last :data:`~ddpw.pace.SPAN_S` second where they are more. A rank is *slow* when, in one of its
phases, the lower quartile of its window is at least :data:`RATIO` times the median of the
other ranks' medians (three quarters of its last steps were that slow: a busy machine slows a
rank now and then, a straggler all the time), and its median is at least :data:`FLOOR` of the
median step longer than theirs (a phase too short to matter, such as a fast data loader, is
never named for its noise). It is named once, with the phase that it loses most time in:

    [ddpw] rank 1 (node3) is slow: train_step takes 2.8x the median of the other 7 ranks over
    its last 10 steps (152.0 ms against 54.3 ms a step); every rank waits for it

It has *recovered* when, in every phase, its median is less than :data:`RECOVERED` times the
others' (or within the floor), which is said once too. A rank's scores over the whole job go
into the job's report (:func:`report`).
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, NamedTuple

from . import pace

if TYPE_CHECKING:
    from .platform import PlatformConfig

#: How many times the others' median a rank's phase must take to be slow, and below which it
#: has recovered.
RATIO, RECOVERED = 1.5, 1.2
#: The smallest difference from the others that counts, as a share of the median step.
FLOOR = 0.05


class Phase(NamedTuple):
    """One phase of a rank's window against the other ranks'."""

    name: str
    #: Its median and lower quartile over the rank's window, in seconds.
    median: float
    quartile: float
    #: The median of the other ranks' medians, and how many ranks those are.
    others: float
    count: int


class Judge:
    """Rank 0's view of every rank's pace, fed with the beats that its hang watch reads."""

    def __init__(self) -> None:
        self.slow: dict[int, str] = {}
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
            judged = [rank for rank, (p, _) in self.last.items() if p["window"] >= pace.WINDOW]
            if len(judged) < 2:
                return
            floor = FLOOR * statistics.median(self.last[r][0]["medians"][-1] for r in judged)
            for rank in judged:
                phases = [self._phase(rank, name, judged)
                          for name in self.last[rank][0]["compared"]]
                if rank not in self.slow:
                    slow = [p for p in phases
                            if p.quartile >= RATIO * p.others and p.median - p.others >= floor]
                    if slow:
                        self._say("slow", rank, max(slow, key=lambda p: p.median - p.others))
                elif all(p.median < RECOVERED * p.others or p.median - p.others < floor
                         for p in phases):
                    self._say("recovered", rank,
                              next(p for p in phases if p.name == self.slow[rank]))

    def _phase(self, rank: int, name: str, judged: list[int]) -> Phase:
        """Rank ``rank``'s phase ``name`` against the other ``judged`` ranks'."""
        i = pace.PHASES.index(name)
        mine = self.last[rank][0]
        others = [self.last[other][0]["medians"][i] for other in judged if other != rank]
        return Phase(name, mine["medians"][i], mine["quartiles"][i],
                     statistics.median(others), len(others))

    def _say(self, event: str, rank: int, phase: Phase) -> None:
        p, host = self.last[rank]
        ratio = phase.median / phase.others if phase.others > 0 else float("inf")
        ranks = f"the other {phase.count} rank{'s' if phase.count > 1 else ''}"
        if event == "slow":
            self.slow[rank] = phase.name
            line = (f"rank {rank} ({host}) is slow: {phase.name} takes {ratio:.1f}x the median "
                    f"of {ranks} over its last {p['window']} steps ({phase.median * 1e3:.1f} ms "
                    f"against {phase.others * 1e3:.1f} ms a step); every rank waits for it")
        else:
            del self.slow[rank]
            line = (f"rank {rank} ({host}) has recovered: {phase.name} takes {ratio:.1f}x the "
                    f"median of {ranks} over its last {p['window']} steps")
        self.events.append({"event": event, "rank": rank, "host": host, "phase": phase.name,
                            "ratio": ratio, "seconds": phase.median,
                            "others_seconds": phase.others, "step": p["steps"],
                            "time": time.time(), "message": line})
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
    """On rank 0 of a job whose steps were timed: every rank's scores (:meth:`Judge.scores`),
    every naming and recovery, and the rule's numbers; ``None`` elsewhere."""
    if _judge is None or not any(p["steps"] for p, _ in _judge.last.values()):
        return None  # not a training job, or one that had no step to time
    return {"ranks": _judge.scores(), "events": list(_judge.events),
            "rule": {"ratio": RATIO, "recovered": RECOVERED, "window": pace.WINDOW,
                     "span_s": pace.SPAN_S, "floor": FLOOR}}


def line(paces: dict[str, Any] | None) -> str | None:
    """The line that the job's summary adds for the ranks named slow in ``paces``
    (:func:`report`), with their scores; ``None`` when none was."""
    named = sorted({e["rank"] for e in paces["events"] if e["event"] == "slow"}) if paces else []
    if not named:
        return None
    ranks = {r["rank"]: r for r in paces["ranks"]}
    said = [f"rank {rank} ({ranks[rank]['host']}, score {ranks[rank]['score']:.2f})"
            for rank in named if rank in ranks]
    return (f"[ddpw]   slow while it ran: {', '.join(said)}; a score is a rank's own work a "
            f"step against the median rank's")
