"""One job of the sharding row's checkpoint cases (``sharding.py``): checkpoints of a model
sharded with FSDP2's ``fully_shard``, written and read by ddpw's checkpointer and by torch's
distributed checkpoint (DCP), timed inside the job. Run on every rank by ``torchrun``::

    torchrun --standalone --nproc_per_node 2 sharded_checkpoint_job.py --mode save \\
        --width 2048 --repeats 3 --folder DIR --out result.json
    torchrun --standalone --nproc_per_node 1 sharded_checkpoint_job.py --mode load \\
        --width 2048 --repeats 3 --folder DIR --out result.json

The model is ``loops/workload.py``'s ``Blocks``, sharded as ddpw shards it (each block, then the
root), with Adam after one step (so that its state exists): every checkpoint holds the model
and the optimiser, ddpw's as a Trainer's save does (:class:`ddpw.checkpoint.checkpointer.
Checkpointer`, the position and each rank's own part beside them), DCP's as its tutorial
writes it (``get_state_dict``, then ``save``; ``FileSystemWriter`` fsyncs every file). The
variants take turns after a warm-up round; each writes into its own folder of ``--folder``
(one file system), its earlier output deleted untimed, after an ``os.sync()``.

``--mode save`` (2 ranks): the time from a barrier to a barrier of ddpw's synchronous save
(each rank writes, hashes and flushes its own rows) and of ``dcp.save`` (the baseline); and the
time each blocks the job, the slower rank's, when asynchronous: ddpw's ``save`` with
``asynchronous=True`` against ``dcp.async_save`` (the baseline of that case), each waited for
untimed before the next. The last round's checkpoints stay in ``--folder`` for ``--mode load``.

``--mode load`` (another world size, 1 rank here): into a fresh model sharded over this
world and a fresh Adam, ddpw's ``restore`` (every file's hash checked, then only the rows this
world's ranks hold read) against DCP's resharding ``load`` and ``set_state_dict`` (the
baseline; it checks nothing, and unpickles its ``.metadata``). After each load the gathered
state is compared with the saved one, which the save wrote beside its checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parent / "loops"))
from workload import BATCH_SIZE, CLASSES, FEATURES, make_model, make_optimiser

from ddpw.checkpoint import Position
from ddpw.checkpoint.checkpointer import Checkpointer, Contents
from ddpw.checkpoint.state import TrainingState

DDPW_SAVE = "ddpw save (sync)"
DCP_SAVE = "dcp.save"
DDPW_ASYNC = "ddpw save (async): blocked"
DCP_ASYNC = "dcp.async_save: blocked"
DDPW_LOAD = "ddpw restore (hash-checked)"
DCP_LOAD = "dcp.load + set_state_dict"
#: The checkpoint each save writes (epoch 1 done), in each variant's own folder.
NAME = "checkpoint_1"
#: The gathered state the loads are compared with.
SAVED = "saved-state.pt"


def sharded(width: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model sharded over this world, as ddpw shards it, and Adam after one step."""
    model = make_model("blocks", width)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimiser = make_optimiser(model)
    generator = torch.Generator().manual_seed(dist.get_rank())
    inputs = torch.randn(BATCH_SIZE, FEATURES, generator=generator)
    labels = torch.randint(0, CLASSES, (BATCH_SIZE,), generator=generator)
    F.cross_entropy(model(inputs), labels).backward()
    optimiser.step()
    optimiser.zero_grad()
    return model, optimiser


