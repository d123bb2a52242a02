"""A hang is never silent: a rank that stops making progress is named, with its stack, and the
job ends; a job that is only slow is never ended.

Every process that ddpw launches (a payload's, or a script's under ``ddpw-launch``) runs a
:class:`Watch` of ``PlatformConfig.hang_timeout_s`` (``T``) seconds. The design follows three
rules, in this order:

1. **The watch never ends a job that torch would have let run**, unless the user asked for a
   shorter limit for that phase. It never shortens a process group's timeout: the groups keep
   torch's default (30 minutes for gloo, NCCL's own), or ``T`` and a margin when that is longer
   (:func:`lengthen_collectives`), so that ``T`` is the longest that ranks may wait for each
   other. ddpw's own checkpoint group waits however long a write takes
   (:func:`ddpw.network.gloo_group`). A user who wants a shorter limit gives their process
   group a timeout of their own (Accelerate's ``InitProcessGroupKwargs``).
2. **A real hang is named within** ``T`` **once the job has shown its pace**: like NVIDIA's
   resiliency extension, which gives a rank's first heartbeat a timeout of its own (set-up, data
   preparation, compilation) and the later ones a steady one, the quiet rule below holds only
   in a kind of work (training steps, evaluation batches, heartbeats) of which every rank has
   ended a unit. Before that (set-up, a first step, a first evaluation batch and its
   compilation), a collective that never completes is judged by the process group's timeout:
   torch's, or the user's.
3. **The watch's own failures never hang or kill the job**: its thread stops on its own errors
   and tries again; once a verdict is posted, the process ends whatever fails in the report.

The protocol, in one place:

- **Progress.** The Trainer calls :func:`enter` as it begins training an epoch or evaluating,
  :func:`progress` at each phase of a step and of evaluation, and says when a unit of work (a
  step, a batch) ended; a function or a script may call :func:`ddpw.utils.heartbeat`, which is
  both. Checkpoint phases run inside :func:`busy`: a rank in one is not hung, however long it
  takes.
- **Beats.** A thread of each rank publishes, every ``min(1, T/10)`` seconds, how often the rank
  has progressed, where, whether it is busy, whether it has ended a unit of the work it is in,
  and whether its main thread waits in a collective, to the launch's key-value store (the
  ``TCPStore`` at ``MASTER_ADDR:MASTER_PORT``, which torchrun's agent holds and which outlives
  a stuck worker), under ``ddpw/hang/{restart}/``.
- **Judgement.** Two ranks judge, rank 0 and the last, each by its own clock (no other
  machine's clock is trusted), so that a judge that hangs holding the GIL (a native call that
  never releases it stops its watch thread too) is judged by the other. The job hangs when no
  rank has moved for ``T`` seconds while none is busy and each has ended a unit of the work it
  is in; or at once when a rank's collective timed out. The stuck ranks are those neither
  waiting in a collective nor timed out in one that moved the fewest times. The first verdict
  posted wins; its judge composes the report.
- **Verdict.** Every rank posts its main thread's stack at once, then writes every thread's
  stack to a file of its own (:mod:`ddpw.hang.report`); a stuck rank posts py-spy's view of
  its main thread too. The judge waits for those (a stuck rank whose stack never comes, on its
  own machine, it dumps with py-spy from outside), composes the report, and every rank writes
  it into its folder (``hang-R.json``, :mod:`ddpw.jobfolder`) and exits with
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
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from .. import environment, jobfolder, rendezvous
from ..errors import HUNG_EXIT_STATUS, PeerFailed
from ..outcome import LOST_PEER
from . import report

#: What torch's process groups say when a collective waited past its timeout (gloo; NCCL).
TIMED_OUT = re.compile(r"Timed out waiting \d+ ?ms|Watchdog caught collective operation timeout|"
                       r"timed out after \d+ milliseconds")
#: How long the judge waits for every rank's stack (posted before anything else), and for a
#: stuck rank's py-spy view; a rank waits for the report a little longer than both.
STACK_WAIT_S, NATIVE_WAIT_S = 5.0, report.SPY_S + 10.0
REPORT_WAIT_S = NATIVE_WAIT_S + report.SPY_S + 10.0
#: The kind of work a process is in until the Trainer says otherwise (:func:`enter`).
FIRST_KIND = "work"


def lengthen_collectives(timeout_s: float) -> None:
    """Make the process groups created from now on in this process wait at least ``timeout_s``
    seconds and a margin in a collective, never less than torch's default: so that ``T`` is the
    longest that ranks may wait for each other, and the watch reports before NCCL's watchdog
    aborts a waiting process (leaving nothing to report)."""
    from torch.distributed import distributed_c10d as c10d

    needed = timedelta(seconds=timeout_s + max(30.0, timeout_s / 2))
    c10d.default_pg_timeout = max(c10d.default_pg_timeout, needed)
    if isinstance(c10d.default_pg_nccl_timeout, timedelta):  # None without NCCL
        c10d.default_pg_nccl_timeout = max(c10d.default_pg_nccl_timeout, needed)


class Watch:
    """One rank's part of the protocol above: its progress, and the thread that publishes it
    and, on a judge, judges.

    :param timeout_s: ``T``.
    :param rank: this process's global rank.
    :param world_size: the number of processes.
    :param folder: where the report goes (``hang-R.json``), or ``None``.
    :param stacks: where every rank writes its stacks (:func:`ddpw.hang.report.stacks_file`);
        ``None``: a new folder in the temporary directory.
    """

    def __init__(self, timeout_s: float, rank: int, world_size: int, folder: Path | None,
                 stacks: Path | None = None) -> None:
        self.timeout_s, self.rank, self.world_size = timeout_s, rank, world_size
        self.folder, self.stacks = folder, stacks
        self.interval = min(1.0, timeout_s / 10)
        # Elastic worlds each have a store of their own, where torchrun's restart count is no
        # name that every rank gives alike (a newcomer counts 0).
        self.prefix = f"ddpw/hang/{rendezvous.store_attempt()}/"
        self.judges = rank in (0, world_size - 1)
        # Written by the main thread, read by the watch's: single assignments, and a set that
        # only grows.
        self.moves = 0
        self.phase = "starting"
        self.kind = FIRST_KIND
        self.kinds_done: set[str] = set()  # the kinds of work of which it has ended a unit
        self.busy_depth = 0
        self.failed = False  # raised an error of its own, which will end the job
        self.waiting: list[list[Any]] | None = None  # a timed-out collective's frames
        self.done = False
        self._stop = threading.Event()
        self._answering = threading.Event()
        self._store: Any = None
        self._moved: dict[int, tuple[int, float]] = {}  # a judge: rank -> (moves, when seen)
        self._thread = threading.Thread(target=self._run, name="ddpw-hang-watch", daemon=True)
        # What else the beat carries, who else reads the beats on rank 0 (ddpw.stragglers).
        self.carried: Callable[[], Any] | None = None
        self.observer: Callable[[list[dict[str, Any]]], None] | None = None

    def start(self) -> Watch:
        """Start the thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """This rank's job is over: end the thread, which says so (no rank is judged after)."""
        self.done = True
        self._stop.set()
        self._thread.join(timeout=5)

    def timed_out(self, error: BaseException) -> None:
        """A collective of this rank timed out: mark it waiting, and let the verdict end the
        process (return after a while if none comes, to report the error as it is)."""
        last = ["", 0, type(error).__name__, str(error).strip().splitlines()[-1][:300]]
        self.waiting = [*report.frames_of(traceback.extract_tb(error.__traceback__)), last]
        self.settle(3 * self.interval + 5)

    def verdict_posted(self) -> bool:
        """Whether a judge has posted a verdict, asked now through a store client of the
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
        time.sleep(REPORT_WAIT_S + report.SPY_S + 10)  # the thread ends the process before

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
                verdict = self._judge() if self.judges else None
                if verdict is not None:
                    self._store.compare_set(self._key("verdict"), "", json.dumps(verdict))
                if verdict is not None or self._store.check([self._key("verdict")]):
                    self._answer()
            except Exception:  # the store went away (the launch is ending): try again
                self._store = None
        with contextlib.suppress(Exception):
            if self._store is not None:
                self._publish()  # done: no judging after this rank's end

    def _publish(self) -> None:
        main = sys._current_frames().get(threading.main_thread().ident)
        self._store.set(self._key(f"beat/{self.rank}"), json.dumps({
            "moves": self.moves, "phase": self.phase, "busy": self.busy_depth > 0,
            "armed": self.kind in self.kinds_done, "waiting": self.waiting is not None,
            "collective": report.in_collective(main), "done": self.done or self.failed,
            "host": socket.gethostname(), "pid": os.getpid(),
            "pace": _guarded(self.carried)}))

    def _judge(self) -> dict[str, Any] | None:
        """A judge: the verdict, once the beats show a hang; else ``None``."""
        keys = [self._key(f"beat/{rank}") for rank in range(self.world_size)]
        if not self._store.check(keys):
            return None
        beats = [json.loads(value) for value in self._store.multi_get(keys)]
        if self.rank == 0 and self.observer is not None:
            _guarded(self.observer, beats)
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
        candidates = ([rank for rank, beat in enumerate(beats)
                       if rank not in waiting and not beat["collective"]]
                      or [rank for rank in range(self.world_size) if rank not in waiting]
                      or list(range(self.world_size)))
        fewest = min(beats[rank]["moves"] for rank in candidates)
        stamp = time.time()
        return {"stuck": [rank for rank in candidates if beats[rank]["moves"] == fewest],
                "waiting": waiting, "quiet_s": quiet, "judge": self.rank, "at": stamp,
                "since": [now - self._moved[rank][1] for rank in range(self.world_size)],
                "beats": beats,
                "stacks": str(self.stacks or report.stacks_folder(stamp, os.getpid()))}

    def _answer(self) -> None:
        """Every rank, once there is a verdict: post this rank's stack, dump every thread's,
        write the report, and end the process, whatever fails on the way."""
        self._answering.set()
        try:
            self._report()
        except Exception as error:  # a full disk, a store gone: the verdict stands
            with contextlib.suppress(Exception):
                print(f"[ddpw] rank {self.rank}: the report of the hang failed: {error!r}",
                      file=sys.stderr)
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(HUNG_EXIT_STATUS)

    def _report(self) -> None:
        began = time.monotonic()
        verdict = json.loads(self._store.get(self._key("verdict")))
        main = sys._current_frames().get(threading.main_thread().ident)
        frames = self.waiting or (report.frames_of(traceback.extract_stack(main)) if main else [])
        self._store.set(self._key(f"stack/{self.rank}"), json.dumps({"frames": frames}))
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(verdict["at"]))
        native = report.dump(self.rank, report.stacks_file(Path(verdict["stacks"]), self.rank),
                             os.getpid(), f"[ddpw] rank {self.rank}: the job hung (verdict at "
                             f"{when}, {verdict['at']:.3f}); every thread's stack follows")
        if self.rank in verdict["stuck"]:
            self._store.set(self._key(f"native/{self.rank}"), json.dumps(native))
        if verdict["judge"] == self.rank:
            composed = self._compose(verdict, began)
            self._store.set(self._key("report"), json.dumps(composed))
            print(f"[ddpw] {composed['message']}", file=sys.stderr)  # for this rank's log
        else:
            posted = self._await([self._key("report")], began + REPORT_WAIT_S)
            composed = (json.loads(posted[0]) if posted else
                        report.compose(verdict, {}, {}, self.timeout_s))
        if self.folder is not None:
            jobfolder.write_json(jobfolder.hang_file(self.folder, self.rank), composed)

    def _compose(self, verdict: dict[str, Any], began: float) -> dict[str, Any]:
        """The judge: the report, from the stacks that arrive in time."""
        stacks, natives = {}, {}
        for rank in range(self.world_size):
            posted = self._await([self._key(f"stack/{rank}")], began + STACK_WAIT_S)
            if posted:
                stacks[rank] = json.loads(posted[0])
        for rank in verdict["stuck"]:
            beat = verdict["beats"][rank]
            if rank in stacks:
                posted = self._await([self._key(f"native/{rank}")], began + NATIVE_WAIT_S)
                natives[rank] = json.loads(posted[0]) if posted else []
            elif beat["host"] == socket.gethostname():  # its watch never ran: the GIL?
                natives[rank] = report.main_thread(report.spy(beat["pid"]))
        return report.compose(verdict, stacks, natives, self.timeout_s)

    def _await(self, keys: list[str], deadline: float) -> list[bytes] | None:
        while True:
            if self._store.check(keys):
                return self._store.multi_get(keys)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)


def _guarded(function: Callable[..., Any] | None, *args: Any) -> Any:
    """``function(*args)``, or ``None`` when it is ``None`` or fails: what rides on the watch
    never stops it (rule 3)."""
    if function is None:
        return None
    try:
        return function(*args)
    except Exception as error:
        if function.__qualname__ not in _failed:  # once, not every second
            _failed.add(function.__qualname__)
            print(f"[ddpw] {function.__qualname__} failed on the hang watch: {error!r}",
                  file=sys.stderr)
        return None


_failed: set[str] = set()  # what _guarded has said failed


def _connect(timeout_s: float = 10.0) -> Any:
    """A client of the launch's store, or ``None`` while it cannot be reached yet."""
    address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not address or not port:
        return None
    import torch.distributed as dist

    return dist.TCPStore(address, int(port), is_master=False, timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False)


