"""Timestamps of a payload's stages, for the launch row's account of where the time goes.

``stamp(stage)`` appends one JSON line to the file that ``BENCH_STAMPS`` names (nothing without
it): this process's id and rank, the stage, ``time.time()``, and its peak RSS so far. The first
stamp of a process is preceded by a ``born`` stamp, when the kernel created the process (before
the interpreter started, so the start-up of Python itself is not lost), and a ``command`` stamp,
when the benchmark's command started; an ``exit`` stamp follows when the process begins to
exit (its last exit handler).

Standard library only, so that importing it costs nothing measurable.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import time

_FILE = os.environ.get("BENCH_STAMPS")
_born_written = False


def _proc_stat(pid: int | str) -> tuple[str, int, int]:
    """A process's command name, parent's id and start (clock ticks since boot)."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    # The name is in parentheses and may hold spaces; the fields after it count from field 3.
    name = text[text.index("(") + 1:text.rindex(")")]
    fields = text[text.rindex(")") + 1:].split()
    return name, int(fields[1]), int(fields[19])


def born(pid: int | str = "self") -> float | None:
    """When process ``pid`` was created, as ``time.time()``, within half a clock tick (5 ms).

    ``/proc/PID/stat`` gives the start in whole ticks since boot (rounded down: half a tick is
    added back); ``CLOCK_BOOTTIME`` gives now since boot, precisely. ``None`` where either is
    missing (not Linux).
    """
    try:
        ticks = _proc_stat(pid)[2]
        tick = 1 / os.sysconf("SC_CLK_TCK")
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - (ticks + 0.5) * tick
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return time.time() - age


def command_born() -> float | None:
    """When the benchmark's command started: the benchmark runs each command under ``timeout``,
    so this is the creation of the nearest ancestor named ``timeout`` (``None`` without one)."""
    try:
        pid = os.getppid()
        while pid > 1:
            name, parent, _ = _proc_stat(pid)
            if name == "timeout":
                return born(pid)
            pid = parent
    except (OSError, ValueError, IndexError):
        pass
    return None


def _write(stage: str, when: float) -> None:
    record = {"pid": os.getpid(), "rank": os.environ.get("RANK"), "stage": stage, "time": when,
              "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    # One short line per append: lines from several processes do not interleave.
    with open(_FILE, "a") as f:  # type: ignore[arg-type]
        f.write(json.dumps(record) + "\n")


def _write_exit() -> None:
    _write("exit", time.time())


def stamp(stage: str, when: float | None = None) -> None:
    """Record that this process reached ``stage`` (now, or at ``when``)."""
    global _born_written
    if not _FILE:
        return
    if not _born_written:
        _born_written = True
        for name, started in (("command", command_born()), ("born", born())):
            if started is not None:
                _write(name, started)
        # An exit stamp: the moment this process's own code was done and its shutdown began.
        # Exit handlers run in reverse: in the scripts, which stamp before importing torch,
        # this runs after torch's and Accelerate's handlers.
        atexit.register(_write_exit)
    _write(stage, time.time() if when is None else when)
