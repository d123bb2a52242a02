"""Which rank writes which tensor of the parts that every rank holds, whole or sliced.

Under DDP every rank holds the same tensors: :func:`share` deals them out whole
(:func:`~ddpw.checkpoint.layout.assign`). Under FSDP2 (``torch.distributed.fsdp.fully_shard``)
a parameter and the optimiser's state of it are DTensors placed ``Shard(0)`` on a 1-D device
mesh: each rank holds a run of rows, as ``torch.chunk`` splits them (:func:`rows_of`). Such a
tensor is *sliced*: every rank writes the rows it holds, under the tensor's key, into its own
file ``{part}-{r+1:05d}-of-{n:05d}.safetensors``; nothing is gathered to one rank. The other
tensors (buffers, the optimiser's step counts) are dealt out whole as under DDP. Tied weights
are written once (:func:`model_tensors`): two DTensors are tied where their local tensors are.

Each rank reports its slices (:attr:`Share.sliced`) and the main rank merges the reports
(:func:`merge`) into the manifest's ``"sliced"`` record: for each part and key, the tensor's
whole shape, its dtype and each slice's file, first row and number of rows (a rank that holds
no rows writes no slice)::

    "sliced": {"model": {"blocks.0.weight": {"shape": [3, 16], "dtype": "F32",
        "slices": [["model-00001-of-00002.safetensors", 0, 2],
                   ["model-00002-of-00002.safetensors", 2, 1]]}}}

A part with sliced tensors has no index file: Hugging Face's loaders take a key to live whole
in one file, and ddpw finds every part's files in the manifest. :mod:`~ddpw.checkpoint.reading`
reads a sliced tensor back at any world size, into either strategy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .layout import assign, tensor_file
from .tensors import DTYPE_NAMES

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch before 2.5
    from torch.distributed._tensor import DTensor, Shard  # type: ignore[no-redef]

#: What a sliced tensor may be, as errors say it.
SUPPORTED = "a DTensor placed (Shard(dim=0),) on a 1-D device mesh, as fully_shard makes them"


def rows_of(total: int, parts: int, index: int) -> tuple[int, int]:
    """The first row and the number of rows that part ``index`` of ``parts`` holds of ``total``
    rows, as ``torch.chunk`` splits them (FSDP2's layout): ``ceil(total / parts)`` rows each,
    the last parts fewer or none."""
    size = -(-total // parts)
    first = min(index * size, total)
    return first, min(size, total - first)


def local_rows(where: str, tensor: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """The rows that this rank holds of a sliced tensor, and the first one's index in the whole
    tensor; ``None`` for a plain tensor.

    :param where: what cannot be done with the tensor, for the errors (``cannot store model
        tensor 'w' in a checkpoint``).
    :raises TypeError: for a DTensor placed otherwise than :data:`SUPPORTED`, or whose rows
        are not those that ``torch.chunk`` gives this rank.
    """
    if not isinstance(tensor, DTensor):
        return None
    mesh, placements = tensor.device_mesh, tuple(tensor.placements)
    if mesh.ndim != 1 or placements != (Shard(0),) or tensor.dim() == 0:
        raise TypeError(f"{where}: it is a DTensor placed {placements} on a {mesh.ndim}-D "
                        f"device mesh; a checkpoint takes {SUPPORTED}.")
    local = tensor.to_local()
    first, rows = rows_of(tensor.shape[0], mesh.size(), mesh.get_local_rank())
    if tuple(local.shape) != (rows, *tensor.shape[1:]):
        raise TypeError(f"{where}: this rank holds {tuple(local.shape)} of "
                        f"{tuple(tensor.shape)}, not the rows {first} to {first + rows} that "
                        f"torch.chunk gives it; a checkpoint takes {SUPPORTED}.")
    return local, first


def model_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``model``'s weights with each tied tensor once, and the other names of tied tensors
    (alias -> stored name). Two DTensors are tied where their local tensors are."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for key, tensor in model.state_dict().items():
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        identity = (local.device, local.untyped_storage().data_ptr(), local.storage_offset(),
                    tuple(tensor.shape), tuple(local.stride()), tensor.dtype)
        if identity in seen:
            aliases[key] = seen[identity]
        else:
            seen[identity] = key
            tensors[key] = tensor
    return tensors, aliases


@dataclass
class Share:
    """What one rank writes of the parts that every rank holds."""

    #: Each file's tensors by key (a sliced tensor's local rows), and the part it belongs to.
    files: dict[str, tuple[str, dict[str, torch.Tensor]]] = field(default_factory=dict)
    #: This rank's slices, as the manifest's ``"sliced"`` record (:func:`merge`).
    sliced: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: For each part without sliced tensors, every whole tensor's file: its index.
    weight_maps: dict[str, dict[str, str]] = field(default_factory=dict)
    #: For each of those parts, the bytes of its tensors.
    sizes: dict[str, int] = field(default_factory=dict)

    def add(self, part: str, name: str, key: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` under ``key`` into file ``name``, of ``part``."""
        self.files.setdefault(name, (part, {}))[1][key] = tensor


def share(tensors: Sequence[tuple[str, str, torch.Tensor]], rank: int, world_size: int
          ) -> Share:
    """This rank's :class:`Share` of ``tensors`` (part, key, tensor): every rank computes the
    same deal of the whole tensors from the same sizes, and each writes its own rows of the
    sliced ones.

    :raises TypeError: as :func:`local_rows` does.
    """
    whole: list[tuple[str, str, torch.Tensor]] = []
    mine = Share()
    for part, key, tensor in tensors:
        found = local_rows(f"cannot store {part} tensor '{key}' in a checkpoint", tensor)
        if found is None:
            whole.append((part, key, tensor))
            continue
        local, first = found
        name = tensor_file(part, rank, world_size)
        slices = [[name, first, local.shape[0]]] if local.shape[0] else []
        if slices:
            mine.add(part, name, key, local)
        mine.sliced.setdefault(part, {})[key] = {
            "shape": list(tensor.shape), "dtype": DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype)),
            "slices": slices}
    owners = assign([t.numel() * t.element_size() for _, _, t in whole], world_size)
    for (part, key, tensor), owner in zip(whole, owners, strict=True):
        if owner == rank:
            mine.add(part, tensor_file(part, rank, world_size), key, tensor)
        if part not in mine.sliced:
            mine.weight_maps.setdefault(part, {})[key] = tensor_file(part, owner, world_size)
            mine.sizes[part] = mine.sizes.get(part, 0) + tensor.numel() * tensor.element_size()
    return mine


def merge(reports: Sequence[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Every rank's :attr:`Share.sliced` as one record, each tensor's slices by first row."""
    merged: dict[str, dict[str, Any]] = {}
    for report in reports:
        for part, records in report.items():
            for key, record in records.items():
                entry = merged.setdefault(part, {}).setdefault(
                    key, {"shape": record["shape"], "dtype": record["dtype"], "slices": []})
                entry["slices"] += record["slices"]
    for records in merged.values():
        for record in records.values():
            record["slices"].sort(key=lambda piece: piece[1])
    return merged
