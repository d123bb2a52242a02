"""Row "training": samples per second of ddpw's Trainer on 2 CPU processes, against the same
loop written by hand with Accelerate (the baseline) and with raw ``torch.distributed`` DDP.

    python scripts/bench/training.py [--repeats 3] [--quick]

A small MLP and a small CNN, each in a small sweep of sizes, on synthetic data made in code;
and the cost of timing every step for :mod:`ddpw.stragglers` (the MLP of width 256, the
Trainer against itself with the timing off).
All three variants train the same model from the same weights on the same data in the same order
(see ``loops/workload.py``), with Adam, 64 samples per batch per process, one compute thread per
process, no evaluation and no checkpoints: only the loop differs. The rate is measured inside the
processes, by rank 0 between barriers, from the start of epoch 2 to the end of the last epoch, so
that neither the launch nor the first epoch's warm-up counts; each run is still a fresh command
(``common.run_command``), which also gives the peak RSS of its largest process. The final loss of
each variant is kept, to show that they did the same work.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # for `common` and `loops`, however this file is run
    sys.path.insert(0, str(HERE))
from common import Result, Run, interleave, row_main, run_command, with_ratios  # noqa: E402
from loops import variants, workload  # noqa: E402
from loops.workload import PROCESSES  # noqa: E402

ROW = "training"
BASELINE = "accelerate (by hand)"
#: The case that measures the cost of timing every step for :mod:`ddpw.stragglers`, against
#: the same Trainer with it off.
TIMED, UNTIMED = "ddpw Trainer", "ddpw Trainer, steps not timed"


@cache
def parameters(model: str, size: int) -> int:
    """Parameters of the benchmark's model (built once per size)."""
    return workload.parameters(model, size)


@dataclass(frozen=True)
class Case:
    """A model and how many samples an epoch has: enough steps to time, few enough to stay
    within a few seconds a run."""

    model: str
    size: int
    samples: int
    #: The case of the step timing's cost (``TIMED`` against ``UNTIMED``).
    timing: bool = False

    @property
    def label(self) -> str:
        what = f"MLP width {self.size}" if self.model == "mlp" else f"CNN {self.size} channels"
        millions = parameters(self.model, self.size) / 1e6
        cost = ": cost of the step timing (stragglers)" if self.timing else ""
        return f"{what} ({millions:.2g}M params), {PROCESSES} processes{cost}"

    @property
    def baseline(self) -> str:
        return UNTIMED if self.timing else BASELINE


# Sizes grow by 4x so that memory's growth with the model shows; samples shrink as the steps
# slow down, keeping each run short. Samples divide by 64 x 2, so every batch is full.
CASES = [Case("mlp", 256, 16384), Case("mlp", 1024, 8192), Case("mlp", 4096, 1024),
         Case("cnn", 16, 8192), Case("cnn", 64, 4096), Case("mlp", 256, 16384, timing=True)]
QUICK_CASES = [Case("mlp", 256, 4096), Case("cnn", 16, 2048), Case("mlp", 256, 4096, timing=True)]


@dataclass
class Measured(Run):
    """A run of one variant, with what its processes measured."""

    samples_per_s: float = 0.0
    loss: float = float("nan")
    rank_peak_rss_mb: float = 0.0
    threads: int = 0
    minor_faults: int = 0


def commands(case: Case, epochs: int) -> dict[str, variants.Command]:
    """Each variant's command and the variables it adds to the environment."""
    args = ["--model", case.model, "--size", str(case.size), "--samples", str(case.samples),
            "--epochs", str(epochs)]
    if case.timing:
        command, env = variants.ddpw(args)
        return {TIMED: (command, env), UNTIMED: (command, {**env, "DDPW_BENCH_UNTIMED": "1"})}
    return {"ddpw Trainer": variants.ddpw(args), BASELINE: variants.accelerate(args),
            "torch DDP (by hand)": variants.torch_ddp(args)}


