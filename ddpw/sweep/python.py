"""The Python form of a sweep, :meth:`ddpw.wrapper.Wrapper.sweep`: a function run as a job of
the configured width for each point of a grid, here ``parallelism`` at a time or as one SLURM
job array.

Each point runs ``Wrapper(p_config, a_config).start(fn, **point)`` in a process of its own
(:mod:`ddpw.sweep.point`), which unpickles the function from the sweep folder's
``function.pkl``; its return value goes to the point's ``result.pkl``, and as JSON (or its
``repr``) into its record.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import jobfolder
from ..errors import ConfigError, WorkerError
from ..files import write_atomically
from ..platform import Platform
from . import folder as sweep_folder
from . import grid as sweep_grid
from .local import Point, gpu_slots, run_points
from .pending import points_to_run

if TYPE_CHECKING:
    from ..artefacts import ArtefactsConfig
    from ..plan import LaunchPlan
    from ..platform import PlatformConfig


def sweep(p_config: PlatformConfig, a_config: ArtefactsConfig | None, fn: Callable[..., Any],
          axes: Mapping[str, Sequence[Any]], parallelism: int | None, max_points: int,
          wait: bool = True, on_interrupt: str = "ask") -> list[Any]:
    """Run ``fn(**point)`` for every point of the grid ``axes`` that is not done yet; return
    every point's result in grid order (see :meth:`ddpw.wrapper.Wrapper.sweep`)."""
    from ..plan import MachineFacts
    from ..shipping import dumps

    if not callable(fn) or isinstance(fn, type):
        raise ConfigError(f"Wrapper.sweep({fn!r}, ...): needs a function, run on every "
                          f"process as fn(**point).")
    if not isinstance(axes, Mapping):
        raise ConfigError(f"Wrapper.sweep(fn, grid={axes!r}): needs a dict of names to lists "
                          f"of values, e.g. {{'lr': [0.1, 0.01], 'seed': [0, 1]}}.")
    for name in axes:
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"Wrapper.sweep grid name {name!r}: needs a Python identifier, "
                              f"as fn takes it as a keyword argument.")
    on_slurm = p_config.platform is Platform.SLURM
    points = sweep_grid.points(axes, max_points)
    parallelism = _parallelism(parallelism, len(points) if on_slurm else 1)
    tasks = [sweep_grid.task_name(i, point) for i, point in enumerate(points)]
    by_task = dict(zip(tasks, points, strict=True))
    identity = {"function": _name(fn),
                "grid": {name: list(values) for name, values in axes.items()},
                "platform": repr(p_config)}
    folder = sweep_folder.folder_for(jobfolder.DEFAULT_ROOT, p_config.name, identity)
    records = sweep_folder.open_sweep(folder, identity, list(by_task.items()))
    to_run = points_to_run(folder, records, on_slurm)
    if to_run:
        # The points' values as given (the records hold them as JSON: tuples become lists).
        data, _ = dumps((fn, p_config, a_config, by_task))
        write_atomically(folder / "function.pkl", data)
        write_atomically(folder / "meta.json",
                         json.dumps({"sys_path": [p for p in sys.path if p]}).encode())
    if on_slurm:
        return _on_slurm(folder, p_config, a_config, fn, by_task, to_run, parallelism, wait,
                         on_interrupt)
    slots = gpu_slots(p_config.n_gpus if p_config.platform is Platform.GPU else 0, parallelism,
                      cuda_devices=MachineFacts.probe().cuda_devices)
    failed = run_points(folder, [Point(task, (sys.executable, "-m", "ddpw.sweep.point",
                                              str(folder), task)) for task in to_run],
                        slots, lambda task, status: None)
    return _ended(folder, p_config, tasks, failed, "console.log")


def _on_slurm(folder: Path, p_config: PlatformConfig, a_config: ArtefactsConfig | None,
              fn: Callable[..., Any], params: dict[str, dict[str, Any]], to_run: list[str],
              parallelism: int, wait: bool, on_interrupt: str) -> list[Any]:
    """Submit the points ``to_run`` as one job array, each its own payload; wait for them."""
    from ..jobfolder import Payload
    from ..plan import MachineFacts, resolve_plan
    from ..shipping import ship
    from ..slurm.node import RequeuePolicy
    from ..utils import is_restartable
    from .array import submit_array, wait_all

    plan = resolve_plan(p_config, MachineFacts.probe())
    if not is_restartable(fn):
        plan = plan.without_restarts()  # it might do its work twice

    def entry(task: str, job_folder: Path, plan: LaunchPlan) -> tuple[str, ...]:
        payload_dir = job_folder / jobfolder.PAYLOAD_DIR
        jobfolder.write_payload(payload_dir, ship(Payload(
            target=fn, p_config=p_config, a_config=a_config, plan=plan, kwargs=params[task])))
        return ("--module", "ddpw.entry", str(payload_dir))

    # A training sweep's function starts a Trainer, which pauses on the requeue signal; the
    # task then requeues itself and the Trainer resumes. (A function that trains nothing runs
    # on, and may run again from its start if SLURM requeues the task after a preemption.)
    policy = RequeuePolicy.RESTARTS if is_restartable(fn) else RequeuePolicy.PAUSES
    submissions = submit_array(folder, p_config, plan, to_run, entry, policy, parallelism,
                               has_results=True) if to_run else {}
    if not wait:
        return list(submissions.values())
    failed = wait_all(folder, submissions, on_interrupt)
    return _ended(folder, p_config, list(params), failed, "logs/NAME-TIME")


def _ended(folder: Path, p_config: PlatformConfig, tasks: Sequence[str], failed: list[str],
           output: str) -> list[Any]:
    """Show the table; raise for the points that failed, or return every point's result."""
    records = [sweep_folder.read(folder, task) for task in tasks]
    if p_config.verbose:
        for line in sweep_folder.table(records):
            print(line, file=sys.stderr, flush=True)
    if failed:
        raise WorkerError(f"sweep points {', '.join(failed)} failed (their output in "
                          f"{folder}/points/TASK/{output}); the others are done, and running "
                          f"the sweep again runs these alone")
    return _results(folder, records)


def _name(fn: Callable[..., Any]) -> str:
    """The function's name, for the sweep's identity: the same from one run to the next (a
    ``repr`` would hold an address)."""
    if isinstance(fn, functools.partial):
        return f"{_name(fn.func)}(*{fn.args!r}, **{fn.keywords!r})"
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def _parallelism(parallelism: int | None, default: int) -> int:
    """How many points run at once: ``parallelism``, checked, or ``default`` (every point of
    a SLURM array, one at a time here)."""
    if parallelism is None:
        return default
    if isinstance(parallelism, bool) or not isinstance(parallelism, int) or parallelism < 1:
        raise ConfigError(f"Wrapper.sweep(parallelism={parallelism!r}): needs a whole number "
                          f"of points at a time, 1 or more.")
    return parallelism


def _results(folder: Path, records: Sequence[Mapping[str, Any]]) -> list[Any]:
    """Every point's value from its ``result.pkl``, in grid order."""
    import cloudpickle

    return [cloudpickle.loads((sweep_folder.point_folder(folder, record["task"])
                               / "result.pkl").read_bytes()) for record in records]
