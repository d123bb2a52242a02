"""A checkpoint's tensors read back into a model and the parts' objects, at any world size and
with either strategy, whichever wrote it.

A part's tensors are first catalogued (:func:`catalogue`) from its files' headers and the
manifest's ``"sliced"`` record (:mod:`~ddpw.checkpoint.slices`): each one a :class:`Stored`, its
whole shape and dtype and its pieces, views into the memory-mapped files. A tensor written whole
(by DDP or one process, and every tensor of format versions 1 to 3) is one piece; a sliced one
(FSDP) has a piece for each rank that held rows of it. Each tensor of the target then takes
what it needs (:func:`placed`): a plain tensor the whole one, assembled from its slices; a
DTensor only this rank's rows, where ``torch.chunk`` puts them for the target's mesh, read in
place from the one piece that holds them all or copied together from the few that do. No rank
of a sharded target makes a whole sharded tensor.

The optimiser's state follows its parameters: a state tensor at ``state.{i}.{name}`` whose
shape is parameter ``i``'s (numbered across the ``param_groups`` in order, as
``Optimizer.state_dict`` numbers them) is placed like that parameter when the parameter is a
DTensor, and whole otherwise (the step counts, every tensor under DDP).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .layout import part_files
from .manifest import read_manifest
from .slices import DTensor, local_rows
from .tensors import DTYPES, MappedFile, join

#: A state tensor's key (:func:`~ddpw.checkpoint.tensors.split`) and its parameter's number.
_STATE = re.compile(r"\d+:\.state\.(\d+)\..+")


@dataclass
class Stored:
    """One tensor of a checkpoint's part: its whole shape and dtype, and its pieces as
    (first row, the rows in a mapped file), by first row."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: list[tuple[int, torch.Tensor]]

    def rows(self, first: int, count: int) -> torch.Tensor:
        """Rows ``first`` to ``first + count``: in the file where one piece holds them all,
        else copied together from the pieces that do."""
        for start, piece in self.pieces:
            if start <= first and first + count <= start + len(piece):
                return piece[first - start:first - start + count]
        rows = torch.empty((count, *self.shape[1:]), dtype=self.dtype)
        for start, piece in self.pieces:
            low, high = max(first, start), min(first + count, start + len(piece))
            if low < high:
                rows[low - first:high - first] = piece[low - start:high - start]
        return rows

    def whole(self) -> torch.Tensor:
        """The whole tensor: in the file where it was written whole."""
        if len(self.pieces) == 1 and tuple(self.pieces[0][1].shape) == self.shape:
            return self.pieces[0][1]
        return self.rows(0, self.shape[0])


def catalogue(folder: Path, manifest: dict[str, Any], part: str,
              mapping: Callable[[str], MappedFile]) -> tuple[dict[str, Stored], dict[str, str]]:
    """``part``'s tensors in checkpoint ``folder`` by key, and its files' metadata.

    :param mapping: maps a file of the checkpoint by name (a reader that keeps its maps passes
        its own, to map each once).
    :raises ConfigError: naming a file that cannot be read, or a tensor whose slices are not
        where the manifest says.
    """
    headers: dict[str, dict[str, torch.Tensor]] = {}
    metadata: dict[str, str] = {}
    for name in part_files(manifest["files"], part, manifest.get("shares", 1)):
        headers[name], found = mapping(name).tensors()
        metadata |= found
    sliced = manifest.get("sliced", {}).get(part, {})
    stored = {key: Stored(tuple(t.shape), t.dtype, [(0, t)])
              for tensors in headers.values() for key, t in tensors.items() if key not in sliced}
    for key, record in sliced.items():
        stored[key] = _assembled(folder, key, record, headers)
    return stored, metadata


def _assembled(folder: Path, key: str, record: dict[str, Any],
               headers: dict[str, dict[str, torch.Tensor]]) -> Stored:
    """The sliced tensor ``key`` of the manifest's ``record``, checked against the files."""
    damaged = f"checkpoint {folder} is damaged: the slices of '{key}'"
    try:
        shape, dtype = tuple(record["shape"]), DTYPES[record["dtype"]]
        pieces, covered = [], 0
        for name, first, rows in record["slices"]:
            piece = headers.get(name, {}).get(key)
            if piece is None or first != covered or tuple(piece.shape) != (rows, *shape[1:]) \
                    or piece.dtype != dtype:
                raise ConfigError(f"{damaged} are not where the manifest says (rows {first} to "
                                  f"{first + rows} in {name}). Use another checkpoint.")
            pieces.append((first, piece))
            covered += rows
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"{damaged} cannot be read from the manifest ({type(error).__name__}: "
                          f"{error}). Use another checkpoint.") from error
    if not shape or covered != shape[0]:
        raise ConfigError(f"{damaged} hold {covered} rows of {shape}. Use another checkpoint.")
    return Stored(shape, dtype, pieces)


