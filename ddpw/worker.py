"""The one entry point of every ddpw process, whatever the platform.

:func:`run` runs a :class:`~ddpw.jobfolder.Payload` in the current process: in the caller's
process for a world of one, or in each process that ``accelerate launch`` starts, through
:func:`main`.
"""

from __future__ import annotations

import atexit
import os
import runpy
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import TorchDynamoPlugin, patch_environment, set_seed

from . import environment, goodput, hang, jobfolder, process, rendezvous, resume
from .errors import JobPaused, PeerFailed
from .jobfolder import Payload
from .outcome import LOST_PEER, consequence, lost_peers
from .plan import LaunchMode, rendezvous_port
from .process import exit_now, exit_status, ignore_signals
from .shipping import dumps
from .utils import World, current_world, is_trainer


def run(payload: Payload, folder: Path | None = None) -> Any:
    """Run ``payload`` in this process, as one rank of its world; return what the target
    returned.

    A :class:`~ddpw.trainer.Trainer` is set up and run; a function is called with the payload's
    arguments, with :func:`ddpw.utils.world` telling it its rank.

    :param folder: the payload folder, in a process that a launch started (:func:`execute`).
    """
    plan = payload.plan
    if plan.mode is LaunchMode.IN_PLACE:
        # The caller's launch owns the process group, so it stays up after the job; but a gloo
        # group still alive at interpreter shutdown can abort the process (seen with torch 2.13
        # after object collectives), so leave it at exit. (Registering twice is harmless.)
        atexit.unregister(_leave_process_group)
        atexit.register(_leave_process_group)
    if plan.srun_env:
        _export_srun_env()
    threads = torch.get_num_threads()
    if plan.threads_per_process is not None:
        torch.set_num_threads(plan.threads_per_process)
    trainer = payload.target if is_trainer(payload.target) else None
    if trainer is not None:
        requeued = os.environ.get(environment.RESUME_FROM)
        # A requeued SLURM attempt chooses again, now that the job has checkpoints of its own,
        # for the launch's world.
        world_size = int(os.environ.get("WORLD_SIZE", plan.world_size))
        trainer.resume_from = (resume.choose(trainer.j_config, payload.a_config, world_size,
                                             requeued=requeued)
                               if requeued else payload.resume_from)
    # In the caller's own process, the launch is now (ddpw.goodput's start-up counts from it).
    launched = goodput.launch_environment() if plan.mode is LaunchMode.IN_PROCESS else {}
    extra = trainer.accelerator_kwargs(payload.p_config) if trainer is not None else {}
    kwargs = dict(plan.accelerator_kwargs)
    if "dynamo_plugin" in kwargs:
        kwargs["dynamo_plugin"] = TorchDynamoPlugin(**kwargs["dynamo_plugin"])
    accelerator = Accelerator(**kwargs, **extra)
    if folder is not None and plan.rendezvous is not None:
        _begin_attempt(folder, payload, trainer)
    try:
        with current_world(World.of(accelerator)), patch_environment(**launched):
            if trainer is not None:
                with trainer.pause_on_signals():
                    trainer.setup(accelerator, payload.p_config, payload.a_config)
                    return trainer.run()
            set_seed(payload.p_config.seed, device_specific=True)
            started = time.time()
            result = payload.target(*payload.args, **payload.kwargs)
            _tell_times(goodput.function_times(started), payload, folder, accelerator)
            return result
    finally:
        if plan.mode is LaunchMode.IN_PROCESS:
            # Accelerate keeps its state in process-wide singletons; a later start() in the same
            # process (another platform, precision or accumulation) must begin from scratch.
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
            torch.set_num_threads(threads)


def _tell_times(times: dict[str, float | None], payload: Payload, folder: Path | None,
                accelerator: Accelerator) -> None:
    """Tell the launching process when a function began and ended on the main rank: print
    its summary here (on stderr: stdout is the function's) when this is that process (a world
    of one), or note the times in the payload folder, for :func:`ddpw.launcher.launch`."""
    if not accelerator.is_main_process:
        return
    if payload.plan.mode is LaunchMode.IN_PROCESS and payload.p_config.verbose:
        print(goodput.function_lines(times), file=sys.stderr, flush=True)
    elif folder is not None:
        jobfolder.note_times(folder, times)


