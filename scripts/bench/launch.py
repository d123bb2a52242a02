"""Launch: the cost of starting a job, for a job that does almost nothing (one all-reduce).

    python scripts/bench/launch.py [--repeats 5] [--quick]

Three cases, each a fresh process per run, timed by :func:`common.run_command` (wall seconds
and the largest peak RSS of any one process), the variants taking turns after a warm-up of each:

- 2 CPU processes, one all-reduce: ddpw's ``Wrapper.start`` (a function on every rank),
  ``ddpw-launch`` (a plain Accelerate script), plain ``accelerate launch`` (the same script: the
  baseline), and ``torchrun --standalone`` (torch.distributed alone, the floor). Each gets the
  same threads per process as ddpw chooses (the cores split evenly), and the Accelerate flags
  that ddpw's own launch uses.
- 1 process: plain ``python`` running the Accelerate script (the baseline), ``Wrapper.start``
  with ``n_procs=1`` (which runs in the calling process) and ``ddpw-launch --n-procs 1``.
- 2 machines x 1 process, one all-reduce: two launchers on this machine, node 1 and node 0,
  meeting at 127.0.0.1 in torchrun's static rendezvous (each run is one ``sh`` command that
  starts both and waits for both): ``torchrun --nnodes 2 --node-rank R`` (the baseline),
  ``ddpw-launch --n-nodes 2 --node-rank R`` (the Accelerate script) and two ``Wrapper.start``
  with ``n_nodes=2, node_rank=R``, one thread per process each.
- Command start-up: ``python -c pass`` (the baseline), ``python -c "import ddpw"`` and
  ``ddpw-launch --help``, neither of which imports torch. Each run takes milliseconds, so this
  case runs four times the repeats.

Where the time goes: the payloads (``payloads/``) stamp the moment each rank's process was
created (the kernel's record, so the interpreter's start is counted), its imports were done
(torch, Accelerate and, for ddpw's workers, ddpw), it had joined the process group, the
all-reduce was done, and its own code was done (its last exit handler; what follows is the
interpreter's shutdown, which ddpw's workers skip, and the launcher's wait and exit). A stage
counts as reached when every rank has reached it. From the command's start (when its
``timeout`` process was created, within 5 ms) these split each run's wall time into segments
that add up to it; the result's ``extra`` holds their medians (``breakdown_s``), and the median
over runs of the largest peak RSS of a rank (``rank_peak_rss_mb``; ``peak_rss_mb`` is the
largest of any process, the launcher's included).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PYTHON, Result, Run, interleave, row_main, run_command, with_ratios

PAYLOADS = Path(__file__).resolve().parent / "payloads"
ROW = "launch"
TWO = "2 processes, one all-reduce"
MACHINES = "2 machines x 1 process, one all-reduce"
ONE = "1 process, one all-reduce"
STARTUP = "command start-up"
#: A run that takes longer than this has hung: it is ended (with its processes) and fails.
LIMIT_S = 180

#: The segments of a run's wall time: (name, from stage, to stage); ``None`` is the command's
#: start or end.
SEGMENTS = (
    ("launch → rank processes started", None, "born"),
    ("start → imports done", "born", "imports"),
    ("imports → rendezvous done", "imports", "rendezvous"),
    ("rendezvous → all-reduce done", "rendezvous", "allreduce"),
    ("teardown: all-reduce done → ranks' code done", "allreduce", "exit"),
    ("teardown: ranks' code done → command returned", "exit", None),
)
STAGES = ("born", "imports", "rendezvous", "allreduce", "exit")
#: What a variant's breakdown means where it differs from the others.
NOTES = {
    ("ddpw Wrapper.start", 1): "a world of one runs in the calling process, which is the rank: "
                               "its imports are ddpw's",
    ("ddpw-launch", 1): "a world of one runs the script in the ddpw-launch process itself: "
                        "the command's own start-up counts as the rank's imports",
}


def threads_per_process(n_procs: int) -> int:
    """The threads ddpw gives each of ``n_procs`` CPU processes (``ddpw.plan``): the cores split
    evenly."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // n_procs)


