"""What a hang leaves behind (:mod:`ddpw.hang`): each rank's stacks, in a file of its own, and
the report that the judge composes from what the ranks posted.

The console gets the report only: the verdict, the stuck ranks' main-thread stacks (with the
native frames that py-spy sees, where it is installed) and one line for every other rank. Every
thread's stack of every rank, as :mod:`faulthandler` and py-spy write them, goes to that rank's
file (:func:`stacks_file`), which the report names.
"""

from __future__ import annotations

import contextlib
import faulthandler
import itertools
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

#: The innermost frames of a main thread's stack that the report shows, and of py-spy's view.
FRAMES, NATIVE_LINES = 8, 12
#: The longest that py-spy may take over one rank's dump (it stops every thread meanwhile).
SPY_S = 20.0


def temporary(folder: Path) -> bool:
    """Whether ``folder`` lies in the temporary directory (as a Wrapper's payload does)."""
    return folder.resolve().is_relative_to(Path(tempfile.gettempdir()).resolve())


def stacks_folder(stamp: float, pid: int) -> Path:
    """A folder of its own for the stacks of a job whose folder goes when the job ends, named
    after the verdict's time (``stamp``) and the judge's ``pid``."""
    when = time.strftime("%Y%m%d-%H%M%S", time.gmtime(stamp))
    return Path(tempfile.gettempdir()) / f"ddpw-hang-{when}-{pid}"


def stacks_file(folder: Path, rank: int) -> Path:
    """Where rank ``rank`` writes every thread's stack after a verdict."""
    return folder / f"hang-{rank}.stacks.log"


def frames_of(summary: traceback.StackSummary) -> list[list[Any]]:
    """The innermost frames, as the report shows them: file, line, function, source text."""
    return [[f.filename, f.lineno, f.name, (f.line or "").strip()] for f in summary[-FRAMES:]]


def in_collective(frame: FrameType | None) -> bool:
    """Whether a thread whose innermost frame is ``frame`` waits in a collective of
    :mod:`torch.distributed` (a call that blocks until every rank makes it: gloo's, and the
    barriers of NCCL; NCCL's other collectives return at once and wait on the device)."""
    for _ in range(2):
        if frame is None:
            return False
        if "/torch/distributed/" in frame.f_code.co_filename.replace("\\", "/"):
            return True
        frame = frame.f_back
    return False


def dump(rank: int, path: Path, pid: int, header: str) -> list[str]:
    """Write every thread's stack of this process to ``path`` (:mod:`faulthandler`'s, then
    py-spy's with native frames when ``py-spy`` is installed); return py-spy's lines for the
    main thread (innermost first), empty without py-spy."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as out:
        print(header, file=out, flush=True)
        faulthandler.dump_traceback(file=out, all_threads=True)
        out.flush()
        spied = spy(pid)
        if spied:
            print(f"\npy-spy's view of rank {rank}, with native frames:\n{spied}", file=out)
    return main_thread(spied)


def spy(pid: int) -> str:
    """py-spy's dump of process ``pid`` with native frames, or ``""`` without py-spy (found
    beside this Python too: a virtual environment's scripts need not be on the PATH)."""
    beside = Path(sys.executable).with_name("py-spy")
    command = shutil.which("py-spy") or (str(beside) if beside.is_file() else None)
    if command is None:
        return ""
    deadline = time.monotonic() + SPY_S
    for _ in range(2):  # once more after a failure: a loaded machine, a thread that was busy
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            run = subprocess.run([command, "dump", "--native", "--pid", str(pid)], text=True,
                                 capture_output=True, timeout=max(1.0, deadline - time.monotonic()))
            if run.returncode == 0:
                return run.stdout
    return ""


def main_thread(spied: str) -> list[str]:
    """The frames of the main thread in a py-spy dump, innermost first."""
    frames: list[str] = []
    for line in spied.splitlines():
        if line.startswith("Thread "):
            if frames:
                break
            frames = ['"MainThread"'] if '"MainThread"' in line else []
        elif frames and line.strip():
            frames.append(line.strip())
    return frames[1:NATIVE_LINES + 1]


def compose(verdict: dict[str, Any], stacks: dict[int, dict[str, Any]],
            natives: dict[int, list[str]], timeout_s: float) -> dict[str, Any]:
    """The report of a hang: ``message`` (one line), ``details`` (the stuck ranks' stacks, one
    line for each other rank, and where every rank's stacks are), ``stuck`` and ``at`` (when
    the verdict came, in seconds since the epoch)."""
    stuck, waiting, beats = verdict["stuck"], verdict["waiting"], verdict["beats"]

    def who(rank: int) -> str:
        return f"rank {rank} ({beats[rank]['host']}, pid {beats[rank]['pid']})"

    def where(rank: int) -> str:
        return beats[rank]["phase"] if beats[rank]["moves"] else "before any progress that ddpw saw"

    def frames(rank: int) -> list[list[Any]]:
        return stacks.get(rank, {}).get("frames") or []

    def innermost(rank: int) -> str:
        if not frames(rank):
            return ""
        file, line, name, code = frames(rank)[-1]
        return f", at {name} ({Path(file).name}:{line})" + (f": {code}" if code else "")

    why = (f"rank(s) {', '.join(map(str, waiting))} waited in a collective until its timeout"
           if waiting else f"no rank made progress for {verdict['quiet_s']:.0f} s")
    message = (f"the job hung: {why} (hang_timeout_s={timeout_s:g}); the stuck rank(s) of "
               f"{len(beats)}: {', '.join(who(rank) for rank in stuck)}, {where(stuck[0])}"
               f"{innermost(stuck[0])}")
    lines = []
    for rank in stuck:
        moved = (f", last progress {verdict['since'][rank]:.0f} s before the verdict"
                 if beats[rank]["moves"] else "")
        arrived = ("" if rank in stacks else
                   " (its stack did not arrive: its watch thread did not run)")
        lines.append(f"{who(rank)}: stuck, {where(rank)}{moved}{arrived}:")
        lines += [(f"  File \"{file}\", line {line}, in {name}" + (f"\n    {code}" if code else ""))
                  for file, line, name, code in frames(rank)]
        native = natives.get(rank) or []
        if frames(rank):  # its Python frames are above: the native ones below the innermost
            native = list(itertools.takewhile(lambda frame: ".py:" not in frame, native))
        if native:
            lines.append("  native frames (py-spy), innermost first:" if frames(rank) else
                         "  as py-spy sees its main thread, innermost first:")
            lines += [f"    {frame}" for frame in native]
    for rank in range(len(beats)):
        if rank not in stuck:
            state = "waited until its collective timed out" if rank in waiting else "not stuck"
            last = frames(rank)[-1] if frames(rank) else None
            at = (f": {last[2]}: {last[3]}" if last and not last[0] else innermost(rank)
                  if last else " (its stack did not arrive)")
            lines.append(f"{who(rank)}: {state}, {where(rank)}{at}")
    lines.append(f"Every thread's stack of each rank: {stacks_file(Path(verdict['stacks']), 0)}"
                 f" to {stacks_file(Path(verdict['stacks']), len(beats) - 1).name}, on its "
                 f"machine. A rank that was only slow needs a longer "
                 f"PlatformConfig.hang_timeout_s (ddpw-launch --hang-timeout-s); None (off) "
                 f"turns the watch off.")
    return {"message": message, "details": "\n".join(lines), "stuck": stuck, "at": verdict["at"]}
