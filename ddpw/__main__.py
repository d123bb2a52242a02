"""``python -m ddpw``: the same as ``ddpw-launch``."""

from .cli import main

main(prog_name="ddpw-launch")
