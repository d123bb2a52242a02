"""The work that ddpw's ``Wrapper.start`` runs in the benchmarks: one all-reduce, or a plain
function.

In a launched rank, ``python -m ddpw.entry`` imports torch, Accelerate and ddpw, then unpickles
the job, which imports this module: so its import marks the moment that rank's imports are done
(the ``imports`` stamp). The job's function is called once ddpw has made the rank's
``Accelerator`` and so its process group (the ``rendezvous`` stamp).
"""

from __future__ import annotations

import torch
from stamps import stamp

stamp("imports")

#: What :func:`total` returns.
TOTAL = 499500.0


def total() -> float:
    """A plain function of no distributed kind: the sum of 0 to 999."""
    return float(torch.arange(1000, dtype=torch.float64).sum())


def all_reduce() -> float:
    """Every rank contributes ``rank + 1``; returns the sum over the world."""
    from ddpw.utils import world

    stamp("rendezvous")
    w = world()
    summed = w.accelerator.reduce(torch.tensor([w.global_rank + 1.0], device=w.device),
                                  reduction="sum")
    stamp("allreduce")
    return float(summed)
