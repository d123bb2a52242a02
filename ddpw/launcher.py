"""Carry out a :class:`~ddpw.plan.LaunchPlan` of several processes with ``accelerate launch``.

``accelerate launch`` runs through its Python API in the calling process (which imports torch
then, not before). :func:`run_accelerate` starts any entry point: ddpw's own, or a user's script
for ``ddpw-launch``. For :func:`launch`, the payload is pickled (:func:`ddpw.shipping.ship`)
into a private temporary payload folder (:mod:`ddpw.jobfolder`) and ``python -m ddpw.entry
FOLDER`` runs on every process; each rank writes its result or report back into the folder,
and the results come back in rank order.

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
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import environment, goodput, jobfolder, rendezvous
from ._compat import warn_if_agent_takes_signals
from .jobfolder import Payload
from .outcome import Outcome
from .plan import LaunchPlan
from .process import AGENT_SIGNALS, FORWARDED, forwarding

#: ``accelerate launch`` changes the process's environment while it runs: one launch at a time.
_LAUNCH_LOCK = threading.Lock()

#: The loggers of torchrun's agent and of ``accelerate launch``, whose records go to the agent's
#: log file rather than the console while a launch runs.
AGENT_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher",
                 "torch.distributed.run", "accelerate")


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
        """Where the records of torchrun's agent and of ``accelerate launch`` go
        (:func:`ddpw.jobfolder.agent_log`)."""
        return jobfolder.agent_log(self.folder, self.node)


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
    :raises ConfigError: when a job on several machines cannot meet: node 0's address does not
        resolve, or the nodes did not all arrive in time (:func:`ddpw.rendezvous.explain`).
    """
    # The launch's own time and id, unless a SLURM attempt's (the plan's) came first.
    env = {**goodput.launch_environment(), **plan.env}
    if logs is not None:  # a script's processes report a hang there (ddpw's own, in the payload's)
        env[environment.HANG_FOLDER] = str(logs.folder)
    if plan.rendezvous is not None:
        rendezvous.check(plan.rendezvous)
        env.update(rendezvous.agent_env(plan.rendezvous))
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
        elastic = (rendezvous.torchrun_options(plan.rendezvous) if plan.rendezvous is not None
                   else {})
        try:
            with _torchrun_sees(elastic):
                outcome = _run(args, launch_env(env), plan.standalone, torchrun_logs, logs,
                               forward, agent_log or Path(tmp) / "agent.log")
        except (RuntimeError, ConnectionError) as error:
            explained = (rendezvous.explain(error, plan.rendezvous)
                         if plan.rendezvous is not None else None)
            if explained is None:
                raise
            raise explained from None
        if torchrun_logs is not None:
            _collect_logs(torchrun_logs, logs.folder, logs.first_rank)
        times = jobfolder.noted_times(logs.folder) if logs is not None else None
        if times is not None:  # a script's, once it ended well on the main rank
            print(goodput.function_lines(times), file=sys.stderr, flush=True)
        return outcome


def launch(payload: Payload) -> list[Any]:
    """Run ``payload`` on ``payload.plan.world_size`` processes; return their results in rank
    order.

    :raises ConfigError: when the payload cannot be pickled, naming the object at fault.
    :raises WorkerError: when a rank raises or dies, with its rank and traceback.
    :raises JobPaused: when the training job paused and saved a checkpoint.
    :raises KeyboardInterrupt: on Ctrl-C, once every process of the job has ended.
    """
    from .shipping import ship  # imports torch, which a launch of a script does without

    with tempfile.TemporaryDirectory(prefix="ddpw-job-") as tmp:
        folder = Path(tmp)
        jobfolder.write_payload(folder, ship(payload))
        outcome = run_accelerate(payload.plan, ["--module", "ddpw.entry", str(folder)],
                                 agent_log=jobfolder.agent_log(folder))
        world_size = jobfolder.noted_world(folder, payload.plan.world_size)
        results = jobfolder.collect(folder, world_size, outcome,
                                    other_machines=payload.plan.rendezvous is not None)
        times = jobfolder.noted_times(folder)
        if times is not None and payload.p_config.verbose:  # a function's, once it ended well
            print(goodput.function_lines(times), file=sys.stderr, flush=True)
        return results


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


def _run(args: list[str], env: dict[str, str], standalone: bool, log_dir: Path | None,
         logs: Logs | None, forward: tuple[signal.Signals, ...], agent_log: Path) -> Outcome:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from accelerate.utils import patch_environment
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    parsed = launch_command_parser().parse_args(args)
    # accelerate's own fallback when a port is busy, taken from the start: the agent binds a free
    # port for the rendezvous itself, so there is no window in which another job can take it.
    parsed.standalone = standalone
    parsed.signals_to_handle = ",".join(sig.name for sig in AGENT_SIGNALS)
    warn_if_agent_takes_signals()  # an older torchrun ignores signals_to_handle
    if logs is not None:
        # torchrun's own options (accelerate's parser lacks the last two): every rank's output
        # to files, and to the console for the main rank or, prefixed, for all.
        parsed.log_dir, parsed.tee = str(log_dir), "3"
        parsed.local_ranks_filter = "" if logs.all_ranks else "0"
        env = {**env, "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": "[rank${rank}]: "}
    with forwarding(forward) as received:
        try:
            with patch_environment(**env), _records_to(agent_log):
                launch_command(parsed)
            failures = {}
        except ChildFailedError as error:
            failures = {rank: (f.exitcode, f.timestamp) for rank, f in error.failures.items()}
        except SignalException as error:
            failures, received[:0] = {}, [signal.Signals(error.sigval)]
    return Outcome(failures, received[0] if received else None, tuple(received))


@contextlib.contextmanager
def _torchrun_sees(options: dict[str, str]) -> Iterator[None]:
    """While the block runs, the arguments that ``accelerate launch`` hands to torchrun get
    ``options`` on top (:func:`ddpw.rendezvous.torchrun_options`: an elastic range of nodes,
    which accelerate's ``--num_machines``, a number, cannot give)."""
    if not options:
        yield
        return
    import torch.distributed.run as torchrun

    original = torchrun.run

    def run(args: Any) -> Any:
        for name, value in options.items():
            setattr(args, name, value)
        return original(args)

    torchrun.run = run
    try:
        yield
    finally:
        torchrun.run = original


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


def _collect_logs(torchrun_dir: Path, folder: Path, first_rank: int) -> None:
    """Append torchrun's ``{run}/attempt_0/{local rank}/std*.log`` to
    ``folder/rank-{first_rank + local rank}.std*.log``."""
    for log in sorted(torchrun_dir.glob("*/attempt_*/*/std*.log")):
        rank = first_rank + int(log.parent.name)
        stream = log.name.removesuffix(".log")
        with open(jobfolder.rank_log(folder, rank, stream), "ab") as out, open(log, "rb") as f:
            shutil.copyfileobj(f, out)
    shutil.rmtree(torchrun_dir, ignore_errors=True)
