"""ddpw's ``Wrapper.start`` running :mod:`work`'s all-reduce (or plain function) on N CPU
processes, and checking what every rank returned.

    python wrapper_start.py --n-procs 2 [--work all-reduce|function]
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
    args = parser.parse_args()
    p_config = PlatformConfig(platform=Platform.CPU, n_procs=args.n_procs, verbose=False)
    job = work.all_reduce if args.work == "all-reduce" else work.total
    results = Wrapper(p_config).start(job)
    n = args.n_procs
    expected = [n * (n + 1) / 2] * n if args.work == "all-reduce" else [work.TOTAL] * n
    if results != expected:
        raise SystemExit(f"wrong results: {results}, expected {expected}")
    stamp("done")


if __name__ == "__main__":
    main()
