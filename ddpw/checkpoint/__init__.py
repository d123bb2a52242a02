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
  every file's size and hash (BLAKE3; SHA-256 in version 1).

A checkpoint is written into a hidden folder (``.{name}.partial``) and renamed into place once
complete and flushed to disk; the marker file ``{prefix}_latest`` moves after it. A crash, a kill
or a full disk at any moment leaves the earlier checkpoints as they were and no folder that looks
complete. Loading checks every file against the manifest before reading it.

Submodules: ``names`` (positions, which checkpoints exist, clean-up), ``tensors`` (the parts'
files), ``hashing`` (hashed writes), ``manifest`` (publish, verify), ``rng`` (RNG states), and
``transaction`` (a Trainer's save and restore, agreed across ranks). The names below are
importable from ``ddpw.checkpoint`` itself, loaded when first used: ``Position``, which
:mod:`ddpw.job` checks ``start_at`` with, needs no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_names

if TYPE_CHECKING:
    from .hashing import TEST_FAULT, write_json
    from .manifest import FORMAT, VERSION, publish, read_manifest, verify
    from .names import (
        LATEST,
        MANIFEST,
        Position,
        available,
        by_write_order,
        latest,
        prune,
        resolve,
        staging_path,
        tidy,
    )
    from .rng import rng_state, set_rng_state
    from .tensors import (
        check_fits,
        join,
        read_model,
        read_part,
        split,
        write_all,
        write_model,
        write_part,
        write_tensors,
    )

__all__ = [
    "FORMAT", "LATEST", "MANIFEST", "TEST_FAULT", "VERSION", "Position", "available",
    "by_write_order", "check_fits", "join", "latest", "prune", "publish", "read_manifest",
    "read_model", "read_part", "resolve", "rng_state", "set_rng_state", "split", "staging_path",
    "tidy", "verify", "write_all", "write_json", "write_model", "write_part", "write_tensors",
]

#: The submodule that defines each name.
_HOMES = {
    "TEST_FAULT": "hashing", "write_json": "hashing",
    "FORMAT": "manifest", "VERSION": "manifest", "publish": "manifest",
    "read_manifest": "manifest", "verify": "manifest",
    "LATEST": "names", "MANIFEST": "names", "Position": "names", "available": "names",
    "by_write_order": "names", "latest": "names", "prune": "names", "resolve": "names",
    "staging_path": "names", "tidy": "names",
    "rng_state": "rng", "set_rng_state": "rng",
    "check_fits": "tensors", "join": "tensors", "read_model": "tensors", "read_part": "tensors",
    "split": "tensors", "write_all": "tensors", "write_model": "tensors", "write_part": "tensors",
    "write_tensors": "tensors",
}

__getattr__, __dir__ = lazy_names(__name__, _HOMES, __all__)