def _export_srun_env() -> None:
    """Set torch.distributed's variables for one task of a multi-task ``srun`` step from SLURM's.

    The rendezvous port derives from the job id (:func:`~ddpw.plan.rendezvous_port`);
    ``MASTER_ADDR`` and ``MASTER_PORT`` already set are kept.
    """
    from submitit.slurm.slurm import SlurmJobEnvironment

    slurm = SlurmJobEnvironment()
    os.environ.setdefault("MASTER_ADDR", slurm.hostnames[0])
    os.environ.setdefault("MASTER_PORT", str(rendezvous_port(slurm.job_id)))
    os.environ.update({"RANK": str(slurm.global_rank), "WORLD_SIZE": str(slurm.num_tasks),
                       "LOCAL_RANK": str(slurm.local_rank),
                       "LOCAL_WORLD_SIZE": str(slurm.num_tasks // slurm.num_nodes)})


def main(argv: list[str]) -> None:
    """Entry point of a launched process: ``python -m ddpw.entry FOLDER``.

    Reads the payload that the launcher wrote to the payload folder ``FOLDER``
    (:mod:`ddpw.jobfolder`), runs it and writes this rank's result (its tensors on the CPU,
    :mod:`ddpw.shipping`) or its report of the exception, then ends the process: with status
    0, :data:`~ddpw.errors.PAUSED_EXIT_STATUS` after a pause, 130 after Ctrl-C, or 1 after an
    exception.
    """
    process.end_with_parent()
    exit_now(execute(Path(argv[0])))


def execute(folder: Path) -> int:
    """Run the payload in ``folder`` as this process's rank and report; return the exit
    status."""
    rank = int(os.environ.get("RANK", "0"))
    caller_shows = False
    try:
        payload = jobfolder.read_payload(folder)
        # A Wrapper's processes on this machine: its WorkerError shows the traceback.
        caller_shows = payload.plan.mode is LaunchMode.ACCELERATE
        hang.start(payload.p_config.hang_timeout_s, folder)
        if payload.plan.rendezvous is not None and os.environ["LOCAL_RANK"] == "0":
            # Before anything can fail: the ranks whose reports the caller reads.
            jobfolder.note_world(folder, int(os.environ["WORLD_SIZE"]))
        result = run(payload, folder)
        # On the CPU, so that a caller without this rank's device (a login node) can read it.
        data = dumps(result)[0]
        jobfolder.write_result(folder, rank, data)
        if payload.plan.rendezvous is not None:
            _share_results(folder, rank, data)
        hang.stop()
        _leave_process_group()
        return 0
    except BaseException as error:
        hang.settle(error)
        hang.stop()
        paused = error.checkpoint if isinstance(error, JobPaused) else None
        if paused is not None:
            # The checkpoint is written: let no further signal (the agent ends the other ranks
            # with SIGTERM as soon as one exits) turn this clean pause into a kill.
            # (A function's Trainer, run in place, pauses on the forwarded signals alone.)
            ignore_signals(payload.target.j_config.pause_signals
                           if is_trainer(payload.target) else ())
        jobfolder.write_report(folder, rank, error, paused=paused,
                               secondary=isinstance(error, PeerFailed))
        if isinstance(error, SystemExit):  # a pause, or sys.exit() in the target
            return error.code if isinstance(error.code, int) else 1
        return _tell(error, rank, caller_shows)


def _tell(error: BaseException, rank: int, caller_shows: bool = False) -> int:
    """Say on this rank's stderr (its log, or the console) why ``error`` ends it, and return
    the exit status that Python would give.

    Python's traceback, as a rule; nothing when ``caller_shows``: the caller that started this
    process shows the traceback of the rank that failed first itself, once; one line when this
    rank failed only because another had (it lost a peer, or stopped with
    :class:`~ddpw.errors.PeerFailed`): that other rank says why.
    """
    peer_failed = isinstance(error, PeerFailed)
    if isinstance(error, SystemExit) or not (caller_shows or peer_failed
                                             or LOST_PEER.search(str(error))):
        return exit_status(error)
    if not caller_shows:
        said = f"stopped: {error}" if peer_failed else consequence(str(error))
        print(f"[ddpw] rank {rank} {said}: a consequence of another rank's failure",
              file=sys.stderr, flush=True)
    return 130 if isinstance(error, KeyboardInterrupt) else 1


def _begin_attempt(folder: Path, payload: Payload, trainer: Any) -> None:
    """On each machine of a job on several, once the world's process group is up: its rank 0
    numbers the world and chooses the checkpoint that a Trainer starts from, for every rank
    (:func:`ddpw.resume.agree`; after a machine was lost or joined, the newest written since
    the job began). In a later world, each machine sets the last world's reports aside, and the
    main rank says what happened: the new world, who was lost, the checkpoint.
    :data:`ddpw.environment.WORLD` tells the job which world it is in."""
    world_size, rank, local_rank = (int(os.environ[name])
                                    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    j_config = trainer.j_config if trainer is not None else None

    def decide(since: int) -> tuple[int, int | None, str | None]:
        world, before = rendezvous.next_world(payload.plan.rendezvous, world_size)
        name = (resume.decide(j_config, payload.a_config, world_size, since,
                              payload.resume_from) if j_config is not None else None)
        return world, before, name

    agreed = resume.agree(rank, world_size, payload.written_before, decide,
                          Path(j_config.checkpoint_path) if j_config is not None else None)
    if trainer is not None:
        trainer.resume_from = agreed.checkpoint
    os.environ[environment.WORLD] = str(agreed.world)
    if local_rank != 0 or agreed.world == 1:  # one process per machine keeps the folder
        return
    lost = lost_peers(jobfolder.set_aside_reports(folder, agreed.world - 2))
    if rank == 0:
        machines = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
        start = (f"resuming from {agreed.checkpoint}" if agreed.checkpoint else
                 "starting from scratch")
        print(f"[ddpw] world {agreed.world} of the job: {world_size} process(es) on {machines} "
              f"machine(s), was {agreed.before}{'; lost ' + ', '.join(lost) if lost else ''}; "
              f"{start}", file=sys.stderr, flush=True)


def _share_results(folder: Path, rank: int, data: bytes) -> None:
    """In a job of several machines, each machine's payload folder is its own: every rank's
    result goes to every node, whose first process writes those of the other nodes' ranks, so
    that ``Wrapper.start`` returns all of them on every machine."""
    every: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, data)
    first = rank - int(os.environ["LOCAL_RANK"])
    if rank == first:
        mine = range(first, first + int(os.environ["LOCAL_WORLD_SIZE"]))
        for other, found in enumerate(every):
            if other not in mine:
                jobfolder.write_result(folder, other, found)


def run_script(target: str, args: list[str], module: bool = False,
               end_with_parent: bool = True) -> None:
    """Entry point of a process that runs a user's script for ``ddpw-launch``:
    ``python -m ddpw.entry --script PATH ARGS...`` (or ``--module NAME ARGS...``).

    The script runs as ``python PATH ARGS...`` would run it (as ``__main__``, with its folder
    first on the import path and ``sys.argv`` set); then the process ends as ddpw's own workers
    do, with the script's exit status.

    :param end_with_parent: have SIGTERM sent to this process when its parent dies, as for
        the processes that a launcher starts (not for ``ddpw-launch`` itself, whose parent is
        the user's shell).
    """
    if end_with_parent:
        process.end_with_parent()
    else:  # ddpw-launch's own process launches the script now (unless a launch around it did)
        for name, value in goodput.launch_environment().items():
            os.environ.setdefault(name, value)
    sys.argv = [target, *args]
    hang.start(hang.timeout_from_environment(), None)
    started = time.time()
    try:
        if module:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.path.insert(0, str(Path(target).resolve().parent))
            runpy.run_path(target, run_name="__main__")
        status = 0
    except BaseException as error:
        hang.settle(error)
        status = _tell(error, int(os.environ.get("RANK", "0")))
    hang.stop()
    if status == 0:
        times = goodput.function_times(started)
        if not end_with_parent:  # ddpw-launch's own process: the one that launched it
            print(goodput.function_lines(times), file=sys.stderr, flush=True)
        elif os.environ.get("RANK", "0") == "0" and environment.HANG_FOLDER in os.environ:
            jobfolder.note_times(Path(os.environ[environment.HANG_FOLDER]), times)
        _leave_process_group()
    exit_now(status)


def _leave_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