def console_script(name: str, module: str) -> list[str]:
    """The console script ``name`` of this Python's environment, as a user types it, or
    ``python -m module`` where it is not installed."""
    script = Path(PYTHON).parent / name
    return [str(script)] if script.is_file() else [PYTHON, "-m", module]


def accelerate_launch(n_procs: int, script: list[str]) -> list[str]:
    """``accelerate launch`` with the flags of ddpw's own launch (``ddpw.plan``), through the
    launch command's module: the ``accelerate`` CLI would add the import of its other
    subcommands, which no launch needs."""
    return [PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
            str(n_procs), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
            "no", "--main_process_port", "0", *script]


def variants(n_procs: int) -> dict[str, tuple[list[str], dict[str, str]]]:
    """The commands (and extra environment) of the case with ``n_procs`` processes; the first
    is the baseline."""
    script = [str(PAYLOADS / "accelerate_allreduce.py"), "--world", str(n_procs)]
    wrapper = [PYTHON, str(PAYLOADS / "wrapper_start.py"), "--n-procs", str(n_procs)]
    ddpw_launch = [*console_script("ddpw-launch", "ddpw"), "--platform", "cpu", "--n-procs",
                   str(n_procs), *script]
    if n_procs == 1:
        # As ddpw's plan of one process does for the script it runs: CPU, torch's own threads.
        return {"python": ([PYTHON, *script], {"ACCELERATE_USE_CPU": "1"}),
                "ddpw Wrapper.start": (wrapper, {}),
                "ddpw-launch": (ddpw_launch, {})}
    threads = {"OMP_NUM_THREADS": str(threads_per_process(n_procs))}
    torchrun = [*console_script("torchrun", "torch.distributed.run"), "--standalone",
                "--nproc_per_node", str(n_procs), str(PAYLOADS / "torch_allreduce.py"),
                "--world", str(n_procs)]
    return {"accelerate launch": (accelerate_launch(n_procs, script),
                                  {"ACCELERATE_USE_CPU": "1", **threads}),
            "ddpw Wrapper.start": (wrapper, {}),
            "ddpw-launch": (ddpw_launch, {}),
            "torchrun --standalone": (torchrun, threads)}


def both_nodes(node: Callable[[int], list[str]]) -> list[str]:
    """One command that starts ``node(1)`` in the background and ``node(0)``, waits for both,
    and fails if either does."""
    one, zero = (shlex.join(node(rank)) for rank in (1, 0))
    return ["sh", "-c", f"{one} & other=$!; {zero}; status=$?; wait $other || status=$?; "
                        f"exit $status"]


def machine_variants() -> dict[str, tuple[list[str], dict[str, str]]]:
    """The commands of the case of 2 machines x 1 process (on loopback), each variant with a
    port of its own; the first is the baseline."""
    script = [str(PAYLOADS / "accelerate_allreduce.py"), "--world", "2"]
    ports = iter(range(29731, 29734))
    torch_port, launch_port, wrapper_port = next(ports), next(ports), next(ports)
    torchrun = both_nodes(lambda rank: [
        *console_script("torchrun", "torch.distributed.run"), "--nnodes", "2", "--node-rank",
        str(rank), "--master-addr", "127.0.0.1", "--master-port", str(torch_port),
        "--nproc-per-node", "1", str(PAYLOADS / "torch_allreduce.py"), "--world", "2"])
    ddpw_launch = both_nodes(lambda rank: [
        *console_script("ddpw-launch", "ddpw"), "--platform", "cpu", "--n-procs", "1",
        "--n-nodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1",
        "--master-port", str(launch_port), *script])
    wrapper = both_nodes(lambda rank: [
        PYTHON, str(PAYLOADS / "wrapper_start.py"), "--n-procs", "1", "--n-nodes", "2",
        "--node-rank", str(rank), "--master-port", str(wrapper_port)])
    one_thread = {"OMP_NUM_THREADS": "1"}
    return {"torchrun, static rendezvous": (torchrun, one_thread),
            "ddpw-launch": (ddpw_launch, {**one_thread, "ACCELERATE_USE_CPU": "1"}),
            "ddpw Wrapper.start": (wrapper, one_thread)}


