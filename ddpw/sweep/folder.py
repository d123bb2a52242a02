"""The sweep folder: one record a point, which the caller, the points' processes and a SLURM
array's tasks write and read, each through :func:`ddpw.files.write_atomically`.

A sweep's folder is named after what it runs, so that the same sweep run again finds it and
runs only the points that are not done: ``ROOT/sweeps/NAME-HASH``, HASH of the script and its
arguments (or the function), the grid and the platform's settings::

    sweep.json            what the sweep runs: its command or function, grid and points
    function.pkl          the Python form's function and configs (ddpw.shipping)
    points/TASK/
        point.json        the point's record (below)
        logs/             its job folders (ddpw-launch --log-dir, console_logs_path)
        console.log       a point run here: everything it printed
        result.pkl        the Python form: what the point's function returned
    claims/               the checkpoint folders that points' Trainers use, each once
    slurm/                submitit's files for a SLURM array (TASKID_ARRAYINDEX_0_log.out...)

A point's record: ``task`` (its name), ``index`` (in the grid), ``params``, ``state``
(``pending``, ``running``, ``done`` or ``failed``), ``requeued`` (times a SLURM task requeued
itself), ``job_id`` (SLURM), ``log_folder``, ``checkpoint_folder``, and ``result``: a function's
return value (as JSON where it can be, else its ``repr``), or a script's ``exit_status`` and
``last_lines``; for a point that failed, its ``error`` (and ``last_lines``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import environment
from ..errors import ConfigError
from ..files import stage, write_atomically

#: A point's states; ``running`` also for a SLURM task that is pending or requeued.
STATES = ("pending", "running", "done", "failed")


def folder_for(root: str | Path, name: str, identity: Mapping[str, Any]) -> Path:
    """The sweep folder of the sweep that ``identity`` describes (its command, grid and
    settings, as JSON), under ``root/sweeps``: the same sweep gets the same folder."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=repr).encode())
    return Path(root).absolute() / "sweeps" / f"{name}-{digest.hexdigest()[:12]}"


