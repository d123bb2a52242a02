"""One rank of a 2-rank NCCL world on one GPU, for tests/test_gpu.py: ``python gpu_rank.py
FOLDER STEP``, with the process-group variables set by the test and ``NCCL_HOSTID`` telling
NCCL that each rank is a host of its own.

It runs ddpw in place (the variables say that this process is one rank of a launch) with
``Platform.GPU, n_gpus=1``, as one task of a 2-node SLURM job with a GPU each would. ``STEP``
is ``straight`` (train 2 epochs), ``pause`` (rank 1 asks for a pause in epoch 2) or ``resume``
(from the latest checkpoint, to the end). The rank's result, or the checkpoint it paused at,
goes to ``FOLDER/STEP-rank-R.pkl``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import cloudpickle

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for jobs

from jobs import PausingProbeTrainer, ProbeNet, ProbeTrainer, artefacts, job

from ddpw import JobPaused, Platform, PlatformConfig, Wrapper


def main(folder: Path, step: str) -> None:
    p_config = PlatformConfig(platform=Platform.GPU, n_gpus=1, verbose=False)
    where = folder / ("straight" if step == "straight" else "paused")
    if step == "straight":
        trainer = ProbeTrainer(job(where, epochs=2, save_every=2))
    elif step == "pause":
        trainer = PausingProbeTrainer(job(where, epochs=2, save_every=2), at=(2, 3), rank=1)
    else:
        trainer = ProbeTrainer(job(where, start_at="latest", epochs=2, save_every=2))
    try:
        outcome = Wrapper(p_config, artefacts(model=ProbeNet())).start(trainer)
    except JobPaused as paused:
        outcome = {"paused": paused.checkpoint}
    rank = os.environ["RANK"]
    (folder / f"{step}-rank-{rank}.pkl").write_bytes(cloudpickle.dumps(outcome))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
