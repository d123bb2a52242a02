"""Row "checkpoint": ddpw's checkpoints against ``torch.save``, ``torch.load`` and Accelerate,
in one process and inside a running 2-process job, saved synchronously and in the background.

    python scripts/bench/checkpoint.py [--repeats 3] [--quick] [--sizes 10,50,100]
        [--every 50] [--folder DIR] [--parts isolated,job,async,resume] [--json FILE]

Models of 10, 50 and 100 million parameters (square linear layers of width 2048 and a narrower
last one) with Adam's state, on CPU processes of one compute thread each (BLAKE3 hashes on every
core). Each part is a fresh command (:func:`common.run_command`, which also gives the peak RSS
of its largest process), and inside it the variants take turns after a warm-up round; every
variant saves into its own subfolder of ``--folder`` (one file system; the system's temporary
folder by default), its earlier output deleted untimed, after an ``os.sync()``. Loads read from
the page cache (the files were just written, and read once more in the warm-up round). What
each part measures (``checkpoint_job.py`` says it in detail):

- ``isolated``: one process (``n_procs=1``), ``JobConfig.async_checkpoint=False``: the time of
  ddpw's ``save_checkpoint()`` (hashed, every file and folder flushed) against ``torch.save``
  followed by an fsync of its file and folders (the same durability, the baseline), plain
  ``torch.save`` and ``accelerator.save_state``; and of ddpw's ``restore_checkpoint()`` (every
  file's hash checked) against ``torch.load`` + ``load_state_dict`` (the baseline), ddpw's
  files read with no hash check and ``accelerator.load_state``.
- ``job``: the same inside a 2-process job, timed from a barrier to a barrier: ddpw's ranks each
  write (load: hash) a share; ``torch.save`` runs on rank 0 while rank 1 waits at the barrier,
  as users write it; ``torch.load`` runs on both ranks.
- ``async``: a 2-process job with ``async_checkpoint=True``: the time ``save_checkpoint()``
  blocks (the slowest rank's) against ``torch.save`` on rank 0 in the same job (the baseline)
  and against the floor, a plain copy of the same tensors into buffers made beforehand (each
  rank its own share, the baseline of a second case, and the whole state); the steps per
  second of the Trainer's loop with a checkpoint every ``--every`` steps (three in an epoch of
  ``4 * every`` steps, the last waited for within the time) against none, and against
  ``torch.save`` on rank 0 at the same steps; and the extra host memory: the peak RSS
  (``VmHWM``) of an epoch with those checkpoints less that of an epoch without, on the rank
  where it is larger, against the size of one copy of the state.
- ``resume``: from a command's start to its first resumed training step, ddpw's Trainer with
  ``start_at="latest"`` against the loop by hand with ``accelerator.load_state`` (the
  baseline), as the ``resume`` row measures it (``resume.py``), for MLPs of the same sizes.

Run by ``run.py`` (``measure``) or by itself, which prints the table and, with ``--json``,
writes the rows as ``run.py`` writes them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # for `common`, `resume` and `loops`, however this file is run
    sys.path.insert(0, str(HERE))
import checkpoint_job as job  # noqa: E402
from common import PYTHON, Result, Run, interleave, run_command, with_ratios  # noqa: E402

ROW = "checkpoint"
SIZES = (10, 50, 100)
PARTS = ("isolated", "job", "async", "resume")
#: Steps between checkpoints in the steps/s measurement, the N of the goal "within 5% of no
#: checkpoints". On the 2-core machine the background write and hash compete with the two
#: training processes for the cores, so each save costs about one step's time or more; at N=10
#: that was 5-6% of the steps, at 50 it is about 1% (a checkpoint every few seconds to a minute
#: of training here, still far more often than a real job saves).
EVERY = 50
MEMORY_DDPW = "ddpw: peak with saves - without"
MEMORY_STATE = "one copy of the state"
MEMORY_SHARE = "one rank's share of the state"


def run_job(mode: str, procs: int, params_m: int, repeats: int, every: int,
            root: Path) -> tuple[dict[str, Any] | None, Run]:
    """Run ``checkpoint_job.py`` once in a fresh command, its checkpoints in a new folder under
    ``root``; return what it measured (``None`` if it failed) and the command's run."""
    folder = Path(tempfile.mkdtemp(prefix="ddpw-bench-checkpoint-", dir=root))
    out = folder / "result.json"
    try:
        run = run_command([PYTHON, str(HERE / "checkpoint_job.py"), "--mode", mode,
                           "--procs", str(procs), "--params", str(params_m),
                           "--repeats", str(repeats), "--every", str(every),
                           "--folder", str(folder), "--out", str(out)],
                          timeout=600 + 40 * params_m * max(1, repeats))
        found = json.loads(out.read_text()) if run.ok and out.is_file() else None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if found is None:
        print(f"  checkpoint_job --mode {mode} --procs {procs} --params {params_m} failed:\n"
              f"{run.error}", file=sys.stderr)
    return found, run


