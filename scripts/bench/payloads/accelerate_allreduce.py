"""A plain Accelerate script that does one all-reduce and exits: what ``accelerate launch``,
``ddpw-launch`` and plain ``python`` run in the launch benchmark.

    accelerate launch --multi_gpu --num_processes 2 accelerate_allreduce.py --world 2

Every rank contributes ``rank + 1``; the sum is checked, and so is the world's size (a launch
that silently gives one process must fail, not look fast).
"""

import time

STARTED = time.time()  # first, before any import

import argparse  # noqa: E402

from stamps import stamp  # noqa: E402

stamp("script", STARTED)

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402

stamp("imports")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", type=int, required=True, help="the expected world size")
    args = parser.parse_args()
    accelerator = Accelerator()  # on several processes, this joins the process group
    stamp("rendezvous")
    rank, n = accelerator.process_index, accelerator.num_processes
    summed = accelerator.reduce(torch.tensor([rank + 1.0], device=accelerator.device),
                                reduction="sum")
    stamp("allreduce")
    if n != args.world or float(summed) != n * (n + 1) / 2:
        raise SystemExit(f"rank {rank}: world of {n}, sum {float(summed)}; expected a world "
                         f"of {args.world}")
    accelerator.end_training()  # leaves the process group, as a finished script should


if __name__ == "__main__":
    main()
