"""Row "sharding": ddpw's Trainer with ``PlatformConfig(strategy="fsdp")`` on 2 CPU processes,
against the same sharded loop written by hand with FSDP2's ``fully_shard`` (the baseline), and
against ddpw's own Trainer with ``strategy="ddp"``.

    python scripts/bench/sharding.py [--repeats 3] [--quick] [--parts training,checkpoint]
        [--json FILE]

The model is ``loops/workload.py``'s ``Blocks``: an input layer, 12 blocks of a 2048 x 2048
linear layer in a ``ModuleList`` and a head, 51M parameters, trained with Adam on synthetic data
made in code. The loop by hand (``loops/fsdp_loop.py``) shards the same units as ddpw does by
default (each block, then the root), and takes the same data in the same order with the same
seeds and one compute thread per process, so the final losses are equal. Two metrics per run:
samples per second from the start of epoch 2 to the end of the last (rank 0, between barriers,
as the training row measures it), and the largest peak RSS of one rank. A rank's peak includes
the whole model as it is built before it is sharded, in every variant alike.

ddpw's CPU workers run with ``MALLOC_MMAP_THRESHOLD_=131072`` and glibc's
``glibc.malloc.hugetlb=1`` under FSDP (``ddpw/plan.py``): every buffer from 128 KiB up is mapped
on its own and given back when freed, so each unit's gathered parameters are new pages at every
step, and huge pages make that a fault per 2 MiB rather than per 4 KiB. The loop by hand runs
as a user writes it, without them, and once more with ddpw's settings, to show what the
Trainer costs by itself. The ranks' page faults are kept (``rank_minor_faults``).

The case "FSDP against DDP" shows the same ddpw FSDP runs against ddpw's DDP runs of the same
round: with Adam in fp32, DDP holds 16 bytes a parameter on every rank (parameters, gradients,
two moments), FSDP about half of that on each of 2 ranks.

The checkpoint cases (``sharded_checkpoint_job.py`` says them in detail) save the same sharded
model and Adam state with ddpw's checkpointer and with torch's distributed checkpoint (DCP):
a save by 2 processes against ``dcp.save``, the time an asynchronous save blocks against
``dcp.async_save``'s, and a load by 1 process of what 2 saved (ddpw's hash-checked restore
against DCP's resharding load), each load checked equal to the saved state.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # for `common` and `loops`, however this file is run
    sys.path.insert(0, str(HERE))
import sharded_checkpoint_job as job  # noqa: E402
from common import PYTHON, Result, Run, interleave, run_command, with_ratios  # noqa: E402
from loops import variants, workload  # noqa: E402
from loops.workload import PROCESSES  # noqa: E402
from training import Measured, run_variant  # noqa: E402

ROW = "sharding"
FSDP = "ddpw, strategy='fsdp'"
DDP = "ddpw, strategy='ddp'"
BASELINE = "fully_shard (by hand)"
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "131072", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
BY_HAND_ALLOCATOR = "fully_shard (by hand), ddpw's allocator settings"
#: What the samples per second of each variant ran with, where the allocator differs.
NOTES = {FSDP: f"{FSDP}: the Trainer's workers run with MALLOC_MMAP_THRESHOLD_=131072 and "
               f"GLIBC_TUNABLES=glibc.malloc.hugetlb=1, as ddpw sets them for FSDP on CPUs",
         BY_HAND_ALLOCATOR: f"{BY_HAND_ALLOCATOR}: the loop by hand with MALLOC_MMAP_THRESHOLD_"
                            f"=131072 and glibc.malloc.hugetlb=1, to show what the Trainer "
                            f"costs by itself"}
#: The blocks' width: 51M parameters; quick: 3.5M.
WIDTH, QUICK_WIDTH = 2048, 512
PARTS = ("training", "checkpoint")
#: Samples per epoch: 2 steps of 64 samples on each of 2 processes, about 3 s an epoch here.
SAMPLES = 256


def commands(width: int, epochs: int) -> dict[str, variants.Command]:
    """Each variant's command and the variables it adds to the environment."""
    args = ["--model", "blocks", "--size", str(width), "--samples", str(SAMPLES),
            "--epochs", str(epochs)]
    by_hand, env = variants.accelerate(args, script="fsdp_loop.py")
    fsdp, fsdp_env = variants.ddpw([*args, "--strategy", "fsdp"])
    return {FSDP: (fsdp, fsdp_env), BASELINE: (by_hand, env),
            DDP: variants.ddpw([*args, "--strategy", "ddp"]),
            BY_HAND_ALLOCATOR: (by_hand, env | ALLOCATOR)}


