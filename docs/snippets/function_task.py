"""Run a plain function on every process: each rank counts the primes in its part of a range."""

import torch

from ddpw import Platform, PlatformConfig, Wrapper, world


def count_primes(limit: int) -> dict[str, int]:
    w = world()  # this process's place in the job
    mine = range(w.global_rank * limit // w.world_size, (w.global_rank + 1) * limit // w.world_size)
    found = sum(1 for n in mine if n > 1 and all(n % d for d in range(2, int(n**0.5) + 1)))
    total = w.accelerator.reduce(torch.tensor(found, device=w.device), reduction="sum")
    return {"rank": w.global_rank, "found": found, "total": int(total)}


if __name__ == "__main__":
    p_config = PlatformConfig(platform=Platform.CPU, n_procs=2)
    for result in Wrapper(p_config).start(count_primes, 10_000):  # one result per rank
        print(result)