def results_of(found: dict[str, Any] | None, run: Run, case: str, variants: Sequence[str],
               baseline: str, extra: dict[str, Any] | None = None,
               notes: dict[str, str] | None = None) -> list[Result]:
    """One result per variant of ``case`` from a job's ``runs`` (seconds)."""
    out = []
    for variant in variants:
        values = found["runs"][variant] if found else []
        more = dict(extra or {})
        if notes and variant in notes:
            more["note"] = notes[variant]
        out.append(Result(ROW, case, variant, "s", values, baseline,
                          peak_rss_mb=run.peak_rss_mb if found else None,
                          failed=0 if found else 1, extra=more))
    return out


def size_of(found: dict[str, Any] | None) -> dict[str, Any]:
    if not found:
        return {}
    return {"params": found["params"], "state_bytes": found["state_bytes"],
            "share_bytes": found["share_bytes"], "threads_per_process": found["threads"]}


def saves_and_loads(procs: int, params_m: int, repeats: int, every: int,
                    root: Path) -> list[Result]:
    """The ``isolated`` (``procs=1``) or ``job`` (``procs=2``) part of one model size."""
    found, run = run_job("sync", procs, params_m, repeats, every, root)
    where = "1 process" if procs == 1 else f"{procs} procs in a job"
    extra = size_of(found) | ({"bytes": found["bytes"], "ddpw_files": found["ddpw_files"]}
                              if found else {})
    on_rank_0 = ("torch.save on rank 0 while the other ranks wait at a barrier"
                 if procs > 1 else "")
    save_notes = {job.DDPW_SAVE: "each rank writes, hashes and flushes its share; rank 0 "
                                 "publishes" if procs > 1 else "hashed, every file flushed",
                  job.TORCH_SAVE_FSYNC: f"{on_rank_0}, then an fsync of its file and folders "
                                        f"(ddpw's durability)".lstrip(", ")}
    load_notes = {job.DDPW_RESTORE: "each rank hashes a share of the files, then loads"
                                    if procs > 1 else "every file's hash checked, then loaded",
                  job.TORCH_LOAD: "on every rank, from the page cache"}
    return [
        *results_of(found, run, f"save {params_m}M + Adam, {where}",
                    (job.DDPW_SAVE, job.TORCH_SAVE_FSYNC, job.TORCH_SAVE, job.ACCELERATE_SAVE),
                    job.TORCH_SAVE_FSYNC, extra, save_notes),
        *results_of(found, run, f"load {params_m}M + Adam, {where}",
                    (job.DDPW_RESTORE, job.DDPW_READ, job.TORCH_LOAD, job.ACCELERATE_LOAD),
                    job.TORCH_LOAD, extra, load_notes),
    ]


