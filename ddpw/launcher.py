"""Carry out a :class:`~ddpw.plan.LaunchPlan` of several processes with ``accelerate launch``.

``accelerate launch`` runs through its Python API in the calling process, which has already
imported torch. :func:`run_accelerate` starts any entry point: ddpw's own, or a user's script
for ``ddpw-launch``. For :func:`launch`, the job is pickled (with cloudpickle, so classes and
functions from the caller's ``__main__`` travel by value) into a private temporary folder and
``python -m ddpw.entry FOLDER`` runs on every process; each rank writes its result or
traceback back into the folder, and the results come back in rank order. Tensors travel on the
CPU both ways (:mod:`ddpw.shipping`).

torchrun's agent and ``accelerate launch`` log what they do (``Sending process ... closing
signal SIGTERM``, ``failed (exitcode: 1) local_rank: ...``). A user needs ddpw's report and the
failing rank's traceback, so while a launch runs their records go to a file instead of the
console: the job's ``agent.log`` (``agent-node{N}.log`` on a node of a multi-node job) for
``ddpw-launch`` and SLURM; for :func:`launch`, a file in the job's temporary folder, whose lines
the :class:`~ddpw.errors.WorkerError` carries when a rank died without a Python exception.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import psutil
from accelerate.utils import patch_environment

from ._compat import warn_if_agent_takes_signals
from .errors import ConfigError, JobPaused, WorkerError
from .plan import LaunchPlan
from .shipping import dumps
from .trainer import Trainer
from .worker import Job

#: ``accelerate launch`` changes the process's environment while it runs: one launch at a time.
_LAUNCH_LOCK = threading.Lock()

#: Signals that ddpw passes on to every process of a job while it runs: the pause signals. The
#: agent is told to leave them alone (it would stop monitoring the job at the first one, and a
#: second one would interrupt its wait for the processes to end).
FORWARDED = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")
                   if hasattr(signal, name))
#: The loggers of torchrun's agent and of ``accelerate launch``, whose records go to the agent's
#: log file rather than the console while a launch runs.
AGENT_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher",
                 "torch.distributed.run", "accelerate")
#: Signals that torchrun's agent handles itself, by ending the job.
_AGENT_SIGNALS = tuple(getattr(signal, name) for name in ("SIGHUP", "SIGQUIT")
                       if hasattr(signal, name))


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a launch ended.

    :param failures: ``{rank: (exit status, time)}`` of the processes that failed.
    :param stopped_by: the signal that stopped the job, or ``None``.
    :param received: every signal passed on to the processes, in order.
    """

    failures: dict[int, tuple[int, float]]
    stopped_by: signal.Signals | None
    received: tuple[signal.Signals, ...] = ()


@dataclasses.dataclass(frozen=True)
class Logs:
    """Where every rank's output goes: ``{folder}/rank-{r}.stdout.log`` and ``.stderr.log``.

    :param folder: the job's log folder.
    :param all_ranks: show every rank's output on the console rather than the main rank's
        alone; each line is prefixed with its rank.
    :param first_rank: the global rank of this node's first process (``r`` counts from it).
    :param node: this node's index in a job of several nodes (each runs its own launch into
        the same folder), or ``None`` for a job on one machine.
    """

    folder: Path
    all_ranks: bool = False
    first_rank: int = 0
    node: int | None = None

    @property
    def agent_log(self) -> Path:
        """Where the records of torchrun's agent and of ``accelerate launch`` go:
        ``{folder}/agent.log``, or ``{folder}/agent-node{N}.log`` on node ``N``."""
        name = "agent.log" if self.node is None else f"agent-node{self.node}.log"
        return self.folder / name


