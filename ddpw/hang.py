"""A hang is never silent: a rank that stops making progress is named, with every rank's stack,
and the job ends.

Every process that ddpw launches (a payload's, or a script's under ``ddpw-launch``) runs a
:class:`Watch` of ``PlatformConfig.hang_timeout_s`` (``T``) seconds. The protocol, in one place:

- **Progress.** The Trainer calls :func:`progress` at each phase of a step and of evaluation,
  and says when a unit of work (a step, a batch) ended; a function or a script may call
  :func:`ddpw.utils.heartbeat`, which is both. Checkpoint phases run inside :func:`busy`: a
  rank in one is not hung, however long it takes.
- **Beats.** A thread of each rank publishes, every ``min(1, T/10)`` seconds, how often the rank
  has progressed, where, whether it is busy and whether it has ended a unit yet, to the launch's
  key-value
  store (the ``TCPStore`` at ``MASTER_ADDR:MASTER_PORT``, which torchrun's agent holds and which
  outlives a stuck worker), under ``ddpw/hang/{restart}/``.
- **Judgement.** Rank 0's thread reads every beat and notes, by its own clock (no other
  machine's clock is trusted), when each rank last moved. The job hangs when no rank has moved
  for ``T`` seconds while none is busy and each has ended a unit (set-up and a slow first step
  are no hang); or at once when a rank's collective timed out, which the process groups do after
  ``T`` as well (:func:`limit_collectives`), so that a script that never calls
  :func:`~ddpw.utils.heartbeat` is caught too. The stuck ranks are those not waiting in a
  timed-out collective that moved the fewest times.
- **Verdict.** Rank 0 posts it; every rank then writes all its threads' stacks to its stderr
  (:mod:`faulthandler`, and py-spy's dump with native frames when ``py-spy`` is installed) and
  posts its main thread's stack; rank 0 composes the report, and every rank writes it into its
  folder (``hang-R.json``, :mod:`ddpw.jobfolder`) and exits with
  :data:`~ddpw.errors.HUNG_EXIT_STATUS`. torchrun's agent ends what is left on every machine,
  and the caller raises :class:`~ddpw.errors.JobHung` (``ddpw-launch`` prints the same lines).

A world of one has no peer to wait for, and nothing watches it.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from . import environment, jobfolder
from .errors import HUNG_EXIT_STATUS, PeerFailed
from .outcome import LOST_PEER

#: What torch's process groups say when a collective waited past its timeout (gloo; NCCL).
TIMED_OUT = re.compile(r"Timed out waiting \d+ ?ms|Watchdog caught collective operation timeout|"
                       r"timed out after \d+ milliseconds")
#: How long rank 0 waits for every rank's stack, and a rank for rank 0's report.
STACK_WAIT_S, REPORT_WAIT_S = 10.0, 20.0
#: The innermost frames of a main thread's stack that the report shows.
FRAMES = 8


def limit_collectives(timeout_s: float) -> None:
    """Make the process groups created from now on in this process time a collective out after
    ``timeout_s`` seconds (gloo raises then), rather than torch's 30 minutes.

    NCCL's watchdog aborts the process on a timeout, leaving nothing to report: its timeout is
    longer by ``max(30 s, T/2)``, so that the watch reports first.
    """
    from torch.distributed import distributed_c10d as c10d

    c10d.default_pg_timeout = timedelta(seconds=timeout_s)
    if isinstance(c10d.default_pg_nccl_timeout, timedelta):  # None without NCCL
        c10d.default_pg_nccl_timeout = timedelta(seconds=timeout_s + max(30.0, timeout_s / 2))


class Watch:
    """One rank's part of the protocol above: its progress, and the thread that publishes it
    and, on rank 0, judges.

    :param timeout_s: ``T``.
    :param rank: this process's global rank.
    :param world_size: the number of processes.
    :param folder: where the report goes (``hang-R.json``), or ``None``.
    """

    def __init__(self, timeout_s: float, rank: int, world_size: int,
                 folder: Path | None) -> None:
        self.timeout_s, self.rank, self.world_size, self.folder = (timeout_s, rank, world_size,
                                                                   folder)
        self.interval = min(1.0, timeout_s / 10)
        self.prefix = f"ddpw/hang/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        # Written by the main thread, read by the watch's: single assignments of ints and str.
        self.moves = 0
        self.phase = "starting"
        self.busy_depth = 0
        self.armed = False  # past its set-up and first unit of work (a step, a batch)
        self.failed = False  # raised an error of its own, which will end the job
        self.waiting: list[list[Any]] | None = None  # a timed-out collective's frames
        self.done = False
        self._stop = threading.Event()
        self._answering = threading.Event()
        self._store: Any = None
        self._moved: dict[int, tuple[int, float]] = {}  # rank 0: rank -> (moves, when seen)
        self._thread = threading.Thread(target=self._run, name="ddpw-hang-watch", daemon=True)

    def start(self) -> Watch:
        """Start the thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """This rank's job is over: end the thread, which says so (rank 0 then judges no
        more)."""
        self.done = True
        self._stop.set()
        self._thread.join(timeout=5)

    def timed_out(self, error: BaseException) -> None:
        """A collective of this rank timed out: mark it waiting, and let the verdict end the
        process (return after a while if none comes, to report the error as it is)."""
        last = ["", 0, type(error).__name__, str(error).strip().splitlines()[-1][:300]]
        self.waiting = [*_frames(traceback.extract_tb(error.__traceback__)), last]
        self.settle(3 * self.interval + 5)

    def verdict_posted(self) -> bool:
        """Whether rank 0 has posted a verdict, asked now through a store client of the
        caller's own (the thread's is the thread's alone); ``False`` if the store is gone."""
        with contextlib.suppress(Exception):
            store = _connect(timeout_s=3.0)
            return store is not None and store.check([self._key("verdict")])
        return False

    def settle(self, seconds: float) -> None:
        """Wait up to ``seconds`` for a verdict to be answered; once it is, wait for the thread
        to end the process. A rank whose peer left because of the verdict must not report that
        as an error of its own."""
        deadline = time.monotonic() + seconds
        while not self._answering.is_set():
            if time.monotonic() > deadline or self._stop.is_set():
                return
            time.sleep(0.05)
        time.sleep(STACK_WAIT_S + REPORT_WAIT_S + 5)  # the thread ends the process before

    # --- the thread ------------------------------------------------------------------------------

    def _key(self, name: str) -> str:
        return self.prefix + name

    def _run(self) -> None:
        # The store's client is this thread's alone: torch's TCPStore is not made for two.
        while not self._stop.wait(self.interval):
            try:
                if self._store is None:
                    self._store = _connect()
                    if self._store is None:
                        continue
                self._publish()
                if self._store.check([self._key("verdict")]):
                    self._answer()
                if self.rank == 0 and (verdict := self._judge()) is not None:
                    self._store.set(self._key("verdict"), json.dumps(verdict))
                    self._answer()
            except Exception:  # the store went away: the launch is ending; try again
                self._store = None
        with contextlib.suppress(Exception):
            if self._store is not None:
                self._publish()  # done: no judging after this rank's end

    def _publish(self) -> None:
        self._store.set(self._key(f"beat/{self.rank}"), json.dumps({
            "moves": self.moves, "phase": self.phase, "busy": self.busy_depth > 0,
            "armed": self.armed, "waiting": self.waiting is not None,
            "done": self.done or self.failed}))

    def _judge(self) -> dict[str, Any] | None:
        """Rank 0: the verdict, once the beats show a hang; else ``None``."""
        keys = [self._key(f"beat/{rank}") for rank in range(self.world_size)]
        if not self._store.check(keys):
            return None
        beats = [json.loads(value) for value in self._store.multi_get(keys)]
        now = time.monotonic()
        for rank, beat in enumerate(beats):
            if beat["busy"] or self._moved.get(rank, (None,))[0] != beat["moves"]:
                self._moved[rank] = (beat["moves"], now)
        if any(beat["done"] for beat in beats):
            return None
        waiting = [rank for rank, beat in enumerate(beats) if beat["waiting"]]
        quiet = now - max(when for _, when in self._moved.values())
        if not waiting and (any(beat["busy"] for beat in beats) or quiet < self.timeout_s
                            or not all(beat["armed"] for beat in beats)):
            return None
        candidates = [rank for rank in range(self.world_size) if rank not in waiting]
        candidates = candidates or list(range(self.world_size))
        fewest = min(beats[rank]["moves"] for rank in candidates)
        return {"stuck": [rank for rank in candidates if beats[rank]["moves"] == fewest],
                "waiting": waiting, "quiet_s": quiet,
                "since": [now - self._moved[rank][1] for rank in range(self.world_size)]}

    def _answer(self) -> None:
        """Every rank, once there is a verdict: dump, post this rank's stack, write the report,
        and end the process."""
        self._answering.set()
        verdict = json.loads(self._store.get(self._key("verdict")))
        main = sys._current_frames().get(threading.main_thread().ident)
        frames = self.waiting or (_frames(traceback.extract_stack(main)) if main else [])
        _dump_stacks(self.rank)
        mine = {"host": socket.gethostname(), "pid": os.getpid(), "phase": self.phase,
                "moves": self.moves, "waiting": self.waiting is not None, "frames": frames}
        self._store.set(self._key(f"stack/{self.rank}"), json.dumps(mine))
        if self.rank == 0:
            stacks = self._await_stacks()
            report = compose(verdict, stacks, self.world_size, self.timeout_s)
            self._store.set(self._key("report"), json.dumps(report))
        else:
            report = self._await(self._key("report"), REPORT_WAIT_S)
            report = (json.loads(report) if report is not None else
                      compose(verdict, {self.rank: mine}, self.world_size, self.timeout_s))
        if self.folder is not None:
            jobfolder.write_json(jobfolder.hang_file(self.folder, self.rank), report)
        if self.rank == 0:  # the caller raises the whole report; this is for the logs
            print(f"[ddpw] {report['message']}", file=sys.stderr)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(HUNG_EXIT_STATUS)

    def _await_stacks(self) -> dict[int, dict[str, Any]]:
        deadline = time.monotonic() + STACK_WAIT_S
        stacks: dict[int, dict[str, Any]] = {}
        while len(stacks) < self.world_size and time.monotonic() < deadline:
            for rank in range(self.world_size):
                if rank not in stacks and self._store.check([self._key(f"stack/{rank}")]):
                    stacks[rank] = json.loads(self._store.get(self._key(f"stack/{rank}")))
            time.sleep(0.05)
        return stacks

    def _await(self, key: str, seconds: float) -> bytes | None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self._store.check([key]):
                return self._store.get(key)
            time.sleep(0.05)
        return None


