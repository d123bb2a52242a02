"""A slow rank is named while the job runs (ddpw.stragglers), on real processes."""

from __future__ import annotations

import json
import re
import socket
import time

import torch
from jobs import BlobTrainer, artefacts, job

from ddpw import Platform, PlatformConfig, Wrapper, stragglers

#: Batches an epoch on each of the 2 ranks (8 samples a batch).
BATCHES = 50


class StragglingTrainer(BlobTrainer):
    """Four even epochs (200 steps) of a few milliseconds of real computing on each rank, as
    noisy as the machine makes them; then rank 1 sleeps 0.15 s in each of epoch 5's first 25
    train steps; the rest of epoch 5 and epoch 6 are even again, and slow enough on both
    ranks for the watch to see the recovery."""

    def train_step(self, batch):
        if self.epoch < 5:
            x = torch.full((200, 200), 1 / 200)
            for _ in range(8):
                x = x @ x
        elif self.epoch == 5 and self.batch < 25:
            time.sleep(0.15 if self.global_rank == 1 else 0.002)
        else:
            time.sleep(0.03)
        return super().train_step(batch)


def test_a_slow_rank_is_named_once_with_its_phase_and_its_recovery_too(tmp_path, capfd):
    p_config = PlatformConfig(platform=Platform.CPU, n_procs=2, verbose=False)
    Wrapper(p_config, artefacts(n_train=2 * 8 * BATCHES)).start(
        StragglingTrainer(job(tmp_path, epochs=6, save_every=0)))
    err = capfd.readouterr().err
    # The job's report: its goodput record, with every rank's pace (ddpw.goodput).
    (record,) = tmp_path.glob("logs/goodput-*.json")
    report = json.loads(record.read_text())["attempts"][-1]["stragglers"]
    assert stragglers.line(report).startswith("[ddpw]   slow while it ran: rank 1 (")

    # Named once, with its host and the phase, within 20 steps of epoch 5; no false alarm
    # over the 200 even steps before (the beats of those steps were judged: about 1 a second).
    host = socket.gethostname()
    named = [line for line in err.splitlines() if "is slow" in line]
    assert len(named) == 1, err
    assert re.search(rf"\[ddpw\] rank 1 \({re.escape(host)}\) is slow: train_step takes "
                     r"[\d.]+x the median of the other 1 rank over its last \d+ steps "
                     r"\([\d.]+ ms against [\d.]+ ms a step\)", named[0]), named[0]
    slow, recovered = report["events"]
    assert (slow["event"], slow["rank"], slow["phase"]) == ("slow", 1, "train_step")
    # Steps counted as rank 1 timed them: epoch 1-4's first batches are not timed.
    assert 4 * (BATCHES - 1) < slow["step"] <= 4 * (BATCHES - 1) + 20, slow
    assert slow["ratio"] > 10 and slow["seconds"] > 0.15
    # Said once when it recovered, after the slow steps.
    assert (recovered["event"], recovered["rank"]) == ("recovered", 1)
    assert recovered["step"] > 4 * (BATCHES - 1) + 25
    assert len([line for line in err.splitlines() if "has recovered" in line]) == 1, err

    # The scores: rank 1 spent about 25 x 0.15 s more in train_step than rank 0, and rank 0
    # waited that long for it (outside its own phases).
    ranks = {r["rank"]: r for r in report["ranks"]}
    assert set(ranks) == {0, 1} and ranks[1]["host"] == host
    steps = ranks[1]["steps"]
    assert steps >= 5 * (BATCHES - 1)  # as of its last beat, up to a second before the end
    extra = (ranks[1]["seconds_per_step"]["train_step"]
             - ranks[0]["seconds_per_step"]["train_step"]) * steps
    assert 25 * 0.148 * 0.8 < extra < 25 * 0.15 * 1.5, extra
    waited = ranks[0]["seconds_per_step"]["waiting"] * steps
    assert waited > 25 * 0.148 * 0.6, ranks[0]
    assert ranks[1]["score"] > ranks[0]["score"]