def results_of(case: str, name: str, runs: list[Measured], failed: int, baseline: str,
               extra: dict[str, object]) -> list[Result]:
    """A variant's two results in ``case``: samples per second and a rank's peak memory."""
    common = dict(row=ROW, case=case, variant=name, baseline=baseline, failed=failed,
                  peak_rss_mb=max((r.peak_rss_mb for r in runs), default=None))
    more = extra | {"final_loss": [r.loss for r in runs],
                    "threads_per_process": max((r.threads for r in runs), default=None),
                    "rank_minor_faults": [r.minor_faults for r in runs],
                    "command_seconds": [r.seconds for r in runs]}
    rate = more | ({"note": NOTES[name]} if name in NOTES else {})
    return [Result(metric="samples/s", values=[r.samples_per_s for r in runs],
                   higher_is_better=True, extra=rate, **common),
            Result(metric="MiB", values=[r.rank_peak_rss_mb for r in runs],
                   extra=more | {"note": "MiB: the peak RSS of the larger rank, the whole model "
                                         "built before it is sharded included"}, **common)]


def training(repeats: int, quick: bool) -> list[Result]:
    """The training cases: every variant, ``repeats`` runs each, taking turns."""
    # Epoch 1 is warm-up; quick runs time 2 epochs, full runs 3.
    epochs = 3 if quick else 4
    width = QUICK_WIDTH if quick else WIDTH
    params = workload.parameters("blocks", width)
    measures: dict[str, Callable[[], Run]] = {
        name: partial(run_variant, command, env)
        for name, (command, env) in commands(width, epochs).items()}
    outcome = interleave(measures, repeats, warmup=0 if quick else 1)
    size = f"{params / 1e6:.2g}M + Adam, {PROCESSES} procs"
    extra = {"params": params, "blocks": workload.BLOCKS, "width": width,
             "timed_epochs": epochs - 1, "samples_per_epoch": SAMPLES}
    against_hand, against_ddp = [], []
    for name, (runs, failed) in outcome.items():
        if name != DDP:
            against_hand += results_of(f"train {size}", name, runs, failed, BASELINE, extra)
        if name in (FSDP, DDP):
            against_ddp += results_of(f"FSDP against DDP, train {size}", name, runs, failed,
                                      DDP, extra)
    return against_hand + against_ddp


def checkpoint_job(mode: str, procs: int, width: int, repeats: int, folder: Path
                   ) -> tuple[dict[str, Any] | None, Run]:
    """Run ``sharded_checkpoint_job.py`` once on ``procs`` processes, its checkpoints in
    ``folder``; return what it measured (``None`` if it failed) and the command's run."""
    out = folder / f"{mode}.json"
    run = run_command([PYTHON, "-m", "torch.distributed.run", "--standalone",
                       "--nproc_per_node", str(procs), str(HERE / "sharded_checkpoint_job.py"),
                       "--mode", mode, "--width", str(width), "--repeats", str(repeats),
                       "--folder", str(folder), "--out", str(out)],
                      env={"OMP_NUM_THREADS": str(variants.THREADS)})
    found = json.loads(out.read_text()) if run.ok and out.is_file() else None
    if found is None:
        print(f"  sharded_checkpoint_job --mode {mode} failed:\n{run.error}", file=sys.stderr)
    return found, run


