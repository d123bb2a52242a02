"""Carry out a :class:`~ddpw.plan.LaunchPlan` of several processes with ``accelerate launch``.

The job is pickled (with cloudpickle, so classes and functions from the caller's ``__main__``
travel by value) into a private temporary folder. ``accelerate launch`` runs through its Python
API in the calling process, which has already imported torch, and starts
``python -m ddpw.entry FOLDER`` on every process; each rank writes its result or traceback back
into the folder, and the results come back in rank order.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import cloudpickle
from accelerate.utils import patch_environment

from .errors import ConfigError, JobPaused, WorkerError
from .trainer import Trainer
from .worker import Job

#: ``accelerate launch`` changes the process's environment while it runs: one launch at a time.
_LAUNCH_LOCK = threading.Lock()

#: The signals that torchrun's agent takes over while it runs (and that ddpw gives back after).
_AGENT_SIGNALS = tuple(getattr(signal, name) for name in
                       ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
                       if hasattr(signal, name))


def launch(job: Job) -> list[Any]:
    """Run ``job`` on ``job.plan.world_size`` processes; return their results in rank order.

    Launches from several threads of one process run one after the other.

    :raises ConfigError: when the job cannot be pickled, naming the object at fault.
    :raises WorkerError: when a rank raises or dies, with its rank and traceback.
    :raises JobPaused: when the training job paused and saved a checkpoint.
    :raises KeyboardInterrupt: on Ctrl-C, once every process of the job has ended.
    """
    plan = job.plan
    payload = ship(job)
    with tempfile.TemporaryDirectory(prefix="ddpw-job-") as tmp, _LAUNCH_LOCK:
        job_dir = Path(tmp)
        (job_dir / "job.pkl").write_bytes(payload)
        (job_dir / "meta.json").write_text(json.dumps({"sys_path": [p for p in sys.path if p]}))
        config_file = job_dir / "accelerate.json"
        config_file.write_text(json.dumps(plan.accelerate_config))
        args = plan.accelerate_args(str(config_file), ["--module", "ddpw.entry", str(job_dir)])
        failures, stopped_by = _run(args, _launch_env(plan.env), plan.standalone)
        reports = _reports(job_dir, plan.world_size)
        paused = {r["paused"] for r in reports.values() if r["paused"]}
        if len(reports) == plan.world_size and len(paused) == 1:
            raise JobPaused(paused.pop())
        if stopped_by == signal.SIGINT:
            raise KeyboardInterrupt
        if stopped_by is not None:
            raise WorkerError(f"the job was stopped by {stopped_by.name}; every process of it "
                              f"has ended")
        results = [job_dir / f"result-{rank}.pkl" for rank in range(plan.world_size)]
        if failures or not all(path.is_file() for path in results):
            raise _explain(reports, failures, plan.world_size)
        return [cloudpickle.loads(path.read_bytes()) for path in results]


def _launch_env(plan_env: dict[str, str]) -> dict[str, str]:
    env = dict(plan_env)
    package_root = Path(__file__).resolve().parent.parent
    if package_root.name not in ("site-packages", "dist-packages"):
        # A source checkout that is not installed: `python -m ddpw.entry` must find it. (An
        # installed ddpw is found anyway, and its site-packages must not come before the
        # standard library.) The caller's other import paths follow in the job's meta.json.
        paths = [str(package_root), *filter(None, [os.environ.get("PYTHONPATH")])]
        env["PYTHONPATH"] = os.pathsep.join(paths)
    # The agent passes the signals it handles on to every process (the pause signals included).
    env["TORCHELASTIC_SIGNALS_TO_HANDLE"] = ",".join(sig.name for sig in _AGENT_SIGNALS)
    return env


def ship(job: Job) -> bytes:
    """Pickle ``job`` for the worker processes.

    :raises ConfigError: naming the first part of the job that cannot be pickled.
    """
    try:
        return cloudpickle.dumps(job)
    except Exception as error:
        culprit = _unpicklable_part(job) or "the job"
        raise ConfigError(
            f"cannot send {culprit} to the worker processes: {type(error).__name__}: {error}. "
            f"Everything a job carries (target, arguments, datasets, model) is pickled with "
            f"cloudpickle; open files, locks, sockets, generators and live processes cannot be. "
            f"Create such objects inside the job instead.") from error


def _unpicklable_part(job: Job) -> str | None:
    parts: list[tuple[str, Any]] = []
    if isinstance(job.target, Trainer):
        parts += [(f"{type(job.target).__name__}.{k}", v) for k, v in vars(job.target).items()]
    parts.append((f"the target {getattr(job.target, '__qualname__', type(job.target).__name__)}",
                  job.target))
    parts += [(f"argument {i} of start()", a) for i, a in enumerate(job.args)]
    parts += [(f"keyword argument {k!r} of start()", v) for k, v in job.kwargs.items()]
    if job.a_config is not None:
        parts += [(f"ArtefactsConfig.{f.name}", getattr(job.a_config, f.name))
                  for f in dataclasses.fields(job.a_config)]
    for name, value in parts:
        try:
            cloudpickle.dumps(value)
        except Exception:
            return f"{name} ({type(value).__name__})"
    return None


def _run(args: list[str], env: dict[str, str], standalone: bool
         ) -> tuple[dict[int, tuple[int, float]], signal.Signals | None]:
    """Run ``accelerate launch ARGS`` here.

    torchrun's agent ends every process of the job when one fails, and passes a signal that it
    receives on to them.

    :returns: ``{rank: (exit status, time)}`` of the processes that failed, and the signal that
        stopped the job (or ``None``).
    """
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    parsed = launch_command_parser().parse_args(args)
    # accelerate's own fallback when a port is busy, taken from the start: the agent binds a free
    # port for the rendezvous itself, so there is no window in which another job can take it.
    parsed.standalone = standalone
    main_thread = threading.current_thread() is threading.main_thread()
    handlers = {sig: signal.getsignal(sig) for sig in _AGENT_SIGNALS} if main_thread else {}
    try:
        with patch_environment(**env):
            launch_command(parsed)
        return {}, None
    except ChildFailedError as error:
        return {rank: (f.exitcode, f.timestamp) for rank, f in error.failures.items()}, None
    except SignalException as error:
        return {}, signal.Signals(error.sigval)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _reports(job_dir: Path, world_size: int) -> dict[int, dict[str, Any]]:
    """The reports of the ranks that ended with an exception (or a pause), by rank."""
    reports = {}
    for rank in range(world_size):
        path = job_dir / f"error-{rank}.json"
        if path.is_file():
            reports[rank] = json.loads(path.read_text())
    return reports


def _explain(reports: dict[int, dict[str, Any]], failures: dict[int, tuple[int, float]],
             world_size: int) -> WorkerError:
    """The error that best explains a failed launch: the rank that failed first, and why.

    A rank that died without a report (killed, or ``os._exit``) is the cause: its peers only
    raise afterwards, having lost their connection to it, and torchrun's agent ends the rest with
    SIGTERM. Otherwise the first report is, as a rank reports before its peers notice it is gone;
    ranks that stopped only because a peer failed (:class:`~ddpw.errors.PeerFailed`) never are.
    """
    died = {rank: when for rank, (status, when) in failures.items()
            if rank not in reports and status != -signal.SIGTERM}
    if died:
        rank = min(died, key=died.__getitem__)
        status = failures[rank][0]
        return WorkerError(f"rank {rank} of {world_size} died ({_describe_status(status)}) "
                           f"without a Python exception", rank=rank, status=status)
    raised = {rank: report["time"] for rank, report in reports.items()
              if not report["secondary"]}
    if not raised:
        return WorkerError("the ranks ended without reporting a result")
    rank = min(raised, key=raised.__getitem__)
    return WorkerError(f"rank {rank} of {world_size} raised an exception", rank=rank,
                       details=reports[rank]["traceback"].rstrip())


def _describe_status(status: int) -> str:
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            pass
    return f"exit status {status}"