def _connect(timeout_s: float = 10.0) -> Any:
    """A client of the launch's store, or ``None`` while it cannot be reached yet."""
    address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not address or not port:
        return None
    import torch.distributed as dist

    return dist.TCPStore(address, int(port), is_master=False, timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def _frames(summary: traceback.StackSummary) -> list[list[Any]]:
    return [[f.filename, f.lineno, f.name, (f.line or "").strip()] for f in summary[-FRAMES:]]


def _dump_stacks(rank: int) -> None:
    """Every thread's stack, to this rank's stderr; py-spy's too (native frames), if it is
    installed."""
    print(f"[ddpw] rank {rank}: the job hung; every thread's stack follows", file=sys.stderr,
          flush=True)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    # Beside this Python too: a virtual environment's scripts need not be on the PATH.
    beside = Path(sys.executable).with_name("py-spy")
    spy = shutil.which("py-spy") or (str(beside) if beside.is_file() else None)
    if spy is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run([spy, "dump", "--native", "--pid", str(os.getpid())],
                           stdout=sys.stderr, stderr=subprocess.STDOUT, timeout=20)


def compose(verdict: dict[str, Any], stacks: dict[int, dict[str, Any]], world_size: int,
            timeout_s: float) -> dict[str, Any]:
    """The report of a hang: ``message`` (one line), ``details`` (each rank's host, pid, last
    progress and main thread's stack) and the ``stuck`` ranks."""
    stuck, waiting = verdict["stuck"], verdict["waiting"]

    def who(rank: int) -> str:
        info = stacks.get(rank)
        return f"rank {rank}" + (f" ({info['host']}, pid {info['pid']})" if info else "")

    def where(rank: int) -> str:
        info = stacks.get(rank)
        if info is None:
            return "its stack did not arrive"
        if not info["moves"]:
            return "before any progress that ddpw saw"
        return info["phase"]

    first = stacks.get(stuck[0], {}).get("frames") or []
    at = (f", at {first[-1][2]} ({Path(first[-1][0]).name}:{first[-1][1]}): {first[-1][3]}"
          if first else "")
    ranks = ", ".join(who(rank) for rank in stuck)
    why = (f"rank(s) {', '.join(map(str, waiting))} waited {timeout_s:g} s in a collective "
           f"that never completed" if waiting else
           f"no rank made progress for {verdict['quiet_s']:.0f} s")
    message = (f"the job hung: {why} (hang_timeout_s={timeout_s:g}); the stuck rank(s) of "
               f"{world_size}: {ranks}, {where(stuck[0])}{at}")
    blocks = []
    for rank in sorted(range(world_size), key=lambda r: (r not in stuck, r)):
        info = stacks.get(rank)
        state = "stuck" if rank in stuck else "waiting" if rank in waiting else "not stuck"
        moved = (f", last progress {verdict['since'][rank]:.0f} s before the verdict"
                 if info and info["moves"] else "")
        head = f"{who(rank)}: {state}, {where(rank)}{moved}"
        lines = [(f"  File \"{f}\", line {n}, in {name}" + (f"\n    {code}" if code else ""))
                 if f else f"  {name}: {code}"
                 for f, n, name, code in (info or {}).get("frames", [])]
        blocks.append("\n".join([head + (":" if lines else ""), *lines]))
    blocks.append("Every thread's stack of each rank is in that rank's stderr. A rank that was "
                  "only slow needs a longer PlatformConfig.hang_timeout_s (ddpw-launch "
                  "--hang-timeout-s); None (off) turns the watch off.")
    return {"message": message, "details": "\n".join(blocks), "stuck": stuck}


# --- the current process's watch ----------------------------------------------------------------

_watch: Watch | None = None


def start(timeout_s: float | None, folder: Path | None) -> Watch | None:
    """Watch this launched process, one rank of a world of several (``RANK``, ``WORLD_SIZE``),
    and limit its collectives to ``timeout_s``; ``None`` (or a world of one) watches nothing.

    :param folder: where the report goes; ``None`` takes ``DDPW_HANG_FOLDER`` if set.
    """
    global _watch
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if timeout_s is None or world_size < 2:
        return None
    if folder is None and os.environ.get(environment.HANG_FOLDER):
        folder = Path(os.environ[environment.HANG_FOLDER])
    limit_collectives(timeout_s)
    # A process that gloo aborts (a collective whose sizes differ across ranks: a skipped
    # collective, which NCCL would hang in) or that crashes in native code shows its stacks too.
    faulthandler.enable(all_threads=True)
    _watch = Watch(timeout_s, int(os.environ.get("RANK", "0")), world_size, folder).start()
    return _watch


def timeout_from_environment() -> float | None:
    """``T`` as the launch gave it to a script's processes (``DDPW_HANG_TIMEOUT_S``; ``off``)."""
    value = os.environ.get(environment.HANG_TIMEOUT, "off")
    return None if value == "off" else float(value)


def stop() -> None:
    """This process's job is over (it returned or raised): no more judging."""
    global _watch
    if _watch is not None:
        _watch.stop()
        _watch = None


def progress(phase: str, unit_done: bool = False) -> None:
    """This rank made progress and is now ``phase`` (``"in train_step"``): cheap, for every
    step.

    :param unit_done: a unit of work (a step, a batch) ended here: the rank is past its set-up
        and first unit, which are never called a hang.
    """
    watch = _watch
    if watch is not None:
        watch.moves += 1
        watch.phase = phase
        if unit_done:
            watch.armed = True


@contextlib.contextmanager
def busy(phase: str) -> Iterator[None]:
    """While the block runs (a checkpoint phase), this rank is not hung, however long it takes."""
    watch = _watch
    if watch is None:
        yield
        return
    watch.busy_depth += 1
    watch.phase = phase
    try:
        yield
    finally:
        watch.busy_depth -= 1
        watch.moves += 1
        watch.phase = f"after {phase}"


def settle(error: BaseException) -> None:
    """As ``error`` leaves the job, before anything else: when it is a collective that timed
    out, or a peer lost to a verdict, let the verdict end the process instead; any other error
    is this rank's own, which ends the job: no rank is called hung while it does (nor while
    this rank waits for its checkpoint in flight). Called more than once, it acts once."""
    watch = _watch
    if watch is None or watch.failed or watch.waiting is not None:
        return
    if TIMED_OUT.search(str(error)):
        watch.timed_out(error)
    elif isinstance(error, PeerFailed) or LOST_PEER.search(str(error)):
        # A peer that left on a verdict had read it from the store: wait for the verdict only
        # when it is there, not a blind while on every lost peer (which delayed the job's end).
        if watch.verdict_posted():
            watch.settle(2 * watch.interval + 1)
        watch.failed = True
    else:
        watch.failed = True
