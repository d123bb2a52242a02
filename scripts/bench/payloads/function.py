"""The plain function of :mod:`work`, called directly in plain ``python``: the floor under every
wrapper in the original-ddpw benchmark's one-process case."""

import work

if __name__ == "__main__":
    if work.total() != work.TOTAL:
        raise SystemExit("wrong result")
