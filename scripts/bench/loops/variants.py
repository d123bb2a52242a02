"""How the benchmark rows start each variant's loop: the commands, and reading back what the
ranks measured.

Every variant gets 2 CPU processes of one compute thread each, as ddpw itself arranges them
(``OMP_NUM_THREADS`` and ``torch.set_num_threads``), so that only the loop differs: ddpw through
``Wrapper.start``, the Accelerate loop and the sharded loop by hand through ``accelerate launch``
with the flags that ddpw's own launch passes, and the DDP loop through ``torchrun``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .workload import PROCESSES

LOOPS = Path(__file__).resolve().parent
#: Compute threads per process: one each, so that 2 processes fit 2 cores without contention.
THREADS = 1

Command = tuple[list[str], dict[str, str]]


def ddpw(args: list[str]) -> Command:
    """``loops/ddpw_loop.py``: ddpw chooses the environment of its workers itself."""
    return [sys.executable, str(LOOPS / "ddpw_loop.py"), "--threads", str(THREADS), *args], {}


def accelerate(args: list[str], dynamo_backend: str = "no",
               script: str = "accelerate_loop.py") -> Command:
    """``loops/accelerate_loop.py`` (or another loop ``script`` of this folder) under
    ``accelerate launch``, a gloo world on the CPU."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", str(PROCESSES), "--num_machines", "1", "--machine_rank", "0",
               "--mixed_precision", "no", "--dynamo_backend", dynamo_backend,
               "--main_process_port", "0",
               str(LOOPS / script), "--threads", str(THREADS), *args]
    return command, {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": str(THREADS)}


def torch_ddp(args: list[str]) -> Command:
    """``loops/ddp_loop.py`` under ``torchrun --standalone``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(PROCESSES), str(LOOPS / "ddp_loop.py"), "--threads", str(THREADS), *args]
    return command, {"OMP_NUM_THREADS": str(THREADS)}


def reports(folder: str | Path) -> dict[int, dict[str, Any]]:
    """What each rank wrote to ``folder`` (``rank-{r}.json``), by rank."""
    found = (json.loads(p.read_text()) for p in Path(folder).glob("rank-*.json"))
    return {r["rank"]: r for r in found}
