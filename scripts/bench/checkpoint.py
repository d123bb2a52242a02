"""Save and load time and size of a checkpoint: ddpw against torch.save and Accelerate.

    python scripts/bench/checkpoint.py [--params 100] [--repeats 3] [--json out.json]

A model of about ``--params`` million parameters (a stack of square linear layers) with its Adam
state, in one process on the CPU. Each row saves to and loads from a fresh folder in the same
file system, each run after an ``os.sync()``; loads read from the page cache. Loading includes
putting the tensors back into the model and optimiser. ddpw's save includes hashing and
fsync; its load includes checking every file's SHA-256 against the manifest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator

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
    fsync, ckpt._fsync = ckpt._fsync, lambda path: None
    try:
        ddpw_save(model, optimiser, folder)
    finally:
        ckpt._fsync = fsync


def torch_save(model, optimiser, folder: Path) -> None:
    folder.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "optimiser": optimiser.state_dict()},
               folder / "state.pt")


def torch_load(model, optimiser, folder: Path) -> None:
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimiser.load_state_dict(state["optimiser"])


def measure(action: Callable[[], None], repeats: int, reset: Callable[[], None]) -> list[float]:
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        reset()
        os.sync()  # start every run with no dirty pages waiting to be written back
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=int, default=100, help="millions of parameters")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    model, optimiser = make(args.params)
    n_params = sum(p.numel() for p in model.parameters())
    accelerator = Accelerator(cpu=True)
    model, optimiser = accelerator.prepare(model, optimiser)
    root = Path(tempfile.mkdtemp(prefix="ddpw-bench-"))
    rows = []
    try:
        variants = {
            "ddpw (safetensors+JSON, sha256, fsync)": (ddpw_save, ddpw_load),
            "  the same without fsync / hash check": (ddpw_save_unsynced, ddpw_read),
            "torch.save / torch.load": (torch_save, torch_load),
            "accelerator.save_state / load_state": (
                lambda m, o, f: accelerator.save_state(str(f)),
                lambda m, o, f: accelerator.load_state(str(f))),
        }
        for name, (save, load) in variants.items():
            folder = root / str(len(rows))

            def clear(folder: Path = folder) -> None:
                shutil.rmtree(folder, ignore_errors=True)
                shutil.rmtree(ckpt.staging_path(folder), ignore_errors=True)

            saves = measure(partial(save, model, optimiser, folder), args.repeats, clear)
            loads = measure(partial(load, model, optimiser, folder), args.repeats, lambda: None)
            size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            rows.append({"variant": name, "save_s": statistics.median(saves),
                         "load_s": statistics.median(loads), "bytes": size,
                         "save_runs": saves, "load_runs": loads})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = rows[2]
    print(f"model: {n_params / 1e6:.1f}M parameters + Adam state, median of {args.repeats}")
    print(f"{'variant':42} {'save s':>7} {'x torch':>8} {'load s':>7} {'x torch':>8} {'MB':>7}")
    for row in rows:
        print(f"{row['variant']:42} {row['save_s']:7.3f} {row['save_s'] / base['save_s']:8.2f} "
              f"{row['load_s']:7.3f} {row['load_s'] / base['load_s']:8.2f} "
              f"{row['bytes'] / 1e6:7.0f}")
    if args.json:
        args.json.write_text(json.dumps({"params": n_params, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
