"""When things happen in a run of epochs, on 2 real processes: a scheduler steps once an epoch
or once an optimiser step (ArtefactsConfig.scheduler_interval), and a resume goes on with the
same schedule; the validation set is evaluated every n epochs (JobConfig.validate_every)."""

from __future__ import annotations

import json

import pytest
import torch
from jobs import Blobs, BlobTrainer, artefacts, final_files, job

from ddpw import ConfigError, JobConfig, JobPaused, Platform, PlatformConfig, Wrapper
from ddpw.artefacts import ArtefactsConfig

CPU2 = PlatformConfig(platform=Platform.CPU, n_procs=2, verbose=False)
LR, GAMMA = 1e-2, 0.5


def halving_every_2(optimiser: torch.optim.Optimizer):
    return torch.optim.lr_scheduler.StepLR(optimiser, step_size=2, gamma=GAMMA)


def logged_lrs(path) -> list[float]:
    return [json.loads(line)["lr"] for line in
            (path / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_an_epoch_scheduler_steps_once_an_epoch_by_default(tmp_path):
    a_config = artefacts(scheduler_loader=halving_every_2)
    assert a_config.scheduler_interval == "epoch"
    Wrapper(CPU2, a_config).start(BlobTrainer(job(tmp_path, epochs=5, save_every=0)))
    # The rate each epoch trained with: StepLR(step_size=2) halves it after epochs 2 and 4.
    # (The configs are checked in the caller; "lr" is logged in every epoch's metrics.)
    assert logged_lrs(tmp_path) == [LR, LR, LR * GAMMA, LR * GAMMA, LR * GAMMA**2]


def test_a_step_scheduler_steps_with_every_optimiser_step(tmp_path):
    # 150 samples, batches of 8 on 2 ranks: 10 optimiser steps an epoch, each counted once
    # per process as Accelerate counts them (20 an epoch), so the rate halves 10 times an
    # epoch; "lr" is the rate when the epoch's training ended.
    a_config = artefacts(scheduler_loader=halving_every_2, scheduler_interval="step")
    Wrapper(CPU2, a_config).start(BlobTrainer(job(tmp_path, epochs=2, save_every=0)))
    assert logged_lrs(tmp_path) == pytest.approx([LR * GAMMA**10, LR * GAMMA**20])


class PauseAfterEpoch3(BlobTrainer):
    def train_step(self, batch):
        if (self.epoch, self.batch) == (4, 3):
            self.request_pause()
        return super().train_step(batch)


def test_a_resumed_epoch_schedule_is_the_uninterrupted_one(tmp_path):
    a_config = artefacts(scheduler_loader=halving_every_2)
    whole = tmp_path / "whole"
    Wrapper(CPU2, a_config).start(BlobTrainer(job(whole, epochs=5, save_every=5)))
    parts = tmp_path / "parts"
    with pytest.raises(JobPaused):
        Wrapper(CPU2, a_config).start(PauseAfterEpoch3(job(parts, epochs=5, save_every=5)))
    Wrapper(CPU2, a_config).start(BlobTrainer(job(parts, start_at="latest", epochs=5,
                                                  save_every=5)))
    assert final_files(parts / "checkpoint" / "ckpt_5") == final_files(
        whole / "checkpoint" / "ckpt_5")
    assert logged_lrs(parts)[-1] == logged_lrs(whole)[-1] == LR * GAMMA**2


def test_an_unknown_interval_is_refused():
    with pytest.raises(ConfigError, match=r"ArtefactsConfig\.scheduler_interval='batch' is not "
                                          r"valid: one of 'epoch', 'step'"):
        ArtefactsConfig(scheduler_interval="batch")


def test_validation_every_2_epochs_and_after_the_last(tmp_path):
    a_config = artefacts(validation_set=Blobs(30, seed=2))
    Wrapper(CPU2, a_config).start(BlobTrainer(job(tmp_path, epochs=5, save_every=0,
                                                  validate_every=2)))
    logged = [json.loads(line) for line in
              (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in logged if "val_loss" in entry] == [2, 4, 5]


def test_a_validate_every_of_0_is_refused():
    with pytest.raises(ConfigError, match=r"JobConfig\.validate_every=0 is not valid: an "
                                          r"integer >= 1"):
        JobConfig(validate_every=0)