def run_accelerate(plan: LaunchPlan, entry: list[str], logs: Logs | None = None,
                   forward: tuple[signal.Signals, ...] = FORWARDED,
                   agent_log: Path | None = None) -> Outcome:
    """Start ``entry`` (a script and its arguments, or ``--module NAME ...``) on every process
    of ``plan`` with ``accelerate launch``, in this process, and wait for them all.

    torchrun's agent ends every process of the job when one fails. The ``forward`` signals are
    passed on to the job's processes while it runs. Launches from several threads of one
    process run one after the other; logs of a later launch into the same folder are appended.

    :param agent_log: where the agent's records go (appended; made at the first record):
        :attr:`Logs.agent_log` when ``logs`` is given; without either, a temporary
        file that is discarded.
    """
    with tempfile.TemporaryDirectory(prefix="ddpw-launch-") as tmp, _LAUNCH_LOCK:
        config_file = Path(tmp) / "accelerate.json"
        config_file.write_text(json.dumps(plan.accelerate_config))
        args = plan.accelerate_args(str(config_file), entry)
        # torchrun writes into a folder of its own inside the job's, flattened at the end.
        torchrun_logs = logs.folder / f".torchrun-{logs.first_rank}" if logs else None
        if torchrun_logs is not None and torchrun_logs.exists():
            # An earlier attempt was killed before it could collect its logs: collect them now.
            _collect_logs(torchrun_logs, logs.folder, logs.first_rank)
        if logs is not None:
            agent_log = logs.agent_log
        outcome = _run(args, launch_env(plan.env), plan.standalone, torchrun_logs, logs,
                       forward, agent_log or Path(tmp) / "agent.log")
        if torchrun_logs is not None:
            _collect_logs(torchrun_logs, logs.folder, logs.first_rank)
        return outcome


def launch(job: Job) -> list[Any]:
    """Run ``job`` on ``job.plan.world_size`` processes; return their results in rank order.

    :raises ConfigError: when the job cannot be pickled, naming the object at fault.
    :raises WorkerError: when a rank raises or dies, with its rank and traceback.
    :raises JobPaused: when the training job paused and saved a checkpoint.
    :raises KeyboardInterrupt: on Ctrl-C, once every process of the job has ended.
    """
    with tempfile.TemporaryDirectory(prefix="ddpw-job-") as tmp:
        job_dir = Path(tmp)
        write_job(job, job_dir)
        outcome = run_accelerate(job.plan, ["--module", "ddpw.entry", str(job_dir)],
                                 agent_log=job_dir / "agent.log")
        return collect(job_dir, job.plan.world_size, outcome)


def new_job_folder(root: str | Path, name: str) -> Path:
    """Make and return a new folder ``root/NAME-YYYYmmdd-HHMMSS`` (``-2``, ``-3``... when jobs of
    that name start within one second)."""
    base = Path(root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in itertools.count(1):
        folder = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def write_job(job: Job, job_dir: Path) -> None:
    """Write ``job`` where ``python -m ddpw.entry JOB_DIR`` reads it."""
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "job.pkl").write_bytes(ship(job))
    (job_dir / "meta.json").write_text(json.dumps({"sys_path": [p for p in sys.path if p]}))


def collect(job_dir: Path, world_size: int, outcome: Outcome) -> list[Any]:
    """The ranks' results from ``job_dir`` in rank order, or the error that explains why not.

    :raises JobPaused, KeyboardInterrupt, WorkerError: as :func:`launch`.
    """
    reports = _reports(job_dir, world_size)
    # A rank pauses only once every rank has written its part of the checkpoint.
    paused = [r["paused"] for r in reports.values() if r["paused"]]
    if paused:
        raise JobPaused(paused[0])
    results = [job_dir / f"result-{rank}.pkl" for rank in range(world_size)]
    if not outcome.failures and all(path.is_file() for path in results):
        return [cloudpickle.loads(path.read_bytes()) for path in results]
    if outcome.stopped_by == signal.SIGINT:
        raise KeyboardInterrupt
    if outcome.stopped_by is not None:
        killed = [rank for rank, (status, _) in sorted(outcome.failures.items())
                  if status == -signal.SIGKILL]
        how = (f" (rank(s) {', '.join(map(str, killed))} did not stop and were killed with "
               f"SIGKILL at the third signal)" if killed and len(outcome.received) >= 3 else "")
        raise WorkerError(f"the job was stopped by {outcome.stopped_by.name}; every process "
                          f"of it has ended{how}")
    agent_log = job_dir / "agent.log"
    agent = agent_log.read_text(errors="replace").rstrip() if agent_log.is_file() else ""
    raise _explain(reports, outcome.failures, world_size, agent)


