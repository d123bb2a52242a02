"""Save and load time and size of a checkpoint: ddpw against torch.save and Accelerate.

    python scripts/bench/checkpoint.py [--repeats 3] [--quick]

Models of 10, 50 and 100 million parameters (a stack of square linear layers) with its Adam
state, in one process on the CPU. Each row saves to and loads from a fresh folder in the same
file system, each run after an ``os.sync()``; loads read from the page cache. Loading includes
putting the tensors back into the model and optimiser. "torch.save + fsync" flushes its file and
folders as ddpw's save does, the same durability. ddpw's save includes hashing and
fsync; its load includes checking every file's hash (BLAKE3; SHA-256 before format version 2)
against the manifest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PYTHON, Result, run_command, with_ratios

from ddpw import checkpoint as ckpt


def make(params_m: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    width = 2048
    layers = max(1, round(params_m * 1e6 / (width * width + width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
    model(torch.randn(4, width)).sum().backward()
    optimiser.step()  # fills exp_avg and exp_avg_sq
    return model, optimiser


def ddpw_save(model, optimiser, folder: Path) -> None:
    staging = ckpt.staging_path(folder)
    staging.mkdir(parents=True)
    digests = ckpt.write_all(staging, {"optimiser": optimiser.state_dict()}, model=model)
    ckpt.publish(staging, folder, digests, {"prefix": "bench"})


def ddpw_load(model, optimiser, folder: Path) -> None:
    ckpt.verify(folder)
    ddpw_read(model, optimiser, folder)


def ddpw_read(model, optimiser, folder: Path) -> None:
    ckpt.read_model(folder, model, "cpu")
    optimiser.load_state_dict(ckpt.read_part(folder, "optimiser"))


def ddpw_save_unsynced(model, optimiser, folder: Path) -> None:
    fsync, os.fsync = os.fsync, lambda fd: None  # every fsync of ddpw's goes through os.fsync
    try:
        ddpw_save(model, optimiser, folder)
    finally:
        os.fsync = fsync


def torch_save(model, optimiser, folder: Path) -> None:
    folder.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "optimiser": optimiser.state_dict()},
               folder / "state.pt")


def torch_save_synced(model, optimiser, folder: Path) -> None:
    """torch.save with the durability of ddpw's save: the file, then its folder and the folder
    above, flushed to disk."""
    torch_save(model, optimiser, folder)
    for path in (folder / "state.pt", folder, folder.parent):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def torch_load(model, optimiser, folder: Path) -> None:
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimiser.load_state_dict(state["optimiser"])


def timed(action: Callable[[], None], repeats: int, reset: Callable[[], None]) -> list[float]:
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        reset()
        os.sync()  # start every run with no dirty pages waiting to be written back
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return times[1:]


def variants(accelerator: Accelerator) -> dict[str, tuple[Callable, Callable]]:
    return {
        "ddpw (hashed, fsync)": (ddpw_save, ddpw_load),
        "ddpw without fsync and hash check": (ddpw_save_unsynced, ddpw_read),
        BASELINE: (torch_save, torch_load),
        "torch.save + fsync / torch.load": (torch_save_synced, torch_load),
        "accelerator.save_state / load_state": (
            lambda m, o, f: accelerator.save_state(str(f)),
            lambda m, o, f: accelerator.load_state(str(f))),
    }


BASELINE = "torch.save / torch.load"


def one(variant: str, params_m: int, repeats: int) -> dict[str, Any]:
    """Save and load times of one variant, in this process."""
    model, optimiser = make(params_m)
    accelerator = Accelerator(cpu=True)
    model, optimiser = accelerator.prepare(model, optimiser)
    save, load = variants(accelerator)[variant]
    root = Path(tempfile.mkdtemp(prefix="ddpw-bench-"))
    folder = root / "checkpoint"
    try:
        def clear() -> None:
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(ckpt.staging_path(folder), ignore_errors=True)

        saves = timed(partial(save, model, optimiser, folder), repeats, clear)
        loads = timed(partial(load, model, optimiser, folder), repeats, lambda: None)
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"params": sum(p.numel() for p in model.parameters()), "save_runs": saves,
            "load_runs": loads, "bytes": size}


def measure(repeats: int, quick: bool) -> list[Result]:
    """Each variant and model size in a process of its own (for its peak memory)."""
    results = []
    for params_m in [10] if quick else [10, 50, 100]:
        for variant in variants(Accelerator(cpu=True)):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "out.json"
                run = run_command([PYTHON, __file__, "--one", variant, "--params", str(params_m),
                                   "--repeats", str(repeats), "--json", str(out)],
                                  env={"OMP_NUM_THREADS": "1"})
                data = json.loads(out.read_text()) if run.ok else None
            if data is None:
                print(f"  {variant} failed:\n{run.error}", file=sys.stderr)
            case = f"{params_m}M parameters + Adam state"
            extra = {"bytes": data["bytes"], "params": data["params"]} if data else {}
            for action in ("save", "load"):
                results.append(Result(
                    "checkpoint", f"{action}, {case}", variant, "s",
                    data[f"{action}_runs"] if data else [], BASELINE,
                    peak_rss_mb=run.peak_rss_mb if data else None, failed=0 if data else 1,
                    extra=extra))
    return with_ratios(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=int, default=100, help="millions of parameters")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one small model (10M)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        args.json.write_text(json.dumps(one(args.one, args.params, args.repeats)))
        return
    for r in measure(args.repeats, args.quick):
        ratio = f"{r.ratio:.2f}" if r.ratio else "-"
        print(f"{r.case:45} {r.variant:36} {r.median:7.3f} s  x{ratio:>5}  "
              f"{(r.peak_rss_mb or 0):7.0f} MiB  {r.extra.get('bytes', 0) / 1e6:6.0f} MB")


if __name__ == "__main__":
    main()
