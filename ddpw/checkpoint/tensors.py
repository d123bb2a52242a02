"""A checkpoint's parts as safetensors and JSON files: the model's weights, and nested states
(optimiser, scheduler, RNG) split into JSON and tensors."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch

from ..errors import ConfigError
from .hashing import write_hashed, write_json

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
    """Write ``tensors`` as a safetensors file, streaming; return the file's digest
    (:data:`~ddpw.checkpoint.hashing.ALGORITHM`).

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
    return write_hashed(path, pieces)


def write_part(folder: Path, name: str, obj: Any) -> dict[str, str]:
    """Write ``obj`` as ``{name}.json`` and, if it holds tensors, ``{name}.safetensors``.

    :returns: the digest of each file written, by file name.
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

    :returns: the file's digest, by file name.
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

    :returns: the digest of each file written, by file name.
    """
    jobs = [partial(write_part, folder, name, obj) for name, obj in parts.items()]
    if model is not None:
        jobs.append(partial(write_model, folder, model))
    digests: dict[str, str] = {}
    with ThreadPoolExecutor(min(4, len(jobs))) as pool:
        for written in pool.map(lambda job: job(), jobs):
            digests |= written
    return digests


# --- reading -------------------------------------------------------------------------------------

@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn a file that safetensors or JSON cannot parse into a :class:`ConfigError` naming it.

    :func:`~ddpw.checkpoint.manifest.verify` finds damage first; this covers a file changed
    together with its manifest.
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
