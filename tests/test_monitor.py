"""JobConfig.monitor: the best-k checkpoints, start_at="best" and early stopping, on 2 real
processes, paused and resumed."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from jobs import Blobs, BlobTrainer, artefacts, final_files, job

from ddpw import ConfigError, JobConfig, JobMode, JobPaused, Platform, PlatformConfig, Wrapper
from ddpw import checkpoint as ckpt
from ddpw.monitor import Monitor, best
from ddpw.resume import choose

CPU2 = PlatformConfig(platform=Platform.CPU, n_procs=2, verbose=False)
#: val_score after each epoch: not monotonic, so that the best are not simply the latest.
SCORES = [0.3, 0.1, 0.4, 0.15, 0.5, 0.9, 0.2, 0.8, 0.7, 0.6]


class ScoringTrainer(BlobTrainer):
    """Validates to scores[epoch - 1] as ``val_score``, beside the real loss and accuracy."""

    scores = SCORES

    def evaluate_step(self, batch):
        out = super().evaluate_step(batch)
        return {**out, "score": torch.full_like(out["loss"], self.scores[self.epoch - 1])}


class LowScoringTrainer(ScoringTrainer):
    scores = [0.01, 0.02, 0.03]


class PausingScoringTrainer(ScoringTrainer):
    def train_step(self, batch):
        if (self.epoch, self.batch) == (4, 3) and self.global_rank == 1:
            self.request_pause()
        return super().train_step(batch)


def a_config():
    return artefacts(validation_set=Blobs(30, seed=2))


def on_disk(folder) -> list[str]:
    return ckpt.available(folder / "checkpoint", "ckpt")


def logged(folder) -> list[dict]:
    return [json.loads(line) for line in
            (folder / "logs" / "metrics.jsonl").read_text().splitlines()]


def best_k_job(folder, mode: str = "max", **kw):
    return job(folder, save_every=1, keep_last=1, keep_best=2, monitor="val_score",
               monitor_mode=mode, **kw)


@pytest.fixture(scope="module")
def six_epochs_max(tmp_path_factory):
    """One 6-epoch run that keeps the best 2 by max val_score, which tests read (or copy)."""
    folder = tmp_path_factory.mktemp("six_epochs_max")
    Wrapper(CPU2, a_config()).start(ScoringTrainer(best_k_job(folder, epochs=6)))
    return folder


@pytest.mark.parametrize("mode", ["min", "max"])
def test_the_kept_checkpoints_are_the_best_k_and_the_latest(tmp_path, six_epochs_max, mode):
    # max: the module's run, copied; min: a run of its own, since pruning happens as it trains.
    if mode == "max":
        shutil.copytree(six_epochs_max, tmp_path, dirs_exist_ok=True)
    else:
        Wrapper(CPU2, a_config()).start(ScoringTrainer(best_k_job(tmp_path, mode, epochs=6)))
    scores = {e["epoch"]: e["val_score"] for e in logged(tmp_path)}
    assert list(scores.values()) == pytest.approx(SCORES[:6])
    ranked = sorted(scores, key=lambda epoch: scores[epoch], reverse=mode == "max")
    expected = {f"ckpt_{epoch}" for epoch in ranked[:2]} | {"ckpt_6"}
    assert set(on_disk(tmp_path)) == expected == (
        {"ckpt_2", "ckpt_4", "ckpt_6"} if mode == "min" else {"ckpt_5", "ckpt_6"})
    j_config = job(tmp_path, JobMode.EVALUATE, start_at="best", monitor="val_score",
                   monitor_mode=mode)
    assert choose(j_config, a_config(), 2) == f"ckpt_{ranked[0]}"
    if mode == "max":  # evaluating the chosen best is the same job in either mode
        metrics = Wrapper(CPU2, a_config()).start(ScoringTrainer(j_config))
        assert set(metrics) == {"loss", "accuracy", "score"}


def test_an_earlier_runs_checkpoints_take_no_place_among_the_best(tmp_path, six_epochs_max):
    shutil.copytree(six_epochs_max, tmp_path, dirs_exist_ok=True)
    assert on_disk(tmp_path) == ["ckpt_5", "ckpt_6"]  # 0.5 and 0.9, the best
    # From scratch in the same folder: its own best 2 stay, and the earlier run's go the way
    # of every checkpoint that keep_last prunes.
    Wrapper(CPU2, a_config()).start(LowScoringTrainer(best_k_job(tmp_path, epochs=3)))
    assert on_disk(tmp_path) == ["ckpt_2", "ckpt_3"]
    assert choose(best_k_job(tmp_path, epochs=3, start_at="best"), a_config(), 2) == "ckpt_3"


def test_a_nan_epoch_is_no_candidate_for_the_best():
    monitor = Monitor("val_score", "min", patience=0)
    for epoch, value in ((1, 0.5), (2, float("nan")), (3, 0.4)):
        monitor.saved(f"ckpt_{epoch}", {"val_score": value})
        monitor.judge(epoch, {"val_score": value}, validated=True)
    assert best(monitor.values, "ckpt", "min", 1) == ["ckpt_3"]
    assert best(monitor.values, "ckpt", "min", 3) == ["ckpt_3", "ckpt_1"]
    assert (monitor.best, monitor.best_epoch, monitor.waited) == (0.4, 3, 0)


def test_a_new_mode_starts_the_count_afresh():
    before = Monitor("val_loss", "min", patience=2)
    before.judge(1, {"val_loss": 0.3}, validated=True)
    before.judge(2, {"val_loss": 0.4}, validated=True)
    after = Monitor("val_loss", "max", patience=2)
    after.load(before.state())
    assert (after.best, after.waited) == (None, 0)
    same = Monitor("val_loss", "min", patience=2)
    same.load(before.state())
    assert (same.best, same.best_epoch, same.waited) == (0.3, 1, 1)


def test_the_best_by_the_real_validation_loss_survive_keep_last(tmp_path):
    Wrapper(CPU2, a_config()).start(BlobTrainer(job(
        tmp_path, epochs=6, save_every=1, keep_last=2, keep_best=2, monitor="val_loss",
        monitor_mode="max")))
    losses = {e["epoch"]: e["val_loss"] for e in logged(tmp_path)}
    worst = sorted(losses, key=lambda epoch: -losses[epoch])[:2]
    assert set(on_disk(tmp_path)) == {f"ckpt_{e}" for e in (*worst, 5, 6)}


def test_early_stopping_fires_after_the_patience_and_a_resume_stops_there_too(tmp_path):
    # Judged: epoch 2 (0.1) is the best; 3 (0.4) and 4 (0.15) do not improve: stop after 4.
    def j_config(folder, **kw):
        return job(folder, epochs=10, save_every=3, monitor="val_score",
                   early_stopping_patience=2, **kw)

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    metrics = Wrapper(CPU2, a_config()).start(ScoringTrainer(j_config(whole)))
    assert metrics["epoch"] == 4 and [e["epoch"] for e in logged(whole)] == [1, 2, 3, 4]
    assert on_disk(whole) == ["ckpt_3", "ckpt_4"]  # epoch 4, the last, is saved
    state = json.loads((whole / "checkpoint" / "ckpt_4" / "state.json").read_text())
    assert state["monitor"] == {"metric": "val_score", "mode": "min",
                                "best": pytest.approx(0.1), "best_epoch": 2, "waited": 2}

    # Paused in epoch 4: the pause's checkpoint knows that epoch 3 did not improve.
    with pytest.raises(JobPaused):
        Wrapper(CPU2, a_config()).start(PausingScoringTrainer(j_config(parts)))
    metrics = Wrapper(CPU2, a_config()).start(ScoringTrainer(j_config(parts,
                                                                      start_at="latest")))
    assert metrics["epoch"] == 4 and [e["epoch"] for e in logged(parts)] == [1, 2, 3, 4]
    assert final_files(parts / "checkpoint" / "ckpt_4") == final_files(
        whole / "checkpoint" / "ckpt_4")

    # Resumed from where it stopped: nothing more to train.
    again = Wrapper(CPU2, a_config()).start(ScoringTrainer(j_config(whole,
                                                                    start_at="latest")))
    assert again["epoch"] == 4 and len(logged(whole)) == 4


def test_epochs_that_do_not_validate_are_not_judged(tmp_path):
    # Validated after 2, 4, 6, ...: 0.1, 0.15 (waits 1), 0.9 (waits 2): stop after epoch 6.
    metrics = Wrapper(CPU2, a_config()).start(ScoringTrainer(job(
        tmp_path, epochs=10, save_every=0, validate_every=2, monitor="val_score",
        early_stopping_patience=2)))
    assert metrics["epoch"] == 6


def test_an_unknown_metric_is_refused_at_the_first_validation_once_the_epoch_is_saved(
        tmp_path):
    with pytest.raises(ConfigError, match=r"^JobConfig\.monitor='val_acc' is not among epoch 2's "
                                          r"metrics: accuracy, epoch, loss, lr, val_accuracy, "
                                          r"val_loss\. Monitor one of these; the epoch is saved "
                                          r"in .*ckpt_2: resume from it with "
                                          r"start_at='latest'\.$"):
        Wrapper(CPU2, a_config()).start(BlobTrainer(job(
            tmp_path, epochs=3, save_every=0, validate_every=2, monitor="val_acc")))
    assert [e["epoch"] for e in logged(tmp_path)] == [1, 2]
    # Nothing is lost: epoch 2 is saved (save_every=0 notwithstanding), and is what resumes.
    assert on_disk(tmp_path) == ["ckpt_2"]
    assert choose(job(tmp_path, start_at="latest", epochs=3, monitor="val_loss"), a_config(),
                  2) == "ckpt_2"


def test_a_validation_metric_without_a_validation_set_is_refused_before_launch(tmp_path):
    with pytest.raises(ConfigError, match=r"JobConfig\.monitor='val_loss' is a validation "
                                          r"metric, and ArtefactsConfig\.validation_set=None"):
        Wrapper(CPU2, artefacts()).start(BlobTrainer(job(tmp_path, monitor="val_loss")))


@pytest.mark.parametrize("fields, message", [
    ({"keep_best": 2}, r"JobConfig\.keep_best=2 needs JobConfig\.monitor"),
    ({"early_stopping_patience": 3}, r"JobConfig\.early_stopping_patience=3 needs "
                                     r"JobConfig\.monitor"),
    ({"start_at": "best"}, r"JobConfig\.start_at='best' needs JobConfig\.monitor"),
    ({"monitor": "val_loss", "keep_best": 2}, r"JobConfig\.keep_last=0 is not valid: at least "
                                              r"1 with keep_best=2"),
    ({"monitor": "val_loss", "monitor_mode": "low"}, r"JobConfig\.monitor_mode='low' is not "
                                                     r"valid: one of 'min', 'max'"),
    ({"monitor": ""}, r"JobConfig\.monitor='' is not valid"),
])
def test_bad_monitor_fields_are_refused(fields, message):
    with pytest.raises(ConfigError, match=message):
        JobConfig(**fields)


def test_evaluating_the_best_with_none_on_disk_is_refused(tmp_path):
    j_config = job(tmp_path, JobMode.EVALUATE, start_at="best", monitor="val_loss")
    with pytest.raises(ConfigError, match=r"start_at='best': there is no checkpoint of a "
                                          r"whole epoch with val_loss in its metrics"):
        Wrapper(CPU2, a_config()).start(BlobTrainer(j_config))
