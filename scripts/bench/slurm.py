"""SLURM: the MNIST example on 2 CPU processes of one node, through ddpw against a hand-written
sbatch script that runs ``accelerate launch``, on the same cluster in the same run.

    scripts/slurm-cluster start && export SLURM_CONF=/tmp/ddpw-slurm/etc/slurm.conf
    python scripts/bench/slurm.py [--repeats 3] [--epochs 2] [--partition debug]

Two times per run, both from the moment the submitting command starts:
- first step: until rank 0 has done its first optimiser step (the wait for the allocation, the
  start of the processes and the set-up);
- total: until the command returns, the job having ended (the hand-written script waits with
  ``sbatch --wait``; ddpw's ``Wrapper.start`` polls ``sacct``).
Each variant runs as a fresh process in its own empty folder, alternately, after one warm-up of
each; the table gives medians, spreads and the ratios of medians.

Where the time to the first step goes (the result's ``extra["breakdown_s"]``, medians):
- command start → start() called: the ddpw script's own work before it calls ``Wrapper.start``
  (its imports, torch's included, and the example's data and model, which the hand-written
  variant's ranks make on the node instead); zero by hand;
- start() called → submitted: ddpw's ``Wrapper.start`` (its imports, checks, ``sinfo``, the
  pickled job and sbatch); by hand, sbatch alone;
- submitted → node started: SLURM's scheduling, until the batch script runs (ddpw: the first
  line that submitit's runner logs on the node, after its Python has started);
- node started → first step: the node's launch, the ranks' imports and set-up, one step.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, Result, with_ratios

HANDWRITTEN = ROOT / "scripts" / "bench" / "handwritten_accelerate.py"

SBATCH = """#!/bin/bash
#SBATCH --job-name=bench-handwritten
#SBATCH --partition={partition}
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=10
#SBATCH --output={folder}/slurm-%j.out
date +%s.%N > {folder}/node-started
export ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 BENCH_FIRST_STEP={folder}/first-step
srun {python} -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 \\
    --mixed_precision no --dynamo_backend no --main_process_port 0 \\
    {script} --epochs {epochs} --save-every {epochs}
"""


def ddpw_job(partition: str, epochs: int) -> None:
    """The ddpw variant, run in a process of its own: the example's Trainer on SLURM."""
    sys.path.insert(0, str(ROOT / "examples" / "mnist"))
    from src import MyDataset, MyModel, MyTrainer, my_optimiser

    from ddpw import ArtefactsConfig, JobConfig, Platform, PlatformConfig, Wrapper

    class Timed(MyTrainer):
        def train_step(self, batch):
            loss = super().train_step(batch)
            if self.accelerator.is_main_process and not Path("first-step").exists():
                Path("first-step").write_text(repr(time.time()))
            return loss

    p_config = PlatformConfig(platform=Platform.SLURM, n_gpus=0, n_procs=2, partition=partition,
                              timeout_min=10, verbose=False)
    a_config = ArtefactsConfig(train_set=MyDataset(train=True), test_set=MyDataset(train=False),
                               batch_size=32, model=MyModel(), optimiser_loader=my_optimiser)
    j_config = JobConfig(epochs=epochs, save_every=epochs,
                         checkpoint_path=str(Path("checkpoint").resolve()))
    # start() with wait=False, then wait(): what start() does by itself, with the moment of
    # submission noted in between.
    Path("start-called").write_text(repr(time.time()))
    submission = Wrapper(p_config, a_config, wait=False).start(Timed(j_config))
    Path("submitted").write_text(repr(time.time()))
    Path("job-folder").write_text(str(submission.folder))
    submission.wait()


def node_started(folder: Path) -> float | None:
    """When submitit's runner first logged on node 0 of the ddpw job in ``folder``."""
    import datetime

    job_folder = Path((folder / "job-folder").read_text())
    for log in sorted((job_folder / "slurm").glob("*_0_log.out")):
        for line in log.read_text(errors="replace").splitlines():
            match = re.search(r"submitit \w+ \((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\)", line)
            if match:
                when = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
                return when.timestamp()
    return None


