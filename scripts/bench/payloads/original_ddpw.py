"""The original ddpw package from PyPI (run with the Python of its own venv): the plain function
of :mod:`work` on one CPU process, or a probe of what it does when asked for two.

    python original_ddpw.py function --version 5.3.0
    python original_ddpw.py probe --version 5.3.0     (prints JSON)

Written for its 5.x API: ``Wrapper(Platform(device=...)).start(target)`` calls
``target(global_rank, local_rank, group, args)``; the targets here take anything, so that 6.x,
which passes keywords, calls them too.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import ddpw
from ddpw import Platform, Wrapper

TOTAL = 499500.0  # as work.TOTAL; work itself is not imported, so that nothing of ours is


def total() -> float:
    """The same plain function as ``work.total``: the sum of 0 to 999."""
    return float(torch.arange(1000, dtype=torch.float64).sum())


def check_package(version: str) -> None:
    """Fail unless the ddpw imported is the original, of ``version``, from this venv."""
    installed = importlib.metadata.version("ddpw")
    where = Path(ddpw.__file__).resolve()
    if installed != version or Path(sys.prefix).resolve() not in where.parents:
        raise SystemExit(f"expected the original ddpw {version} in {sys.prefix}; imported "
                         f"{installed} from {where}")


def function() -> None:
    """The plain function through the original's Wrapper on the CPU (one process, here)."""
    results: list[float] = []

    def target(*_args: Any, **_kwargs: Any) -> None:
        results.append(total())

    Wrapper(Platform(device="cpu", verbose=False)).start(target)
    if results != [TOTAL]:
        raise SystemExit(f"wrong results: {results}")


def _recording_target(calls: list[dict[str, Any]]) -> Callable[..., None]:
    """A target that records each call: whether it had a process group, and whether an
    all-reduce worked."""

    def target(*args: Any, **kwargs: Any) -> None:
        call: dict[str, Any] = {"process_group": torch.distributed.is_initialized()}
        try:
            summed = torch.tensor([1.0])
            torch.distributed.all_reduce(summed)
            call["all_reduce"] = float(summed)
        except Exception as error:
            call["all_reduce"] = f"{type(error).__name__}: {error}"
        calls.append(call)

    return target


def probe() -> list[dict[str, Any]]:
    """Ask for two processes the ways the original offers, and report what ran: its world size,
    how many times the target was called here, whether it had a process group, and whether an
    all-reduce worked. With no CUDA device visible (the caller hides any), as on a CPU host."""
    found = []
    for settings in ({"device": "cpu", "n_gpus": 2}, {"device": "gpu", "n_gpus": 2}):
        calls: list[dict[str, Any]] = []
        outcome: dict[str, Any] = {"platform": settings}
        try:
            platform = Platform(**settings, verbose=False)
            outcome["world_size"] = platform.world_size
            Wrapper(platform).start(_recording_target(calls))
            outcome["returned"] = True
        except Exception:
            outcome["returned"] = False
            outcome["error"] = traceback.format_exc().strip().splitlines()[-1]
        # Targets run in this process only (a spawned process's calls are not seen here, and
        # the original spawns none on CPUs): count them.
        outcome["calls_here"] = calls
        found.append(outcome)
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("function", "probe"))
    parser.add_argument("--version", required=True, help="the original's expected version")
    args = parser.parse_args()
    check_package(args.version)
    if args.mode == "function":
        function()
    else:
        print(json.dumps(probe()))


if __name__ == "__main__":
    main()
