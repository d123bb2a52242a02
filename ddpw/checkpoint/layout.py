"""Which rank writes which tensor of a checkpoint, and the files that hold them.

Under DDP every rank holds the same model, optimiser, scheduler and scaler, so each rank writes
a share of their tensors. :func:`assign` deals the tensors out so that the ranks' bytes are
about even (whole tensors, the largest first to the rank with the fewest bytes so far); every
rank computes the same answer from the same sizes, so no message is needed to agree on it.

With one share (a world of one), a part's tensors are one file, ``{part}.safetensors``. With
``n`` shares, rank ``r`` writes ``{part}-{r+1:05d}-of-{n:05d}.safetensors`` for each part it holds
tensors of, and the main rank writes an index that maps each tensor to its file: for the model
``model.safetensors.index.json``, the layout of Hugging Face's sharded checkpoints, which
``transformers`` and ``accelerate.load_checkpoint_in_model`` read; for the others
``{part}.shares.json``, in the same format. A part with tensors sliced across the ranks (FSDP:
:mod:`~ddpw.checkpoint.slices`) has no index, since the index maps a key to one file. ddpw
itself finds a part's files by their names in the manifest (:func:`tensor_files`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from .manifest import read_manifest


def assign(sizes: Sequence[int], shares: int) -> list[int]:
    """The share (``0 .. shares-1``) of each item of ``sizes`` (bytes), balancing the bytes."""
    load = [0] * shares
    owner = [0] * len(sizes)
    # Largest first, each to the least loaded share; ties go to the lower index, so that every
    # rank computes the same assignment.
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        share = min(range(shares), key=lambda s: (load[s], s))
        owner[index] = share
        load[share] += sizes[index]
    return owner


def tensor_file(part: str, share: int, shares: int) -> str:
    """The name of the file in which share ``share`` of ``shares`` keeps ``part``'s tensors."""
    if shares == 1:
        return f"{part}.safetensors"
    return f"{part}-{share + 1:05d}-of-{shares:05d}.safetensors"


def index_file(part: str) -> str:
    """The name of the file that maps each of ``part``'s tensors to its file (with shares).

    Only the model's is named as Hugging Face names one: their tools refuse a folder with two.
    """
    return "model.safetensors.index.json" if part == "model" else f"{part}.shares.json"


def index(weight_map: dict[str, str], total_size: int) -> dict[str, object]:
    """The content of an index file (:func:`index_file`), as Hugging Face writes one."""
    return {"metadata": {"total_size": total_size}, "weight_map": weight_map}


def part_files(names: Iterable[str], part: str, shares: int) -> list[str]:
    """The files among a checkpoint's file ``names`` that hold ``part``'s tensors, when
    ``shares`` ranks wrote it."""
    names = set(names)
    return [name for share in range(shares)
            if (name := tensor_file(part, share, shares)) in names]


def tensor_files(folder: Path, part: str) -> list[Path]:
    """The files that hold ``part``'s tensors in the checkpoint ``folder`` (none if it has
    none), as its manifest lists them (a part with sliced tensors has no index).

    :raises ConfigError: when the manifest cannot be read.
    """
    manifest = read_manifest(folder)
    return [folder / name
            for name in part_files(manifest["files"], part, manifest.get("shares", 1))]
