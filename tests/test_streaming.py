"""Streaming data: an IterableDataset without ``__len__`` trains, pauses, resumes and evaluates
on real processes as map-style data does."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from accelerate.utils import InitProcessGroupKwargs
from jobs import (
    Blobs,
    BlobTrainer,
    InspectingTrainer,
    PausingTrainer,
    artefacts,
    final_files,
    job,
    step_lr,
)
from torch.utils.data import IterableDataset

from ddpw import JobMode, JobPaused, Platform, PlatformConfig, Wrapper
from ddpw import checkpoint as ckpt

CPU1 = PlatformConfig(platform=Platform.CPU, verbose=False)
CPU2 = PlatformConfig(platform=Platform.CPU, n_procs=2, verbose=False)
ACCUMULATE = {"gradient_accumulation_steps": 2}


class BlobStream(IterableDataset):
    """The samples of ``Blobs(n, seed)`` as a stream with no length, in an order shuffled by the
    epoch (``set_epoch``), as a streaming data set's shuffle buffer seeded by the epoch would."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True) -> None:
        self.blobs, self.shuffle, self.epoch = Blobs(n, seed), shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        n = len(self.blobs)
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(self.epoch))
                 if self.shuffle else torch.arange(n))
        for i in order.tolist():
            yield self.blobs[i]


class LopsidedStream(BlobStream):
    """A stream that would end early on every rank but the first, were those ranks to read it."""

    def __iter__(self):
        rank = dist.get_rank() if dist.is_initialized() else 0
        for i, sample in enumerate(super().__iter__()):
            if rank and i == len(self.blobs) // 3:
                return
            yield sample


def streams(n_train: int = 150, **overrides):
    """The artefacts of tests/jobs.py with both sets as streams (61 test samples, in order)."""
    return artefacts(train_set=BlobStream(n_train), test_set=BlobStream(61, seed=1,
                                                                          shuffle=False),
                     **overrides)


