"""Run by tests/test_sharded_checkpoints.py under ``torch.distributed.run`` (gloo, CPU): restore
the checkpoints named, then, with ``--save``, train a few AdamW steps and save two checkpoints
(the first asynchronously, the second not), each time writing the whole (gathered) model and
optimiser state that the checkpoint holds or was restored into, for the test to compare.

    --strategy fsdp|plain  the model sharded with fully_shard (blocks, then the root) or whole
    --root ROOT            the checkpoints' folder; --out OUT: where the states are written
    --load NAME ...        restore each (into a fresh model and optimiser): OUT/loaded-NAME
                           (.safetensors, or .error with a ConfigError's text)
    --save PREFIX          then train and save PREFIX_1 and PREFIX_2: OUT/saved-PREFIX_k
    --refusals             (in a world of one) what a save says of other DTensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import Shard

from ddpw.checkpoint import Position
from ddpw.checkpoint.checkpointer import Checkpointer, Contents
from ddpw.checkpoint.state import TrainingState
from ddpw.errors import ConfigError
from ddpw.process import exit_now

BATCH = 4


class Net(nn.Module):
    """Blocks with 3 and 4 hidden rows (on 3 ranks, the 4 rows are 2, 2 and none), a 5-row
    embedding tied to the head, and a buffer."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(5, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, width), nn.Tanh(),
                                                  nn.Linear(width, 16)) for width in (3, 4))
        self.head = nn.Linear(16, 5, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 16) + seed)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) * self.scale
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def built(strategy: str, seed: int) -> tuple[Net, torch.optim.Optimizer]:
    model = Net(seed)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=0.05)


def gathered(model: Net, optimiser: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The whole model and optimiser state, every DTensor gathered (a collective)."""
    def whole(t: torch.Tensor) -> torch.Tensor:
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()

    found = {f"model/{k}": whole(t) for k, t in model.state_dict().items()}
    for number, state in optimiser.state_dict()["state"].items():
        found |= {f"optimiser/{number}/{name}": whole(t) for name, t in state.items()}
    return found


def dump(out: Path, name: str, tensors: dict[str, torch.Tensor]) -> None:
    if dist.get_rank() == 0:
        safetensors.torch.save_file(tensors, str(out / f"{name}.safetensors"))


def checkpointer(root: Path, prefix: str, asynchronous: bool) -> Checkpointer:
    checkpoints = Checkpointer(root, prefix, keep_last=0, asynchronous=asynchronous,
                               rank=dist.get_rank(), world_size=dist.get_world_size(),
                               device=torch.device("cpu"))
    checkpoints.open(writes=True)
    return checkpoints


def refusals(out: Path) -> None:
    """What a save says of DTensors placed otherwise than Shard(0) on a 1-D mesh: written to
    OUT/refusals.txt, one line each (in a world of one)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    from ddpw.checkpoint.slices import share

    flat, square = init_device_mesh("cpu", (1,)), init_device_mesh("cpu", (1, 1))
    said = []
    for key, tensor in (("replicated", distribute_tensor(torch.ones(3, 2), flat, [Replicate()])),
                        ("columns", distribute_tensor(torch.ones(3, 2), flat, [Shard(1)])),
                        ("square", distribute_tensor(torch.ones(3, 2), square,
                                                     [Shard(0), Shard(0)]))):
        try:
            share([("optimiser", key, tensor)], 0, 1)
        except TypeError as error:
            said.append(str(error))
    (out / "refusals.txt").write_text("\n".join(said) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=("fsdp", "plain"), required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--load", nargs="*", default=[])
    parser.add_argument("--save")
    parser.add_argument("--refusals", action="store_true")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    reader = checkpointer(args.root, "read", asynchronous=False)
    for name in args.load:
        model, optimiser = built(args.strategy, seed=99)
        try:
            reader.restore(name, model, {"optimiser": optimiser}, BATCH, 1)
        except ConfigError as error:
            if rank == 0:
                (args.out / f"loaded-{name}.error").write_text(str(error))
            continue
        dump(args.out, f"loaded-{name}", gathered(model, optimiser))
    if args.refusals:
        refusals(args.out)
    if args.save:
        model, optimiser = built(args.strategy, seed=1)
        writers = {1: checkpointer(args.root, args.save, asynchronous=True),
                   2: checkpointer(args.root, args.save, asynchronous=False)}
        # Whole models see the same data on every rank, so that they stay alike (as DDP's).
        torch.manual_seed(100 + (rank if args.strategy == "fsdp" else 0))
        for step in range(1, 5):
            ids = torch.randint(0, 5, (BATCH, 6))
            loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.roll(1).flatten())
            loss.backward()
            optimiser.step()
            optimiser.zero_grad()
            if step in (2, 4):
                k = step // 2
                state = TrainingState(k, 0, step, BATCH, world_size, 0, 1)
                contents = Contents(model, {"optimiser": optimiser.state_dict()}, state,
                                    {"rank": rank}, {"strategy": args.strategy})
                dump(args.out, f"saved-{args.save}_{k}", gathered(model, optimiser))
                # The asynchronous save writes from its host buffers while training goes on;
                # the second checkpointer, as a job's one, saves once it is done.
                writers[1].wait()
                writers[k].save(Position(k), contents)
        for writer in writers.values():
            writer.close()
    reader.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # As ddpw's own ranks end: finalising the interpreter after gloo collectives once aborted
    # a run of this script that had done all its work ("terminate called without an active
    # exception", SIGABRT; see exit_now).
    exit_now(0)
