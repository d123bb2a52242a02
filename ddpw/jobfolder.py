"""The job folder: what the caller hands a job's processes, what they hand back, and the names
of every file in it. Each file that another process reads whole is written once, by one writer,
with :func:`ddpw.files.write_atomically`, so that a reader sees all of it or nothing; the logs
and the checkpoint record, which grow a line at a time, are appended to.

A **payload folder** carries one launch: a private temporary folder for a launch on this machine,
``job/`` in a SLURM job's folder::

    job.pkl          the Payload (written by the caller; ddpw.shipping)
    meta.json        the caller's import path
    result-R.pkl     what rank R returned, its tensors on the CPU (written by rank R)
    error-R.json     rank R's report when it raised or paused (written by rank R)
    hang-R.json      the report of a hang, as rank R received it (written by rank R; ddpw.hang)
    times.json       when a function began and ended (written by the main rank; ddpw.goodput)
    agent.log        what torchrun's agent logged (a launch on this machine)

A **SLURM job's folder**, ``NAME-TIME`` under the console logs path, which the nodes share with
the submitting machine (as clusters' home and project file systems are)::

    job/                 the payload folder
    slurm/               submitit's files: JOBID_0_log.out is node 0's console
    rank-R.stdout.log    every rank's output (attempts after a requeue are appended)
    rank-R.stderr.log
    hang-R.stacks.log    every thread's stack of rank R when the job hung (ddpw.hang)
    agent-nodeN.log      what torchrun's agent on node N logged (made when it logs)
    attempt-K.json       attempt K's start (K = SLURM_RESTART_COUNT): its checkpoint (node 0)
    node-N.json          how node N's processes ended in the last attempt, and whether node 0
                         requeued the job (node N)
    checkpoints.txt      the checkpoints the job published, newest last (the main rank)

``ddpw-launch`` keeps a folder of the same name for a launch on this machine, with the rank and
agent logs, the stacks of a hang and the script's ``times.json`` (written by its main rank); a
Wrapper job on this machine, whose payload folder goes at its end, writes the stacks of a hang
to a folder of its own that the report names.
"""

from __future__ import annotations

import itertools
import json
import pickle
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import (
    HUNG_EXIT_STATUS,
    PAUSED_EXIT_STATUS,
    ConfigError,
    JobHung,
    JobPaused,
    WorkerError,
)
from .files import write_atomically
from .outcome import LOST_PEER, Outcome, describe_status, explain, others, root_cause

if TYPE_CHECKING:
    from .artefacts import ArtefactsConfig
    from .plan import LaunchPlan
    from .platform import PlatformConfig
    from .trainer import Trainer

#: Where job folders go unless told otherwise (``JobConfig.console_logs_path``,
#: ``ddpw-launch --log-dir``).
DEFAULT_ROOT = "./logs/console_logs"
#: The payload folder inside a SLURM job's folder.
PAYLOAD_DIR = "job"
#: submitit's folder inside a SLURM job's folder.
SUBMITIT_DIR = "slurm"


@dataclass
class Payload:
    """What every process of a launch needs: the target, its arguments, the configs and the plan.

    :param resume_from: the checkpoint a Trainer starts from, chosen before any process
        started (:func:`ddpw.resume.choose`); ``None`` starts fresh.
    :param written_before: the write order of the newest checkpoint before the job began
        (:func:`ddpw.resume.last_written`): after an elastic restart, the job resumes from the
        newest written since.
    """

    target: Trainer | Callable[..., Any]
    p_config: PlatformConfig
    a_config: ArtefactsConfig | None
    plan: LaunchPlan
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    resume_from: str | None = None
    written_before: int = 0


