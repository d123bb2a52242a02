"""Row "compile": what ``PlatformConfig.torch_compile`` costs and gains, on 2 CPU processes,
against the same loop by hand with Accelerate, compiled by ``accelerate launch --dynamo_backend
inductor`` (the baseline) and not compiled.

    python scripts/bench/compile.py [--repeats 3] [--quick]

The loops and the data are the training row's (``loops/``). Two metrics per variant: samples
per second from the start of epoch 2 to the end of the last (the gain, once compiled) and the
whole command's seconds (the cost: start-up and compilation included). Every run compiles from
nothing: TorchInductor's cache is a fresh folder of its own (an absolute path: a relative one
leaves the cache unused).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # for `common` and `loops`, however this file is run
    sys.path.insert(0, str(HERE))
from common import Result, interleave, row_main, with_ratios  # noqa: E402
from loops import variants  # noqa: E402
from training import Case, Measured, parameters, run_variant  # noqa: E402

ROW = "compile"
BASELINE = "accelerate, compiled (by hand)"
CASES = [Case("mlp", 1024, 8192), Case("cnn", 16, 8192)]
QUICK_CASES = [Case("mlp", 256, 4096)]


def cold(command: list[str], env: dict[str, str]) -> Measured:
    """One run of ``command`` that compiles from nothing, in a fresh TorchInductor cache."""
    cache = tempfile.mkdtemp(prefix="ddpw-bench-inductor-")
    try:
        return run_variant(command, {**env, "TORCHINDUCTOR_CACHE_DIR": cache})
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def commands(case: Case, epochs: int) -> dict[str, variants.Command]:
    """Each variant's command and the variables it adds to the environment."""
    args = ["--model", case.model, "--size", str(case.size), "--samples", str(case.samples),
            "--epochs", str(epochs)]
    compiled, compiled_env = variants.accelerate(args, dynamo_backend="inductor")
    ddpw_compiled, _ = variants.ddpw([*args, "--compile"])
    return {BASELINE: (compiled, compiled_env),
            "ddpw Trainer, torch_compile": (ddpw_compiled, {}),
            "accelerate (by hand)": variants.accelerate(args),
            "ddpw Trainer": variants.ddpw(args)}


def measure(repeats: int, quick: bool) -> list[Result]:
    """The row's results: every case, every variant, ``repeats`` runs each, taking turns."""
    epochs = 3 if quick else 5
    results = []
    for case in QUICK_CASES if quick else CASES:
        outcome = interleave({name: partial(cold, command, env)
                              for name, (command, env) in commands(case, epochs).items()},
                             repeats, warmup=0)
        for name, (runs, failed) in outcome.items():
            runs: list[Measured]
            common = dict(row=ROW, case=case.label, variant=name, baseline=BASELINE,
                          peak_rss_mb=max((r.peak_rss_mb for r in runs), default=None),
                          failed=failed)
            results.append(Result(metric="samples/s", values=[r.samples_per_s for r in runs],
                                  higher_is_better=True, **common, extra={
                                      "params": parameters(case.model, case.size),
                                      "final_loss": [r.loss for r in runs],
                                      "timed_epochs": epochs - 1}))
            results.append(Result(metric="s", values=[r.seconds for r in runs], **common,
                                  extra={"note": "s: the whole command, start-up and a cold "
                                                 "compilation included"}))
    # Ratios compare one metric with the same metric of the baseline.
    by_metric = {}
    for r in results:
        by_metric.setdefault(r.metric, []).append(r)
    return [r for group in by_metric.values() for r in with_ratios(group)]


def show(results: list[Result]) -> None:
    """Print the results as a small table."""
    width = max((len(r.case) for r in results), default=4)
    print(f"{'case':{width}} {'variant':30} {'metric':10} {'median':>10} {'ratio':>6} "
          f"{'failed':>6}")
    for r in results:
        ratio = f"{r.ratio:6.3f}" if r.ratio is not None else f"{'-':>6}"
        print(f"{r.case:{width}} {r.variant:30} {r.metric:10} {r.median:10.2f} {ratio} "
              f"{r.failed:6d}")


if __name__ == "__main__":
    row_main(measure, show, __doc__, repeats=3,
             quick_help="the smallest MLP, 2 timed epochs: a smoke test, not a measurement")