# --- the current process's watch ----------------------------------------------------------------

_watch: Watch | None = None


def start(timeout_s: float | None, folder: Path | None) -> Watch | None:
    """Watch this launched process, one rank of a world of several (``RANK``, ``WORLD_SIZE``),
    and lengthen its collectives to ``timeout_s`` where that is longer than torch's;
    ``None`` (or a world of one) watches nothing.

    :param folder: where the report goes; ``None`` takes ``DDPW_HANG_FOLDER`` if set.
    """
    global _watch
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if timeout_s is None or world_size < 2:
        return None
    # The stacks go beside the report where it outlives the job: the logs of ddpw-launch, a
    # SLURM job's folder; not a Wrapper's payload, a temporary folder that goes with the job.
    stacks = folder if folder is not None and not report.temporary(folder) else None
    if folder is None and os.environ.get(environment.HANG_FOLDER):
        folder = stacks = Path(os.environ[environment.HANG_FOLDER]).absolute()
    lengthen_collectives(timeout_s)
    # A process that gloo aborts (a collective whose sizes differ across ranks: a skipped
    # collective, which NCCL would hang in) or that crashes in native code shows its stacks too.
    faulthandler.enable(all_threads=True)
    _watch = Watch(timeout_s, int(os.environ.get("RANK", "0")), world_size, folder,
                   stacks).start()
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