def open_sweep(folder: Path, identity: Mapping[str, Any],
               points: Sequence[tuple[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Make the sweep folder (or find it, from an earlier run of the same sweep) and return
    every point's record, in grid order; a new point's is ``pending``.

    :param points: each point's name and parameters, in grid order.
    """
    (folder / "points").mkdir(parents=True, exist_ok=True)
    write_atomically(folder / "sweep.json", json.dumps(
        {**identity, "points": [task for task, _ in points]}, indent=1, default=repr).encode())
    records = []
    for index, (task, params) in enumerate(points):
        record = read(folder, task)
        if not record:
            record = {"task": task, "index": index,
                      "params": {name: as_json(value) for name, value in params.items()},
                      "state": "pending",
                      "requeued": 0, "job_id": None, "log_folder": str(logs(folder, task)),
                      "checkpoint_folder": None, "result": None}
            write(folder, record)
        records.append(record)
    return records


def point_folder(folder: Path, task: str) -> Path:
    """Point ``task``'s own folder."""
    return folder / "points" / task


def logs(folder: Path, task: str) -> Path:
    """Where point ``task``'s job folders go."""
    return point_folder(folder, task) / "logs"


def read(folder: Path, task: str) -> dict[str, Any]:
    """Point ``task``'s record; ``{}`` before there is one."""
    path = point_folder(folder, task) / "point.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def write(folder: Path, record: Mapping[str, Any]) -> None:
    """Write a point's record, whole."""
    path = point_folder(folder, record["task"]) / "point.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(record, indent=1).encode())


def update(folder: Path, task: str, **changes: Any) -> dict[str, Any]:
    """Change some fields of point ``task``'s record (one writer at a time: the caller, or the
    point's SLURM task while the caller does not touch it); return the record."""
    record = {**read(folder, task), **changes}
    if changes.get("state") in ("done", "failed"):
        record["ended"] = time.time()
    write(folder, record)
    return record


def as_json(value: Any) -> Any:
    """A function's return value as the record keeps it: itself when JSON can hold it (lists,
    dicts of strings, numbers...), else its ``repr``."""
    try:
        json.dumps(value, allow_nan=True)
        return value
    except (TypeError, ValueError):
        return repr(value)


def last_lines(path: Path, n: int = 10) -> list[str]:
    """The last ``n`` lines of a log, for a script's result."""
    if not path.is_file():
        return []
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
        return f.read().decode(errors="replace").splitlines()[-n:]


def claim_for_this_point(checkpoint: str | Path) -> None:
    """In a point of a sweep (its processes have :data:`~ddpw.environment.SWEEP_FOLDER` set),
    claim ``checkpoint`` for the point (:func:`claim`); elsewhere, nothing."""
    folder = os.environ.get(environment.SWEEP_FOLDER)
    if folder:
        claim(Path(folder), checkpoint, os.environ[environment.SWEEP_TASK])


def claim(folder: Path, checkpoint: str | Path, task: str) -> None:
    """Claim a checkpoint folder for point ``task``: a Trainer of the sweep does (on every
    rank) before it starts, so that two points never write to one.

    :raises ConfigError: when another point of the sweep claimed the same folder.
    """
    checkpoint = str(Path(checkpoint).absolute())
    claims = folder / "claims"
    claims.mkdir(exist_ok=True)
    path = claims / hashlib.sha256(checkpoint.encode()).hexdigest()[:16]
    # Staged under this process's name: every rank of the point claims at once.
    staged = stage(path.with_name(f"{path.name}.{task}.{os.getpid()}"), json.dumps(
        {"task": task, "checkpoint": checkpoint}).encode())
    try:
        os.link(staged, path)  # the first point to claim it wins, whole or not at all
    except FileExistsError:
        pass
    finally:
        staged.unlink()
    owner = json.loads(path.read_text())["task"]
    if owner != task:
        raise ConfigError(f"sweep points {owner} and {task} both write their checkpoints to "
                          f"{checkpoint} (JobConfig.checkpoint_path): make it differ between "
                          f"points, e.g. checkpoint_path=f'ckpts/{{lr}}-{{seed}}' from the "
                          f"point's values.")
    if os.environ.get("RANK", "0") == "0":  # one writer of the point's record
        update(folder, task, checkpoint_folder=checkpoint)


def table(records: Sequence[Mapping[str, Any]]) -> Iterator[str]:
    """The sweep's table, a line a point: its name, parameters, state and result."""
    names = list(dict.fromkeys(name for record in records for name in record["params"]))
    rows = [["point", *names, "state", "result"]]
    for record in records:
        state = record["state"] + (f" (requeued {record['requeued']})"
                                   if record.get("requeued") else "")
        rows.append([record["task"], *(str(record["params"].get(name, "")) for name in names),
                     state, _short(record.get("result"))])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        yield "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()


def _short(result: Any) -> str:
    """A result in a table's cell: a script's exit status, or a value cut to 60 characters."""
    if result is None:
        return ""
    if isinstance(result, dict) and "exit_status" in result:
        return f"exit status {result['exit_status']}"
    if isinstance(result, dict) and "error" in result:  # the traceback's last line says most
        result = (result.get("last_lines") or [result["error"]])[-1]
    text = json.dumps(result) if not isinstance(result, str) else result
    return text if len(text) <= 60 else text[:57] + "..."


def refuse_busy(records: Sequence[Mapping[str, Any]], folder: Path) -> None:
    """Refuse to run a sweep whose points another run of it is running (a SLURM array still in
    the queue): they would run twice."""
    busy = [record["task"] for record in records if record["state"] == "running"]
    if busy:
        raise ConfigError(f"the sweep in {folder} is running points {', '.join(busy)} (in "
                          f"another run, or a SLURM array still queued): wait for them, or "
                          f"cancel them and set their state in points/TASK/point.json to "
                          f"\"failed\".")
