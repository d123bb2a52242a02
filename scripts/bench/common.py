"""What every benchmark row shares: timing a command in a fresh process, its peak memory, and
rows of results with medians, spreads and ratios against a baseline measured in the same run.

A row module exposes ``measure(repeats: int, quick: bool) -> list[Result]``; ``scripts/bench/run``
collects them into one table, a JSON file, a plot and the docs' Performance page.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

# Runs a command, then prints its wall time and the largest peak RSS among the processes it
# started (RUSAGE_CHILDREN covers every descendant that was waited for).
_MEASURE = """
import json, resource, subprocess, sys, time
started = time.perf_counter()
done = subprocess.run(sys.argv[1:])
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "peak_rss_mb": peak, "returncode": done.returncode}),
      file=sys.stderr)
"""


@dataclasses.dataclass
class Run:
    """One run of a command: wall seconds, the largest peak RSS of its processes (MiB), and
    whether it succeeded (its stderr's end when not)."""

    seconds: float
    peak_rss_mb: float
    ok: bool
    error: str = ""


def run_command(command: list[str], env: dict[str, str] | None = None,
                cwd: str | Path | None = None, timeout: float = 600) -> Run:
    """Run ``command`` in a fresh process (in a new empty folder unless ``cwd``) and measure it."""
    with tempfile.TemporaryDirectory(prefix="ddpw-bench-") as tmp:
        # A session of its own, so that a run past its time is ended with all its processes.
        process = subprocess.Popen([PYTHON, "-c", _MEASURE, *command], cwd=cwd or tmp,
                                   env={**os.environ, **(env or {})}, text=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   start_new_session=True)
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            _, stderr = process.communicate()
            return Run(timeout, 0.0, False, f"timed out after {timeout} s")
    lines = stderr.strip().splitlines()
    report = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    if report is None or report["returncode"] != 0:
        return Run(report["seconds"] if report else 0.0, report["peak_rss_mb"] if report else 0.0,
                   False, "\n".join(lines[-12:]))
    return Run(report["seconds"], report["peak_rss_mb"], True)


@dataclasses.dataclass
class Result:
    """One line of the table: a variant of a case of a row, against the row's baseline.

    :param row: ``"launch"``, ``"training"``, ``"checkpoint"``, ``"resume"``, ``"sharding"``,
        ``"slurm"``, ``"sweep"`` or ``"original ddpw"``.
    :param case: what was measured, such as ``"2 processes, one all-reduce"``.
    :param variant: who did it, such as ``"ddpw Wrapper.start"``.
    :param metric: the unit of ``values``, such as ``"s"`` or ``"samples/s"``.
    :param values: one per successful repeat.
    :param baseline: the variant that ratios compare against (the raw tool).
    :param higher_is_better: ``True`` for rates.
    :param peak_rss_mb: the largest peak RSS of one process over the repeats, if measured.
    :param failed: repeats that failed.
    :param extra: anything else worth keeping (a time breakdown, bytes on disk).
    """

    row: str
    case: str
    variant: str
    metric: str
    values: list[float]
    baseline: str
    higher_is_better: bool = False
    peak_rss_mb: float | None = None
    failed: int = 0
    ratio: float | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")


def repeat(measure: Callable[[], Run], repeats: int, warmup: int = 1) -> tuple[list[Run], int]:
    """Warm up, then ``repeats`` runs: the successful ones, and how many failed (each failure's
    error is printed)."""
    for _ in range(warmup):
        measure()
    runs, failed = [], 0
    for _ in range(repeats):
        run = measure()
        if run.ok:
            runs.append(run)
        else:
            failed += 1
            print(f"  a run failed:\n{run.error}", file=sys.stderr)
    return runs, failed


def interleave(measures: dict[str, Callable[[], Run]], repeats: int,
               warmup: int = 1) -> dict[str, tuple[list[Run], int]]:
    """Like :func:`repeat` for several variants, taking turns so that a machine's drift over
    time falls on all of them alike."""
    for _ in range(warmup):
        for measure in measures.values():
            measure()
    results: dict[str, tuple[list[Run], int]] = {name: ([], 0) for name in measures}
    for _ in range(repeats):
        for name, measure in measures.items():
            run = measure()
            runs, failed = results[name]
            if run.ok:
                runs.append(run)
            else:
                results[name] = (runs, failed + 1)
                print(f"  {name}: a run failed:\n{run.error}", file=sys.stderr)
    return results


def with_ratios(results: list[Result]) -> list[Result]:
    """Fill in each result's ratio: its median over its baseline's (same row and case)."""
    medians = {(r.row, r.case, r.variant): r.median for r in results}
    for r in results:
        base = medians.get((r.row, r.case, r.baseline))
        usable = base is not None and base > 0 and r.values  # NaN > 0 is False
        r.ratio = r.median / base if usable else None
    return results


def row_main(measure: Callable[[int, bool], list[Result]],
             show: Callable[[Sequence[Result]], None], doc: str | None, repeats: int,
             quick_help: str) -> None:
    """The command line of a row module run by itself: ``--repeats`` and ``--quick``, then
    the row's own table."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    args = parser.parse_args()
    show(measure(args.repeats, args.quick))
