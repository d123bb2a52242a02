"""The benchmarks' sharded training loop written by hand: FSDP2's ``fully_shard`` on the items of
the model's ``ModuleList`` and then on the root, the baseline that ddpw's Trainer with
``PlatformConfig(strategy="fsdp")`` is compared with. Run on every rank by ``accelerate
launch``, as the Accelerate loop is::

    ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 \\
        fsdp_loop.py --model blocks --size 2048 --samples 512 --epochs 3

What a careful user writes on CPUs, where Accelerate has no FSDP: the model sharded before the
optimiser is built on its shards, and kept out of Accelerate's ``prepare`` (which would wrap it
in DDP); Accelerate only shards the data, with the seedable sampler that ddpw uses, so the
data and its order are ddpw's. Each rank writes its measurements to ``rank-{rank}.json`` (see
:mod:`workload`).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader
from workload import BATCH_SIZE, SEED, arguments, make_data, make_model, make_optimiser, report


def main() -> None:
    args = arguments(__doc__)
    torch.set_num_threads(args.threads)  # as ddpw's workers do, before anything computes
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(
        use_seedable_sampler=True, data_seed=SEED))
    set_seed(SEED, device_specific=True)
    model = make_model(args.model, args.size)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimiser = make_optimiser(model)
    loader = accelerator.prepare(
        DataLoader(make_data(args.model, args.samples), batch_size=BATCH_SIZE, shuffle=True))

    started, mean = 0.0, float("nan")
    for epoch in range(1, args.epochs + 1):
        if epoch == 2:
            # Steady state only, every rank's clock starting together.
            dist.barrier()
            started = time.perf_counter()
        model.train()
        loader.set_epoch(epoch)
        total = torch.zeros(())
        for inputs, labels in loader:
            loss = F.cross_entropy(model(inputs), labels)
            loss.backward()
            optimiser.step()
            optimiser.zero_grad()
            total += loss.detach()
        mean = accelerator.reduce(total / len(loader), reduction="mean").item()
    dist.barrier()
    report(accelerator.process_index, loss=mean, seconds=time.perf_counter() - started,
           samples=(args.epochs - 1) * args.samples)
    accelerator.end_training()


if __name__ == "__main__":
    main()
