"""How the processes of a ddpw job handle signals and end, on every platform.

- The launching process (:mod:`ddpw.launcher`, the SLURM node runner) passes the pause signals
  on to the job's processes (:func:`forwarding`).
- A process of a SLURM job notes the requeue signal from its first moment, before any Trainer
  can handle it (:func:`note_requeue_signal`, called by ``import ddpw``).
- A worker ends with its parent (:func:`end_with_parent`) and leaves with the status Python
  would give it (:func:`exit_status`), without finalising the interpreter (:func:`exit_now`).
- The pause handler counts the pause signals it takes (:func:`pause_signals_taken`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from . import environment

#: The signals that ddpw passes on to every process of a job while it runs: the pause signals.
FORWARDED_NAMES = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")
FORWARDED = tuple(getattr(signal, name) for name in FORWARDED_NAMES if hasattr(signal, name))
#: Signals that torchrun's agent handles itself, by ending the job.
AGENT_SIGNALS = tuple(getattr(signal, name) for name in ("SIGHUP", "SIGQUIT")
                      if hasattr(signal, name))


@contextlib.contextmanager
def forwarding(signals: tuple[signal.Signals, ...] = FORWARDED
               ) -> Iterator[list[signal.Signals]]:
    """While the block runs, pass the ``signals`` on to the processes that this process starts
    in it (the job's); yield the list of the signals received, in order.

    The third signal means it: from then on the processes get ``SIGKILL``. On leaving, the
    handlers of these signals and of :data:`AGENT_SIGNALS` (which torchrun's agent replaces)
    are restored. Signal handlers belong to the main thread: from another thread, nothing is
    forwarded.
    """
    received: list[signal.Signals] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    import psutil

    me = psutil.Process()
    earlier = {child.pid for child in me.children()}

    def forward(signum: int, frame: Any) -> None:
        received.append(signal.Signals(signum))
        signum = signal.SIGKILL if len(received) >= 3 else signum
        for child in me.children():
            if child.pid not in earlier:
                with contextlib.suppress(psutil.Error):
                    child.send_signal(signum)

    handlers = {sig: signal.getsignal(sig) for sig in signals + AGENT_SIGNALS}
    for sig in signals:
        signal.signal(sig, forward)
    try:
        yield received
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def ignore_signals(names: Iterable[str]) -> None:
    """Ignore the :data:`FORWARDED_NAMES` and ``names`` from now on: a process that has paused
    cleanly must not be turned into a killed one by the signals that end its peers."""
    for name in {*FORWARDED_NAMES, *names}:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def exit_status(error: BaseException) -> int:
    """The status with which Python itself would end a process that ``error`` ends, saying what
    Python says: ``sys.exit``'s code or message, or the traceback (130 after Ctrl-C).

    Call it in the ``except`` block that caught ``error``.
    """
    if isinstance(error, SystemExit):
        if error.code is None or isinstance(error.code, int):
            return error.code or 0
        print(error.code, file=sys.stderr)
        return 1
    import traceback  # only here: it costs a light `import ddpw` a quarter of its time

    traceback.print_exc()
    return 130 if isinstance(error, KeyboardInterrupt) else 1


def end_with_parent() -> None:
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
    # failed one; and finalising one that imported torch takes half a second, for nothing.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


# --- SLURM's requeue signal from a process's first moment ---------------------------------------
# SLURM sends PlatformConfig.requeue_signal to every process of a job. Its default action ends a
# process, and a process spends its first seconds importing torch and unpickling the job, before
# any Trainer handles the signal. So `import ddpw` itself, in a process that ddpw's SLURM node
# runner started, notes the signal until the Trainer takes over; a function or a plain script
# ignores it.

_requeue_signal_came = False


def note_requeue_signal() -> None:
    """In a process of a ddpw SLURM job (:data:`ddpw.environment.REQUEUE_SIGNAL` is set), note
    the requeue signal from now on rather than die of it."""
    name = os.environ.get(environment.REQUEUE_SIGNAL)
    if name and threading.current_thread() is threading.main_thread():
        signal.signal(getattr(signal, name), _note_requeue_signal)


def requeue_signal_came() -> bool:
    """Whether the requeue signal has come since :func:`note_requeue_signal`; forget it."""
    global _requeue_signal_came
    came, _requeue_signal_came = _requeue_signal_came, False
    return came


def _note_requeue_signal(signum: int, frame: Any) -> None:
    global _requeue_signal_came
    _requeue_signal_came = True


# --- the pause signals a process took -------------------------------------------------------------
# The crash tests' hook (ddpw.checkpoint.hashing) sends a second pause signal during a save and,
# in the writer's thread, waits until it has reached this process's pause handler: a count that
# the handler bumps is what another thread can safely read. (The hook once learnt of the signal
# from faulthandler's dump of every thread, made inside the signal handler: that dump crashes
# the process now and then, SIGSEGV without a word, while other threads run Python.)

_pause_signals_taken = 0


def note_pause_signal() -> None:
    """Count a pause signal that this process's handler took (safe in a signal handler)."""
    global _pause_signals_taken
    _pause_signals_taken += 1


def pause_signals_taken() -> int:
    """How many pause signals this process's pause handlers have taken."""
    return _pause_signals_taken
