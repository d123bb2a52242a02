"""One all-reduce with torch.distributed alone (gloo), for ``torchrun``: the floor under every
launcher in the launch benchmark.

    torchrun --standalone --nproc_per_node 2 torch_allreduce.py --world 2
"""

import time

STARTED = time.time()  # first, before any import

import argparse  # noqa: E402

from stamps import stamp  # noqa: E402

stamp("script", STARTED)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

stamp("imports")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", type=int, required=True, help="the expected world size")
    args = parser.parse_args()
    dist.init_process_group("gloo")  # torchrun's variables: env:// rendezvous
    stamp("rendezvous")
    rank, n = dist.get_rank(), dist.get_world_size()
    summed = torch.tensor([rank + 1.0])
    dist.all_reduce(summed)
    stamp("allreduce")
    if n != args.world or float(summed) != n * (n + 1) / 2:
        raise SystemExit(f"rank {rank}: world of {n}, sum {float(summed)}; expected a world "
                         f"of {args.world}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
