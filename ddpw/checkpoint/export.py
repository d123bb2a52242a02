"""A checkpoint's model in Hugging Face's layout, for ``transformers``,
``accelerate.load_checkpoint_in_model`` and whatever else reads it: :func:`export`, and the
command ``ddpw-export`` (:mod:`ddpw.cli_export`).

Any checkpoint exports, whichever world size and strategy wrote it: the model whole, one
tensor under each key, as ``model.safetensors`` or, above the shard size,
``model-0000i-of-0000n.safetensors`` and the index ``model.safetensors.index.json``. The
checkpoint is verified first (every file's hash). The output files are written one at a time,
each from the tensors of that file alone (a sliced tensor put together from its slices, a whole
one read in place from the checkpoint), so no more than one output file's tensors are ever in
memory. Tied weights are written once, under the name the checkpoint stores them by, as
``save_pretrained`` writes them: ``transformers`` ties the other names again when it loads, and
``accelerate.load_checkpoint_in_model`` leaves a tied parameter that the file lacks to its twin.
The folder is written under a hidden name beside ``out`` and renamed into place once complete.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path

from ..errors import ConfigError
from .hashing import write_json
from .layout import index, tensor_file
from .manifest import verify
from .names import MANIFEST
from .reading import catalogue
from .tensors import MappedFile, write_tensors

#: The shard size of ``save_pretrained`` (``"5GB"``).
MAX_SHARD_BYTES = 5 * 10**9
#: The units of a shard size, as Hugging Face reads them: ``KB`` is 1000 bytes, ``KiB`` 1024.
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def shard_bytes(text: str) -> int:
    """The bytes of a shard size written as Hugging Face writes one: ``5GB``, ``500MiB``,
    ``1000``.

    :raises ConfigError: for anything else.
    """
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _UNITS or int(match.group(1)) < 1:
        raise ConfigError(f"max shard size {text!r} is not a size: give a whole number of bytes "
                          f"above 0, with a unit or not (B, KB, MB, GB, TB, KiB, MiB, GiB, "
                          f"TiB), e.g. 5GB.")
    return int(match.group(1)) * _UNITS[unit]


def export(folder: str | Path, out: str | Path, max_shard_bytes: int = MAX_SHARD_BYTES
           ) -> list[Path]:
    """Write the model of checkpoint ``folder`` into the new folder ``out`` in Hugging Face's
    layout; return the files written.

    :param max_shard_bytes: the most bytes of tensors in one file (a larger tensor gets a file
        of its own); above it the model is sharded, as ``save_pretrained`` shards it.
    :raises ConfigError: when ``folder`` is not a checkpoint or is damaged, or ``out`` exists
        and is not an empty folder.
    """
    folder, out = Path(folder), Path(out)
    if not (folder / MANIFEST).is_file():
        raise ConfigError(f"{folder} is not a ddpw checkpoint: it has no {MANIFEST}.")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ConfigError(f"{out} already exists and is not an empty folder: give a new one.")
    manifest = verify(folder)
    stored, _ = catalogue(folder, manifest, "model", lambda name: MappedFile(folder / name))
    groups: list[list[str]] = [[]]
    filled = 0
    for key in sorted(stored, key=_natural):
        size = stored[key].dtype.itemsize * math.prod(stored[key].shape)
        if groups[-1] and filled + size > max_shard_bytes:
            groups.append([])
            filled = 0
        groups[-1].append(key)
        filled += size
    names = (["model.safetensors"] if len(groups) == 1
             else [tensor_file("model", i, len(groups)) for i in range(len(groups))])
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, group in zip(names, groups, strict=True):
        write_tensors(staging / name, {key: stored[key].whole() for key in group},
                      {"format": "pt"})
    if len(groups) > 1:
        weight_map = {key: name for name, group in zip(names, groups, strict=True)
                      for key in group}
        total = sum(stored[k].dtype.itemsize * math.prod(stored[k].shape) for k in weight_map)
        write_json(staging / "model.safetensors.index.json", index(weight_map, total))
    if out.exists():
        out.rmdir()
    os.replace(staging, out)
    return sorted(out.iterdir())


def _natural(key: str) -> list[object]:
    """``key`` ordered as a person reads it: ``blocks.9`` before ``blocks.10``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part)
            for part in re.split(r"(\d+)", key)]
