"""The one entry point of every ddpw process, whatever the platform.

:func:`run` runs a :class:`Job` in the current process: in the caller's process for a world of
one, or in each process that ``accelerate launch`` starts, through :func:`main`.
"""

from __future__ import annotations

import atexit
import json
import os
import pickle
import runpy
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed

from .artefacts import ArtefactsConfig
from .errors import JobPaused, PeerFailed
from .plan import LaunchMode, LaunchPlan, rendezvous_port
from .platform import PlatformConfig
from .shipping import dumps
from .trainer import RESUME_ENV, Trainer
from .utils import World, current_world


@dataclass
class Job:
    """What every process of a job needs: the target, its arguments, the configs and the plan."""

    target: Trainer | Callable[..., Any]
    p_config: PlatformConfig
    a_config: ArtefactsConfig | None
    plan: LaunchPlan
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


def run(job: Job) -> Any:
    """Run ``job`` in this process, as one rank of its world; return what the target returned.

    A :class:`~ddpw.trainer.Trainer` is set up and run; a function is called with the job's
    arguments, with :func:`ddpw.utils.world` telling it its rank.
    """
    plan = job.plan
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
    trainer = job.target if isinstance(job.target, Trainer) else None
    if trainer is not None and os.environ.get(RESUME_ENV):
        # A requeued SLURM job: choose again, now that the job has checkpoints of its own.
        trainer.check(job.p_config, job.a_config, world_size=plan.world_size)
    extra = trainer.accelerator_kwargs(job.p_config) if trainer is not None else {}
    accelerator = Accelerator(**plan.accelerator_kwargs, **extra)
    try:
        with current_world(World.of(accelerator)):
            if trainer is not None:
                with trainer.pause_on_signals():
                    trainer.setup(accelerator, job.p_config, job.a_config)
                    return trainer.run()
            set_seed(job.p_config.seed, device_specific=True)
            return job.target(*job.args, **job.kwargs)
    finally:
        if plan.mode is LaunchMode.IN_PROCESS:
            # Accelerate keeps its state in process-wide singletons; a later start() in the same
            # process (another platform, precision or accumulation) must begin from scratch.
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
            torch.set_num_threads(threads)


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
    """Entry point of a launched process: ``python -m ddpw.entry JOB_DIR``.

    Reads the job that the launcher wrote to ``JOB_DIR``, runs it and writes the result (its
    tensors on the CPU, :mod:`ddpw.shipping`) or the traceback to ``JOB_DIR/result-{rank}.pkl``
    or ``error-{rank}.json`` for the launcher, then ends the process: with status 0,
    :data:`~ddpw.errors.PAUSED_EXIT_STATUS` after a pause, 130 after Ctrl-C, or 1 after an
    exception.
    """
    _end_with_parent()
    exit_now(execute(Path(argv[0])))


def execute(job_dir: Path) -> int:
    """Run the job in ``job_dir`` as this process's rank and report; return the exit status."""
    rank = int(os.environ.get("RANK", "0"))
    try:
        meta = json.loads((job_dir / "meta.json").read_text())
        # The caller's import path, so that its modules (a script's folder) import here too.
        sys.path[:0] = [p for p in meta["sys_path"] if p not in sys.path]
        with open(job_dir / "job.pkl", "rb") as f:
            job = pickle.load(f)
        result = run(job)
        # On the CPU, so that a caller without this rank's device (a login node) can read it.
        _write_atomically(job_dir / f"result-{rank}.pkl", dumps(result)[0])
        _leave_process_group()
        status = 0
    except BaseException as error:
        if isinstance(error, JobPaused):
            # The checkpoint is written: let no further signal (the agent ends the other ranks
            # with SIGTERM as soon as one exits) turn this clean pause into a kill.
            pause_signals = job.target.j_config.pause_signals
            for name in {"SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", *pause_signals}:
                signal.signal(getattr(signal, name), signal.SIG_IGN)
        report = {"rank": rank, "time": time.time(), "traceback": traceback.format_exc(),
                  "paused": error.checkpoint if isinstance(error, JobPaused) else None,
                  "secondary": isinstance(error, PeerFailed)}
        _write_atomically(job_dir / f"error-{rank}.json", json.dumps(report).encode())
        if isinstance(error, SystemExit):
            status = error.code if isinstance(error.code, int) else 1
        else:
            traceback.print_exc()
            status = 130 if isinstance(error, KeyboardInterrupt) else 1
    return status


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
        _end_with_parent()
    sys.argv = [target, *args]
    try:
        if module:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.path.insert(0, str(Path(target).resolve().parent))
            runpy.run_path(target, run_name="__main__")
        status = 0
    except SystemExit as error:
        if error.code is None or isinstance(error.code, int):
            status = error.code or 0
        else:  # as Python itself does with sys.exit("message")
            print(error.code, file=sys.stderr)
            status = 1
    except BaseException as error:
        traceback.print_exc()
        status = 130 if isinstance(error, KeyboardInterrupt) else 1
    if status == 0:
        _leave_process_group()
    exit_now(status)


def _end_with_parent() -> None:
    """Have the kernel send SIGTERM (a pause signal) to this process when its launcher dies.

    Without it, workers whose caller was killed (kill -9, the OOM killer) would run on unseen.
    """
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() == 1:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def exit_now(status: int) -> None:
    """End this process with ``status`` after the atexit handlers, without finalising the
    interpreter."""
    # Finalising the interpreter after gloo collectives intermittently aborts the process
    # (std::terminate in a C++ destructor, torch 2.13), which would turn a finished rank into a
    # failed one: run the atexit handlers, flush, and leave without finalising.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _leave_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)