def placed(stored: Stored, like: torch.Tensor | None, device: torch.device | str,
           key: str = "") -> torch.Tensor:
    """``stored`` (the tensor ``key``) as the target ``like`` holds it: a DTensor of the same
    shape gets this rank's rows alone, placed as it is; anything else the whole tensor, on
    ``device``.

    :raises TypeError: for a DTensor target placed otherwise than a checkpoint's slices can
        be (:data:`~ddpw.checkpoint.slices.SUPPORTED`).
    """
    if isinstance(like, DTensor) and tuple(like.shape) == stored.shape:
        found = local_rows(f"cannot load the checkpoint's '{key}' into the model", like)
        assert found is not None
        local, first = found
        rows = stored.rows(first, len(local)).to(local.device, non_blocking=True)
        return DTensor.from_local(rows, like.device_mesh, like.placements, run_check=False,
                                  shape=like.shape, stride=like.stride())
    whole = stored.whole()
    return whole if torch.device(device).type == "cpu" else whole.to(device, non_blocking=True)


def aliases(metadata: dict[str, str]) -> dict[str, str]:
    """The tied weights' other names (alias -> stored name) in a model file's metadata."""
    return json.loads(metadata.get("ddpw_aliases", "{}"))


def fits(folder: Path, stored: dict[str, Stored], tied: dict[str, str],
         targets: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Check that the ``stored`` weights and their ``tied`` names fit the model's state dict
    ``targets`` (by whole shapes: DTensors' global ones).

    :raises ConfigError: listing missing, unexpected and mis-shaped tensors.
    """
    shapes = {key: s.shape for key, s in stored.items()}
    shapes |= {alias: shapes[key] for alias, key in tied.items() if key in shapes}
    expected = {k: tuple(t.shape) for k, t in targets.items()}
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


def load_model(model: torch.nn.Module, folder: Path, stored: dict[str, Stored],
               metadata: dict[str, str], device: torch.device | str) -> None:
    """Load the ``stored`` weights (and their tied names in ``metadata``) into ``model``.

    :raises ConfigError: when the weights do not fit the model, naming the keys.
    """
    targets, tied = model.state_dict(), aliases(metadata)
    fits(folder, stored, tied, targets, model)
    model.load_state_dict({key: placed(stored[tied.get(key, key)], target, device, key)
                           for key, target in targets.items()})


def load_part(target: Any, structure: Any, stored: dict[str, Stored],
              device: torch.device | str) -> None:
    """Load a part (its JSON ``structure`` and ``stored`` tensors) into ``target``, an object
    with ``load_state_dict``; an optimiser's state placed like its parameters."""
    params: dict[int, torch.Tensor] = {}
    groups = getattr(target, "param_groups", None)
    if groups and isinstance(structure, dict) and isinstance(structure.get("param_groups"), list):
        numbers = [n for group in structure["param_groups"] for n in group["params"]]
        params = dict(zip(numbers, (p for group in groups for p in group["params"]),
                          strict=False))
    tensors = {}
    for key, one in stored.items():
        match = _STATE.fullmatch(key)
        like = params.get(int(match.group(1))) if match else None
        tensors[key] = placed(one, like, device, key)
    target.load_state_dict(join(structure, tensors))


def _mapping(folder: Path) -> Callable[[str], MappedFile]:
    return lambda name: MappedFile(folder / name)


def read_part(folder: Path, name: str, device: torch.device | str = "cpu") -> Any:
    """Read a part that a checkpoint keeps as ``{name}.json`` and, if it holds tensors, one or
    more safetensors files, whole, without checking its hashes.

    :raises ConfigError: naming a file that is not what it should be.
    """
    stored, _ = catalogue(folder, read_manifest(folder), name, _mapping(folder))
    tensors = {key: placed(one, None, device) for key, one in stored.items()}
    return join(MappedFile(folder / f"{name}.json").json(), tensors)


def read_model(folder: Path, model: torch.nn.Module, device: torch.device | str) -> None:
    """Load a checkpoint's model weights into ``model`` (sharded or not), without checking
    their hashes.

    :raises ConfigError: when a file is not a safetensors file, or the weights do not fit the
        model, naming the keys.
    """
    stored, metadata = catalogue(folder, read_manifest(folder), "model", _mapping(folder))
    load_model(model, folder, stored, metadata, device)


def check_fits(folder: Path, model: torch.nn.Module) -> None:
    """Check, from the files' headers and the manifest alone, that the checkpoint's weights fit
    ``model``.

    :raises ConfigError: listing missing, unexpected and mis-shaped tensors.
    """
    stored, metadata = catalogue(folder, read_manifest(folder), "model", _mapping(folder))
    fits(folder, stored, aliases(metadata), model.state_dict(), model)
