"""The Performance page (docs/performance.rst) and its figures, written from a results file.

    python scripts/bench/publish.py [scripts/bench/results/latest.json]

``run.py --publish`` calls :func:`publish` after a run; run by itself, this module publishes the
results file that a run left, and runs no benchmark. The page opens with a paragraph on where
ddpw stands against each baseline; then each section (:mod:`sections`) has its figure
(:mod:`figures`), the dates of its runs, a table of every variant, its notes, and where the
time goes when the row measured that.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, Result
from figures import NAMES, figures, panels
from sections import SECTIONS, Goal, Section, X, goal_of, is_ddpw, number, size_of, value

RESULTS = ROOT / "scripts" / "bench" / "results"
STATIC = ROOT / "docs" / "_static"
PAGE = ROOT / "docs" / "performance.rst"


def publish(results: list[Result], facts: dict[str, str]) -> None:
    """Write docs/performance.rst and its figures (in docs/_static) from the results."""
    figures(results, STATIC)
    out = ["..", "   Written by scripts/bench/publish.py (run.py --publish): do not edit by hand.",
           "", "Performance", "###########", "", summary(results), "",
           "ddpw against the raw tools it wraps (``accelerate launch``, ``torchrun``, "
           "``torch.save``, a hand-written sbatch script) and its peers, measured side by side "
           "by ``python scripts/bench/run.py --publish``. Each variant runs in fresh processes "
           "after a warm-up, alternating with the others; the ratio is the median over the "
           "baseline's median, measured in the same run. Each figure shows ddpw beside the "
           "baseline, and the goal an issue set where there is one; each table has every "
           "variant, peers included.", "",
           f"Machine: {facts['cpu']}, {facts['cores']} cores, {facts['memory_gib']} GiB, GPU: "
           f"{facts['gpu']}; Python {facts['python']}, torch {facts['torch']}, accelerate "
           f"{facts['accelerate']}. Each section says when it was measured, and how many "
           "times each variant ran"
           + (", and on which CPU where it was another" if any(
               r.extra.get("cpu", facts["cpu"]) != facts["cpu"] for r in results) else "")
           + ".", ""]
    for section in SECTIONS:
        held = [r for r in results if section.holds(r)]
        if held:
            out += _section(section, held, facts["cpu"])
    PAGE.write_text("\n".join(out) + "\n")


def _section(section: Section, rows: list[Result], cpu: str) -> list[str]:
    """A section's heading, figure, dates (and CPU, where not ``cpu``), table, notes and time
    breakdown."""
    # A row measured in parts (run.py --add) says when each of its cases was.
    runs: dict[tuple[str, int, str], list[str]] = {}
    for r in rows:
        cases = runs.setdefault(
            (r.extra["measured"], r.extra["repeats"], r.extra.get("cpu", cpu)), [])
        if r.case not in cases:
            cases.append(r.case)
    said = [f"Measured {when}{'' if on == cpu else f' on {on}'}, {times} repeats per variant"
            + (f": {'; '.join(cases)}" if len(runs) > 1 else "") + "."
            for (when, times, on), cases in runs.items()]
    out = [section.title, "=" * len(section.title), "",
           f".. image:: _static/{section.name}.png",
           f"   :alt: {section.title}: ddpw's ratios to the baseline, with the goals", "",
           *(f"- {line}" if len(said) > 1 else line for line in said),
           "", ".. list-table::", "   :header-rows: 1", "",
           "   * - Case", "     - Variant", "     - Median", "     - Spread",
           "     - Ratio", "     - Peak MiB"]
    for r in rows:
        median = value(r) if r.values else "failed"
        spread = f"{number(min(r.values))} to {number(max(r.values))}" if r.values else "-"
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else "-"
        peak = f"{r.peak_rss_mb:.0f}" if r.peak_rss_mb else "-"
        out += [f"   * - {_plain(r.case)}", f"     - {_plain(_variant(r))}", f"     - {median}",
                f"     - {spread}", f"     - {ratio}", f"     - {peak}"]
    notes = sorted({str(r.extra["note"]) for r in rows if r.extra.get("note")})
    out += [""] + [f"- {_plain(note)}" for note in notes] + ([""] if notes else [])
    return out + _breakdown(rows)


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
        out.append(f"   * - {_plain(r.case)}: {_plain(r.variant)}")
        out += [f"     - {r.extra['breakdown_s'].get(segment, float('nan')):.3f}"
                for segment in segments]
    return [*out, ""]


def summary(results: list[Result]) -> str:
    """One paragraph: for each section, ddpw's ratios to each baseline, and the goals met."""
    sentences, bounded = [], []  # bounded: (goal, result)
    for section in SECTIONS:
        held = [r for r in results if section.holds(r)]
        shown = [r for p in panels(section, held) for b in p.blocks for _, r in b.bars
                 if is_ddpw(r) and r.ratio is not None and r.variant != r.baseline
                 and (section.headline is None or r.variant in section.headline)]
        bounded += [(goal, r) for r in shown if (goal := goal_of(r))]
        # Compared alike: the same kind of case, unit, baseline and goal.
        groups: dict[tuple[str, str, str, Goal | None], list[Result]] = {}
        for r in shown:
            kind = size_of(r.case)[0] if section.by_size else ""
            groups.setdefault((kind, r.metric, r.baseline, goal_of(r)), []).append(r)
        named = not section.by_size and len({r.variant for r in shown}) > 1
        units = not section.by_size and len({r.metric for r in shown}) > 1
        items = [_compared(kind, goal, rs, named, units)
                 for (kind, _, _, goal), rs in groups.items()]
        if items:
            sentences.append(f"**{section.title}**: {'; '.join(items)}.")
    met = sum(goal.met(r) for goal, r in bounded)
    # A line block: one paragraph, a line per section.
    return "\n".join(["| Where ddpw stands against each baseline (in italics): the ratio of "
                      "ddpw's median to the baseline's, measured in the same run (for times and "
                      "memory lower is better, for samples or steps per second higher), and the "
                      "goal an issue set where there is one. ddpw meets its goal in "
                      f"{met} of the {len(bounded)} measurements that have one.",
                      *(f"| {sentence}" for sentence in sentences)])


