"""Checkpoints as safetensors and JSON: nothing in them is ever unpickled.

A checkpoint is a folder ``{checkpoint_path}/{prefix}_{epoch}`` holding:

- ``model.safetensors``: the unwrapped model's weights (no ``module.`` prefix; tied weights once);
- ``optimiser.json`` / ``optimiser.safetensors``: the optimiser's hyper-parameters and structure,
  and its state tensors; likewise ``scheduler.*`` and ``scaler.*`` when there is one;
- ``rng-{rank}.json`` / ``rng-{rank}.safetensors``: each rank's Python, NumPy and torch RNG states;
- ``state.json``: epoch, step and the metrics of the last epoch;
- ``manifest.json``, written last: format version, world size, platform and every file's size.

A folder is written under a temporary name and renamed into place only once complete, so a crash
while saving leaves the previous checkpoints as they were and no folder that looks valid but is not.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from .errors import ConfigError

FORMAT = "ddpw-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"


def path_of(checkpoint_path: str | Path, prefix: str, epoch: int) -> Path:
    """The folder of the checkpoint for ``epoch``."""
    return Path(checkpoint_path) / f"{prefix}_{epoch}"


def available(checkpoint_path: str | Path, prefix: str) -> list[int]:
    """Epochs that have a complete checkpoint (a manifest), in increasing order."""
    root = Path(checkpoint_path)
    if not root.is_dir():
        return []
    epochs = []
    for entry in root.iterdir():
        name, _, number = entry.name.rpartition("_")
        if name == prefix and number.isdigit() and (entry / MANIFEST).is_file():
            epochs.append(int(number))
    return sorted(epochs)


def require(checkpoint_path: str | Path, prefix: str, epoch: int) -> Path:
    """The folder of checkpoint ``epoch``, after checking that it is complete.

    :raises ConfigError: naming the folder and listing the checkpoints that do exist.
    """
    folder = path_of(checkpoint_path, prefix, epoch)
    if not (folder / MANIFEST).is_file():
        found = available(checkpoint_path, prefix)
        listed = ", ".join(str(e) for e in found) if found else "none"
        raise ConfigError(f"JobConfig.start_at={epoch}: no checkpoint {folder} (a folder with a "
                          f"{MANIFEST}). Checkpoints in {checkpoint_path} with prefix "
                          f"'{prefix}': {listed}.")
    manifest = read_manifest(folder)
    for name, entry in manifest["files"].items():
        size = (folder / name).stat().st_size if (folder / name).is_file() else None
        if size != entry["bytes"]:
            raise ConfigError(f"checkpoint {folder} is damaged: {name} has "
                              f"{'no file' if size is None else f'{size} bytes'}, the manifest "
                              f"says {entry['bytes']} bytes. Use another checkpoint.")
    return folder


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a checkpoint folder, after checking its format and version."""
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{folder / MANIFEST} is not a ddpw checkpoint manifest.")
    if manifest.get("version", 0) > VERSION:
        raise ConfigError(f"checkpoint {folder} has format version {manifest['version']}, newer "
                          f"than this ddpw reads ({VERSION}): upgrade ddpw to load it.")
    return manifest


def check_fits(folder: Path, model: torch.nn.Module) -> None:
    """Check, from the file header alone, that the checkpoint's weights fit ``model``.

    Tied weights are stored once, under one of their names; any name of a tied group counts.

    :raises ConfigError: listing missing, unexpected and mis-shaped tensors.
    """
    with safetensors.safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    groups: dict[tuple[int, int], list[str]] = {}
    expected = model.state_dict(keep_vars=True)
    for key, tensor in expected.items():
        groups.setdefault((tensor.untyped_storage().data_ptr(), tensor.storage_offset()),
                          []).append(key)
    missing = [names[0] for names in groups.values() if not any(n in shapes for n in names)]
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [f"{k} is {shapes[k]} in the checkpoint, {tuple(expected[k].shape)} in the model"
             for k in shapes
             if k in expected and tuple(expected[k].shape) != shapes[k]]
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected),
                                     ("wrong shape", wrong)) if keys]
        raise ConfigError(f"checkpoint {folder} does not fit the model "
                          f"({type(model).__name__}): " + "; ".join(parts) + ".")


# Nested state (optimiser, scheduler, RNG) is split into JSON for the structure and numbers, and
# a flat dict of tensors for safetensors. Tuples and non-string keys are tagged so that they come
# back as they were.

def split(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """Replace every tensor in ``obj`` by a reference and put it in ``tensors``."""
    if isinstance(obj, torch.Tensor):
        # The count makes the name unique even where two paths read alike ("a.b" and "a"/"b").
        key = f"{len(tensors)}:{path}"
        tensors[key] = obj.detach().to("cpu").contiguous()
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


def write_part(folder: Path, name: str, obj: Any) -> None:
    """Write ``obj`` as ``{name}.json`` and, if it holds tensors, ``{name}.safetensors``."""
    tensors: dict[str, torch.Tensor] = {}
    structure = split(obj, tensors)
    if tensors:
        safetensors.torch.save_file(tensors, str(folder / f"{name}.safetensors"))
    _write_text(folder / f"{name}.json", json.dumps(structure))


def read_part(folder: Path, name: str, device: torch.device | str = "cpu") -> Any:
    """Read what :func:`write_part` wrote."""
    tensor_file = folder / f"{name}.safetensors"
    tensors = (safetensors.torch.load_file(str(tensor_file), device=str(device))
               if tensor_file.is_file() else {})
    return join(json.loads((folder / f"{name}.json").read_text()), tensors)


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch and (where present) CUDA RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def staging_path(folder: Path) -> Path:
    """Where ``folder`` is written before it is renamed into place."""
    return folder.with_name(f".{folder.name}.partial")


def publish(staging: Path, folder: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest into ``staging``, flush it all to disk and rename it to ``folder``.

    A folder already at ``folder`` (a checkpoint of the same epoch from an earlier run) is moved
    aside first and deleted only after the new one is in place.
    """
    files = sorted(p.name for p in staging.iterdir() if p.is_file())
    manifest = {**manifest, "format": FORMAT, "version": VERSION,
                "files": {name: {"bytes": (staging / name).stat().st_size} for name in files}}
    _write_text(staging / MANIFEST, json.dumps(manifest, indent=1))
    for name in files:
        _fsync(staging / name)
    _fsync(staging)
    old = folder.with_name(f".{folder.name}.old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(staging, folder)
    _fsync(folder.parent)
    shutil.rmtree(old, ignore_errors=True)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
