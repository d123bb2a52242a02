"""Checkpoints as safetensors and JSON: nothing in them is ever unpickled.

A checkpoint is a folder under ``JobConfig.checkpoint_path``, named ``{prefix}_{k}`` for the state
after ``k`` complete epochs, or ``{prefix}_{k}_batch{b}`` for a pause ``b`` batches into epoch
``k + 1``. It holds:

- ``model.safetensors``: the unwrapped model's weights (no ``module.`` prefix); tied weights are
  stored once and their other names listed in the file's metadata;
- ``optimiser.json`` + ``optimiser.safetensors``: the optimiser's hyper-parameters and structure,
  and its state tensors; likewise ``scheduler.*`` and, with fp16, ``scaler.*``;
- ``rank-{r}.json`` + ``rank-{r}.safetensors``: rank ``r``'s Python, NumPy, torch and CUDA RNG
  states and its share of the running epoch's metrics;
- ``state.json``: the data position (epochs done, batches into the next epoch, optimiser steps,
  batch size, world size, data seed) and the last epoch's metrics;
- ``manifest.json``, written last: format and version, world size, platform, mixed precision and
  every file's size and SHA-256.

A checkpoint is written into a hidden folder (``.{name}.partial``) and renamed into place once
complete and flushed to disk; the marker file ``{prefix}_latest`` moves after it. A crash, a kill
or a full disk at any moment leaves the earlier checkpoints as they were and no folder that looks
complete. Loading checks every file against the manifest before reading it.
"""

from __future__ import annotations

import contextlib
import faulthandler
import hashlib
import json
import os
import random
import re
import select
import shutil
import signal
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch

from .environment import TEST_CHECKPOINT_FAULT as TEST_FAULT
from .errors import ConfigError
from .files import fsync, stage

FORMAT = "ddpw-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"



# --- names and positions -------------------------------------------------------------------------

@dataclass(frozen=True, order=True)
class Position:
    """Where a checkpoint stands: ``epochs`` complete, then ``batches`` into the next epoch."""

    epochs: int
    batches: int = 0

    def name(self, prefix: str) -> str:
        """The checkpoint folder's name."""
        return f"{prefix}_{self.epochs}" + (f"_batch{self.batches}" if self.batches else "")

    @classmethod
    def parse(cls, name: str, prefix: str) -> Position | None:
        """The position in a folder name, or ``None`` if it is not a checkpoint of ``prefix``."""
        match = re.fullmatch(re.escape(prefix) + r"_(\d+)(?:_batch(\d+))?", name)
        return cls(int(match.group(1)), int(match.group(2) or 0)) if match else None


def available(checkpoint_path: str | Path, prefix: str) -> list[str]:
    """Names of the complete checkpoints (those with a manifest), oldest position first."""
    root = Path(checkpoint_path)
    if not root.is_dir():
        return []
    found = [(position, entry.name) for entry in root.iterdir()
             if (position := Position.parse(entry.name, prefix)) is not None
             and (entry / MANIFEST).is_file()]
    return [name for _, name in sorted(found)]


def latest(checkpoint_path: str | Path, prefix: str) -> str | None:
    """The most recently written complete checkpoint, or ``None``.

    The marker file ``{prefix}_latest`` names it; if the marker is missing or names a checkpoint
    that is gone, the one written last (its manifest's ``sequence``) is taken.
    """
    marker = Path(checkpoint_path) / f"{prefix}_{LATEST}"
    names = available(checkpoint_path, prefix)
    if marker.is_file():
        named = marker.read_text().strip()
        if named in names:
            return named
    return by_write_order(checkpoint_path, names)[-1] if names else None


def by_write_order(checkpoint_path: str | Path, names: list[str]) -> list[str]:
    """``names`` sorted from the first written to the last (manifest ``sequence``)."""
    return sorted(names, key=lambda name: _sequence(Path(checkpoint_path) / name))


def _sequence(folder: Path) -> int:
    try:
        return int(json.loads((folder / MANIFEST).read_text()).get("sequence", 0))
    except (OSError, ValueError):
        return 0


def resolve(checkpoint_path: str | Path, prefix: str, start_at: int | str) -> str | None:
    """The checkpoint that ``start_at`` asks for: a name, or ``None`` to start from scratch.

    :raises ConfigError: when it asks for a checkpoint that does not exist, listing those that do.
    """
    if start_at == LATEST:
        return latest(checkpoint_path, prefix)
    if isinstance(start_at, int) and start_at <= 0:
        return None
    name = Position(start_at).name(prefix) if isinstance(start_at, int) else start_at
    names = available(checkpoint_path, prefix)
    if name not in names:
        listed = ", ".join(names) if names else "none"
        raise ConfigError(f"JobConfig.start_at={start_at!r}: no checkpoint "
                          f"{Path(checkpoint_path) / name} (a folder with a {MANIFEST}). "
                          f"Checkpoints in {checkpoint_path} with prefix '{prefix}': {listed}.")
    return name


