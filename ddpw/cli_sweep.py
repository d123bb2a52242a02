"""``ddpw-launch --sweep NAME=V1,V2 [--sweep ...] [--parallelism N] SCRIPT ARGS``: the script run
once per point of the grid, with ``{NAME}`` (and ``{task}``) in its arguments filled in.

On this machine each point is a ``ddpw-launch`` of its own, without the sweep's options and with
its ``--log-dir`` in the point's folder (:mod:`ddpw.sweep.local`); on SLURM, a task of one job
array (:mod:`ddpw.sweep.array`). The sweep's folder (:mod:`ddpw.sweep.folder`) is under
``--log-dir``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from .errors import ConfigError
from .plan import LaunchMode, LaunchPlan, MachineFacts
from .platform import Platform, PlatformConfig
from .sweep import folder as sweep_folder
from .sweep import grid as sweep_grid
from .sweep.local import Point, gpu_slots, run_points, script_result
from .sweep.pending import points_to_run

#: The options that are the sweep's own: a point's ddpw-launch is given none of them.
_SWEEP_OPTIONS = {"--sweep": True, "--parallelism": True, "--max-points": True,
                  "--no-wait": False, "--dry-run": False}


def sweep_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--sweep``, ``--parallelism`` and ``--max-points`` to ``ddpw-launch``."""
    for decorate in reversed((
        click.option("--sweep", "sweeps", multiple=True, metavar="NAME=V1,V2,...",
                     help="Run the script once per point of the grid that these options span "
                          "(their product), {NAME} in its arguments replaced by the point's "
                          "value and {task} by the point's name (repeatable)."),
        click.option("--parallelism", type=click.IntRange(min=1),
                     help="Sweep points that run at once: here, each with its own GPUs; on "
                          "SLURM, the array's %N [default: 1 here, every point on SLURM]."),
        click.option("--max-points", type=click.IntRange(min=1),
                     default=sweep_grid.MAX_POINTS, show_default=True,
                     help="The most points a sweep may have."),
    )):
        command = decorate(command)
    return command


@dataclass(frozen=True)
class Sweep:
    """What ``ddpw-launch`` was asked to run, for a sweep of it."""

    sweeps: tuple[str, ...]
    parallelism: int | None
    max_points: int
    script: str
    script_args: tuple[str, ...]
    module: bool
    argv: tuple[str, ...]


def take(options: dict[str, Any], script: str, script_args: tuple[str, ...],
         module: bool) -> Sweep:
    """Take the sweep's options out of ``ddpw-launch``'s, which then hold the platform's."""
    return Sweep(options.pop("sweeps"), options.pop("parallelism"), options.pop("max_points"),
                 script, script_args, module, tuple(sys.argv[1:]))


def run(sweep: Sweep, p_config: PlatformConfig, plan: LaunchPlan, settings: dict[str, Any],
        log_dir: str, dry_run: bool, no_wait: bool, on_interrupt: str,
        describe: Callable[[list[str]], dict[str, Any]]) -> int:
    """Run the sweep; return ``ddpw-launch``'s exit status: 0 when every point is done, 1 when
    some failed (named on stderr), 2 when SLURM refused the array.

    :param describe: the plan of one point (``--dry-run``'s), given its script arguments.
    :raises click.UsageError: for a bad grid, before anything starts.
    """
    try:
        return _run(sweep, p_config, plan, settings, log_dir, dry_run, no_wait, on_interrupt,
                    describe)
    except ConfigError as error:
        raise click.UsageError(str(error)) from None


