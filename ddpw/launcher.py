"""Carry out a :class:`~ddpw.plan.LaunchPlan` of several processes with ``accelerate launch``.

The job is pickled (with cloudpickle, so classes and functions from the caller's ``__main__``
travel by value) into a private temporary folder; ``accelerate launch`` starts
``python -m ddpw.entry FOLDER`` on every process; each rank writes its result or traceback back
into the folder, and the results come back in rank order.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import cloudpickle

from .errors import ConfigError, WorkerError
from .trainer import Trainer
from .worker import Job

#: How long the processes get to end after a Ctrl-C or SIGTERM before they are killed.
STOP_GRACE_S = 30


def launch(job: Job) -> list[Any]:
    """Run ``job`` on ``job.plan.world_size`` processes; return their results in rank order.

    :raises ConfigError: when the job cannot be pickled, naming the object at fault.
    :raises WorkerError: when a rank raises or dies, with its rank and traceback.
    """
    plan = job.plan
    with tempfile.TemporaryDirectory(prefix="ddpw-job-") as tmp:
        job_dir = Path(tmp)
        (job_dir / "job.pkl").write_bytes(ship(job))
        (job_dir / "meta.json").write_text(json.dumps({"sys_path": [p for p in sys.path if p]}))
        config_file = job_dir / "accelerate.json"
        config_file.write_text(json.dumps(plan.accelerate_config))
        command = plan.command(str(config_file), ["--module", "ddpw.entry", str(job_dir)])
        status, tail = _run(command, _worker_env(plan.env))
        results = [job_dir / f"result-{rank}.pkl" for rank in range(plan.world_size)]
        if status != 0 or not all(path.is_file() for path in results):
            raise _failure(job_dir, status, tail, plan.world_size)
        return [cloudpickle.loads(path.read_bytes()) for path in results]


def _worker_env(plan_env: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, **plan_env}
    # `python -m ddpw.entry` must find this very ddpw, installed or not; the caller's other
    # import paths follow in the job's meta.json.
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
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


def _run(command: list[str], env: dict[str, str]) -> tuple[int, list[str]]:
    """Run ``command``, echoing its stderr while keeping the tail; stop it on Ctrl-C or SIGTERM."""
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True,
                               errors="replace")
    tail: collections.deque[str] = collections.deque(maxlen=400)

    def pump() -> None:
        for line in process.stderr:
            sys.stderr.write(line)
            tail.append(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    forward = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: process.terminate()) if forward else None
    try:
        process.wait()
    except BaseException:
        # Ctrl-C: torchrun's agent stops its workers on SIGTERM; kill them if it cannot.
        process.terminate()
        try:
            process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        raise
    finally:
        if forward:
            signal.signal(signal.SIGTERM, previous)
        reader.join(timeout=5)
    return process.returncode, list(tail)


def _failure(job_dir: Path, status: int, tail: list[str], world_size: int) -> WorkerError:
    """The error that best explains a failed launch: the first rank that failed, and why."""
    reports = {}
    for rank in range(world_size):
        path = job_dir / f"error-{rank}.json"
        if path.is_file():
            reports[rank] = json.loads(path.read_text())
    root_rank, root_status = _root_cause("".join(tail))
    if root_rank is None and reports:
        root_rank = min(reports, key=lambda r: reports[r]["time"])
    if root_rank in reports:
        return WorkerError(f"rank {root_rank} of {world_size} raised an exception",
                           rank=root_rank, details=reports[root_rank]["traceback"].rstrip())
    launcher_output = "".join(tail[-12:]).rstrip()
    if root_rank is not None:
        how = _describe_status(root_status)
        return WorkerError(f"rank {root_rank} of {world_size} died ({how}) without a Python "
                           f"exception", rank=root_rank, status=root_status,
                           details=launcher_output)
    return WorkerError(f"accelerate launch exited with status {status} before the ranks "
                       f"reported a result", status=status, details=launcher_output)


_ROOT_CAUSE = re.compile(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)


def _root_cause(launcher_output: str) -> tuple[int | None, int | None]:
    """The rank and exit code that torchrun's agent names as the first failure, if it does."""
    match = _ROOT_CAUSE.search(launcher_output)
    return (int(match.group(1)), int(match.group(2))) if match else (None, None)


def _describe_status(status: int | None) -> str:
    if status is not None and status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            pass
    return f"exit status {status}"