def in_the_background(params_m: int, repeats: int, every: int, root: Path) -> list[Result]:
    """The ``async`` part of one model size."""
    found, run = run_job("async", 2, params_m, repeats, every, root)
    where = "2 procs"
    extra = size_of(found)
    if found:
        extra |= {"published_s": found["published_s"],
                  "first_save_blocked_s": found["first_save_blocked_s"]}
    blocked = results_of(
        found, run, f"async save, time blocked, {params_m}M, {where}",
        (job.DDPW_ASYNC, job.TORCH_SAVE, job.TORCH_SAVE_FSYNC, job.COPY_FULL, job.COPY_SHARE),
        job.TORCH_SAVE, extra,
        {job.DDPW_ASYNC: "until save_checkpoint() returns, on the slower rank; the first save, "
                         "which makes the buffers, is left out (first_save_blocked_s)",
         job.TORCH_SAVE: "on rank 0 while the other rank waits at a barrier"})
    floor = results_of(found, run, f"async save against a copy, {params_m}M, {where}",
                       (job.DDPW_ASYNC, job.COPY_SHARE, job.COPY_FULL), job.COPY_SHARE, extra,
                       {job.COPY_SHARE: "each rank copies its share of the tensors, as ddpw "
                                        "deals them out, into buffers made beforehand"})
    steps = []
    for variant in (job.NO_CHECKPOINTS, job.DDPW_EVERY, job.TORCH_EVERY):
        more = dict(extra)
        if found:
            more |= {"steps_per_epoch": found["steps_per_epoch"], "every": found["every"]}
            if variant in found["loop_blocked_s"]:
                more["blocked_per_save_s"] = found["loop_blocked_s"][variant]
        if variant == job.DDPW_EVERY:
            more["note"] = (f"a checkpoint after steps {every}, {2 * every} and {3 * every} of "
                            f"{4 * every}, the last waited for within the time")
        steps.append(Result(ROW, f"steps/s, a checkpoint every {every} steps, {params_m}M, "
                                 f"{where}", variant, "steps/s",
                            found["rates"][variant] if found else [], job.NO_CHECKPOINTS,
                            higher_is_better=True,
                            peak_rss_mb=run.peak_rss_mb if found else None,
                            failed=0 if found else 1, extra=more))
    memory = []
    if found:
        ranks = found["memory_mb"]
        more = dict(extra) | {"memory_mb_by_rank": ranks}
        rising = max(r["peak_with"] - r["peak_without"] for r in ranks)
        values = {MEMORY_DDPW: [rising], MEMORY_STATE: [found["state_bytes"] / 2**20],
                  MEMORY_SHARE: [max(found["share_bytes"]) / 2**20]}
    else:
        more, values = dict(extra), {name: [] for name in (MEMORY_DDPW, MEMORY_STATE,
                                                           MEMORY_SHARE)}
    for variant, numbers in values.items():
        memory.append(Result(
            ROW, f"async save, extra host memory, {params_m}M, {where}", variant, "MiB",
            numbers, MEMORY_STATE, peak_rss_mb=run.peak_rss_mb if found else None,
            failed=0 if found else 1,
            extra=more | ({"note": "VmHWM over an epoch with a checkpoint every "
                                   f"{every} steps less VmHWM over an epoch without, on the "
                                   "rank where it rises most"}
                          if variant == MEMORY_DDPW else {})))
    return [*blocked, *floor, *steps, *memory]


def mlp_width(params_m: int) -> int:
    """The hidden width of the benchmarks' MLP (``loops/workload.py``) of about ``params_m``
    million parameters: ``w * w + (features + classes + 2) * w + classes``."""
    from loops.workload import CLASSES, FEATURES

    linear = FEATURES + CLASSES + 2
    return round((-linear + math.sqrt(linear * linear + 4 * (params_m * 1e6 - CLASSES))) / 2)