def launch_env(plan_env: dict[str, str]) -> dict[str, str]:
    """The environment that ddpw's processes get on top of the caller's: the plan's, and an
    import path that finds this ddpw."""
    env = dict(plan_env)
    package_root = Path(__file__).resolve().parent.parent
    if package_root.name not in ("site-packages", "dist-packages"):
        # A source checkout that is not installed: `python -m ddpw.entry` must find it. (An
        # installed ddpw is found anyway, and its site-packages must not come before the
        # standard library.) The caller's other import paths follow in the job's meta.json.
        paths = [str(package_root), *filter(None, [os.environ.get("PYTHONPATH")])]
        env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def ship(job: Job) -> bytes:
    """Pickle ``job`` for the worker processes, with the data of its tensors that are not on the
    CPU as CPU copies (:mod:`ddpw.shipping`), which it says once, unless
    ``PlatformConfig.verbose`` is false.

    :raises ConfigError: naming the first part of the job that cannot be pickled.
    """
    try:
        data, moved = dumps(job)
    except Exception as error:
        culprit = _unpicklable_part(job) or "the job"
        raise ConfigError(
            f"cannot send {culprit} to the worker processes: {type(error).__name__}: {error}. "
            f"Everything a job carries (target, arguments, datasets, model) is pickled with "
            f"cloudpickle; open files, locks, sockets, generators and live processes cannot be. "
            f"Create such objects inside the job instead.") from error
    if moved.storages and job.p_config.verbose:
        print(moved.note("the job"), file=sys.stderr, flush=True)
    return data


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


def _run(args: list[str], env: dict[str, str], standalone: bool, log_dir: Path | None,
         logs: Logs | None, forward: tuple[signal.Signals, ...], agent_log: Path) -> Outcome:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    parsed = launch_command_parser().parse_args(args)
    # accelerate's own fallback when a port is busy, taken from the start: the agent binds a free
    # port for the rendezvous itself, so there is no window in which another job can take it.
    parsed.standalone = standalone
    parsed.signals_to_handle = ",".join(sig.name for sig in _AGENT_SIGNALS)
    warn_if_agent_takes_signals()  # an older torchrun ignores signals_to_handle
    if logs is not None:
        # torchrun's own options (accelerate's parser lacks the last two): every rank's output
        # to files, and to the console for the main rank or, prefixed, for all.
        parsed.log_dir, parsed.tee = str(log_dir), "3"
        parsed.local_ranks_filter = "" if logs.all_ranks else "0"
        env = {**env, "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": "[rank${rank}]: "}
    received: list[signal.Signals] = []
    handlers = forward_signals(received, forward)
    try:
        with patch_environment(**env), _records_to(agent_log):
            launch_command(parsed)
        failures = {}
    except ChildFailedError as error:
        failures = {rank: (f.exitcode, f.timestamp) for rank, f in error.failures.items()}
    except SignalException as error:
        failures, received[:0] = {}, [signal.Signals(error.sigval)]
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return Outcome(failures, received[0] if received else None, tuple(received))


