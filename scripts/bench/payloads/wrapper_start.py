"""ddpw's ``Wrapper.start`` running :mod:`work`'s all-reduce (or plain function) on N CPU
processes, and checking what every rank returned.

    python wrapper_start.py --n-procs 2 [--work all-reduce|function]
        [--n-nodes 2 --node-rank R --master-port P]     (one of 2 machines, on 127.0.0.1)
"""

import time

STARTED = time.time()  # first, before any import

import argparse  # noqa: E402

from stamps import stamp  # noqa: E402

stamp("script", STARTED)

from ddpw import Platform, PlatformConfig, Wrapper  # noqa: E402


def main() -> None:
    # After ddpw: its import stamps "imports" in this process too (the rank, in a world of one).
    import work

    parser = argparse.ArgumentParser()
    parser.add_argument("--n-procs", type=int, default=2)
    parser.add_argument("--work", choices=("all-reduce", "function"), default="all-reduce")
    parser.add_argument("--n-nodes", type=int, default=1)
    parser.add_argument("--node-rank", type=int, default=None)
    parser.add_argument("--master-port", type=int, default=None)
    args = parser.parse_args()
    machines = ({"n_nodes": args.n_nodes, "node_rank": args.node_rank,
                 "master_addr": "127.0.0.1", "master_port": args.master_port}
                if args.n_nodes > 1 else {})
    p_config = PlatformConfig(platform=Platform.CPU, n_procs=args.n_procs, verbose=False,
                              **machines)
    job = work.all_reduce if args.work == "all-reduce" else work.total
    results = Wrapper(p_config).start(job)
    n = args.n_procs * args.n_nodes
    expected = [n * (n + 1) / 2] * n if args.work == "all-reduce" else [work.TOTAL] * n
    if results != expected:
        raise SystemExit(f"wrong results: {results}, expected {expected}")
    stamp("done")


if __name__ == "__main__":
    main()
