"""Which points a run of a sweep runs: those that are not done. A point that an earlier run
left ``running`` and that runs no more (the run was stopped, or SLURM ended its task without
it saying so) counts as not done; one that still runs (in another run of the sweep here, or a
SLURM array still queued) is refused: it would run twice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psutil

from . import folder as sweep_folder


def points_to_run(folder: Path, records: list[dict[str, Any]], on_slurm: bool) -> list[str]:
    """The names of the points of ``records`` (updated in place) that this run runs.

    :raises ConfigError: when some of them still run.
    """
    if on_slurm:
        from .array import refresh  # only here: it needs SLURM's commands

        refresh(folder, records)
    else:
        reset_interrupted(folder, records)
    sweep_folder.refuse_busy(records, folder)
    return [record["task"] for record in records if record["state"] != "done"]


def reset_interrupted(folder: Path, records: list[dict[str, Any]]) -> None:
    """Points that a run of the sweep here left ``running`` when it was stopped (its process
    is gone) are ``pending`` again."""
    for i, record in enumerate(records):
        pid = record.get("pid")
        if record["state"] == "running" and record.get("job_id") is None and (
                pid is None or not psutil.pid_exists(pid)):
            records[i] = sweep_folder.update(folder, record["task"], state="pending", pid=None)