def _run(sweep: Sweep, p_config: PlatformConfig, plan: LaunchPlan, settings: dict[str, Any],
         log_dir: str, dry_run: bool, no_wait: bool, on_interrupt: str,
         describe: Callable[[list[str]], dict[str, Any]]) -> int:
    axes = sweep_grid.parse(sweep.sweeps)
    for warning in sweep_grid.check_script_args(sweep.script_args, axes):
        click.echo(f"[ddpw] warning: {warning}", err=True)
    points = sweep_grid.points(axes, sweep.max_points)
    tasks = [sweep_grid.task_name(i, point) for i, point in enumerate(points)]
    args = {task: sweep_grid.fill(sweep.script_args, point, task)
            for task, point in zip(tasks, points, strict=True)}
    checkpoints: dict[str, str] = {}
    for option, _ in sweep_grid.checkpoint_folders(sweep.script_args):
        folders = {task: dict(sweep_grid.checkpoint_folders(args[task]))[option]
                   for task in tasks}
        sweep_grid.check_distinct(folders, f"the script's {option}")
        checkpoints = checkpoints or folders  # the first such option, for the records
    script = sweep.script if sweep.module else str(Path(sweep.script).resolve())
    parallelism = sweep.parallelism or (len(points) if plan.mode is LaunchMode.SLURM else 1)
    identity = {"script": script, "module": sweep.module, "args": sweep.script_args,
                "grid": axes, "settings": {k: repr(v) for k, v in sorted(settings.items())}}
    folder = sweep_folder.folder_for(log_dir, settings.get("name", "DDPW"), identity)
    if dry_run:
        _dry_run(folder, plan, tasks, points, args, parallelism, describe)
        return 0
    records = sweep_folder.open_sweep(folder, identity, list(zip(tasks, points, strict=True)))
    for i, record in enumerate(records):
        if record["task"] in checkpoints and record["checkpoint_folder"] is None:
            records[i] = sweep_folder.update(folder, record["task"], checkpoint_folder=str(
                Path(checkpoints[record["task"]]).absolute()))
    to_run = points_to_run(folder, records, on_slurm=plan.mode is LaunchMode.SLURM)
    click.echo(f"[ddpw] sweep of {len(points)} points in {folder}: {len(to_run)} to run",
               err=True)
    failed: list[str] = []
    if plan.mode is LaunchMode.SLURM:
        status = _on_slurm(folder, p_config, plan, to_run, args, script, sweep.module,
                           parallelism, no_wait, on_interrupt)
        if status is not None:
            return status
        failed = [task for task in to_run if sweep_folder.read(folder, task)["state"] != "done"]
    elif to_run:
        base = _point_options(sweep.argv, sweep.script, sweep.script_args)
        commands = [Point(task, (sys.executable, "-m", "ddpw", *base, "--log-dir",
                                 str(sweep_folder.logs(folder, task)),
                                 *(("--module",) if sweep.module else ()), script, *args[task]))
                    for task in to_run]
        gpus = p_config.n_gpus if p_config.platform is Platform.GPU else 0
        slots = gpu_slots(gpus, parallelism, cuda_devices=MachineFacts.probe().cuda_devices)
        try:
            failed = run_points(folder, commands, slots, script_result(folder))
        except KeyboardInterrupt:  # the points got it too, and have ended
            click.echo("[ddpw] sweep stopped; run the same command again to go on", err=True)
            return 130
    for line in sweep_folder.table([sweep_folder.read(folder, task) for task in tasks]):
        click.echo(line, err=True)
    if failed:
        click.echo(f"[ddpw] sweep points {', '.join(failed)} failed; their output in "
                   f"{folder}/points/; run the same command again to run them alone", err=True)
        return 1
    return 0


def _point_options(argv: Sequence[str], script: str, script_args: Sequence[str]) -> list[str]:
    """The options of ``ddpw-launch``'s command line ``argv`` (those before the script) that a
    point's own ``ddpw-launch`` gets: all but the sweep's (and ``--module``, given again)."""
    at = len(argv) - len(script_args) - 1
    if at < 0 or argv[at] != script:
        raise ConfigError("cannot tell the script from ddpw-launch's options in the command "
                          "line; put the options before the script.")
    options, kept, skip = argv[:at], [], False
    for token in options:
        if skip:
            skip = False
            continue
        name = token.partition("=")[0]
        if name in _SWEEP_OPTIONS or name in ("-m", "--module"):
            skip = _SWEEP_OPTIONS.get(name, False) and "=" not in token
            continue
        kept.append(token)
    return kept


def _dry_run(folder: Path, plan: LaunchPlan, tasks: list[str], points: list[dict[str, Any]],
             args: dict[str, list[str]], parallelism: int,
             describe: Callable[[list[str]], dict[str, Any]]) -> None:
    """Print every point's plan (and, on SLURM, the array's sbatch script) and run nothing."""
    shown: dict[str, Any] = {"sweep_folder": str(folder), "parallelism": parallelism,
                             "points": [{"task": task, "params": point, **describe(args[task])}
                                        for task, point in zip(tasks, points, strict=True)]}
    if plan.mode is LaunchMode.SLURM:
        from .slurm.node import RequeuePolicy
        from .sweep.array import chunks, max_array_size, sbatch_script

        shown["sbatch"] = [sbatch_script(folder, plan, RequeuePolicy.PAUSES, len(array),
                                         parallelism).splitlines()
                           for array in chunks(tasks, max_array_size())]
    click.echo(json.dumps(shown, indent=2, default=str))


def _on_slurm(folder: Path, p_config: PlatformConfig, plan: LaunchPlan, to_run: list[str],
              args: dict[str, list[str]], script: str, module: bool, parallelism: int,
              no_wait: bool, on_interrupt: str) -> int | None:
    """Submit the points as one job array and wait for them (unless ``no_wait``); return an
    exit status to end with now, or ``None`` once every point has ended."""
    from .slurm.node import RequeuePolicy
    from .sweep.array import submit_array, wait_all

    def entry(task: str, job_folder: Path, plan: LaunchPlan) -> tuple[str, ...]:
        return ("--module", "ddpw.entry", "--module" if module else "--script", script,
                *args[task])

    try:
        submissions = submit_array(folder, p_config, plan, to_run, entry, RequeuePolicy.PAUSES,
                                   parallelism, has_results=False) if to_run else {}
    except ConfigError as error:
        click.echo(f"Error: {error}", err=True)
        return 2
    arrays = sorted({submission.job_id.split("_")[0] for submission in submissions.values()})
    if arrays:
        click.echo(f"[ddpw] submitted {len(submissions)} points as SLURM job array(s) "
                   f"{', '.join(arrays)}", err=True)
    if no_wait:
        click.echo(json.dumps({"sweep_folder": str(folder), "jobs": {
            task: submission.job_id for task, submission in submissions.items()}}))
        return 0
    try:
        wait_all(folder, submissions, on_interrupt)
    except KeyboardInterrupt:
        return 130
    return None