def startup_variants() -> dict[str, list[str]]:
    """The commands of the start-up case; the first is the baseline."""
    return {"python -c pass": [PYTHON, "-c", "pass"],
            "python -c 'import ddpw'": [PYTHON, "-c", "import ddpw"],
            "ddpw-launch --help": [*console_script("ddpw-launch", "ddpw"), "--help"]}


def timed(command: list[str], env: dict[str, str], limit_s: float = LIMIT_S) -> Run:
    """:func:`common.run_command`, but a run that hangs is ended and fails: ``timeout`` sends its
    process group SIGTERM (launchers end their workers on it; ddpw's die with their parent)."""
    if shutil.which("timeout"):
        command = ["timeout", "-k", "10", str(int(limit_s)), *command]
    try:
        return run_command(command, env=env, timeout=limit_s + 30)
    except subprocess.TimeoutExpired:
        return Run(limit_s, 0.0, False, f"no end after {limit_s + 30:.0f} s")


def stamped_run(command: list[str], env: dict[str, str], world: int,
                runs: list[tuple[Run, dict[str, float] | None, float | None]]) -> Run:
    """Run ``command`` once with its payload's stamps going to a fresh file; append the run, its
    segments (``None`` without every rank's stamps) and the largest rank's peak RSS to ``runs``."""
    with tempfile.TemporaryDirectory(prefix="ddpw-bench-launch-") as tmp:
        stamps = Path(tmp) / "stamps.jsonl"
        run = timed(command, {**env, "BENCH_STAMPS": str(stamps)})
        returned = time.time()
        records = ([json.loads(line) for line in stamps.read_text().splitlines()]
                   if stamps.is_file() else [])
    segments, rank_rss = breakdown(records, run.seconds, returned, world)
    runs.append((run, segments, rank_rss))
    return run


def breakdown(records: list[dict[str, Any]], seconds: float, returned: float,
              world: int) -> tuple[dict[str, float] | None, float | None]:
    """A run's wall time split into :data:`SEGMENTS`, and the largest peak RSS of its ranks.

    The ranks are the processes that stamped the all-reduce (a launching ``Wrapper.start`` also
    stamps its own start-up); without every stage's stamp from all ``world`` ranks, ``None``.
    A stage is reached when the last rank reaches it. The command starts when its ``timeout``
    process was created (else when ``run_command`` returned, less the wall time) and ends its
    wall time later, so that the segments add up to it.
    """
    by_pid: dict[int, dict[str, dict[str, Any]]] = {}
    for record in records:
        by_pid.setdefault(record["pid"], {})[record["stage"]] = record
    ranks = [stages for stages in by_pid.values() if "allreduce" in stages]
    if len(ranks) != world or not all(s in rank for rank in ranks for s in STAGES):
        return None, None
    reached: dict[str | None, float] = {s: max(rank[s]["time"] for rank in ranks)
                                        for s in STAGES}
    started = [rank["command"]["time"] for rank in ranks if "command" in rank]
    start = min(started) if started else returned - seconds
    segments = {name: (start + seconds if end is None else reached[end])
                - (start if begin is None else reached[begin])
                for name, begin, end in SEGMENTS}
    # The exit stamp holds a rank's peak RSS over its whole life, nearly.
    return segments, max(rank["exit"]["rss_mb"] for rank in ranks)