def _compared(kind: str, goal: Goal | None, results: list[Result], named: bool,
              units: bool) -> str:
    """``2 processes: 0.99x to 1.05x *accelerate launch* (goal ≤ 1.05x: met)``, with the variant
    named where the section has several and these results are of one, and the unit where it
    has several."""
    ratios = sorted(r.ratio for r in results if r.ratio is not None)
    low, high = f"{ratios[0]:.2f}{X}", f"{ratios[-1]:.2f}{X}"
    cases = list(dict.fromkeys(r.case for r in results))
    variants = list(dict.fromkeys(r.variant for r in results))
    first = results[0]
    unit = f" ({NAMES.get(first.metric, first.metric)})" if units else ""
    text = _plain(kind or (cases[0] if len(cases) == 1 else f"{len(cases)} cases")) + unit \
        + ": " + (f"{_plain(variants[0])} " if named and len(variants) == 1 else "") \
        + (low if low == high else f"{low} to {high}") + f" *{_plain(first.baseline)}*"
    if goal is None:
        return text
    met = sum(goal.met(r) for r in results)
    verdict = ("met" if met == len(results) else "missed" if not met
               else f"met in {met} of {len(results)}")
    return text + f" (goal {goal.said(first)}: {verdict})"


def _variant(result: Result) -> str:
    return result.variant + (" (baseline)" if result.variant == result.baseline else "")


def _plain(text: str) -> str:
    """``text`` for reST, as it is: ``--`` not made a dash, ``*`` and backquotes not markup."""
    return re.sub(r"([*`\\])", r"\\\1", text).replace("--", "-\\-")


def load(path: Path) -> tuple[list[Result], dict[str, str]]:
    """The results of a results file (as ``run.py`` writes it), each with the date, repeats
    and CPU of its run, and the machine's facts."""
    data = json.loads(path.read_text())
    results = []
    for found in data["results"]:
        result = Result(**{k: v for k, v in found.items() if k != "median"})
        result.extra.setdefault("measured", data["machine"]["date"])
        result.extra.setdefault("repeats", data["repeats"])
        result.extra.setdefault("cpu", data["machine"]["cpu"])
        results.append(result)
    return results, data["machine"]


if __name__ == "__main__":
    publish(*load(Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS / "latest.json"))