class ImpatientTrainer(InspectingTrainer):
    """Gives up on a stuck collective after two minutes, so that a hang fails the test."""

    def accelerator_kwargs(self, p_config):
        handler = InitProcessGroupKwargs(timeout=timedelta(minutes=2))
        return {**super().accelerator_kwargs(p_config), "kwargs_handlers": [handler]}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Three epochs of a stream on 2 processes without a stop: what the first test reads, and
    the reference (its metrics, its last checkpoint) for the resumes."""
    path = tmp_path_factory.mktemp("uninterrupted")
    result = Wrapper(CPU2, streams(scheduler_loader=step_lr)).start(
        InspectingTrainer(job(path, epochs=3, save_every=3, **ACCUMULATE)))
    inspected = ("params", "seen", "seen_order", "distributed_type")  # InspectingTrainer's
    metrics = {k: v for k, v in result.items() if k not in inspected}
    return metrics, final_files(path / "checkpoint" / "ckpt_3"), result, path


def test_a_stream_without_length_trains_on_two_processes_that_end_each_epoch_together(
        uninterrupted, no_leftover_processes):
    assert not hasattr(BlobStream(4), "__len__")
    _, _, result, path = uninterrupted
    assert torch.equal(*result["params"]), "ranks ended with different parameters"
    # 150 samples a epoch in global batches of 16: 9 whole ones and 6 samples, 3 on each rank.
    seen = result["seen"][0] + result["seen"][1]
    assert sorted(seen) == sorted(list(range(150)) * 3)
    # Each global batch is 16 consecutive samples of the stream, the first 8 on rank 0, and
    # the stream was told each epoch (set_epoch) before it was read.
    for epoch, first in ((1, 0), (2, 75), (3, 150)):
        order = torch.randperm(150, generator=torch.Generator().manual_seed(epoch)).tolist()
        assert result["seen_order"][first:first + 16] == order[:8] + order[16:24]
    assert ckpt.available(path / "checkpoint", "ckpt") == ["ckpt_3"]


def test_a_stream_that_one_rank_would_see_end_early_never_leaves_a_rank_waiting(tmp_path):
    # Rank 0 alone reads the stream and deals every global batch out, the end included: the
    # ranks stop together whatever the other ranks' copies of the stream would do.
    a_config = artefacts(train_set=LopsidedStream(150))
    result = Wrapper(CPU2, a_config).start(ImpatientTrainer(job(tmp_path, epochs=1)))
    assert sorted(result["seen"][0] + result["seen"][1]) == list(range(150))


def test_the_progress_bar_of_a_stream_counts_batches_without_a_total(tmp_path, capfd):
    loud = PlatformConfig(platform=Platform.CPU, verbose=True)
    Wrapper(loud, streams(n_train=48)).start(BlobTrainer(job(tmp_path, epochs=1)))
    _, err = capfd.readouterr()
    assert "epoch 1/1: 0batch [" in err and "/6 [" not in err, err  # not "0%| 0/6 ["


def _pause_and_resume(path: Path, at: tuple[int, int]) -> tuple[str, dict]:
    with pytest.raises(JobPaused) as paused:
        Wrapper(CPU2, streams(scheduler_loader=step_lr)).start(
            PausingTrainer(job(path, epochs=3, save_every=3, **ACCUMULATE), at=at))
    resumed = Wrapper(CPU2, streams(scheduler_loader=step_lr)).start(
        BlobTrainer(job(path, mode=JobMode.RESUME, start_at="latest", epochs=3, save_every=3,
                        **ACCUMULATE)))
    return Path(paused.value.checkpoint).name, resumed


def test_a_stream_paused_mid_epoch_skips_the_batches_done_and_resumes_bitwise(
        tmp_path, uninterrupted):
    # Asked during batch 4 of epoch 2: the flags travel during the next optimiser step (2
    # batches), and the ranks stop after batch 6, that is 6 x 16 samples into the stream.
    paused_at, resumed = _pause_and_resume(tmp_path, at=(2, 3))
    assert paused_at == "ckpt_1_batch6"
    assert resumed == uninterrupted[0]
    assert final_files(tmp_path / "checkpoint" / "ckpt_3") == uninterrupted[1]


def test_a_pause_at_the_end_of_a_stream_is_taken_at_the_epoch_boundary(tmp_path, uninterrupted):
    # Asked during batch 8 of the 10 of epoch 1 (a stream does not say that it has 10): the
    # step that would answer it ends the stream, so the epoch ends first and the job pauses
    # with the epoch's checkpoint.
    paused_at, resumed = _pause_and_resume(tmp_path, at=(1, 7))
    assert paused_at == "ckpt_1"
    assert resumed == uninterrupted[0]
    assert final_files(tmp_path / "checkpoint" / "ckpt_3") == uninterrupted[1]


def test_a_stream_resumes_on_another_world_size_with_the_samples_that_remain(tmp_path):
    with pytest.raises(JobPaused):
        Wrapper(CPU2, streams()).start(PausingTrainer(job(tmp_path, epochs=2), at=(2, 2)))
    paused_at = ckpt.latest(tmp_path / "checkpoint", "ckpt")
    assert paused_at == "ckpt_1_batch4"  # 4 x 16 samples of epoch 2 done
    straight = Wrapper(CPU1, streams(batch_size=16)).start(
        InspectingTrainer(job(tmp_path / "straight", epochs=2, save_every=0)))
    resumed = Wrapper(CPU1, streams(batch_size=16)).start(
        InspectingTrainer(job(tmp_path, start_at=paused_at, epochs=2, save_every=0)))
    assert resumed["seen_order"] == straight["seen_order"][150 + 64:]
    # A stream shorter than the samples already done: the resumed epoch is over at once.
    short = Wrapper(CPU2, streams(n_train=64)).start(
        InspectingTrainer(job(tmp_path, start_at=paused_at, epochs=2, save_every=0)))
    assert short["epoch"] == 2 and short["seen_order"] == []


def test_evaluating_a_stream_gives_the_same_numbers_on_one_and_two_processes(tmp_path):
    # 61 samples: 3 global batches of 16 and 13 samples, which 2 ranks share 7 and 6, the
    # 7th a repeat that must not count.
    Wrapper(CPU1, artefacts()).start(BlobTrainer(job(tmp_path, epochs=1, save_every=1)))
    evaluate = job(tmp_path, mode=JobMode.EVALUATE, start_at=1)
    on_two = Wrapper(CPU2, streams()).start(BlobTrainer(evaluate))
    on_one = Wrapper(CPU1, streams()).start(BlobTrainer(evaluate))
    map_style = Wrapper(CPU2, artefacts()).start(BlobTrainer(evaluate))
    assert on_two == on_one == map_style
    assert on_two["accuracy"] * 61 == pytest.approx(round(on_two["accuracy"] * 61))
