"""SLURM's warning signal in the processes of a ddpw SLURM job, from their first moment.

SLURM sends ``PlatformConfig.requeue_signal`` to every process of a job. Its default action
ends a process, and a process spends its first seconds importing torch and unpickling the job,
before any Trainer handles the signal. So ``import ddpw`` itself, in a process that ddpw's SLURM
node runner started (it sets :data:`REQUEUE_SIGNAL_ENV`), notes the signal until the Trainer
takes over (:func:`take`); in a function or a plain script it is ignored.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

#: Set by ddpw's SLURM node runner for its processes: the name of the requeue signal.
REQUEUE_SIGNAL_ENV = "DDPW_REQUEUE_SIGNAL"

_received = False


def install() -> None:
    """Note the requeue signal from now on, in a process of a ddpw SLURM job."""
    name = os.environ.get(REQUEUE_SIGNAL_ENV)
    if name and threading.current_thread() is threading.main_thread():
        signal.signal(getattr(signal, name), _note)


def take() -> bool:
    """Whether the requeue signal has come since :func:`install`; forget it."""
    global _received
    received, _received = _received, False
    return received


def _note(signum: int, frame: Any) -> None:
    global _received
    _received = True
