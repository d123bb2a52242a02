"""How a launch ended, and which rank to blame.

torchrun's agent sees each process's exit status; a rank that raised says why in its report
(:mod:`ddpw.jobfolder`). When one rank fails, the others fail after it, of a lost peer or because
the agent ended them: :func:`root_cause` finds the first, and :func:`explain` turns it into the
:class:`~ddpw.errors.WorkerError` that the caller sees.
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

    :param reports: the ranks' error reports (:func:`ddpw.jobfolder.reports`).
    :param agent: what torchrun's agent logged, the details of a rank that died without a
        Python exception (the agent saw its end; the rank itself said nothing).
    :param other_machines: some ranks ran on other machines, whose reports are not here: when
        every rank here only lost its peers, the first failure was on one of those.
    """
    said = f"torchrun's agent logged:\n{agent}" if agent else ""
    secondary = {rank for rank, report in reports.items()
                 if report["secondary"] or LOST_PEER.search(report["traceback"])}
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
