"""How a launch ended, and which rank to blame.

torchrun's agent sees each process's exit status; a rank that raised says why in its report
(:mod:`ddpw.jobfolder`). When one rank fails, the others fail after it, of a lost peer or because
the agent ended them: :func:`root_cause` finds the first, and :func:`explain` turns it into the
:class:`~ddpw.errors.WorkerError` that the caller sees: one line that names every rank that
failed (:func:`others`), and the first one's traceback, which the console then shows once (the
processes of a Wrapper's job on this machine print none themselves, :mod:`ddpw.worker`). A
rank that only lost its peer is that failure's consequence (:func:`consequence`): a few words,
never a traceback.
"""

from __future__ import annotations

import dataclasses
import re
import signal
from typing import Any

from .errors import PAUSED_EXIT_STATUS, ConfigError, WorkerError


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

    @property
    def paused(self) -> bool:
        """Whether the job paused: a rank ended with :data:`~ddpw.errors.PAUSED_EXIT_STATUS`,
        and every other that failed did so too or was ended by the agent (``SIGTERM``) as the
        first one left."""
        statuses = {status for status, _ in self.failures.values()}
        return (PAUSED_EXIT_STATUS in statuses
                and statuses <= {PAUSED_EXIT_STATUS, -signal.SIGTERM})


#: What a rank says when it fails only because a peer is gone (gloo, NCCL).
LOST_PEER = re.compile(r"Connection (closed|reset) by peer|NCCL communicator was aborted|"
                       r"remote process exited")
#: Where gloo says the lost peer was: ``Connection closed by peer [10.0.0.2]:40113``, or
#: ``Read error [10.0.0.2]:40113: Connection reset by peer``.
PEER_ADDRESS = re.compile(r"(?:by peer|Read error) \[([^\]]+)\]")


def lost_peers(reports: dict[int, dict[str, Any]]) -> list[str]:
    """The addresses of the peers that the ranks of ``reports`` lost, as gloo names them."""
    return sorted({address for report in reports.values()
                   for address in PEER_ADDRESS.findall(report["traceback"])})


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


def explain(reports: dict[int, dict[str, Any]], failures: dict[int, tuple[int, float]],
            world_size: int, agent: str = "",
            other_machines: bool = False) -> WorkerError | ConfigError:
    """The error that best explains a failed launch: the rank that failed first, and why; or,
    when that rank found bad input (a damaged checkpoint), the same
    :class:`~ddpw.errors.ConfigError`.

    The error's message is one line that names that rank and then every other rank that failed
    (:func:`others`); its details are that rank's traceback alone, so that the console shows it
    once.

    :param reports: the ranks' error reports (:func:`ddpw.jobfolder.reports`).
    :param agent: what torchrun's agent logged, the details of a rank that died without a
        Python exception (the agent saw its end; the rank itself said nothing).
    :param other_machines: some ranks ran on other machines, whose reports are not here: when
        every rank here only lost its peers, the first failure was on one of those.
    """
    said = f"torchrun's agent logged:\n{agent}" if agent else ""
    secondary = {rank for rank, report in reports.items() if is_consequence(report)}
    rank = root_cause(failures, secondary, {r: report["time"] for r, report in reports.items()})
    if rank is None:
        return WorkerError("the ranks ended without reporting a result", details=said)
    if rank in reports and reports[rank].get("config_error"):
        return ConfigError(reports[rank]["config_error"])
    if other_machines and rank in secondary:
        where = lost_peers({rank: reports[rank]}) if rank in reports else []
        at = f" (at {', '.join(where)})" if where else ""
        return WorkerError(f"rank {rank} of {world_size} lost its peers{at}: a process on "
                           f"another machine of the job failed first, or that machine went "
                           f"down; its own output says why", rank=rank,
                           details=reports.get(rank, {}).get("traceback", said).rstrip())
    also = others(rank, reports, failures)
    if rank in reports:
        first = " first" if any(r not in secondary for r in reports if r != rank) else ""
        return WorkerError(f"rank {rank} of {world_size} raised an exception{first}{also}",
                           rank=rank, details=reports[rank]["traceback"].rstrip())
    status = failures[rank][0]
    return WorkerError(f"rank {rank} of {world_size} died ({describe_status(status)}) "
                       f"without a Python exception{also}", rank=rank, status=status,
                       details=said)


def is_consequence(report: dict[str, Any]) -> bool:
    """Whether the rank of ``report`` failed only because another rank had: it lost its peer
    (gloo, NCCL) or stopped with :class:`~ddpw.errors.PeerFailed`."""
    return bool(report.get("secondary") or LOST_PEER.search(report["traceback"]))


def others(first: int, reports: dict[int, dict[str, Any]],
           failures: dict[int, tuple[int, float]]) -> str:
    """What became of the ranks that failed besides ``first``, as clauses to follow the line
    about ``first``, the ranks of one fate together: ``; rank 1 raised too (ValueError: ...);
    ranks 2, 3 lost a peer (...)``.

    :param reports: the ranks' error reports (:func:`ddpw.jobfolder.reports`); a script's ranks
        write none, and ``ddpw-launch`` gives the ``traceback`` alone, from the stderr log of
        each rank that lost its peer.

    The ranks that torchrun's agent itself ended (``SIGTERM``) are left out, as is a paused
    rank: they did what they were told.
    """
    said = _last_line(reports[first]) if first in reports else None
    fates: dict[str, list[int]] = {}
    for rank in sorted((set(reports) | set(failures)) - {first}):
        report = reports.get(rank)
        if report is not None and report.get("paused"):
            continue
        if report is not None and is_consequence(report):
            fate = consequence(report["traceback"])
        elif report is not None:
            line = _last_line(report)
            fate = "raised the same" if line == said else f"raised too ({line})"
        elif failures[rank][0] != -signal.SIGTERM:
            fate = f"failed ({describe_status(failures[rank][0])})"
        else:
            continue
        fates.setdefault(fate, []).append(rank)
    return "".join(f"; rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} {fate}"
                   for fate, ranks in fates.items())


def consequence(said: str) -> str:
    """What a rank that failed only because another had did, in a few words, from its error's
    message or traceback: ``lost a peer (Connection closed by peer [10.0.0.2])``, or
    ``stopped because another rank failed``."""
    lost = LOST_PEER.search(said)
    if lost is None:
        return "stopped because another rank failed"
    where = re.compile(re.escape(lost.group(0)) + r" (\[[^\]]+\])").search(said)
    return f"lost a peer ({lost.group(0)}{' ' + where.group(1) if where else ''})"


def _last_line(report: dict[str, Any]) -> str:
    """The exception's own line at the end of a report's traceback: ``ValueError: ...``."""
    lines = report["traceback"].rstrip().splitlines()
    return lines[-1] if lines else "no traceback"


def describe_status(status: int) -> str:
    """An exit status in words: ``exit status 3`` or ``killed by SIGKILL``."""
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            pass
    return f"exit status {status}"