def checkpoints(repeats: int, quick: bool) -> list[Result]:
    """The checkpoint cases: saved by 2 processes, loaded by 1."""
    width = QUICK_WIDTH if quick else WIDTH
    folder = Path(tempfile.mkdtemp(prefix="ddpw-bench-sharding-"))
    try:
        saved, save_run = checkpoint_job("save", PROCESSES, width, repeats, folder)
        loaded, load_run = (checkpoint_job("load", 1, width, repeats, folder) if saved
                            else (None, Run(0.0, 0.0, False)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    size = f"{workload.parameters('blocks', width) / 1e6:.2g}M + Adam"
    cases = [
        (f"save {size}, {PROCESSES} procs", (job.DDPW_SAVE, job.DCP_SAVE), saved, save_run),
        (f"async save, time blocked, {size}, {PROCESSES} procs",
         (job.DDPW_ASYNC, job.DCP_ASYNC), saved, save_run),
        (f"load {size}, saved by {PROCESSES} procs, loaded by 1", (job.DDPW_LOAD, job.DCP_LOAD),
         loaded, load_run)]
    notes = {job.DDPW_SAVE: "each rank writes, hashes and flushes its own rows",
             job.DCP_SAVE: "get_state_dict, then dcp.save (FileSystemWriter fsyncs its files)",
             job.DDPW_ASYNC: "until save() returns, on the slower rank, the first save "
                             "(which makes the buffers) left out",
             job.DCP_ASYNC: "until dcp.async_save returns, on the slower rank",
             job.DDPW_LOAD: "every file's hash checked, then each rank's rows read",
             job.DCP_LOAD: "get_state_dict, dcp.load, set_state_dict; nothing checked"}
    results = []
    for case, (ddpw, baseline), found, run in cases:
        for variant in (ddpw, baseline):
            extra = {"note": notes[variant]}
            if found:
                extra |= {"params": saved["params"]} | (
                    {"bytes": saved["bytes"][variant]} if variant in saved["bytes"] else
                    {"equal_to_saved": found["equal_to_saved"][variant]})
            results.append(Result(ROW, case, variant, "s", found["runs"][variant] if found else [],
                                  baseline, peak_rss_mb=run.peak_rss_mb if found else None,
                                  failed=0 if found else 1, extra=extra))
    return results


def measure(repeats: int, quick: bool, parts: Sequence[str] = PARTS) -> list[Result]:
    """The row's results: the training cases, then the checkpoint cases."""
    results = ((training(repeats, quick) if "training" in parts else [])
               + (checkpoints(repeats, quick) if "checkpoint" in parts else []))
    # Ratios compare one metric with the same metric of the baseline.
    return [r for metric in dict.fromkeys(r.metric for r in results)
            for r in with_ratios([r for r in results if r.metric == metric])]


def show(results: list[Result]) -> None:
    """Print the results as a small table."""
    width = max((len(r.case) for r in results), default=4)
    print(f"{'case':{width}} {'variant':52} {'metric':9} {'median':>9} {'min':>9} {'max':>9} "
          f"{'ratio':>6} {'loss':>8} {'failed':>6}")
    for r in results:
        ratio = f"{r.ratio:6.3f}" if r.ratio is not None else f"{'-':>6}"
        low, high = (min(r.values), max(r.values)) if r.values else (float("nan"),) * 2
        losses = r.extra.get("final_loss") if r.values else None
        loss = statistics.median(losses) if losses else float("nan")
        print(f"{r.case:{width}} {r.variant:52} {r.metric:9} {r.median:9.3g} {low:9.3g} "
              f"{high:9.3g} {ratio} {loss:8.4f} {r.failed:6d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help="blocks of width 512, 2 timed epochs: a smoke test, not a "
                             "measurement")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the results here, as run.py writes latest.json (for "
                             "run.py --add)")
    args = parser.parse_args()
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {','.join(PARTS)}")
    results = measure(args.repeats, args.quick, parts)
    show(results)
    if args.json:
        from run import machine

        args.json.write_text(json.dumps(
            {"machine": machine(), "repeats": args.repeats, "quick": args.quick,
             "results": [dataclasses.asdict(r) | {"median": r.median} for r in results]},
            indent=1, default=str))


if __name__ == "__main__":
    main()
