"""A checkpoint's manifest: written last by :func:`publish`, which puts the folder in place, and
checked by :func:`verify` before anything is loaded."""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..files import fsync, stage
from .hashing import ALGORITHM, ALGORITHMS, file_digest, write_json
from .names import LATEST, MANIFEST, available, sequence

FORMAT = "ddpw-checkpoint"
#: Version 4 may slice a tensor across the ranks (FSDP): each rank writes its rows into its
#: own file, and the manifest's ``"sliced"`` record says, for each part and key, the tensor's
#: whole ``"shape"``, its ``"dtype"`` and each slice's file, first row and number of rows
#: (:mod:`~ddpw.checkpoint.slices`); a part with sliced tensors has no index file. Version 3
#: may keep a part's tensors in several files, one per rank that wrote a share
#: (:mod:`~ddpw.checkpoint.layout`), and records how many shares (``"shares"``). Version 2
#: names its hash (``"hash": "blake3"``) and records each file's digest under that name;
#: version 1 recorded SHA-256 (``"sha256"``) without naming it. All four are read.
VERSION = 4


def publish(staging: Path, folder: Path, digests: dict[str, str],
            manifest: dict[str, Any]) -> None:
    """Write the manifest into ``staging``, flush it to disk and rename ``staging`` to
    ``folder``.

    ``digests`` holds the digest of every file in ``staging``, each already flushed to disk by
    the rank that wrote it. The manifest's ``sequence`` orders checkpoints by when they were
    written. A folder already at ``folder`` (the same position, from an earlier run) is moved
    aside first and deleted once the new one is in place (:func:`~ddpw.checkpoint.names.tidy`
    puts it back if a crash comes in between). Then the ``latest`` marker, written beforehand,
    names the new checkpoint. A failure before the rename (a full disk) leaves neither the new
    marker nor ``folder``.

    :raises RuntimeError: when ``staging`` holds a file that ``digests`` lacks, or lacks one.
    """
    prefix = manifest["prefix"]
    files = sorted(p.name for p in staging.iterdir() if p.is_file())
    if files != sorted(digests):
        raise RuntimeError(f"checkpoint {folder}: the staged files {files} are not those "
                           f"written, {sorted(digests)}")
    entries = {name: {"bytes": (staging / name).stat().st_size, ALGORITHM: digests[name]}
               for name in files}
    done = available(folder.parent, prefix)
    number = 1 + max((sequence(folder.parent / name) for name in done), default=0)
    write_json(staging / MANIFEST, {"format": FORMAT, "version": VERSION, "hash": ALGORITHM,
                                    **manifest, "sequence": number, "files": entries})
    fsync(staging)
    # The new marker is on disk before the folder moves, so that a full disk cannot strike
    # between the two and leave a checkpoint in place that the job reports as not written.
    marker = stage(folder.parent / f"{prefix}_{LATEST}", f"{folder.name}\n".encode(),
                   durable=True)
    old = folder.with_name(f".{folder.name}.old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(staging, folder)
    fsync(folder.parent)
    shutil.rmtree(old, ignore_errors=True)
    os.replace(marker, folder.parent / f"{prefix}_{LATEST}")
    fsync(folder.parent)


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a checkpoint folder, after checking its format and version."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"checkpoint {folder}: cannot read {MANIFEST} ({error}); the "
                          f"checkpoint is damaged: use another one.") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a ddpw checkpoint manifest.")
    if manifest.get("version", 0) > VERSION or hash_of(manifest) not in ALGORITHMS:
        raise ConfigError(f"checkpoint {folder} has format version {manifest.get('version')} "
                          f"(hash {hash_of(manifest)!r}), newer than this ddpw reads "
                          f"({VERSION}): upgrade ddpw to load it.")
    return manifest


def hash_of(manifest: dict[str, Any]) -> str:
    """The hash whose digests ``manifest`` records: what it names, or SHA-256 (version 1)."""
    return str(manifest.get("hash", "sha256"))


def check(folder: Path) -> dict[str, Any]:
    """Check that a checkpoint has a manifest this ddpw reads and every file at its size; return
    the manifest. The hashes are checked as the files are read
    (:meth:`~ddpw.checkpoint.checkpointer.Checkpointer.restore`), or by :func:`verify`.

    :raises ConfigError: naming the first file that is missing or truncated.
    """
    manifest = read_manifest(folder)
    for name, entry in manifest["files"].items():
        path = folder / name
        size = path.stat().st_size if path.is_file() else None
        if size != entry["bytes"]:
            found = "missing" if size is None else f"{size} bytes"
            raise ConfigError(f"checkpoint {folder} is damaged: {name} is {found}, the manifest "
                              f"says {entry['bytes']} bytes. Use another checkpoint.")
    return manifest


def damage(folder: Path, name: str, manifest: dict[str, Any], digest: str) -> str | None:
    """What is wrong with file ``name`` of checkpoint ``folder`` whose hash came out as
    ``digest`` (a message for a :class:`ConfigError`), or ``None`` if it is as the manifest
    says."""
    algorithm = hash_of(manifest)
    if digest == manifest["files"][name][algorithm]:
        return None
    return (f"checkpoint {folder} is damaged: the {ALGORITHMS[algorithm]} hash of {name} differs "
            f"from the manifest's (the file was altered or corrupted). Use another checkpoint.")


def verify(folder: Path) -> dict[str, Any]:
    """Check every file of a checkpoint against its manifest, sizes and hashes; return the
    manifest.

    :raises ConfigError: naming the first file that is missing, truncated or altered.
    """
    manifest = check(folder)
    files, algorithm = manifest["files"], hash_of(manifest)
    with ThreadPoolExecutor() as pool:
        actual = dict(zip(files, pool.map(lambda n: file_digest(folder / n, algorithm), files),
                          strict=True))
    for name in files:
        if (wrong := damage(folder, name, manifest, actual[name])) is not None:
            raise ConfigError(wrong)
    return manifest
