"""The Performance page's figures: one per section, ddpw's ratios to the baseline beside it.

A figure is about 1200 pixels wide (a page shows it about 740 wide) and as tall as its bars
need. Each case is a block of bars under its name: ddpw's variants in blue, then the baseline
in grey at 1, with the goal drawn over them as a red dashed line where there is one. A row of
model sizes (the checkpoint row) has a panel per kind of case instead, a bar per size, and
its baseline as the black line at 1. Peers are in the page's tables, not here.
"""

from __future__ import annotations

import dataclasses
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Result
from sections import SECTIONS, Goal, Section, X, goal_of, is_ddpw, size_of, value

if TYPE_CHECKING:  # matplotlib is the bench extra's, imported only to draw
    from matplotlib.artist import Artist
    from matplotlib.axes import Axes

DDPW = "#1f6fb4"
BASELINE = "#7f7f7f"
GOAL = "#c0392b"
SLOT = 0.23  # inches per bar or header
WIDTH = 6.7  # inches, at DPI: 1200 pixels
DPI = 180
TOP = 0.4  # inches for the figure's title and legend
AXIS = 0.45  # inches below a panel for its x axis
NAMES = {"s": "time", "MiB": "memory"}


@dataclasses.dataclass
class Block:
    """Bars drawn together: a case's variants under its name, or a kind of case's sizes."""

    header: str | None
    bars: list[tuple[str, Result]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Panel:
    """One plot of a figure."""

    title: str
    blocks: list[Block]
    baseline: Result | None = None  # when no bar shows it: the line at 1

    @property
    def headed(self) -> bool:
        return any(block.header is not None for block in self.blocks)

    @property
    def slots(self) -> int:
        return sum(len(b.bars) + (b.header is not None) for b in self.blocks)


def panels(section: Section, results: list[Result]) -> list[Panel]:
    """The section's plots, a panel per unit (seconds, samples per second).

    A case is a block: ddpw's variants, then the baseline. By size, a panel per kind of case
    holds a bar per size of ddpw's variant that has a goal there (each of ddpw's variants where
    none has), against the baseline drawn as the line at 1."""
    out: dict[str, Panel] = {}
    for r in results:
        if not section.by_size:
            if is_ddpw(r) or r.variant == r.baseline:
                unit = f"{NAMES[r.metric]} ({r.metric})" if r.metric in NAMES else r.metric
                panel = out.setdefault(unit, Panel(unit, []))
                # A note that says what the unit measures (``s: the whole command``) says it.
                note = str(r.extra.get("note", ""))
                if note.startswith(f"{r.metric}: "):
                    panel.title = unit + note[len(r.metric):]
                block = next((b for b in panel.blocks if b.header == r.case), None)
                if block is None:
                    panel.blocks.append(block := Block(r.case))
                block.bars.append((r.variant, r))
            continue
        kind, label = size_of(r.case)
        title = f"{kind}\nagainst {r.baseline}"
        if r.variant == r.baseline:
            out.setdefault(title, Panel(title, [Block(None)])).baseline = r
        elif is_ddpw(r) and (goal_of(r) or not any(
                goal_of(o) for o in results if o.case == r.case and is_ddpw(o))):
            out.setdefault(title, Panel(title, [Block(None)])).blocks[0].bars.append((label, r))
    for panel in out.values():
        for block in panel.blocks:
            # ddpw above its baseline (which may be ddpw's too: FSDP against DDP)
            block.bars.sort(key=lambda bar: bar[1].variant == bar[1].baseline)
    return list(out.values())


def figure(section: Section, results: list[Result], path: Path) -> None:
    """Draw the section's panels, one above the other (two side by side when they are many)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = panels(section, results)
    columns = 2 if len(plots) > 3 else 1
    longest = max(len(label) for p in plots for b in p.blocks for label, _ in b.bars)
    labels = 0.15 + 0.08 * longest  # inches left of each panel for the bars' names
    wide = (WIDTH - 0.2) / columns - labels
    for panel in plots:  # a title as wide as its panel, on as many lines as that takes
        room = wide + 0.3 + (labels if panel.headed else 0)
        panel.title = "\n".join(textwrap.fill(part, int(room / 0.07))
                                for part in panel.title.split("\n"))
    lines = [plots[i:i + columns] for i in range(0, len(plots), columns)]
    sizes = [(0.1 + 0.2 * max(p.title.count("\n") + 1 for p in line),
              max(p.slots for p in line) * SLOT) for line in lines]
    tall = TOP + sum(title + axes + AXIS for title, axes in sizes)
    fig = plt.figure(figsize=(WIDTH, tall), dpi=DPI)
    y = tall - TOP
    for line, (title, axes) in zip(lines, sizes, strict=True):
        y -= title + axes
        for j, panel in enumerate(line):
            left = j * (WIDTH - 0.2) / columns + labels
            ax = fig.add_axes((left / WIDTH, y / tall, wide / WIDTH, axes / tall))
            _draw(ax, panel, max(p.slots for p in line), -(labels - 0.1) / wide)
        y -= AXIS
    fig.text(0.01, 1 - 0.1 / tall, section.title,
             fontsize=12, fontweight="bold", va="top")
    fig.legend(handles=_legend(plots, any(goal_of(r) for r in results)), loc="upper right",
               ncol=3, fontsize=9, frameon=False, bbox_to_anchor=(0.995, 1 - 0.02 / tall))
    fig.savefig(path)
    plt.close(fig)


def _legend(plots: list[Panel], goals: bool) -> list[Artist]:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    baseline = ([Line2D([], [], color="black", linewidth=1.2, label="baseline (= 1)")]
                if all(p.baseline for p in plots)
                else [Patch(color=BASELINE, label="baseline")])
    goal = [Line2D([], [], color=GOAL, linestyle="--", label="goal")] if goals else []
    return [Patch(color=DDPW, label="ddpw"), *baseline, *goal]


def _draw(ax: Axes, panel: Panel, slots: int, indent: float) -> None:
    """Draw a panel in ``ax``: its blocks' headers start ``indent`` (a fraction of the plot's
    width, left of it) over the bars' names."""
    from matplotlib.transforms import blended_transform_factory

    across = blended_transform_factory(ax.transAxes, ax.transData)
    y = 0.0
    ticks, labels, far = [], [], 1.0
    goals: list[tuple[Goal, float, float]] = []  # (goal, first y, last y)
    # One goal for the whole panel is named once, under it; several, each after its case.
    one = len({goal_of(r) for b in panel.blocks for _, r in b.bars} - {None}) == 1
    first = panel.baseline or panel.blocks[0].bars[0][1]
    for block in panel.blocks:
        header = y
        if block.header is not None:
            named = ax.text(indent, y, block.header, fontsize=9.5, fontweight="bold",
                            va="center", transform=across,  # over the line at 1
                            bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
            y += 1
        for label, r in block.bars:
            ticks.append(y)
            labels.append(label)
            if r.ratio is None:
                said = ("failed (see the notes under the table)" if not r.values
                        else f"{value(r)}, no baseline to compare")
                ax.text(0.02, y, f" {said}", fontsize=9, va="center", style="italic")
            else:
                ax.barh(y, r.ratio, height=0.7,
                        color=BASELINE if r.variant == r.baseline else DDPW)
                ax.text(r.ratio, y, f" {r.ratio:.2f}{X}  {value(r)}", fontsize=9, va="center",
                        bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5,
                              "alpha": 0.85})
                far = max(far, r.ratio)
            goal = goal_of(r)
            if goal is not None:
                if goals and goals[-1][0] == goal and goals[-1][2] == y - 0.5:
                    goals[-1] = (goal, goals[-1][1], y + 0.5)
                else:
                    goals.append((goal, y - 0.5, y + 0.5))
                far = max(far, goal.limit)
            y += 1
        if not one and block.header is not None and goals and goals[-1][1] > header:
            ax.annotate(f"   goal {goals[-1][0].said(block.bars[0][1])}", (1, 0.5),
                        xycoords=named, color=GOAL, fontsize=9, va="center")
    for goal, low, high in goals:
        ax.plot([goal.limit] * 2, [low, high], color=GOAL, linestyle="--", linewidth=1.5,
                zorder=2.5)  # over the baseline's line, where they meet
    if one:  # on the x axis's line, at its end
        ax.annotate(f"goal {goals[0][0].said(first)}", (1, 0), xycoords="axes fraction",
                    xytext=(0, -19), textcoords="offset points", color=GOAL, fontsize=9,
                    ha="right", va="top")
    ax.axvline(1.0, color="black", linewidth=0.8 if panel.baseline is None else 1.2)
    ax.set_xlim(0, far * (1.9 if panel.baseline is not None else 1.6))
    ax.set_ylim(slots - 0.5, -0.5)
    ax.set_yticks(ticks, labels, fontsize=9.5)
    ax.tick_params(axis="y", length=0)
    ax.tick_params(axis="x", labelsize=8)
    better = "higher" if first.higher_is_better else "lower"
    ax.set_xlabel(f"ratio, {better} is better", fontsize=9, loc="left")
    ax.annotate(panel.title, (indent if panel.headed else 0, 1), xycoords="axes fraction",
                xytext=(0, 5), textcoords="offset points", fontsize=9.5, va="bottom")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def figures(results: list[Result], folder: Path) -> list[Path]:
    """A figure per section that has results, in ``folder``; their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for section in SECTIONS:
        held = [r for r in results if section.holds(r)]
        if held:
            paths.append(folder / f"{section.name}.png")
            figure(section, held, paths[-1])
    return paths