@contextlib.contextmanager
def _records_to(path: Path) -> Iterator[None]:
    """Send the records of the :data:`AGENT_LOGGERS` to ``path`` (made at the first one)
    rather than to their handlers while the block runs; then restore the loggers."""
    handler = logging.FileHandler(path, delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = {}
    for name in AGENT_LOGGERS:
        logger = logging.getLogger(name)
        saved[logger] = (logger.handlers, logger.propagate)
        logger.handlers, logger.propagate = [handler], False
    try:
        yield
    finally:
        for logger, (handlers, propagate) in saved.items():
            logger.handlers, logger.propagate = handlers, propagate
        handler.close()


def forward_signals(received: list[signal.Signals],
                    signals: tuple[signal.Signals, ...] = FORWARDED) -> dict[signal.Signals, Any]:
    """Until the handlers returned are restored, pass the ``signals`` on to the
    processes that this process starts from now on (the job's), recording them in ``received``.

    Signal handlers belong to the main thread: from another thread, nothing is forwarded.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}
    me = psutil.Process()
    earlier = {child.pid for child in me.children()}

    def forward(signum: int, frame: Any) -> None:
        received.append(signal.Signals(signum))
        # The third signal means it: a rank that does not stop by itself is killed.
        signum = signal.SIGKILL if len(received) >= 3 else signum
        for child in me.children():
            if child.pid not in earlier:
                with contextlib.suppress(psutil.Error):
                    child.send_signal(signum)

    handlers = {sig: signal.getsignal(sig) for sig in signals + _AGENT_SIGNALS}
    for sig in signals:
        signal.signal(sig, forward)
    return handlers


def _collect_logs(torchrun_dir: Path, folder: Path, first_rank: int) -> None:
    """Append torchrun's ``{run}/attempt_0/{local rank}/std*.log`` to
    ``folder/rank-{first_rank + local rank}.std*.log``."""
    for log in sorted(torchrun_dir.glob("*/attempt_*/*/std*.log")):
        rank = first_rank + int(log.parent.name)
        with open(folder / f"rank-{rank}.{log.name}", "ab") as out, open(log, "rb") as f:
            shutil.copyfileobj(f, out)
    shutil.rmtree(torchrun_dir, ignore_errors=True)


#: What a rank says when it fails only because a peer is gone (gloo, NCCL).
LOST_PEER = re.compile(r"Connection (closed|reset) by peer|NCCL communicator was aborted|"
                       r"remote process exited")


def root_cause(failures: dict[int, tuple[int, float]], secondary: set[int],
               reported: dict[int, float]) -> int | None:
    """The rank that failed first, from what torchrun's agent saw and what the ranks reported.

    :param failures: ``{rank: (exit status, time the agent saw it)}``.
    :param secondary: ranks that failed only because a peer had (lost connection, PeerFailed).
    :param reported: ``{rank: time of its exception}`` for the ranks that raised.

    A rank that raised counts from the time of its exception; one that died without a report
    (killed, ``os._exit``) from the agent's time; ranks that the agent itself ended with SIGTERM
    count only when nothing else failed.
    """
    events = {rank: reported[rank] for rank in reported if rank not in secondary}
    events |= {rank: when for rank, (status, when) in failures.items()
               if rank not in reported and rank not in secondary and status != -signal.SIGTERM}
    if not events:
        events = {rank: when for rank, (_, when) in failures.items()}
    return min(events, key=events.__getitem__) if events else None


def _reports(job_dir: Path, world_size: int) -> dict[int, dict[str, Any]]:
    """The reports of the ranks that ended with an exception (or a pause), by rank."""
    reports = {}
    for rank in range(world_size):
        path = job_dir / f"error-{rank}.json"
        if path.is_file():
            reports[rank] = json.loads(path.read_text())
    return reports


def _explain(reports: dict[int, dict[str, Any]], failures: dict[int, tuple[int, float]],
             world_size: int, agent: str = "") -> WorkerError:
    """The error that best explains a failed launch: the rank that failed first, and why.

    :param agent: what torchrun's agent logged, the details of a rank that died without a
        Python exception (the agent saw its end; the rank itself said nothing).
    """
    said = f"torchrun's agent logged:\n{agent}" if agent else ""
    secondary = {rank for rank, report in reports.items()
                 if report["secondary"] or LOST_PEER.search(report["traceback"])}
    rank = root_cause(failures, secondary, {r: report["time"] for r, report in reports.items()})
    if rank is None:
        return WorkerError("the ranks ended without reporting a result", details=said)
    if rank in reports:
        return WorkerError(f"rank {rank} of {world_size} raised an exception", rank=rank,
                           details=reports[rank]["traceback"].rstrip())
    status = failures[rank][0]
    return WorkerError(f"rank {rank} of {world_size} died ({describe_status(status)}) "
                       f"without a Python exception", rank=rank, status=status, details=said)


def describe_status(status: int) -> str:
    """An exit status in words: ``exit status 3`` or ``killed by SIGKILL``."""
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            pass
    return f"exit status {status}"
