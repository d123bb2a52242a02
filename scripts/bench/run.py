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
- ``slurm``: submit to first step and to the end, against a hand-written sbatch script (only
  when a SLURM cluster answers: ``scripts/slurm-cluster start``);
- ``original_ddpw``: the original ``ddpw`` package from PyPI, where its features overlap.

Every variant of a row runs in fresh processes, after a warm-up, alternating with the others;
the table gives the median, the spread and the ratio to the row's baseline, measured in the same
run. Results go to ``scripts/bench/results/latest.json`` and ``latest.png``; ``--publish`` also
writes the docs' Performance page (``docs/performance.rst``) from them, with the machine's
description, so that no number there is typed by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import platform
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, Result

ROWS = ("launch", "training", "compile", "checkpoint", "resume", "slurm", "original_ddpw")
RESULTS = ROOT / "scripts" / "bench" / "results"


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


def plot(results: list[Result], path: Path) -> None:
    """Each case's variants as bars of their ratio to the baseline (1.0 is the raw tool)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        if r.ratio is not None:
            cases.setdefault((r.row, r.case), []).append(r)
    fig, ax = plt.subplots(figsize=(12, 0.42 * sum(len(v) for v in cases.values()) + 1.5))
    labels, y = [], 0.0
    for (row, case), rows in cases.items():
        for r in rows:
            ddpw = r.variant.startswith("ddpw")
            ax.barh(y, r.ratio, color="#1f77b4" if ddpw else "#b0b0b0")
            ax.text(r.ratio, y, f" {r.ratio:.2f}", va="center", fontsize=7)
            labels.append(f"{row}: {case[:40]} | {r.variant[:30]}")
            y += 1
        y += 0.6
    ax.set_yticks(_positions(cases))
    ax.set_yticklabels(labels, fontsize=7)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("ratio to the row's baseline (time: lower is better; samples/s: higher)")
    ax.set_title("ddpw against the raw tools, same machine, same run (blue: ddpw)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _positions(cases: dict[tuple[str, str], list[Result]]) -> list[float]:
    positions, y = [], 0.0
    for rows in cases.values():
        for _ in rows:
            positions.append(y)
            y += 1
        y += 0.6
    return positions


def publish(results: list[Result], facts: dict[str, str], repeats: int, png: Path) -> None:
    """Write docs/performance.rst (and its figure) from the results."""
    static = ROOT / "docs" / "_static"
    static.mkdir(exist_ok=True)
    shutil.copyfile(png, static / "performance.png")
    out = ["..", "   Written by scripts/bench/run.py --publish: do not edit by hand.", "",
           "Performance", "###########", "",
           "ddpw against the raw tools it wraps (``accelerate launch``, ``torchrun``, "
           "``torch.save``, a hand-written sbatch script) and its peers, measured side by side "
           "in one run of ``python scripts/bench/run.py --publish``. Each variant runs in "
           "fresh processes after a warm-up, alternating with the others; the ratio is the "
           "median over the baseline's median (for times lower is better, for samples per "
           "second higher is better).", "",
           f"Machine: {facts['cpu']}, {facts['cores']} cores, {facts['memory_gib']} GiB, GPU: "
           f"{facts['gpu']}; Python {facts['python']}, torch {facts['torch']}, accelerate "
           f"{facts['accelerate']}. Each row says when it was measured, and how many "
           f"times each variant ran.", "",
           ".. image:: _static/performance.png", "   :alt: ratios to the baselines", ""]
    for row in dict.fromkeys(r.row for r in results):
        rows = [r for r in results if r.row == row]
        title = row.replace("_", " ").capitalize()
        # A row measured in parts (run.py --add) says when each of its cases was.
        runs: dict[tuple[str, int], list[str]] = {}
        for r in rows:
            run = (r.extra.get("measured", facts["date"]), r.extra.get("repeats", repeats))
            runs.setdefault(run, [])
            if r.case not in runs[run]:
                runs[run].append(r.case)
        said = [f"Measured {when}, {times} repeats per variant"
                + (f": {'; '.join(cases)}" if len(runs) > 1 else "") + "."
                for (when, times), cases in runs.items()]
        out += [title, "=" * len(title), "", *(f"- {line}" if len(said) > 1 else line
                                               for line in said),
                "", ".. list-table::", "   :header-rows: 1", "",
                "   * - Case", "     - Variant", "     - Median", "     - Spread",
                "     - Ratio", "     - Peak MiB"]
        for r in rows:
            median = f"{r.median:.3g} {r.metric}" if r.values else "failed"
            spread = f"{min(r.values):.3g} to {max(r.values):.3g}" if r.values else "-"
            ratio = f"{r.ratio:.2f}" if r.ratio is not None else "-"
            peak = f"{r.peak_rss_mb:.0f}" if r.peak_rss_mb else "-"
            variant = r.variant + (" (baseline)" if r.variant == r.baseline else "")
            out += [f"   * - {r.case}", f"     - {variant}", f"     - {median}",
                    f"     - {spread}", f"     - {ratio}", f"     - {peak}"]
        notes = sorted({str(r.extra["note"]) for r in rows if r.extra.get("note")})
        out += [""] + [f"- {note}" for note in notes] + ([""] if notes else [])
        out += _breakdown(rows)
    (ROOT / "docs" / "performance.rst").write_text("\n".join(out) + "\n")


def _breakdown(rows: list[Result]) -> list[str]:
    """Where the time goes, for the results that measured it (medians, seconds)."""
    timed = [r for r in rows if r.extra.get("breakdown_s")]
    if not timed:
        return []
    segments = list(timed[0].extra["breakdown_s"])
    out = ["Where the time goes (medians, seconds):", "", ".. list-table::",
           "   :header-rows: 1", "", "   * - Case, variant"]
    out += [f"     - {segment}" for segment in segments]
    for r in timed:
        out.append(f"   * - {r.case}: {r.variant}")
        out += [f"     - {r.extra['breakdown_s'].get(segment, float('nan')):.3f}"
                for segment in segments]
    return [*out, ""]


def _other_rows(path: Path, measured: set[str]) -> list[Result]:
    """The results in ``path`` of the rows not in ``measured``, each marked with its run's
    date and repeats (ratios compare variants of one run, so rows of two runs may sit side by
    side)."""
    last = json.loads(path.read_text())
    kept = []
    for found in last["results"]:
        if found["row"] in measured:
            continue
        found.pop("median", None)
        result = Result(**found)
        result.extra.setdefault("measured", last["machine"]["date"])
        result.extra.setdefault("repeats", last["repeats"])
        kept.append(result)
    return kept


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
                             "not measure, each with the date and repeats of its own run")
    parser.add_argument("--add", type=Path, action="append", default=[], metavar="JSON",
                        help="add the results that a row's own script wrote with --json (a "
                             "part of a row measured by itself), in the order given")
    args = parser.parse_args()
    facts = machine()
    results: list[Result] = []
    for row in filter(None, args.rows.split(",")):
        print(f"== {row}", file=sys.stderr, flush=True)
        for result in importlib.import_module(row).measure(args.repeats, args.quick):
            result.extra |= {"measured": facts["date"], "repeats": args.repeats}
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
    plot(results, RESULTS / "latest.png")
    if args.publish:
        publish(results, facts, args.repeats, RESULTS / "latest.png")
    print(f"results in {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
