"""When things happen in a run of epochs, on 2 real processes: a scheduler steps once an epoch
or once an optimiser step (ArtefactsConfig.scheduler_interval), and a resume goes on with the
same schedule; the validation set is evaluated every n epochs (JobConfig.validate_every)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from jobs import Blobs, BlobTrainer, PausingTrainer, artefacts, final_files, job

from ddpw import ConfigError, JobConfig, JobPaused, Platform, PlatformConfig, Wrapper
from ddpw.artefacts import ArtefactsConfig

CPU2 = PlatformConfig(platform=Platform.CPU, n_procs=2, verbose=False)
LR, GAMMA = 1e-2, 0.5


def halving_every_2(optimiser: torch.optim.Optimizer):
    return torch.optim.lr_scheduler.StepLR(optimiser, step_size=2, gamma=GAMMA)


def logged_lrs(path) -> list[float]:
    return [json.loads(line)["lr"] for line in
            (path / "logs" / "metrics.jsonl").read_text().splitlines()]


def five_epochs() -> ArtefactsConfig:
    return artefacts(scheduler_loader=halving_every_2, validation_set=Blobs(30, seed=2))


def five_epochs_job(path, **kw) -> JobConfig:
    return job(path, epochs=5, save_every=5, validate_every=2, **kw)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """Five epochs without a stop, with an epoch scheduler and validation every 2 epochs: the
    schedule that the tests below read, and the reference for the resume."""
    path = tmp_path_factory.mktemp("whole")
    Wrapper(CPU2, five_epochs()).start(BlobTrainer(five_epochs_job(path)))
    return path


def test_an_epoch_scheduler_steps_once_an_epoch_by_default(whole):
    assert five_epochs().scheduler_interval == "epoch"
    # The rate each epoch trained with: StepLR(step_size=2) halves it after epochs 2 and 4.
    # (The configs are checked in the caller; "lr" is logged in every epoch's metrics.)
    assert logged_lrs(whole) == [LR, LR, LR * GAMMA, LR * GAMMA, LR * GAMMA**2]


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


def test_a_resumed_epoch_schedule_is_the_uninterrupted_one(tmp_path, whole):
    a_config = five_epochs()
    with pytest.raises(JobPaused):
        Wrapper(CPU2, a_config).start(PauseAfterEpoch3(five_epochs_job(tmp_path)))
    Wrapper(CPU2, a_config).start(BlobTrainer(five_epochs_job(tmp_path, start_at="latest")))
    assert final_files(tmp_path / "checkpoint" / "ckpt_5") == final_files(
        whole / "checkpoint" / "ckpt_5")
    assert logged_lrs(tmp_path)[-1] == logged_lrs(whole)[-1] == LR * GAMMA**2


def test_an_unknown_interval_is_refused():
    with pytest.raises(ConfigError, match=r"ArtefactsConfig\.scheduler_interval='batch' is not "
                                          r"valid: one of 'epoch', 'step'"):
        ArtefactsConfig(scheduler_interval="batch")


def test_validation_every_2_epochs_and_after_the_last(whole):
    logged = [json.loads(line) for line in
              (whole / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in logged if "val_loss" in entry] == [2, 4, 5]


def test_a_validate_every_of_0_is_refused():
    with pytest.raises(ConfigError, match=r"JobConfig\.validate_every=0 is not valid: an "
                                          r"integer >= 1"):
        JobConfig(validate_every=0)


class LossNotingTrainer(PausingTrainer):
    """Notes each training batch's loss and accuracy, by epoch, in
    ``{training_logs_path}/batches-{rank}-of-{world_size}.txt``."""

    def train_step(self, batch):
        values = super().train_step(batch)
        folder = Path(self.j_config.training_logs_path)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"batches-{self.global_rank}-of-{self.world_size}.txt", "a") as f:
            f.write(f"{self.epoch} {values['loss'].item()!r} {values['accuracy'].item()!r}\n")
        return values


def one_cycle(optimiser: torch.optim.Optimizer):
    return torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=LR, total_steps=100)


def test_an_epoch_resumed_mid_way_at_another_world_size_averages_all_its_batches(
        tmp_path, capfd, recwarn):
    """Paused on 2 ranks in the middle of epoch 2, resumed on another number: epoch 2's
    metrics (what monitor='loss', keep_best and early stopping judge) average the batches
    before the pause too, not only those after. (And a OneCycleLR stepped once an epoch is
    warned about, once a job.)"""
    a_config = artefacts(scheduler_loader=one_cycle)
    j_config = job(tmp_path, epochs=2, save_every=0, monitor="loss")
    with pytest.raises(JobPaused):
        Wrapper(CPU2, a_config).start(LossNotingTrainer(j_config, at=(2, 5)))
    cpu1 = PlatformConfig(platform=Platform.CPU, n_procs=1, verbose=False)
    Wrapper(cpu1, a_config).start(LossNotingTrainer(
        job(tmp_path, start_at="latest", epochs=2, save_every=0, monitor="loss"), at=(0, 0)))
    # Warned by the main rank of the 2, and by the world of 1, which runs in this process
    # (where pytest records its warnings).
    said = "scheduler_interval='epoch' steps this OneCycleLR once an epoch"
    assert len([line for line in capfd.readouterr().err.splitlines() if said in line]) == 1
    assert len([w for w in recwarn if said in str(w.message)]) == 1
    batches = [line.split() for path in (tmp_path / "logs").glob("batches-*.txt")
               for line in path.read_text().splitlines()]
    epoch_2 = [(float(loss), float(accuracy)) for epoch, loss, accuracy in batches
               if epoch == "2"]
    # 150 samples in batches of 8: 10 batches a rank on 2 ranks, 19 on 1; paused after 6.
    assert len(epoch_2) == 2 * 6 + 7
    logged = [json.loads(line) for line in
              (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in logged] == [1, 2]
    assert logged[1]["loss"] == pytest.approx(sum(v for v, _ in epoch_2) / len(epoch_2))
    assert logged[1]["accuracy"] == pytest.approx(sum(a for _, a in epoch_2) / len(epoch_2))


def rising_plateau(optimiser: torch.optim.Optimizer):
    """Halves the rate after each epoch whose metric did not rise (every one but the first,
    as the loss falls)."""
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimiser, mode="max", factor=GAMMA,
                                                      patience=0)


def test_reduce_lr_on_plateau_steps_on_the_validation_loss_of_each_validated_epoch(tmp_path):
    a_config = artefacts(scheduler_loader=rising_plateau, validation_set=Blobs(30, seed=2))
    # Paused in epoch 3 and resumed: its state (the best value so far) is in the checkpoint.
    with pytest.raises(JobPaused):
        Wrapper(CPU2, a_config).start(PausingTrainer(
            job(tmp_path, epochs=5, save_every=0, validate_every=2), at=(3, 2)))
    Wrapper(CPU2, a_config).start(BlobTrainer(job(tmp_path, start_at="latest", epochs=5,
                                                  save_every=0, validate_every=2)))
    logged = [json.loads(line) for line in
              (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    # The same scheduler, stepped on val_loss after the epochs validated (2, 4 and 5) only.
    replay = rising_plateau(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR))
    expected = []
    for entry in logged:
        expected.append(replay.optimizer.param_groups[0]["lr"])
        if "val_loss" in entry:
            replay.step(entry["val_loss"])
    assert [entry["epoch"] for entry in logged] == [1, 2, 3, 4, 5]
    assert [entry["lr"] for entry in logged] == expected
    assert expected[-1] < expected[0]  # it did reduce the rate


def test_reduce_lr_on_plateau_at_every_step_is_refused(tmp_path):
    a_config = artefacts(scheduler_loader=rising_plateau, scheduler_interval="step")
    with pytest.raises(ConfigError, match=r"ArtefactsConfig\.scheduler_interval='step' is not "
                                          r"valid for a ReduceLROnPlateau: it steps on an "
                                          r"epoch's metric; use 'epoch'\.$"):
        Wrapper(CPU2, a_config).start(BlobTrainer(job(tmp_path, epochs=1, save_every=0)))
