"""Every benchmark of ddpw against the raw tools and its peers, in one run.

    python scripts/bench/run.py [--repeats 5] [--quick] [--rows launch,training,...] [--publish]
        [--keep-other-rows]

Rows (each a module of this folder with ``measure(repeats, quick)``):

- ``launch``: a job that does one all-reduce, through ddpw and through the raw launchers, and
  the start-up of ``import ddpw`` and ``ddpw-launch --help`` against ``python -c pass``;
- ``training``: samples per second of the Trainer against the same loop by hand;
- ``compile``: ``PlatformConfig.torch_compile``'s gain in samples per second and cost in
  start-up, against the loop by hand under ``accelerate launch --dynamo_backend inductor``;
- ``checkpoint``: save and load times and bytes against ``torch.save`` and Accelerate;
- ``resume``: time from the command's start to the first resumed training step;
- ``sharding``: ``strategy="fsdp"``'s samples per second and memory per rank against the same
  loop by hand with FSDP2's ``fully_shard``, and against ``strategy="ddp"``;
- ``slurm``: submit to first step and to the end, against a hand-written sbatch script (only
  when a SLURM cluster answers: ``scripts/slurm-cluster start``);
- ``sweep``: a 2-point ``ddpw-launch --sweep`` job array against ``sbatch --array`` by hand,
  submit to the first task's first line and to the end (only when a SLURM cluster answers);
- ``original_ddpw``: the original ``ddpw`` package from PyPI, where its features overlap.

Every variant of a row runs in fresh processes, after a warm-up, alternating with the others;
the table gives the median, the spread and the ratio to the row's baseline, measured in the same
run. Results go to ``scripts/bench/results/latest.json``, with a figure per row beside it;
``--publish`` also writes the docs' Performance page (``docs/performance.rst``) and its figures
from them (``publish.py`` does that from a results file alone), with the machine's description,
so that no number there is typed by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import publish
from common import Result

ROWS = ("launch", "training", "compile", "checkpoint", "resume", "sharding", "slurm",
        "sweep", "original_ddpw")
RESULTS = publish.RESULTS


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    import accelerate
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor() or "unknown CPU")
    memory = next((int(line.split()[1]) // 2**20 for line in
                   Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")), 0)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cpu": cpu, "cores": str(len(os.sched_getaffinity(0))), "memory_gib": str(memory),
            "gpu": gpu, "python": platform.python_version(), "torch": torch.__version__,
            "accelerate": accelerate.__version__, "os": platform.platform(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def table(results: list[Result]) -> str:
    lines = [f"{'row':13} {'case':48} {'variant':38} {'median':>10} {'min':>9} {'max':>9} "
             f"{'ratio':>6} {'peak MiB':>8} {'failed':>6}"]
    for r in results:
        spread = (f"{min(r.values):9.3f} {max(r.values):9.3f}" if r.values
                  else f"{'-':>9} {'-':>9}")
        median = f"{r.median:10.3f}" if r.values else f"{'-':>10}"
        ratio = f"{r.ratio:6.3f}" if r.ratio is not None else f"{'-':>6}"
        peak = f"{r.peak_rss_mb:8.0f}" if r.peak_rss_mb else f"{'-':>8}"
        lines.append(f"{r.row:13} {r.case[:48]:48} {r.variant[:38]:38} {median} {spread} "
                     f"{ratio} {peak} {r.failed:6d}  {r.metric}")
    return "\n".join(lines)


def _other_rows(path: Path, measured: set[str]) -> list[Result]:
    """The results in ``path`` of the rows not in ``measured``, each marked with its run's
    date, repeats and CPU (ratios compare variants of one run, so rows of two runs may sit
    side by side)."""
    return [r for r in publish.load(path)[0] if r.row not in measured]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small cases only, for a smoke run")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--publish", action="store_true",
                        help="write docs/performance.rst from the results")
    parser.add_argument("--keep-other-rows", action="store_true",
                        help="keep the rows of the last run (latest.json) that this run does "
                             "not measure, each with the date, repeats and CPU of its own run")
    parser.add_argument("--add", type=Path, action="append", default=[], metavar="JSON",
                        help="add the results that a row's own script wrote with --json (a "
                             "part of a row measured by itself), in the order given")
    args = parser.parse_args()
    facts = machine()
    results: list[Result] = []
    for row in filter(None, args.rows.split(",")):
        print(f"== {row}", file=sys.stderr, flush=True)
        for result in importlib.import_module(row).measure(args.repeats, args.quick):
            result.extra |= {"measured": facts["date"], "repeats": args.repeats,
                             "cpu": facts["cpu"]}
            results.append(result)
    for path in args.add:
        results += _other_rows(path, set())
    if args.keep_other_rows and (RESULTS / "latest.json").is_file():
        results += _other_rows(RESULTS / "latest.json", {r.row for r in results})
    print(table(results))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(
        {"machine": facts, "repeats": args.repeats, "quick": args.quick,
         "results": [dataclasses.asdict(r) | {"median": r.median} for r in results]},
        indent=1, default=str))
    publish.figures(results, RESULTS)
    if args.publish:
        publish.publish(results, facts)
    print(f"results in {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
