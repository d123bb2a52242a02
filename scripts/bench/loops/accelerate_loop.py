"""The benchmarks' training loop written by hand with Accelerate: the baseline that ddpw's
Trainer is compared with. Run on every rank by ``accelerate launch``::

    ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 \\
        accelerate_loop.py --model mlp --size 256 --samples 4096 --epochs 4

What a careful user would write: the same seeding and seedable data order as ddpw, the loss
summed on the device and averaged across ranks once per epoch. ``--save DIR`` writes
``accelerator.save_state(DIR/epoch_{epochs})`` at the end; ``--resume DIR/epoch_{k}`` loads it
and trains epochs ``k + 1`` to ``--epochs``. Each rank writes its measurements to
``rank-{rank}.json`` (see :mod:`workload`).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from workload import (
    BATCH_SIZE,
    SEED,
    arguments,
    make_data,
    make_model,
    make_optimiser,
    note_first_step,
    report,
)


def main() -> None:
    args = arguments(__doc__)
    torch.set_num_threads(args.threads)  # as ddpw's workers do, before anything computes
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(
        use_seedable_sampler=True, data_seed=SEED))
    set_seed(SEED, device_specific=True)
    model = make_model(args.model, args.size)
    optimiser = make_optimiser(model)
    loader = DataLoader(make_data(args.model, args.samples), batch_size=BATCH_SIZE, shuffle=True)
    model, optimiser, loader = accelerator.prepare(model, optimiser, loader)
    rank = accelerator.process_index

    first_epoch, restore_s, restore_began = 1, None, 0.0
    if args.resume:
        restore_began, clock = time.time(), time.perf_counter()
        accelerator.load_state(args.resume)
        restore_s = time.perf_counter() - clock
        first_epoch = int(re.fullmatch(r"epoch_(\d+)", Path(args.resume).name).group(1)) + 1

    timed_from, started, mean = None, 0.0, float("nan")
    first_step_pending = bool(args.resume)
    for epoch in range(first_epoch, args.epochs + 1):
        if epoch == 2 and not args.resume:
            # Steady state only: start-up and the first epoch (allocations, DDP's buckets) are
            # left out, and the barrier starts every rank's clock together.
            accelerator.wait_for_everyone()
            timed_from, started = epoch, time.perf_counter()
        model.train()
        loader.set_epoch(epoch)
        total = torch.zeros((), device=accelerator.device)
        for inputs, labels in loader:
            loss = F.cross_entropy(model(inputs), labels)
            accelerator.backward(loss)
            optimiser.step()
            optimiser.zero_grad()
            total += loss.detach()
            if first_step_pending:
                note_first_step(rank, time.time())
                first_step_pending = False
        mean = accelerator.reduce(total / len(loader), reduction="mean").item()
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - started
    if args.save:
        accelerator.save_state(f"{args.save}/epoch_{args.epochs}")
    values = {"loss": mean}
    if timed_from is not None:
        values.update(seconds=seconds, samples=(args.epochs - timed_from + 1) * args.samples)
    if args.resume:
        values.update(restore_s=restore_s, restore_began=restore_began)
    report(rank, **values)
    accelerator.end_training()


if __name__ == "__main__":
    main()
