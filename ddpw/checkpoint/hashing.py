"""A checkpoint's files hashed as they are written (or afterwards), and the crash tests' hook
that strikes once a named file is written.

The hash is BLAKE3 (the ``blake3`` package), a cryptographic hash that runs on every core: 5 GB/s
on one core of the 2-core test machine and 10 GB/s on both, against 1.2 GB/s for SHA-256
(``hashlib``, with the CPU's SHA instructions), so that hashing a checkpoint costs less than
writing it. Checkpoints of format version 1 recorded SHA-256, which :func:`file_digest` still
computes for them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import blake3

from ..environment import TEST_CHECKPOINT_FAULT as TEST_FAULT

#: The hash that a checkpoint's manifest records from format version 2 on.
ALGORITHM = "blake3"
#: Each hash a manifest may name, as messages spell it (version 1 recorded ``sha256``).
ALGORITHMS = {"blake3": "BLAKE3", "sha256": "SHA-256"}


def new_hasher(algorithm: str = ALGORITHM) -> Any:
    """A fresh hasher of ``algorithm`` (one of :data:`ALGORITHMS`), with ``update`` and
    ``hexdigest``. BLAKE3's hashes a large piece on every core."""
    if algorithm == "blake3":
        return blake3.blake3(max_threads=blake3.blake3.AUTO)
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown hash {algorithm!r}: one of {', '.join(ALGORITHMS)}")


def write_hashed(path: Path, pieces: Iterable[bytes | memoryview]) -> str:
    """Write ``pieces`` one after another as the file ``path`` and flush it to disk; return its
    :data:`ALGORITHM` digest.

    Each piece is hashed right after it is written, while it is still in the CPU's caches;
    BLAKE3 hashes a large piece on every core, faster than the write.

    :raises OSError: naming ``path``, also where the failed write (a full disk) names no file.
    """
    hasher = new_hasher()
    with _naming(path), open(path, "wb") as f:
        for piece in pieces:
            f.write(piece)
            hasher.update(piece)
        f.flush()
        os.fsync(f.fileno())
    _test_fault(path)
    return hasher.hexdigest()


def write_json(path: Path, obj: Any) -> str:
    """Write ``obj`` as JSON and flush it to disk; return the file's :data:`ALGORITHM`
    digest."""
    return write_hashed(path, [json.dumps(obj).encode()])


def file_digest(path: Path, algorithm: str = ALGORITHM) -> str:
    """The ``algorithm`` digest of the file ``path``, read in chunks."""
    hasher = new_hasher(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            hasher.update(chunk)
    return hasher.hexdigest()


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Name ``path`` in an :class:`OSError` that names no file, as a failed write (a full disk)
    does not."""
    try:
        yield
    except OSError as error:
        if error.filename is None and error.errno is not None:
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise


def _test_fault(path: Path) -> None:
    """For the crash tests only: act as :data:`TEST_FAULT` says once ``path`` is written.

    ``sleep=S`` is a disk that takes ``S`` seconds over the file. ``sigterm=PID`` makes a
    second pause signal certainly arrive during a save: ``PID`` (the process that started the
    job) passes the ``SIGTERM`` on to the job's processes, and the write goes on only once this
    process's pause handler has taken it (:func:`ddpw.process.pause_signals_taken`). The main
    thread runs the handler: when another thread took the signal while the main thread waits
    for this very write, 0.2 s later the hook wakes it with a ``SIGTERM`` to it alone.
    """
    fault = os.environ.get(TEST_FAULT)
    name, _, action = (fault or "").rpartition(":")
    if name != path.name:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action.startswith("sleep="):
        time.sleep(float(action.removeprefix("sleep=")))
        return
    if action.startswith("sigterm="):
        from ..process import pause_signals_taken

        pid = int(action.removeprefix("sigterm="))
        taken, deadline = pause_signals_taken(), time.monotonic() + 120
        os.kill(pid, signal.SIGTERM)
        nudge = time.monotonic() + 0.2
        while pause_signals_taken() == taken:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{TEST_FAULT}: process {pid} did not pass SIGTERM on")
            if time.monotonic() > nudge:
                # Another thread took it, and the main thread, which runs the handler, may be
                # waiting for this very write: wake it (a signal to it alone).
                signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
                nudge = deadline
            time.sleep(0.001)
        print(f"{TEST_FAULT}: wrote {path}, sent SIGTERM to {pid}, received it back, going on",
              file=sys.stderr, flush=True)
        return
    raise OSError(28, "No space left on device (injected by " + TEST_FAULT + ")", str(path))
