"""A process's random number generator states, which each rank saves in its checkpoint part."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


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
    # Copies: torch reads a generator state from the start of its storage, and a tensor read in
    # place from a checkpoint file starts further in (torch 2.13 rejects it, or crashes).
    torch.set_rng_state(state["torch"].clone())
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].clone(), device)
