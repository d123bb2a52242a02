"""Wall time of the MNIST example on 2 CPU processes: ddpw against the same loop by hand.

    python scripts/bench/example_vs_accelerate.py [--repeats 3] [--epochs 6] [--json out.json]

Each variant is a fresh ``python`` process, run alternately after one warm-up of each, in its own
empty folder; the table gives the median, min and max wall seconds and the ratio of medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def variants(epochs: int) -> dict[str, tuple[list[str], dict[str, str]]]:
    common = ["--epochs", str(epochs), "--save-every", "3"]
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                  "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no", "--main_process_port", "0",
                  str(ROOT / "scripts" / "bench" / "handwritten_accelerate.py"), *common]
    ddpw = [sys.executable, str(ROOT / "examples" / "mnist" / "main.py"), "--platform", "cpu",
            "--n-procs", "2", "--mode", "train", "--quiet", *common]
    threads = str(max(1, len(os.sched_getaffinity(0)) // 2))
    # The same thread count per process as ddpw chooses, so that only the wrapper differs.
    return {"accelerate launch (by hand)": (accelerate, {"ACCELERATE_USE_CPU": "1",
                                                         "OMP_NUM_THREADS": threads}),
            "ddpw Wrapper.start": (ddpw, {})}


def run_once(command: list[str], env: dict[str, str]) -> float | None:
    """Wall seconds of one run, or ``None`` if it failed (its output's end is printed)."""
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        done = subprocess.run(command, cwd=folder, env={**os.environ, **env}, text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if done.returncode != 0:
            print(f"FAILED ({done.returncode}): {' '.join(command[:4])} ...\n"
                  + "\n".join(done.stderr.splitlines()[-8:]), file=sys.stderr)
            return None
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    runs = variants(args.epochs)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for command, env in runs.values():
        run_once(command, env)  # warm-up: page cache, bytecode
    failed = {name: 0 for name in runs}
    for _ in range(args.repeats):
        for name, (command, env) in runs.items():
            seconds = run_once(command, env)
            if seconds is None:
                failed[name] += 1
            else:
                times[name].append(seconds)
    baseline = statistics.median(times["accelerate launch (by hand)"])
    rows = []
    print(f"{'variant':30} {'median s':>9} {'min':>7} {'max':>7} {'ratio':>6} {'failed':>7}")
    for name, values in times.items():
        median = statistics.median(values)
        rows.append({"variant": name, "median_s": median, "min_s": min(values),
                     "max_s": max(values), "ratio": median / baseline, "runs": values,
                     "failed": failed[name]})
        print(f"{name:30} {median:9.2f} {min(values):7.2f} {max(values):7.2f} "
              f"{median / baseline:6.3f} {failed[name]:7d}")
    if args.json:
        args.json.write_text(json.dumps({"epochs": args.epochs, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