def carry(provider: Callable[[], Any],
          observer: Callable[[list[dict[str, Any]]], None] | None = None) -> bool:
    """Have this rank's beats carry ``provider()`` too (under ``"pace"``), and on rank 0 give
    ``observer`` every rank's beats whenever the watch reads them (about once a second, on its
    thread); ``False`` when no watch runs (a world of one, or ``hang_timeout_s=None``)."""
    if _watch is None:
        return False
    _watch.carried, _watch.observer = provider, observer
    return True


def enter(kind: str, phase: str) -> None:
    """This rank begins a kind of work (``"training"``, ``"evaluation"``) and is now ``phase``:
    until it ends a unit of that kind (its first step, its first batch: data loading,
    compilation), no rank is called hung by the quiet rule."""
    watch = _watch
    if watch is not None:
        watch.kind = kind
        progress(phase)


def progress(phase: str, unit_done: bool = False) -> None:
    """This rank made progress and is now ``phase`` (``"in train_step"``): cheap, for every
    step.

    :param unit_done: a unit of work (a step, a batch) ended here: the rank has shown its pace
        in the kind of work it is in (:func:`enter`).
    """
    watch = _watch
    if watch is not None:
        watch.moves += 1
        watch.phase = phase
        if unit_done:
            watch.kinds_done.add(watch.kind)


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