def run_once(variant: str, partition: str, epochs: int) -> tuple[float, float, list[float]] | None:
    """(seconds to the first step, total seconds, the :data:`SEGMENTS` of the first) of one
    run, or ``None`` if it failed."""
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        folder = Path(tmp)
        if variant == "ddpw":
            command = [sys.executable, __file__, "--ddpw-job", "--partition", partition,
                       "--epochs", str(epochs)]
        else:
            script = folder / "job.sh"
            script.write_text(SBATCH.format(partition=partition, folder=folder,
                                            python=sys.executable, script=HANDWRITTEN,
                                            epochs=epochs))
            command = ["sbatch", "--wait", "--parsable", str(script)]
        started = time.time()
        done = subprocess.run(command, cwd=folder, text=True, capture_output=True)
        total = time.time() - started
        first = folder / "first-step"
        if done.returncode != 0 or not first.is_file():
            print(f"FAILED ({done.returncode}): {variant}\n"
                  + "\n".join(done.stderr.splitlines()[-8:]), file=sys.stderr)
            return None
        first_step = float(first.read_text())
        if variant == "ddpw":
            called = float((folder / "start-called").read_text())
            submitted, node = float((folder / "submitted").read_text()), node_started(folder)
        else:
            # sbatch --wait returns at the end: the job id is known once sbatch has the job,
            # which the scheduler's own record gives (SubmitTime, to the second) no better
            # than the command's start does; sbatch alone takes a few milliseconds.
            called = submitted = started
            node = float((folder / "node-started").read_text())
        node = node if node is not None else submitted
        return first_step - started, total, [called - started, submitted - called,
                                             node - submitted, first_step - node]


HANDWRITTEN_VARIANT = "sbatch + accelerate launch (by hand)"
#: The segments of the time to the first step (see the module's docstring).
SEGMENTS = ("command start → start() called", "start() called → submitted",
            "submitted → node started", "node started → first step")


def measure(repeats: int, quick: bool, partition: str = "debug",
            epochs: int = 2) -> list[Result]:
    """Both variants, alternately; nothing (and a note) when no SLURM cluster answers."""
    if shutil.which("sinfo") is None or subprocess.run(["sinfo"], capture_output=True).returncode:
        print("  slurm: no cluster answers (start one with scripts/slurm-cluster start and set "
              "SLURM_CONF); row skipped", file=sys.stderr)
        return []
    variants = {HANDWRITTEN_VARIANT: "handwritten", "ddpw Wrapper.start": "ddpw"}
    for variant in variants.values():
        run_once(variant, partition, epochs)  # warm-up
    runs: dict[str, list[tuple[float, float, list[float]]]] = {name: [] for name in variants}
    failed = {name: 0 for name in variants}
    for _ in range(repeats):
        for name, variant in variants.items():
            result = run_once(variant, partition, epochs)
            if result is None:
                failed[name] += 1
            else:
                runs[name].append(result)
    cases = ("1 node x 2 processes: submit to first step",
             f"1 node x 2 processes: submit to the end ({epochs} epochs)")
    results = [Result("slurm", case, name, "s", [r[i] for r in runs[name]], HANDWRITTEN_VARIANT,
                      failed=failed[name])
               for i, case in enumerate(cases) for name in variants]
    for result in results[:len(variants)]:  # the first case's: where its time went
        segments = [r[2] for r in runs[result.variant]]
        if segments:
            result.extra["breakdown_s"] = {
                name: statistics.median(s[i] for s in segments)
                for i, name in enumerate(SEGMENTS)}
    return with_ratios(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--partition", default="debug")
    parser.add_argument("--ddpw-job", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ddpw_job:
        ddpw_job(args.partition, args.epochs)
        return
    for r in measure(args.repeats, False, args.partition, args.epochs):
        print(f"{r.case:50} {r.variant:38} {r.median:7.2f} s "
              f"(min {min(r.values):.2f}, max {max(r.values):.2f})  x{r.ratio:.3f}  "
              f"failed {r.failed}")
        for name, seconds in r.extra.get("breakdown_s", {}).items():
            print(f"{'':50} {name:38} {seconds:7.2f} s")


if __name__ == "__main__":
    main()
