"""Row "resume": wall time from the start of a command to its first resumed training step,
ddpw's Trainer against the same loop written by hand with Accelerate (the baseline).

    python scripts/bench/resume.py [--repeats 3] [--quick]

For each model, each variant first trains one epoch on 2 CPU processes and saves a checkpoint
(ddpw: ``save_every=1``; by hand: ``accelerator.save_state``), once and untimed. Then, in fresh
commands on 2 CPU processes, it resumes: ddpw with ``JobConfig(start_at="latest")``, the loop by
hand with ``accelerator.load_state``. The time runs from just before the command starts until
rank 0's first optimiser step after the restore, which the payload notes with ``time.time()``: so
it holds the launch, the imports, building the model, reading and checking the checkpoint and one
step. Loads read from the page cache (the checkpoint was just written, or read by the previous
run). Two models: the small MLP of the training row, and one of about 18M parameters whose
checkpoint (weights and Adam state, some 215 MB) makes loading matter. Besides the first-step
time, each result keeps the restore alone as measured by rank 0 (and, for ddpw, the hash check
of every file that its caller makes before starting the processes), the checkpoint's size on disk
and the command's total time.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # for `common` and `loops`, however this file is run
    sys.path.insert(0, str(HERE))
from common import Result, Run, interleave, row_main, run_command, with_ratios  # noqa: E402
from loops import variants, workload  # noqa: E402
from loops.workload import PROCESSES  # noqa: E402

ROW = "resume"
DDPW = "ddpw Trainer (start_at='latest')"
BASELINE = "accelerate load_state (by hand)"
#: (MLP width, samples per epoch): a small model, and one of about 18M parameters. Few samples:
#: only the time to the first step counts, and the rest of the resumed epoch is waited for.
CASES = [(256, 1024), (4096, 256)]


@dataclass
class Measured(Run):
    """A resumed run: seconds to the first step, and the restore's own share."""

    first_step_s: float = 0.0
    before_restore_s: float = float("nan")
    restore_s: float = float("nan")
    verify_s: float = float("nan")


def commands(width: int, samples: int, store: Path) -> dict[str, dict[str, variants.Command]]:
    """For each variant, the commands that write its checkpoint into ``store`` and resume it."""
    args = ["--model", "mlp", "--size", str(width), "--samples", str(samples)]
    ddpw_folder, accelerate_folder = store / "ddpw", store / "accelerate"
    return {
        DDPW: {"save": variants.ddpw([*args, "--epochs", "1", "--save", str(ddpw_folder)]),
               "resume": variants.ddpw([*args, "--epochs", "2", "--resume", str(ddpw_folder)])},
        BASELINE: {
            "save": variants.accelerate([*args, "--epochs", "1", "--save", str(accelerate_folder)]),
            "resume": variants.accelerate([*args, "--epochs", "2",
                                         "--resume", str(accelerate_folder / "epoch_1")])},
    }


def save(command: list[str], env: dict[str, str]) -> None:
    """Write a variant's checkpoint (untimed), or fail loudly: nothing can resume without it."""
    with tempfile.TemporaryDirectory(prefix="ddpw-bench-resume-") as folder:
        run = run_command(command, env=env, cwd=folder)
    if not run.ok:
        raise RuntimeError(f"writing the checkpoint failed:\n{run.error}")


def resume(command: list[str], env: dict[str, str]) -> Measured:
    """One fresh resumed run in an empty folder: seconds from its start to the first step."""
    with tempfile.TemporaryDirectory(prefix="ddpw-bench-resume-") as folder:
        started = time.time()  # the epoch clock, as the payload's note of its first step
        run = run_command(command, env=env, cwd=folder)
        first = Path(folder, "first-step")
        first_step = float(first.read_text()) if first.is_file() else None
        ranks = variants.reports(folder)
        verify = Path(folder, "verify.json")
        verify_s = (json.loads(verify.read_text())["verify_s"] if verify.is_file()
                    else float("nan"))
    measured = Measured(run.seconds, run.peak_rss_mb, run.ok, run.error, verify_s=verify_s)
    if run.ok and (first_step is None or 0 not in ranks):
        measured.ok, measured.error = False, "no first resumed step was noted"
    if measured.ok:
        measured.first_step_s = first_step - started
        measured.restore_s = ranks[0]["restore_s"]
        measured.before_restore_s = ranks[0]["restore_began"] - started
    return measured


def folder_mb(folder: Path) -> float:
    """Megabytes of the files under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def measure(repeats: int, quick: bool) -> list[Result]:
    """The row's results: both models, both variants, ``repeats`` resumed runs each, taking
    turns (after a warm-up run each unless ``quick``). Even a quick run keeps the larger model:
    without it, the row would not show what loading costs."""
    results = []
    for width, samples in CASES:
        params = workload.parameters("mlp", width)
        case = f"MLP {params / 1e6:.2g}M params + Adam, {PROCESSES} processes"
        store = Path(tempfile.mkdtemp(prefix="ddpw-bench-resume-store-"))
        try:
            plan = commands(width, samples, store)
            for steps in plan.values():
                save(*steps["save"])
            sizes = {DDPW: folder_mb(store / "ddpw"), BASELINE: folder_mb(store / "accelerate")}
            measures: dict[str, Callable[[], Run]] = {
                name: partial(resume, *steps["resume"]) for name, steps in plan.items()}
            outcome = interleave(measures, repeats, warmup=0 if quick else 1)
        finally:
            shutil.rmtree(store, ignore_errors=True)
        for name, (runs, failed) in outcome.items():
            results.append(Result(
                row=ROW, case=case, variant=name, metric="s",
                values=[r.first_step_s for r in runs], baseline=BASELINE,
                peak_rss_mb=max((r.peak_rss_mb for r in runs), default=None), failed=failed,
                extra={"params": params, "checkpoint_mb": sizes[name],
                       # Where the time goes: until rank 0 begins restoring (launch, imports,
                       # model, job shipping), then the restore itself; the rest is one step.
                       "before_restore_s": [r.before_restore_s for r in runs],
                       "restore_s": [r.restore_s for r in runs],
                       **({"verify_s": [r.verify_s for r in runs]} if name == DDPW else {}),
                       "command_seconds": [r.seconds for r in runs]}))
    return with_ratios(results)


def show(results: list[Result]) -> None:
    """Print the results as a small table."""
    width = max((len(r.case) for r in results), default=4)
    print(f"{'case':{width}} {'variant':33} {'first step s':>12} {'min':>6} {'max':>6} "
          f"{'ratio':>6} {'before s':>8} {'restore s':>9} {'verify s':>8} {'ckpt MB':>7} "
          f"{'RSS MB':>7} {'failed':>6}")
    for r in results:
        ratio = f"{r.ratio:6.3f}" if r.ratio is not None else f"{'-':>6}"
        low, high = (min(r.values), max(r.values)) if r.values else (float("nan"),) * 2
        restore = statistics.median(r.extra["restore_s"]) if r.values else float("nan")
        before = statistics.median(r.extra["before_restore_s"]) if r.values else float("nan")
        verify = statistics.median(r.extra.get("verify_s") or [float("nan")])
        print(f"{r.case:{width}} {r.variant:33} {r.median:12.2f} {low:6.2f} {high:6.2f} {ratio} "
              f"{before:8.2f} {restore:9.3f} {verify:8.3f} {r.extra['checkpoint_mb']:7.0f} "
              f"{r.peak_rss_mb or 0:7.0f} {r.failed:6d}")


if __name__ == "__main__":
    row_main(measure, show, __doc__, repeats=3,
             quick_help="no warm-up runs: a smoke test, not a measurement")
