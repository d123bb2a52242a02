"""Sweeps on SLURM: a 2-point grid as one job array, through ``ddpw-launch --sweep`` against
``sbatch --array`` by hand, on the same cluster in the same run.

    scripts/slurm-cluster start && export SLURM_CONF=/tmp/ddpw-slurm/etc/slurm.conf
    python scripts/bench/sweep.py [--repeats 3] [--partition debug]

Each point runs a script that imports torch, as a training script does first, and notes when
it got there. Two times per run, both from the moment the submitting command starts:
- first task's first line: until the first point's script has imported torch (the
  submission, SLURM's scheduling, the node's start and, for ddpw, its entry on the node);
- total: until the command returns, every point done (``sbatch --wait`` by hand; ddpw waits
  for the array and writes the sweep folder's records and table).
Each variant runs as a fresh command in its own empty folder, alternately, after one warm-up of
each; the table gives medians, spreads and the ratios of medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Result, with_ratios

POINT = """import sys, time
import torch  # noqa: F401, as a training script begins
from pathlib import Path
Path(sys.argv[1], f"first-{sys.argv[2]}").write_text(repr(time.time()))
"""

SBATCH = """#!/bin/bash
#SBATCH --job-name=bench-array
#SBATCH --partition={partition}
#SBATCH --array=0-1
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=1
#SBATCH --time=5
#SBATCH --output={folder}/slurm-%A_%a.out
srun {python} {script} {folder} $SLURM_ARRAY_TASK_ID
"""

DDPW = "ddpw-launch --sweep"
BY_HAND = "sbatch --array (by hand)"


def run_once(variant: str, partition: str) -> tuple[float, float] | None:
    """(seconds to the first task's first line, total seconds) of one run, or ``None``."""
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        folder = Path(tmp)
        script = folder / "point.py"
        script.write_text(POINT)
        if variant == DDPW:
            command = [sys.executable, "-m", "ddpw", "--platform", "slurm", "--n-gpus", "0",
                       "--n-procs", "1", "--partition", partition, "--timeout-min", "5",
                       "--log-dir", str(folder / "logs"), "--sweep", "x=1,2", str(script),
                       str(folder), "{x}"]
        else:
            job = folder / "job.sh"
            job.write_text(SBATCH.format(partition=partition, folder=folder,
                                         python=sys.executable, script=script))
            command = ["sbatch", "--wait", "--parsable", str(job)]
        started = time.time()
        done = subprocess.run(command, cwd=folder, text=True, capture_output=True)
        total = time.time() - started
        firsts = [float(p.read_text()) for p in folder.glob("first-*")]
        if done.returncode != 0 or len(firsts) != 2:
            print(f"FAILED ({done.returncode}): {variant}\n"
                  + "\n".join(done.stderr.splitlines()[-8:]), file=sys.stderr)
            return None
        return min(firsts) - started, total


def measure(repeats: int, quick: bool, partition: str = "debug") -> list[Result]:
    """Both variants, alternately; nothing (and a note) when no SLURM cluster answers."""
    if shutil.which("sinfo") is None or subprocess.run(["sinfo"], capture_output=True).returncode:
        print("  sweep: no cluster answers (start one with scripts/slurm-cluster start and set "
              "SLURM_CONF); row skipped", file=sys.stderr)
        return []
    variants = (BY_HAND, DDPW)
    for variant in variants:
        run_once(variant, partition)  # warm-up
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    failed = {name: 0 for name in variants}
    for _ in range(repeats):
        for name in variants:
            result = run_once(name, partition)
            if result is None:
                failed[name] += 1
            else:
                runs[name].append(result)
    cases = ("2-point array: submit to the first task's first line",
             "2-point array: submit to the end")
    return with_ratios([Result("sweep", case, name, "s", [r[i] for r in runs[name]], BY_HAND,
                               failed=failed[name])
                        for i, case in enumerate(cases) for name in variants])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--partition", default="debug")
    args = parser.parse_args()
    for r in measure(args.repeats, False, args.partition):
        print(f"{r.case:55} {r.variant:28} {r.median:7.2f} s (min {min(r.values):.2f}, "
              f"max {max(r.values):.2f})  x{r.ratio:.3f}  failed {r.failed}")


if __name__ == "__main__":
    main()
