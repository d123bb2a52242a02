"""Checkpoints as safetensors and JSON: nothing in them is ever unpickled.

A checkpoint is a folder under ``JobConfig.checkpoint_path``, named ``{prefix}_{k}`` for the state
after ``k`` complete epochs, or ``{prefix}_{k}_batch{b}`` for a pause ``b`` batches into epoch
``k + 1``. It holds:

- the unwrapped model's weights (no ``module.`` prefix): ``model.safetensors`` from a world of
  one; from ``n`` ranks, each rank's share ``model-0000r-of-0000n.safetensors`` and the index
  ``model.safetensors.index.json``, as Hugging Face shards a model (:mod:`.layout`). A model
  sharded with FSDP (DTensors placed ``Shard(0)``) is written in slices: each rank writes the
  rows it holds into its own file, and there is no index (:mod:`.slices`). Tied weights are
  stored once and their other names listed in the files' metadata;
- ``optimiser.json``: the optimiser's hyper-parameters and structure, with its state tensors
  in ``optimiser.safetensors`` or in shares like the model's; likewise ``scheduler.*`` and,
  with fp16, ``scaler.*``;
- ``rank-{r}.json`` + ``rank-{r}.safetensors``: rank ``r``'s Python, NumPy, torch and CUDA RNG
  states and its share of the running epoch's metrics;
- ``state.json``: the data position (epochs done, batches into the next epoch, optimiser steps,
  batch size, world size, data seed, gradient accumulation), the last epoch's metrics, the
  early-stopping count and the tracker runs' ids (:class:`~ddpw.checkpoint.state.TrainingState`);
- ``manifest.json``, written last: format and version (4), world size and shares, platform,
  mixed precision, every file's size and hash (BLAKE3; SHA-256 in version 1) and, for each
  sliced tensor, its whole shape, dtype and each slice's file, first row and rows
  (``"sliced"``, from version 4).

A checkpoint is written into a hidden folder (``.{name}.partial``), every file flushed to disk
by the rank that wrote it, and renamed into place by the main rank once every rank has written
its share; the marker file ``{prefix}_latest`` moves after it. A crash, a kill or a full disk at
any moment leaves the earlier checkpoints as they were and no folder that looks complete.
Loading checks every file against the manifest before anything of it is used, and reads a
checkpoint of any world size into either strategy (:mod:`.reading`); :mod:`.export` writes any
checkpoint's model in Hugging Face's layout (``ddpw-export``).

Submodules: ``names`` (positions, which checkpoints exist, clean-up), ``layout`` (which rank
writes what, and the files' names), ``tensors`` (the parts' files), ``slices`` (which rank
writes which tensor, whole or in rows), ``reading`` (the tensors back into a model),
``hashing`` (hashed writes), ``manifest`` (publish, check, verify), ``rng`` (RNG states),
``state`` (the training state in ``state.json``), ``export`` (Hugging Face's layout) and
``checkpointer`` (the :class:`~ddpw.checkpoint.checkpointer.Checkpointer` that a Trainer saves
and restores with, agreed across ranks, in the background). The names below are importable from
``ddpw.checkpoint`` itself, loaded when first used: ``Position``, which :mod:`ddpw.job` checks
``start_at`` with, needs no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_names

if TYPE_CHECKING:
    from .hashing import TEST_FAULT, write_json
    from .manifest import FORMAT, VERSION, check, publish, read_manifest, verify
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
    from .reading import check_fits, read_model, read_part
    from .rng import rng_state, set_rng_state
    from .tensors import join, split, write_tensors

__all__ = [
    "FORMAT", "LATEST", "MANIFEST", "TEST_FAULT", "VERSION", "Position", "available",
    "by_write_order", "check", "check_fits", "join", "latest", "prune", "publish",
    "read_manifest", "read_model", "read_part", "resolve", "rng_state", "set_rng_state", "split",
    "staging_path", "tidy", "verify", "write_json", "write_tensors",
]

#: The submodule that defines each name.
_HOMES = {
    "TEST_FAULT": "hashing", "write_json": "hashing",
    "FORMAT": "manifest", "VERSION": "manifest", "check": "manifest", "publish": "manifest",
    "read_manifest": "manifest", "verify": "manifest",
    "LATEST": "names", "MANIFEST": "names", "Position": "names", "available": "names",
    "by_write_order": "names", "latest": "names", "prune": "names", "resolve": "names",
    "staging_path": "names", "tidy": "names",
    "rng_state": "rng", "set_rng_state": "rng",
    "check_fits": "reading", "read_model": "reading", "read_part": "reading",
    "join": "tensors", "split": "tensors", "write_tensors": "tensors",
}

__getattr__, __dir__ = lazy_names(__name__, _HOMES, __all__)