def gathered(model: torch.nn.Module, optimiser: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The whole model and optimiser state, each DTensor gathered (a collective)."""
    def whole(t: torch.Tensor) -> torch.Tensor:
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()

    found = {f"model/{k}": whole(t) for k, t in model.state_dict().items()}
    for number, state in optimiser.state_dict()["state"].items():
        found |= {f"optimiser/{number}/{name}": whole(t) for name, t in state.items()}
    return found


def checkpointer(root: Path, asynchronous: bool) -> Checkpointer:
    checkpoints = Checkpointer(root, "checkpoint", keep_last=0, asynchronous=asynchronous,
                               rank=dist.get_rank(), world_size=dist.get_world_size(),
                               device=torch.device("cpu"))
    checkpoints.open(writes=True)
    return checkpoints


def contents(model: torch.nn.Module, optimiser: torch.optim.Optimizer) -> Contents:
    """What a Trainer's checkpoint after epoch 1 holds (its own part: no RNG states here)."""
    world = dist.get_world_size()
    state = TrainingState(1, 0, 1, BATCH_SIZE, world, 0, 1)
    return Contents(model, {"optimiser": optimiser.state_dict()}, state,
                    {"rank": dist.get_rank()}, {"platform": "cpu"})


def settled(*folders: Path) -> None:
    """Delete the folders' contents (rank 0), flush every dirty page, and start together."""
    if dist.get_rank() == 0:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
    dist.barrier()
    os.sync()
    dist.barrier()


def slowest(action: Callable[[], Any]) -> float:
    """The slowest rank's seconds from a common barrier until ``action`` returned."""
    dist.barrier()
    started = time.perf_counter()
    action()
    seconds = torch.tensor(time.perf_counter() - started, dtype=torch.float64)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return seconds.item()


def take_turns(actions: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """A warm-up round, then ``repeats`` rounds of every action in turn."""
    times: dict[str, list[float]] = {name: [] for name in actions}
    for round_ in range(repeats + 1):
        for name, action in actions.items():
            seconds = action()
            if round_:
                times[name].append(seconds)
    return times


def bench_save(width: int, repeats: int, folder: Path) -> dict[str, Any]:
    model, optimiser = sharded(width)
    roots = {name: folder / key for name, key in (
        (DDPW_SAVE, "ddpw"), (DCP_SAVE, "dcp"), (DDPW_ASYNC, "ddpw-async"),
        (DCP_ASYNC, "dcp-async"))}
    for root in roots.values():
        root.mkdir(parents=True, exist_ok=True)
    sync_writer = checkpointer(roots[DDPW_SAVE], False)
    async_writer = checkpointer(roots[DDPW_ASYNC], True)

    def ddpw_save() -> float:
        settled(roots[DDPW_SAVE])
        return slowest(lambda: sync_writer.save(Position(1), contents(model, optimiser)))

    def dcp_state() -> dict[str, Any]:
        model_state, optimiser_state = get_state_dict(model, optimiser)
        return {"model": model_state, "optimiser": optimiser_state}

    def dcp_save() -> float:
        settled(roots[DCP_SAVE])
        return slowest(lambda: dcp.save(dcp_state(), checkpoint_id=roots[DCP_SAVE] / NAME))

    def ddpw_async() -> float:
        settled(roots[DDPW_ASYNC])
        blocked = slowest(lambda: async_writer.save(Position(1), contents(model, optimiser)))
        async_writer.wait()
        return blocked

    # A group of its own for the background save's collectives, as torch's documentation of
    # async_save advises (and ddpw's checkpointer has): on the default group they would mix
    # with the job's own, which deadlocked here.
    background = dist.new_group(backend="gloo")

    def dcp_async() -> float:
        settled(roots[DCP_ASYNC])
        future: list[Any] = []
        blocked = slowest(lambda: future.append(dcp.async_save(
            dcp_state(), checkpoint_id=roots[DCP_ASYNC] / NAME, process_group=background)))
        future[0].result()
        return blocked

    runs = take_turns({DDPW_SAVE: ddpw_save, DCP_SAVE: dcp_save, DDPW_ASYNC: ddpw_async,
                       DCP_ASYNC: dcp_async}, repeats)
    sync_writer.close()
    async_writer.close()
    state = gathered(model, optimiser)
    if dist.get_rank() == 0:
        torch.save(state, folder / SAVED)
    sizes = {name: sum(f.stat().st_size for f in (root / NAME).rglob("*") if f.is_file())
             for name, root in roots.items()}
    params = sum(t.numel() for k, t in state.items() if k.startswith("model/"))
    return {"runs": runs, "bytes": sizes, "params": params}


def bench_load(width: int, repeats: int, folder: Path) -> dict[str, Any]:
    reader = checkpointer(folder / "ddpw", False)
    saved = torch.load(folder / SAVED)
    held: list[Any] = []
    checked: dict[str, bool] = {}

    def fresh(name: str) -> None:
        """Before a variant's first load, a new model and optimiser (not the saved state)."""
        if name not in checked:
            held[:] = sharded(width)

    def compare(name: str) -> None:
        if name not in checked:
            now = gathered(*held)
            checked[name] = now.keys() == saved.keys() and all(
                torch.equal(now[k], saved[k]) for k in saved)

    def ddpw_load() -> float:
        fresh(DDPW_LOAD)
        settled()
        seconds = slowest(lambda: reader.restore(NAME, held[0], {"optimiser": held[1]},
                                                 BATCH_SIZE, 1))
        compare(DDPW_LOAD)
        return seconds

    def dcp_load() -> float:
        fresh(DCP_LOAD)
        settled()

        def load() -> None:
            model_state, optimiser_state = get_state_dict(*held)
            state = {"model": model_state, "optimiser": optimiser_state}
            dcp.load(state, checkpoint_id=folder / "dcp" / NAME)
            set_state_dict(*held, model_state_dict=state["model"],
                           optim_state_dict=state["optimiser"])

        seconds = slowest(load)
        compare(DCP_LOAD)
        return seconds

    runs = take_turns({DDPW_LOAD: ddpw_load, DCP_LOAD: dcp_load}, repeats)
    reader.close()
    return {"runs": runs, "equal_to_saved": checked}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("save", "load"), required=True)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    bench = bench_save if args.mode == "save" else bench_load
    found = bench(args.width, args.repeats, args.folder)
    if dist.get_rank() == 0:
        found |= {"world_size": dist.get_world_size()}
        args.out.write_text(json.dumps(found))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