# --- nested state as JSON plus tensors -----------------------------------------------------------
# Optimiser, scheduler and RNG states are nested containers. Their tensors go to safetensors and
# the rest to JSON; tuples and non-string keys are tagged so that they come back as they were.

def split(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """Replace every tensor in ``obj`` by a reference and put it in ``tensors``."""
    if isinstance(obj, torch.Tensor):
        # The count makes the name unique even where two paths read alike ("a.b" and "a"/"b").
        key = f"{len(tensors)}:{path}"
        tensors[key] = obj.detach()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: split(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__items__": [[k, split(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [split(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [split(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at '{path}' in a checkpoint: only "
                    f"tensors, arrays, numbers, strings and containers of them")


def join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Undo :func:`split`."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return np.array(obj["__ndarray__"], dtype=obj["dtype"])
        if "__items__" in obj:
            return {k: join(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(join(v, tensors) for v in obj["__tuple__"])
        return {k: join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join(v, tensors) for v in obj]
    return obj


# --- writing -------------------------------------------------------------------------------------

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}


def write_tensors(path: Path, tensors: dict[str, torch.Tensor],
                  metadata: dict[str, str] | None = None) -> str:
    """Write ``tensors`` as a safetensors file, streaming; return the file's SHA-256.

    Unlike ``safetensors.torch.save_file``, the file is written tensor by tensor from the
    tensors' own memory (CPU tensors are not copied; device tensors are copied to the host
    first), with no buffer of the whole file, and hashed while it is written.
    """
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, t in cpu.items():
        if t.dtype not in _DTYPES:
            raise TypeError(f"cannot store tensor '{name}' of dtype {t.dtype} in a checkpoint")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    pieces = [len(encoded).to_bytes(8, "little"), encoded]
    pieces += [memoryview(t.reshape(-1).view(torch.uint8).numpy()) for t in cpu.values()
               if t.numel()]
    return _write_hashed(path, pieces)


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


def _write_hashed(path: Path, pieces: Iterable[bytes | memoryview]) -> str:
    hasher = hashlib.sha256()
    # Writing and hashing both release the GIL: each piece is hashed while the next is written.
    with _naming(path), ThreadPoolExecutor(1) as pool, open(path, "wb") as f:
        pending = None
        for piece in pieces:
            f.write(piece)
            if pending is not None:
                pending.result()
            pending = pool.submit(hasher.update, piece)
        if pending is not None:
            pending.result()
    _test_fault(path)
    return hasher.hexdigest()


def write_json(path: Path, obj: Any) -> str:
    """Write ``obj`` as JSON; return the file's SHA-256."""
    return _write_hashed(path, [json.dumps(obj).encode()])


def write_part(folder: Path, name: str, obj: Any) -> dict[str, str]:
    """Write ``obj`` as ``{name}.json`` and, if it holds tensors, ``{name}.safetensors``.

    :returns: the SHA-256 of each file written, by file name.
    """
    tensors: dict[str, torch.Tensor] = {}
    structure = split(obj, tensors)
    digests = {}
    if tensors:
        digests[f"{name}.safetensors"] = write_tensors(folder / f"{name}.safetensors", tensors)
    digests[f"{name}.json"] = write_json(folder / f"{name}.json", structure)
    return digests


def write_model(folder: Path, model: torch.nn.Module) -> dict[str, str]:
    """Write ``model``'s weights as ``model.safetensors``, each tied tensor once.

    :returns: the file's SHA-256, by file name.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for key, tensor in model.state_dict().items():
        identity = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                    tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if identity in seen:
            aliases[key] = seen[identity]
        else:
            seen[identity] = key
            tensors[key] = tensor
    metadata = {"ddpw_aliases": json.dumps(aliases)} if aliases else None
    return {"model.safetensors": write_tensors(folder / "model.safetensors", tensors, metadata)}


def write_all(folder: Path, parts: dict[str, Any], model: torch.nn.Module | None = None
              ) -> dict[str, str]:
    """Write ``model`` (if given) and each of ``parts`` (:func:`write_part`) into ``folder``.

    The files are written by concurrent threads: copying into the page cache and hashing both
    release the GIL, so a large model and its optimiser state are saved side by side.

    :returns: the SHA-256 of each file written, by file name.
    """
    jobs = [partial(write_part, folder, name, obj) for name, obj in parts.items()]
    if model is not None:
        jobs.append(partial(write_model, folder, model))
    digests: dict[str, str] = {}
    with ThreadPoolExecutor(min(4, len(jobs))) as pool:
        for written in pool.map(lambda job: job(), jobs):
            digests |= written
    return digests


def staging_path(folder: Path) -> Path:
    """Where ``folder`` is written before it is renamed into place."""
    return folder.with_name(f".{folder.name}.partial")


def tidy(checkpoint_path: str | Path, prefix: str) -> None:
    """Clean up after writes that a crash interrupted: delete hidden partial folders, and put
    back a checkpoint that :func:`publish` had moved aside when the crash came."""
    root = Path(checkpoint_path)
    if not root.is_dir():
        return
    for entry in root.glob(f".{prefix}_*"):
        if entry.name.endswith(".partial") and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.endswith(".old"):
            original = root / entry.name[1:-len(".old")]
            if original.exists():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                os.replace(entry, original)


def publish(staging: Path, folder: Path, digests: dict[str, str],
            manifest: dict[str, Any]) -> None:
    """Write the manifest into ``staging``, flush it all to disk and rename it to ``folder``.

    Files whose digest is not in ``digests`` (written by other ranks) are hashed here. The
    manifest's ``sequence`` orders checkpoints by when they were written. A folder already at
    ``folder`` (the same position, from an earlier run) is moved aside first and deleted once
    the new one is in place (:func:`tidy` puts it back if a crash comes in between). Then the
    ``latest`` marker, written beforehand, names the new checkpoint. A failure before the rename
    (a full disk) leaves neither the new marker nor ``folder``.
    """
    prefix = manifest["prefix"]
    files = sorted(p.name for p in staging.iterdir() if p.is_file())
    missing = [name for name in files if name not in digests]
    with ThreadPoolExecutor() as pool:
        hashed = pool.map(lambda n: _sha256(staging / n), missing)
        digests = {**digests, **dict(zip(missing, hashed, strict=True))}
        list(pool.map(lambda n: fsync(staging / n), files))
    entries = {name: {"bytes": (staging / name).stat().st_size, "sha256": digests[name]}
               for name in files}
    done = available(folder.parent, prefix)
    sequence = 1 + max((_sequence(folder.parent / name) for name in done), default=0)
    write_json(staging / MANIFEST, {"format": FORMAT, "version": VERSION, **manifest,
                                    "sequence": sequence, "files": entries})
    fsync(staging / MANIFEST)
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


def prune(checkpoint_path: str | Path, prefix: str, keep_last: int,
          protect: tuple[str | None, ...]) -> None:
    """Delete all but the ``keep_last`` most recently written checkpoints, never ``protect``."""
    names = by_write_order(checkpoint_path, available(checkpoint_path, prefix))
    for name in names[:-keep_last]:
        if name not in protect:
            shutil.rmtree(Path(checkpoint_path) / name, ignore_errors=True)


def _test_fault(path: Path) -> None:
    """For the crash tests only: act as :data:`TEST_FAULT` says once ``path`` is written.

    ``sigterm=PID`` makes a second pause signal certainly arrive during a save: ``PID`` (the
    process that started the job) passes the ``SIGTERM`` on to the job's processes, and the
    write goes on only once this process has received it. ``faulthandler`` notes the arrival (it
    can be set up from this writer thread, where :func:`signal.signal` cannot) and hands the
    signal on to the process's own handler. It dumps every thread: the signal may land on a
    thread of torch's own, which has no Python traceback to write.
    """
    fault = os.environ.get(TEST_FAULT)
    name, _, action = (fault or "").rpartition(":")
    if name != path.name:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action.startswith("sigterm="):
        pid = int(action.removeprefix("sigterm="))
        arrival, note = os.pipe()
        faulthandler.register(signal.SIGTERM, file=note, all_threads=True, chain=True)
        try:
            os.kill(pid, signal.SIGTERM)
            arrived = select.select([arrival], [], [], 120)[0]
        finally:
            faulthandler.unregister(signal.SIGTERM)
            os.close(arrival)
            os.close(note)
        if not arrived:
            raise RuntimeError(f"{TEST_FAULT}: process {pid} did not pass SIGTERM on")
        print(f"{TEST_FAULT}: wrote {path}, sent SIGTERM to {pid}, received it back, going on",
              file=sys.stderr, flush=True)
        return
    raise OSError(28, "No space left on device (injected by " + TEST_FAULT + ")", str(path))


# --- reading -------------------------------------------------------------------------------------

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
    if manifest.get("version", 0) > VERSION:
        raise ConfigError(f"checkpoint {folder} has format version {manifest['version']}, newer "
                          f"than this ddpw reads ({VERSION}): upgrade ddpw to load it.")
    return manifest


def verify(folder: Path) -> dict[str, Any]:
    """Check every file of a checkpoint against its manifest; return the manifest.

    :raises ConfigError: naming the first file that is missing, truncated or altered.
    """
    manifest = read_manifest(folder)
    files = manifest["files"]
    for name, entry in files.items():
        path = folder / name
        size = path.stat().st_size if path.is_file() else None
        if size != entry["bytes"]:
            found = "missing" if size is None else f"{size} bytes"
            raise ConfigError(f"checkpoint {folder} is damaged: {name} is {found}, the manifest "
                              f"says {entry['bytes']} bytes. Use another checkpoint.")
    with ThreadPoolExecutor() as pool:
        actual = dict(zip(files, pool.map(lambda n: _sha256(folder / n), files), strict=True))
    for name, entry in files.items():
        if actual[name] != entry["sha256"]:
            raise ConfigError(f"checkpoint {folder} is damaged: the SHA-256 of {name} differs "
                              f"from the manifest's (the file was altered or corrupted). Use "
                              f"another checkpoint.")
    return manifest


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn a file that safetensors or JSON cannot parse into a :class:`ConfigError` naming it.

    :func:`verify` finds damage first; this covers a file changed together with its manifest.
    """
    try:
        yield
    except ConfigError:
        raise
    except (safetensors.SafetensorError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"checkpoint {path.parent} is damaged: {path.name} cannot be read "
                          f"({type(error).__name__}: {error}). Use another checkpoint.") from error


def read_part(folder: Path, name: str, device: torch.device | str = "cpu") -> Any:
    """Read what :func:`write_part` wrote.

    :raises ConfigError: naming a file that is not what it should be.
    """
    tensor_file, json_file = folder / f"{name}.safetensors", folder / f"{name}.json"
    tensors: dict[str, torch.Tensor] = {}
    if tensor_file.is_file():
        with _reading(tensor_file):
            tensors = safetensors.torch.load_file(str(tensor_file), device=_device(device))
    with _reading(json_file):
        return join(json.loads(json_file.read_text()), tensors)


def read_model(folder: Path, model: torch.nn.Module, device: torch.device | str) -> None:
    """Load ``model.safetensors`` into ``model``.

    :raises ConfigError: when the file is not a safetensors file, or the weights do not fit the
        model, naming the keys.
    """
    path = folder / "model.safetensors"
    with _reading(path):
        state = safetensors.torch.load_file(str(path), device=_device(device))
    for alias, key in _aliases(path).items():
        state[alias] = state[key]
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        check_fits(folder, model)  # names the keys
        raise ConfigError(f"checkpoint {folder} does not fit the model: missing "
                          f"{result.missing_keys}, unexpected {result.unexpected_keys}.")


def check_fits(folder: Path, model: torch.nn.Module) -> None:
    """Check, from the file header alone, that the checkpoint's weights fit ``model``.

    :raises ConfigError: listing missing, unexpected and mis-shaped tensors.
    """
    path = folder / "model.safetensors"
    with _reading(path), safetensors.safe_open(str(path), framework="pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    for alias, key in _aliases(path).items():
        shapes[alias] = shapes[key]
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    missing = [k for k in expected if k not in shapes]
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [f"{k} is {shapes[k]} in the checkpoint, {expected[k]} in the model"
             for k in shapes if k in expected and expected[k] != shapes[k]]
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected),
                                     ("wrong shape", wrong)) if keys]
        raise ConfigError(f"checkpoint {folder} does not fit the model "
                          f"({type(model).__name__}): " + "; ".join(parts) + ".")


def _aliases(path: Path) -> dict[str, str]:
    with _reading(path), safetensors.safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        return json.loads(metadata.get("ddpw_aliases", "{}"))


def _device(device: torch.device | str) -> str:
    # safetensors takes "cpu" or "cuda:0", not "cpu:0" (which accelerate can report on CPU).
    device = torch.device(device)
    return "cpu" if device.type == "cpu" else str(device)


# --- RNG states ----------------------------------------------------------------------------------

def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's Python, NumPy and torch RNG states, and its CUDA device's if it has one."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


# --- files ---------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            hasher.update(chunk)
    return hasher.hexdigest()
