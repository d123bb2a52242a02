"""What the Performance page shows: a section per bench row (the launch row's cases of several
machines make one of their own), the goals that the issues set on ddpw's ratios to the
baselines, and how the results read (which are ddpw's, a checkpoint case's model size, a value).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Result

X = "\N{MULTIPLICATION SIGN}"


@dataclasses.dataclass(frozen=True)
class Section:
    """A part of the page: the results of one bench row (or of some of its cases).

    :param title: the heading, also the figure's name (lower case, ``-`` for spaces).
    :param row: the bench row whose results it shows.
    :param takes: which of the row's cases it shows (all when ``None``).
    :param by_size: the cases differ by a model size (``10M``): a panel per kind of case, a bar
        per size.
    :param headline: the ddpw variants that the summary speaks of (each of them when ``None``).
    """

    title: str
    row: str
    takes: Callable[[str], bool] | None = None
    by_size: bool = False
    headline: tuple[str, ...] | None = None

    @property
    def name(self) -> str:
        return "performance-" + self.title.lower().replace(" ", "-")

    def holds(self, result: Result) -> bool:
        return result.row == self.row and (self.takes is None or self.takes(result.case))


def _machines(case: str) -> bool:
    return bool(re.match(r"\d+ machines", case))


SECTIONS = (
    Section("Launch", "launch", lambda case: not _machines(case)),
    Section("Several machines", "launch", _machines),
    Section("Training", "training"),
    Section("Compile", "compile", headline=("ddpw Trainer, torch_compile",)),
    Section("Checkpoint", "checkpoint", by_size=True),
    Section("Resume", "resume"),
    Section("Sharding", "sharding", headline=(
        "ddpw, strategy='fsdp'", "ddpw save (sync)", "ddpw save (async): blocked",
        "ddpw restore (hash-checked)")),
    Section("SLURM", "slurm"),
    Section("Sweeps", "sweep"),
    Section("Original ddpw", "original ddpw"),
)


@dataclasses.dataclass(frozen=True)
class Goal:
    """A bound an issue set on a ddpw variant's ratio to its case's baseline.

    :param row: the bench row.
    :param case: a regular expression that the start of the case matches.
    :param variants: the ddpw variants it bounds.
    :param limit: the ratio: at most this for times and bytes, at least this for rates.
    :param metric: the unit it bounds, where the case has several (any when ``None``).
    """

    row: str
    case: str
    variants: tuple[str, ...]
    limit: float
    metric: str | None = None

    def bounds(self, result: Result) -> bool:
        return (result.row == self.row and result.variant in self.variants
                and self.metric in (None, result.metric)
                and re.match(self.case, result.case) is not None)

    def met(self, result: Result) -> bool:
        assert result.ratio is not None
        return (result.ratio >= self.limit if result.higher_is_better
                else result.ratio <= self.limit)

    def said(self, result: Result) -> str:
        """``≤ 1.05x`` (``≥`` for rates)."""
        return f"{'≥' if result.higher_is_better else '≤'} {self.limit:g}{X}"


LAUNCHERS = ("ddpw Wrapper.start", "ddpw-launch")
ASYNC = "ddpw save_checkpoint (async): blocked"
RESUMED = "ddpw Trainer (start_at='latest')"
SHARDED = ("ddpw, strategy='fsdp'",)  # not the variants with other allocator settings
GOALS = (
    # Issue 32 (stragglers): timing every step costs at most 1% of the steps per second.
    Goal("training", r".*cost of the step timing", ("ddpw Trainer",), 0.99),
    # Issue 7 (the bench): launch within 5% of accelerate launch, training at least 0.98.
    Goal("launch", r"2 processes", LAUNCHERS, 1.05),
    Goal("training", r"", ("ddpw Trainer",), 0.98),
    # Issue 13 (the light import): a world of one, --help and a SLURM job's first step.
    Goal("launch", r"1 process", ("ddpw Wrapper.start",), 1.05),
    Goal("launch", r"command start-up", ("ddpw-launch --help",), 1.5),
    Goal("slurm", r".*submit to first step", ("ddpw Wrapper.start",), 1.05),
    # Issue 14 (checkpoints): sync saves, verified loads, async saves, memory and resumes.
    Goal("checkpoint", r"save \d+M", ("ddpw save_checkpoint (sync)",), 1.0),
    Goal("checkpoint", r"load \d+M", ("ddpw restore_checkpoint (hash-checked)",), 0.5),
    Goal("checkpoint", r"async save, time blocked", (ASYNC,), 0.1),
    Goal("checkpoint", r"async save against a copy", (ASYNC,), 1.5),
    Goal("checkpoint", r"steps/s", ("ddpw save_checkpoint (async)",), 0.95),
    Goal("checkpoint", r"async save, extra host memory", ("ddpw: peak with saves - without",),
         1.0),
    Goal("checkpoint", r"resume to first step", (RESUMED,), 1.0),
    Goal("resume", r"", (RESUMED,), 1.0),
    # Issue 30 (sharding): the Trainer's FSDP against the same loop by hand with fully_shard.
    Goal("sharding", r"train", SHARDED, 0.95, "samples/s"),
    Goal("sharding", r"train", SHARDED, 1.05, "MiB"),
    # ... and its checkpoints against torch's distributed checkpoint (DCP).
    Goal("sharding", r"save", ("ddpw save (sync)",), 1.0),
    Goal("sharding", r"async save", ("ddpw save (async): blocked",), 1.0),
    Goal("sharding", r"load", ("ddpw restore (hash-checked)",), 1.0),
)


def goal_of(result: Result) -> Goal | None:
    return next((goal for goal in GOALS if goal.bounds(result)), None)


def is_ddpw(result: Result) -> bool:
    return result.variant.startswith("ddpw")


_SIZE = re.compile(r"(, MLP|,)? (\d+M)\b")
_EVERY = re.compile(r"every (\d+) steps")


def size_of(case: str) -> tuple[str, str]:
    """A checkpoint case's kind and what sets it apart from the other cases of its kind:
    ``("save + Adam, 1 process", "10M")``, ``("steps/s, a checkpoint every N steps, 2 procs",
    "50M, N=10")``."""
    size, every = _SIZE.search(case), _EVERY.search(case)
    kind = _EVERY.sub("every N steps", _SIZE.sub("", case, count=1))
    label = (size.group(2) if size else "") + (f", N={every.group(1)}" if every else "")
    return kind, label


def value(result: Result) -> str:
    """A result's median and unit: ``4.82 s``."""
    return f"{number(result.median)} {result.metric}"


def number(value: float) -> str:
    """Three significant digits, without an exponent: ``14300``, ``4.82``, ``0.0415``."""
    rounded = float(f"{value:.3g}")
    return f"{rounded:.0f}" if abs(rounded) >= 100 else f"{rounded:g}"
