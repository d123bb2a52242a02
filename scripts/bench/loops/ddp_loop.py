"""The benchmarks' training loop written with raw ``torch.distributed``: DDP, a
``DistributedSampler`` and nothing else. Run on every rank by ``torchrun``::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 ddp_loop.py --model mlp ...

The floor under both Accelerate and ddpw. Its data order comes from ``DistributedSampler``, not
Accelerate's seedable sampler, so its loss is close to theirs but not equal. Each rank writes its
measurements to ``rank-{rank}.json`` (see :mod:`workload`).
"""

from __future__ import annotations

import random
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from workload import BATCH_SIZE, SEED, arguments, make_data, make_model, make_optimiser, report


def main() -> None:
    args = arguments(__doc__)
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    # Seeded as Accelerate's set_seed(device_specific=True) seeds: offset by the rank.
    random.seed(SEED + rank)
    np.random.seed(SEED + rank)
    torch.manual_seed(SEED + rank)
    model = DistributedDataParallel(make_model(args.model, args.size))
    optimiser = make_optimiser(model)
    data = make_data(args.model, args.samples)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=SEED)
    loader = DataLoader(data, batch_size=BATCH_SIZE, sampler=sampler)

    started, mean = 0.0, torch.zeros(())
    for epoch in range(1, args.epochs + 1):
        if epoch == 2:
            dist.barrier()  # steady state only, every rank's clock starting together
            started = time.perf_counter()
        model.train()
        sampler.set_epoch(epoch)
        total = torch.zeros(())
        for inputs, labels in loader:
            loss = F.cross_entropy(model(inputs), labels)
            loss.backward()
            optimiser.step()
            optimiser.zero_grad()
            total += loss.detach()
        mean = total / len(loader)
        dist.all_reduce(mean)
        mean /= world
    dist.barrier()
    seconds = time.perf_counter() - started
    report(rank, loss=mean.item(), seconds=seconds, samples=(args.epochs - 1) * args.samples)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
