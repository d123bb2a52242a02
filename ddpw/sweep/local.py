"""A sweep on this machine: its points run as processes of their own, ``parallelism`` at a
time, each a job of the configured width; with GPUs, each running point has GPUs of its own.

A point is one command (``ddpw-launch`` of the script with the point's arguments, or
``python -m ddpw.sweep.point`` for a function): what it prints goes to its ``console.log``, and
its exit status decides its state. A point that fails does not stop the others.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import environment
from ..errors import ConfigError
from . import folder as sweep_folder


@dataclass(frozen=True)
class Point:
    """A point to run here: its name, and the command that runs it."""

    task: str
    command: tuple[str, ...]


def gpu_slots(gpus_per_point: int, parallelism: int,
              env: Mapping[str, str] = os.environ, cuda_devices: int = 0
              ) -> list[str | None]:
    """What ``CUDA_VISIBLE_DEVICES`` each of the points running at once gets: disjoint sets of
    ``gpus_per_point`` of the GPUs visible here (those that ``CUDA_VISIBLE_DEVICES`` names, else
    all ``cuda_devices``), as many sets as ``parallelism`` asks and the GPUs allow; for CPU
    points (``gpus_per_point=0``), ``parallelism`` times ``None``.

    :raises ConfigError: when a point asks for more GPUs than are visible.
    """
    if not gpus_per_point:
        return [None] * parallelism
    visible = env.get("CUDA_VISIBLE_DEVICES")
    devices = ([d.strip() for d in visible.split(",") if d.strip()] if visible is not None
               else [str(i) for i in range(cuda_devices)])
    sets = len(devices) // gpus_per_point
    if not sets:
        raise ConfigError(f"each sweep point asks for {gpus_per_point} GPU(s) "
                          f"(PlatformConfig.n_gpus) and {len(devices)} are visible here.")
    return [",".join(devices[i * gpus_per_point:(i + 1) * gpus_per_point])
            for i in range(min(parallelism, sets))]


def run_points(folder: Path, points: Sequence[Point], slots: Sequence[str | None],
               result: Callable[[str, int], Any]) -> list[str]:
    """Run ``points``, as many at a time as there are ``slots`` (each a
    ``CUDA_VISIBLE_DEVICES``, or ``None`` to leave it as it is); record each one's state and
    result as it ends; return the names of those that failed.

    :param result: the result to record for a point that ended with an exit status (``None``
        keeps what the point recorded itself).
    """
    waiting, running, failed = list(points), {}, []
    free = list(slots)
    try:
        while waiting or running:
            while waiting and free:
                point, slot = waiting.pop(0), free.pop(0)
                running[point.task] = (_start(folder, point, slot), slot)
            time.sleep(0.2)
            for task, (process, slot) in list(running.items()):
                status = process.poll()
                if status is None:
                    continue
                del running[task]
                free.append(slot)
                changes: dict[str, Any] = {"state": "done" if status == 0 else "failed",
                                           "pid": None}
                value = result(task, status)
                if value is not None:
                    changes["result"] = value
                sweep_folder.update(folder, task, **changes)
                if status:
                    failed.append(task)
                _say(f"sweep point {task}: {changes['state']} (exit status {status})")
    finally:  # Ctrl-C: the points got it too; they end before the sweep does
        for process, _ in running.values():
            process.wait()
    return failed


def _start(folder: Path, point: Point, gpus: str | None) -> subprocess.Popen[bytes]:
    env = {**os.environ, environment.SWEEP_FOLDER: str(folder),
           environment.SWEEP_TASK: point.task}
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    console = sweep_folder.point_folder(folder, point.task) / "console.log"
    with open(console, "ab") as log:
        process = subprocess.Popen(point.command, stdout=log, stderr=subprocess.STDOUT, env=env)
    sweep_folder.update(folder, point.task, state="running", pid=process.pid, started=time.time(),
                        **({"gpus": gpus} if gpus is not None else {}))
    _say(f"sweep point {point.task}: running" + (f" on GPU(s) {gpus}" if gpus else "")
         + f"; its output in {console}")
    return process


def script_result(folder: Path) -> Callable[[str, int], dict[str, Any]]:
    """A script's result: its exit status and the last lines it printed."""
    def result(task: str, status: int) -> dict[str, Any]:
        console = sweep_folder.point_folder(folder, task) / "console.log"
        return {"exit_status": status, "last_lines": sweep_folder.last_lines(console)}
    return result


def _say(message: str) -> None:
    print(f"[ddpw] {message}", file=sys.stderr, flush=True)
