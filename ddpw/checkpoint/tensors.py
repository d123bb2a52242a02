"""A checkpoint's parts as safetensors and JSON files: the model's weights, and nested states
(optimiser, scheduler, RNG) split into JSON and tensors; files written hashed and mapped into
memory to be read in place (:mod:`~ddpw.checkpoint.reading` puts them into a model)."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import torch

from ..errors import ConfigError
from .hashing import write_hashed

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

#: Each dtype's name in a safetensors header.
DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}
#: The dtype of each name in a safetensors header.
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def write_tensors(path: Path, tensors: dict[str, torch.Tensor],
                  metadata: dict[str, str] | None = None) -> str:
    """Write ``tensors`` (on the CPU) as a safetensors file and flush it to disk; return the
    file's digest (:data:`~ddpw.checkpoint.hashing.ALGORITHM`).

    Unlike ``safetensors.torch.save_file``, the file is written tensor by tensor from the
    tensors' own memory, with no buffer of the whole file, and hashed while it is written. The
    widest elements come first, so that every tensor's data is aligned to its element size and
    :func:`map_tensors` can read it in place.
    """
    for name, t in tensors.items():
        if t.dtype not in DTYPE_NAMES:
            raise TypeError(f"cannot store tensor '{name}' of dtype {t.dtype} in a checkpoint")
    ordered = sorted(tensors, key=lambda name: -tensors[name].element_size())
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in ordered:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    pieces = [len(encoded).to_bytes(8, "little"), encoded]
    pieces += [memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
               for name in ordered if (t := tensors[name]).numel()]
    return write_hashed(path, pieces)


# --- reading -------------------------------------------------------------------------------------

@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn a file that safetensors or JSON cannot parse into a :class:`ConfigError` naming it.

    Hashes find damage first; this covers a file changed together with its manifest, and a file
    read before its hash is known to be right (the hash of another rank's share).
    """
    try:
        yield
    except ConfigError:
        raise
    except (safetensors.SafetensorError, ValueError, KeyError, TypeError, IndexError,
            RuntimeError) as error:
        raise ConfigError(f"checkpoint {path.parent} is damaged: {path.name} cannot be read "
                          f"({type(error).__name__}: {error}). Use another checkpoint.") from error


class MappedFile:
    """A file mapped into memory, copy-on-write: its bytes are read once, from the page cache,
    by whatever touches them first (a hash, or a copy into the model), and a tensor made from
    them may be changed without changing the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
        #: The file's bytes.
        self.data = torch.empty(0, dtype=torch.uint8).set_(storage)

    def hash_into(self, hasher: Any) -> None:
        """Feed the file's bytes to ``hasher`` (``update``)."""
        if self.data.numel():
            hasher.update(self.data.numpy())

    def json(self) -> Any:
        """The file's content as JSON."""
        with _reading(self.path):
            return json.loads(self.data.numpy().tobytes())

    def tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors of a safetensors file, in place where their data is aligned, and its
        metadata."""
        with _reading(self.path):
            length = int.from_bytes(self.data[:8].numpy().tobytes(), "little")
            base = 8 + length
            if len(self.data) < 8 or base > len(self.data):
                raise ValueError("not a safetensors file: its header overruns the file")
            try:
                header = json.loads(self.data[8:base].numpy().tobytes())
            except ValueError as error:
                raise ValueError(f"not a safetensors file: its header is not JSON ({error})"
                                 ) from error
            if not isinstance(header, dict):
                raise ValueError("not a safetensors file: its header is not a JSON object")
            metadata = header.pop("__metadata__", None) or {}
            tensors = {}
            for name, entry in header.items():
                dtype = DTYPES[entry["dtype"]]
                begin, end = entry["data_offsets"]
                raw = self.data[base + begin:base + end]
                shape = tuple(entry["shape"])
                if raw.numel() != math.prod(shape) * dtype.itemsize or end > len(self.data) - base:
                    raise ValueError(f"tensor '{name}' does not fit its offsets")
                if (base + begin) % dtype.itemsize:
                    raw = raw.clone()  # written by a ddpw that did not align (before version 3)
                tensors[name] = raw.view(dtype).reshape(shape)
            return tensors, metadata


def map_tensors(paths: Iterable[Path], mapping: Callable[[Path], MappedFile] = MappedFile
                ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of the safetensors files ``paths`` together, and their metadata: for a part
    whose tensors are whole (a part with sliced tensors holds a slice of each under its key in
    several files; :func:`~ddpw.checkpoint.reading.catalogue` reads those).

    :param mapping: maps a file (a reader that keeps its maps passes its own, to map each once).
    """
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for path in paths:
        found, meta = mapping(path).tensors()
        tensors |= found
        metadata |= meta
    return tensors, metadata