def resumed(params_m: int, repeats: int, quick: bool, root: Path) -> list[Result]:
    """The ``resume`` part of one model size, as ``resume.py`` measures it."""
    import resume as resume_row  # scripts/bench/resume.py

    width = mlp_width(params_m)
    store = Path(tempfile.mkdtemp(prefix="ddpw-bench-checkpoint-resume-", dir=root))
    try:
        # Two steps an epoch (64 samples per batch per process): only the first step counts.
        plan = resume_row.commands(width, 256, store)
        for steps in plan.values():
            resume_row.save(*steps["save"])
        sizes = {resume_row.DDPW: resume_row.folder_mb(store / "ddpw"),
                 resume_row.BASELINE: resume_row.folder_mb(store / "accelerate")}
        measures: dict[str, Callable[[], Run]] = {
            name: partial(resume_row.resume, *steps["resume"]) for name, steps in plan.items()}
        outcome = interleave(measures, repeats, warmup=0 if quick else 1)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    params = resume_row.workload.parameters("mlp", width)
    out = []
    for name, (runs, failed) in outcome.items():
        out.append(Result(
            ROW, f"resume to first step, MLP {params_m}M, 2 procs", name, "s",
            [r.first_step_s for r in runs], resume_row.BASELINE,
            peak_rss_mb=max((r.peak_rss_mb for r in runs), default=None), failed=failed,
            extra={"params": params, "mlp_width": width, "checkpoint_mb": sizes[name],
                   "before_restore_s": [r.before_restore_s for r in runs],
                   "restore_s": [r.restore_s for r in runs],
                   **({"verify_s": [r.verify_s for r in runs]} if name == resume_row.DDPW
                      else {}),
                   "command_seconds": [r.seconds for r in runs]}))
    return out


def measure(repeats: int, quick: bool, sizes: Sequence[int] | None = None, every: int = EVERY,
            folder: Path | None = None, parts: Sequence[str] = PARTS) -> list[Result]:
    """The row's results: every part for every model size (``quick``: 10M only)."""
    root = Path(folder or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    for params_m in sizes or ((10,) if quick else SIZES):
        print(f"  checkpoint: {params_m}M parameters", file=sys.stderr, flush=True)
        if "isolated" in parts:
            results += saves_and_loads(1, params_m, repeats, every, root)
        if "job" in parts:
            results += saves_and_loads(2, params_m, repeats, every, root)
        if "async" in parts:
            results += in_the_background(params_m, repeats, every, root)
        if "resume" in parts:
            results += resumed(params_m, repeats, quick, root)
    return with_ratios(results)


def show(results: Sequence[Result]) -> None:
    """Print the results as a small table, and the goals' ratios the table does not show."""
    width = max((len(r.case) for r in results), default=4)
    print(f"{'case':{width}} {'variant':38} {'median':>9} {'min':>9} {'max':>9} {'unit':7} "
          f"{'ratio':>6} {'RSS MB':>7} {'failed':>6}")
    for r in results:
        ratio = f"{r.ratio:6.3f}" if r.ratio is not None else f"{'-':>6}"
        low, high = (min(r.values), max(r.values)) if r.values else (float("nan"),) * 2
        print(f"{r.case:{width}} {r.variant:38} {r.median:9.3f} {low:9.3f} {high:9.3f} "
              f"{r.metric:7} {ratio} {r.peak_rss_mb or 0:7.0f} {r.failed:6d}")
    for r in results:
        if r.variant == job.DDPW_ASYNC and r.case.startswith("async save, time") and r.values:
            print(f"{r.case}: a save's background work until published, median "
                  f"{statistics.median(r.extra['published_s']):.3f} s; the first save "
                  f"(making the buffers) blocked {r.extra['first_save_blocked_s']:.3f} s")
        if r.variant == job.DDPW_EVERY and r.values and r.extra.get("blocked_per_save_s"):
            print(f"{r.case}: blocked per save in the loop, median "
                  f"{statistics.median(r.extra['blocked_per_save_s']):.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help="10M only: a smoke test, not a measurement")
    parser.add_argument("--sizes", default=None,
                        help="millions of parameters, comma-separated (default 10,50,100)")
    parser.add_argument("--every", type=int, default=EVERY,
                        help="steps between checkpoints in the steps/s case")
    parser.add_argument("--folder", type=Path, default=None,
                        help="where the checkpoints go (default: the temporary folder)")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the results here, as run.py writes latest.json")
    args = parser.parse_args()
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {','.join(PARTS)}")
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    results = measure(args.repeats, args.quick, sizes, args.every, args.folder, parts)
    show(results)
    if args.json:
        from run import machine

        args.json.write_text(json.dumps(
            {"machine": machine(), "repeats": args.repeats, "quick": args.quick,
             "results": [dataclasses.asdict(r) | {"median": r.median} for r in results]},
            indent=1, default=str))


if __name__ == "__main__":
    main()