def run_variant(command: list[str], env: dict[str, str]) -> Measured:
    """One fresh run of ``command`` in an empty folder, and what its ranks wrote there."""
    with tempfile.TemporaryDirectory(prefix="ddpw-bench-training-") as folder:
        run = run_command(command, env=env, cwd=folder)
        ranks = variants.reports(folder)
    measured = Measured(run.seconds, run.peak_rss_mb, run.ok, run.error)
    if run.ok and len(ranks) != PROCESSES:
        measured.ok, measured.error = False, f"{len(ranks)} of {PROCESSES} ranks reported"
    if measured.ok:
        measured.samples_per_s = ranks[0]["samples"] / ranks[0]["seconds"]
        measured.loss = ranks[0]["loss"]
        measured.rank_peak_rss_mb = max(r["peak_rss_mb"] for r in ranks.values())
        measured.threads = max(r["threads"] for r in ranks.values())
        measured.minor_faults = max(r["minor_faults"] for r in ranks.values())
    return measured


def measure(repeats: int, quick: bool) -> list[Result]:
    """The row's results: every case, every variant, ``repeats`` runs each, taking turns."""
    # Epoch 1 is warm-up; quick runs time 2 epochs, full runs 4.
    epochs = 3 if quick else 5
    results = []
    for case in QUICK_CASES if quick else CASES:
        measures: dict[str, Callable[[], Run]] = {
            name: partial(run_variant, command, env)
            for name, (command, env) in commands(case, epochs).items()}
        # The rate is taken after start-up, so a warm-up run buys little in a quick run.
        # A cost of 1% needs more runs to show through the noise of a shared machine.
        runs = 2 * repeats + 1 if case.timing else repeats
        outcome = interleave(measures, runs, warmup=0 if quick else 1)
        for name, (runs, failed) in outcome.items():
            results.append(Result(
                row=ROW, case=case.label, variant=name, metric="samples/s",
                values=[r.samples_per_s for r in runs], baseline=case.baseline,
                higher_is_better=True,
                peak_rss_mb=max((r.peak_rss_mb for r in runs), default=None), failed=failed,
                extra={"params": parameters(case.model, case.size),
                       "final_loss": [r.loss for r in runs],
                       # Each worker's own peak: the parent of a ddpw or torchrun launch may be
                       # the largest process, which peak_rss_mb reports.
                       "rank_peak_rss_mb": max((r.rank_peak_rss_mb for r in runs), default=None),
                       "threads_per_process": max((r.threads for r in runs), default=None),
                       "timed_epochs": epochs - 1, "samples_per_epoch": case.samples,
                       "command_seconds": [r.seconds for r in runs]}))
    return with_ratios(results)


def show(results: list[Result]) -> None:
    """Print the results as a small table."""
    width = max((len(r.case) for r in results), default=4)
    print(f"{'case':{width}} {'variant':22} {'samples/s':>10} {'min':>8} {'max':>8} {'ratio':>6} "
          f"{'RSS MB':>7} {'rank MB':>7} {'loss':>8} {'failed':>6}")
    for r in results:
        ratio = f"{r.ratio:6.3f}" if r.ratio is not None else f"{'-':>6}"
        low, high = (min(r.values), max(r.values)) if r.values else (float("nan"),) * 2
        loss = statistics.median(r.extra["final_loss"]) if r.values else float("nan")
        print(f"{r.case:{width}} {r.variant:22} {r.median:10.0f} {low:8.0f} {high:8.0f} {ratio} "
              f"{r.peak_rss_mb or 0:7.0f} {r.extra['rank_peak_rss_mb'] or 0:7.0f} "
              f"{loss:8.4f} {r.failed:6d}")


if __name__ == "__main__":
    row_main(measure, show, __doc__, repeats=3,
             quick_help="smallest sizes, 2 timed epochs: a smoke test, not a measurement")
