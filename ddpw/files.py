"""Writing a file so that a reader sees either nothing or all of it.

Every file that one ddpw process writes for another to read whole (a rank's result or report, a
SLURM node's record, a checkpoint's ``latest`` marker) goes through :func:`write_atomically`:
the data goes to a hidden ``.{name}.partial`` beside it, which is renamed into place, an atomic
step on every POSIX file system. (Logs, which grow a line at a time, are appended to.)
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: Path, data: bytes, durable: bool = False) -> None:
    """Write ``data`` to ``path`` in one step: readers see the old file or the new one.

    :param durable: also flush the file and then its folder to disk, so that the new file
        survives a power cut once this returns (a rename alone survives a crash or a kill).
    """
    os.replace(stage(path, data, durable), path)
    if durable:
        fsync(path.parent)


def stage(path: Path, data: bytes, durable: bool = False) -> Path:
    """Write ``data`` to the hidden file that :func:`write_atomically` renames to ``path``, and
    return it, for a caller that renames it later (``os.replace(staged, path)``).

    A failed write (a full disk) removes it again and raises.
    """
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
    except OSError as error:
        partial.unlink(missing_ok=True)
        if error.filename is None and error.errno is not None:
            # A failed write names no file: name the one it was for.
            raise OSError(error.errno, error.strerror, str(partial)) from error
        raise
    return partial


def fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