def make(root: str | Path, name: str) -> Path:
    """Make and return a new job folder ``root/NAME-YYYYmmdd-HHMMSS`` (``-2``, ``-3``... when
    jobs of that name start within one second)."""
    base = Path(root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in itertools.count(1):
        folder = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


# --- the payload folder --------------------------------------------------------------------------

def write_payload(folder: Path, data: bytes) -> None:
    """Write a pickled :class:`Payload` (:func:`ddpw.shipping.ship`) where
    ``python -m ddpw.entry FOLDER`` reads it, with this process's import path."""
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(folder / "job.pkl", data)
    write_atomically(folder / "meta.json",
                     json.dumps({"sys_path": [p for p in sys.path if p]}).encode())


def read_payload(folder: Path) -> Payload:
    """The :class:`Payload` in ``folder``, after putting the caller's import path first, so
    that the caller's modules (a script's folder) import here too."""
    meta = json.loads((folder / "meta.json").read_text())
    sys.path[:0] = [p for p in meta["sys_path"] if p not in sys.path]
    with open(folder / "job.pkl", "rb") as f:
        return pickle.load(f)


def result_file(folder: Path, rank: int | str) -> Path:
    """Where rank ``rank``'s pickled return value goes."""
    return folder / f"result-{rank}.pkl"


def report_file(folder: Path, rank: int | str) -> Path:
    """Where rank ``rank``'s report of the exception that ended it goes."""
    return folder / f"error-{rank}.json"


def hang_file(folder: Path, rank: int | str) -> Path:
    """Where rank ``rank`` writes the report of a hang (:func:`ddpw.hang.compose`)."""
    return folder / f"hang-{rank}.json"


def hang_report(folder: Path) -> dict[str, Any] | None:
    """The report of a hang that ended the job, as any rank in ``folder`` wrote it, else
    ``None``; the one of the lowest rank there (rank 0 composed it)."""
    found = sorted((int(path.stem.removeprefix("hang-")), path)
                   for path in folder.glob(hang_file(folder, "*").name)
                   if path.stem.removeprefix("hang-").isdigit())
    return json.loads(found[0][1].read_text()) if found else None


def write_result(folder: Path, rank: int, data: bytes) -> None:
    """Rank ``rank``'s pickled return value."""
    write_atomically(result_file(folder, rank), data)


def write_report(folder: Path, rank: int, error: BaseException, paused: str | None = None,
                 secondary: bool = False) -> None:
    """Rank ``rank``'s report of the exception that ended it.

    :param paused: the checkpoint written, when the exception is a pause.
    :param secondary: the rank stopped only because another failed
        (:class:`~ddpw.errors.PeerFailed`).
    """
    report = {"rank": rank, "time": time.time(), "paused": paused, "secondary": secondary,
              "traceback": "".join(traceback.format_exception(type(error), error,
                                                              error.__traceback__)),
              # Raised to the caller as it was: bad input that only the ranks could see (a
              # damaged checkpoint, a checkpoint folder that not every rank sees).
              "config_error": str(error) if isinstance(error, ConfigError) else None}
    write_atomically(report_file(folder, rank), json.dumps(report).encode())


def note_world(folder: Path, world_size: int) -> None:
    """The world size of the processes running now: an elastic job's may shrink."""
    write_atomically(folder / "world.json", json.dumps({"world_size": world_size}).encode())


def note_times(folder: Path, times: dict[str, float | None]) -> None:
    """When a function began and ended on the main rank (:func:`ddpw.goodput.function_times`)."""
    write_atomically(folder / "times.json", json.dumps(times).encode())


def noted_times(folder: Path) -> dict[str, float | None] | None:
    """What :func:`note_times` noted, if it did."""
    path = folder / "times.json"
    return json.loads(path.read_text()) if path.is_file() else None


def noted_world(folder: Path, planned: int) -> int:
    """The world size that :func:`note_world` noted last, else ``planned``."""
    path = folder / "world.json"
    return json.loads(path.read_text())["world_size"] if path.is_file() else planned


def reports(folder: Path, world_size: int) -> dict[int, dict[str, Any]]:
    """The reports of the ranks that ended with an exception (or a pause), by rank."""
    found = {}
    for rank in range(world_size):
        path = report_file(folder, rank)
        if path.is_file():
            found[rank] = json.loads(path.read_text())
    return found


def set_aside_reports(folder: Path, attempt: int) -> dict[int, dict[str, Any]]:
    """Move the reports of an attempt that ended (an elastic restart follows) out of the way of
    the next attempt's, as ``error-R.attempt-K.json`` (and ``hang-R.attempt-K.json``); return
    the errors' by rank."""
    for path in folder.glob(hang_file(folder, "*").name):
        if path.stem.removeprefix("hang-").isdigit():
            path.rename(path.with_name(f"{path.stem}.attempt-{attempt}.json"))
    found = {}
    for path in folder.glob(report_file(folder, "*").name):
        if not path.stem.removeprefix("error-").isdigit():  # set aside before
            continue
        report = json.loads(path.read_text())
        found[report["rank"]] = report
        path.rename(path.with_name(f"{path.stem}.attempt-{attempt}.json"))
    return found


def results_present(folder: Path, world_size: int) -> bool:
    """Whether every rank's result is in ``folder``."""
    return all(result_file(folder, rank).is_file() for rank in range(world_size))


def collect(folder: Path, world_size: int, outcome: Outcome,
            other_machines: bool = False) -> list[Any]:
    """The ranks' results from ``folder`` in rank order, or the error that explains why not.

    :param other_machines: some of the ranks ran on other machines, whose reports are not in
        ``folder``.

    :raises JobHung: when a rank hung and ddpw ended the job (:mod:`ddpw.hang`).
    :raises JobPaused: when the training job paused and saved a checkpoint.
    :raises KeyboardInterrupt: when Ctrl-C stopped the launch.
    :raises WorkerError: when a rank raised or died, or a signal stopped the launch.
    """
    import cloudpickle

    hung = hang_report(folder)
    if hung is not None:
        raise JobHung(hung["message"], hung["stuck"], hung["details"])
    found = reports(folder, world_size)
    # A rank pauses only once every rank has written its part of the checkpoint.
    paused = [report["paused"] for report in found.values() if report["paused"]]
    if paused:
        raise JobPaused(paused[0])
    if not outcome.failures and results_present(folder, world_size):
        return [cloudpickle.loads(result_file(folder, rank).read_bytes())
                for rank in range(world_size)]
    if outcome.stopped_by == signal.SIGINT:
        raise KeyboardInterrupt
    if outcome.stopped_by is not None:
        killed = [rank for rank, (status, _) in sorted(outcome.failures.items())
                  if status == -signal.SIGKILL]
        how = (f" (rank(s) {', '.join(map(str, killed))} did not stop and were killed with "
               f"SIGKILL at the third signal)" if killed and len(outcome.received) >= 3 else "")
        raise WorkerError(f"the job was stopped by {outcome.stopped_by.name}; every process "
                          f"of it has ended{how}")
    log = agent_log(folder)
    agent = log.read_text(errors="replace").rstrip() if log.is_file() else ""
    raise explain(found, outcome.failures, world_size, agent, other_machines)


def exit_status(folder: Path, outcome: Outcome, all_ranks: bool) -> tuple[int, list[str]]:
    """The exit status of a launch (``ddpw-launch``'s) that ended as ``outcome`` with its job
    folder ``folder``, and what to say about it on stderr: 0 when every rank finished,
    :data:`~ddpw.errors.PAUSED_EXIT_STATUS` for a pause, ``128 + N`` when signal ``N`` stopped
    it, :data:`~ddpw.errors.HUNG_EXIT_STATUS` with the hang's report, else the status of the
    rank that failed first for a reason of its own (:func:`~ddpw.outcome.root_cause`), with
    what it said last when the console showed rank 0 alone (not ``all_ranks``).
    """
    failures = outcome.failures
    if not failures:
        return 0, []  # every rank finished, even if a signal came along
    if outcome.paused:
        return PAUSED_EXIT_STATUS, []
    if outcome.stopped_by is not None:
        return 128 + outcome.stopped_by.value, []
    hung = hang_report(folder)
    if hung is not None:
        return HUNG_EXIT_STATUS, [f"[ddpw] {hung['message']}\n{hung['details']}\n[ddpw] logs in "
                                  f"{folder}"]
    said = {rank: _text(rank_log(folder, rank, "stderr")) for rank in failures}
    lost = {rank: {"traceback": text} for rank, text in said.items() if LOST_PEER.search(text)}
    rank = root_cause(failures, set(lost), {})
    status, lines = failures[rank][0], []
    if rank != 0 and not all_ranks:
        lines.append("\n".join(f"[rank{rank}]: {line}"
                               for line in said[rank].splitlines()[-30:]))
    lines.append(f"[ddpw] rank {rank} failed ({describe_status(status)})"
                 f"{others(rank, lost, failures)}; logs in {folder}")
    return (status if status > 0 else 128 - status), lines


def _text(log: Path) -> str:
    return log.read_text(errors="replace") if log.is_file() else ""


# --- the logs ------------------------------------------------------------------------------------

def rank_log(folder: Path, rank: int, stream: str) -> Path:
    """Rank ``rank``'s ``stdout`` or ``stderr`` log."""
    return folder / f"rank-{rank}.{stream}.log"


def agent_log(folder: Path, node: int | None = None) -> Path:
    """Where the records of torchrun's agent and of ``accelerate launch`` go: ``agent.log``, or
    ``agent-node{N}.log`` on node ``N`` of a job of several nodes (each runs its own launch
    into the same folder)."""
    return folder / ("agent.log" if node is None else f"agent-node{node}.log")


# --- a SLURM job's attempts ----------------------------------------------------------------------

def attempt_file(folder: Path, attempt: int) -> Path:
    """Attempt ``attempt``'s start, written by node 0:
    ``{"attempt": K, "port": RENDEZVOUS_PORT, "resume": PATH}``."""
    return folder / f"attempt-{attempt}.json"


def node_file(folder: Path, node: int | str) -> Path:
    """How node ``node``'s processes ended in the last attempt, written by that node."""
    return folder / f"node-{node}.json"


def checkpoint_record(folder: Path) -> Path:
    """The checkpoints the job published, one absolute path a line, newest last."""
    return folder / "checkpoints.txt"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to one of the job folder's JSON files."""
    write_atomically(path, json.dumps(data).encode())


def read_json(path: Path) -> dict[str, Any]:
    """What a JSON file of the job folder holds; ``{}`` when it is not there."""
    return json.loads(path.read_text()) if path.is_file() else {}


def await_json(path: Path, timeout: float = 300.0) -> dict[str, Any]:
    """What another node writes to ``path``, once it is there.

    :raises RuntimeError: when it is not there after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if time.monotonic() > deadline:
            raise RuntimeError(f"node 0 did not begin this attempt: no {path} after {timeout} s")
        time.sleep(0.2)
    return json.loads(path.read_text())


def clear_attempt(folder: Path) -> None:
    """Remove what the last attempt's processes and nodes reported (node 0, as an attempt
    begins)."""
    payload_dir = folder / PAYLOAD_DIR
    for stale in [*payload_dir.glob(result_file(payload_dir, "*").name),
                  *payload_dir.glob(report_file(payload_dir, "*").name),
                  *payload_dir.glob(hang_file(payload_dir, "*").name),
                  *folder.glob(node_file(folder, "*").name)]:
        stale.unlink(missing_ok=True)


def note_checkpoint(record: Path, checkpoint: Path) -> None:
    """Add a checkpoint just published to ``record`` (:func:`checkpoint_record`)."""
    with open(record, "a") as f:
        f.write(f"{checkpoint.resolve()}\n")


def newest_checkpoint(record: Path) -> str | None:
    """The newest checkpoint noted in ``record`` that still exists."""
    noted = record.read_text().split() if record.is_file() else []
    return next((path for path in reversed(noted) if Path(path).is_dir()), None)