def measure_case(case: str, commands: dict[str, tuple[list[str], dict[str, str]]],
                 n_procs: int, repeats: int, quick: bool) -> list[Result]:
    """Every variant of one case (``commands``: a command and its environment by variant's
    name) of ``n_procs`` processes in all, interleaved; the first variant is the baseline."""
    warmup = 0 if quick else 1
    stamped: dict[str, list[tuple[Run, dict[str, float] | None, float | None]]] = {
        name: [] for name in commands}

    def measure_of(name: str) -> Callable[[], Run]:
        command, env = commands[name]
        return lambda: stamped_run(command, env, n_procs, stamped[name])

    outcomes = interleave({name: measure_of(name) for name in commands}, repeats, warmup)
    baseline = next(iter(commands))
    results = []
    for name, (runs, failed) in outcomes.items():
        measured = [entry for entry in stamped[name][warmup:] if entry[0].ok]
        segments = [s for _, s, _ in measured if s is not None]
        rank_rss = [r for _, _, r in measured if r is not None]
        command, env = commands[name]
        extra: dict[str, Any] = {"command": shlex.join(command), "env": env}
        if (name, n_procs) in NOTES:
            extra["note"] = NOTES[name, n_procs]
        if segments:
            extra["breakdown_s"] = {seg: statistics.median(s[seg] for s in segments)
                                    for seg, _, _ in SEGMENTS}
            extra["breakdown_runs"] = len(segments)
        if rank_rss:
            extra["rank_peak_rss_mb"] = statistics.median(rank_rss)
        results.append(Result(
            row=ROW, case=case, variant=name, metric="s", values=[r.seconds for r in runs],
            baseline=baseline, failed=failed, extra=extra,
            peak_rss_mb=max((r.peak_rss_mb for r in runs), default=None)))
    return results


def measure_startup(repeats: int, quick: bool) -> list[Result]:
    """The start-up case, interleaved: no stamps, and no ``timeout`` process, whose own start
    would be a good part of a run of milliseconds."""
    commands = startup_variants()

    def measure_of(command: list[str]) -> Callable[[], Run]:
        return lambda: run_command(command, timeout=LIMIT_S)

    outcomes = interleave({name: measure_of(command) for name, command in commands.items()},
                          4 * repeats, 0 if quick else 1)
    baseline = next(iter(commands))
    return [Result(row=ROW, case=STARTUP, variant=name, metric="s",
                   values=[r.seconds for r in runs], baseline=baseline, failed=failed,
                   extra={"command": shlex.join(commands[name])},
                   peak_rss_mb=max((r.peak_rss_mb for r in runs), default=None))
            for name, (runs, failed) in outcomes.items()]


def measure(repeats: int, quick: bool) -> list[Result]:
    """Every case: 2 processes against ``accelerate launch``, 1 against plain ``python``, 2
    machines against ``torchrun``'s static rendezvous, and the commands' start-up against
    ``python -c pass``."""
    return with_ratios([*measure_case(TWO, variants(2), 2, repeats, quick),
                        *measure_case(ONE, variants(1), 1, repeats, quick),
                        *measure_case(MACHINES, machine_variants(), 2, repeats, quick),
                        *measure_startup(repeats, quick)])


def print_table(results: list[Result]) -> None:
    """The results as a small table, each with its time breakdown (if any) beneath."""
    print(f"{'case':32} {'variant':24} {'median':>8} {'min':>7} {'max':>7} {'ratio':>6} "
          f"{'peak MiB':>9} {'rank MiB':>9} {'failed':>6}")
    for r in results:
        low, high = (min(r.values), max(r.values)) if r.values else (float("nan"),) * 2
        ratio = f"{r.ratio:6.3f}" if r.ratio is not None and r.ratio == r.ratio else f"{'-':>6}"
        peak = f"{r.peak_rss_mb:9.0f}" if r.peak_rss_mb is not None else f"{'-':>9}"
        rank = r.extra.get("rank_peak_rss_mb")
        rank_text = f"{rank:9.0f}" if rank is not None else f"{'-':>9}"
        print(f"{r.case:32} {r.variant:24} {r.median:8.3f} {low:7.3f} {high:7.3f} {ratio} "
              f"{peak} {rank_text} {r.failed:6d}")
        for segment, seconds in r.extra.get("breakdown_s", {}).items():
            print(f"{'':34}{segment:50} {seconds:7.3f} s")
        if r.extra.get("note"):
            print(f"{'':34}note: {r.extra['note']}")


if __name__ == "__main__":
    row_main(measure, print_table, __doc__, repeats=5, quick_help="no warm-up runs")
