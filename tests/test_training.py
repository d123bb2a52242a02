"""End-to-end training on real CPU processes: sync, sharding, checkpoints, resume, evaluation."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from jobs import (
    Blobs,
    BlobTrainer,
    InspectingTrainer,
    Net,
    PausingTrainer,
    artefacts,
    final_files,
    job,
    step_lr,
)

from ddpw import JobMode, JobPaused, Platform, PlatformConfig, Wrapper
from ddpw import checkpoint as ckpt

CPU2 = PlatformConfig(platform=Platform.CPU, n_procs=2, verbose=False)
CPU1 = PlatformConfig(platform=Platform.CPU, verbose=False)


def test_two_processes_form_one_world_that_syncs_and_shards(tmp_path, no_leftover_processes):
    result = Wrapper(CPU2, artefacts(n_train=150)).start(
        InspectingTrainer(job(tmp_path, epochs=1, save_every=0)))
    assert result["distributed_type"] == "DistributedType.MULTI_CPU"
    params = result["params"]
    assert len(params) == 2
    assert torch.equal(params[0], params[1]), "ranks ended with different parameters"
    seen0, seen1 = (set(s) for s in result["seen"])
    # 150 samples, 8 per batch and per rank: 10 batches each, the last one padded from the start.
    assert len(result["seen"][0]) == len(result["seen"][1]) == 80
    assert seen0 | seen1 == set(range(150))
    assert len(seen0 & seen1) <= 10, "the ranks trained on the same samples"


class AugmentedBlobs(Blobs):
    """Blobs with noise drawn, as the docs advise, from a generator seeded by the sample."""

    def __getitem__(self, i):
        x, y, index = super().__getitem__(i)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
        return x + 0.1 * noise, y, index


#: Shuffling, augmentation, dropout, a scheduler and gradient accumulation all take part in
#: the resumes.
EXACT = {"train_set": AugmentedBlobs(150), "scheduler_loader": step_lr}
ACCUMULATE = {"gradient_accumulation_steps": 2}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Five epochs on 2 processes, saved every 2: the checkpoints and the reference that the
    tests below read (or copy), with the metrics it returned."""
    path = tmp_path_factory.mktemp("straight")
    metrics = Wrapper(CPU2, artefacts(**EXACT)).start(
        BlobTrainer(job(path, epochs=5, save_every=2, **ACCUMULATE)))
    return path, metrics


def test_checkpoints_are_written_exactly_at_save_every(straight):
    path, metrics = straight
    assert metrics["epoch"] == 5 and set(metrics) >= {"loss", "accuracy"}
    assert ckpt.available(path / "checkpoint", "ckpt") == ["ckpt_2", "ckpt_4", "ckpt_5"]
    names = sorted(p.name for p in (path / "checkpoint").iterdir())
    assert names == ["ckpt_2", "ckpt_4", "ckpt_5", "ckpt_latest"], "staging folders were left"
    assert (path / "checkpoint" / "ckpt_latest").read_text() == "ckpt_5\n"
    folder = path / "checkpoint" / "ckpt_4"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["world_size"] == manifest["shares"] == 2 and manifest["epochs_done"] == 4
    # Each rank wrote a share of the model and of the optimiser's state.
    assert {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
            "model.safetensors.index.json", "optimiser-00001-of-00002.safetensors",
            "optimiser-00002-of-00002.safetensors", "optimiser.shares.json", "optimiser.json",
            "rank-0.json", "rank-1.json", "state.json"} <= set(manifest["files"])
    assert not list(folder.glob("*.pkl")) and not list(folder.glob("*.bin"))
    lines = (path / "logs" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4, 5]


def test_save_every_zero_saves_nothing(tmp_path):
    Wrapper(CPU1, artefacts()).start(BlobTrainer(job(tmp_path, epochs=2, save_every=0)))
    assert ckpt.available(tmp_path / "checkpoint", "ckpt") == []


@pytest.mark.parametrize("mode", [JobMode.RESUME, JobMode.TRAIN])
def test_resume_from_checkpoint_is_bitwise_equal_to_uninterrupted(tmp_path, straight, mode):
    # Epoch 2's checkpoint of the straight run, alone in a folder of its own, resumed.
    reference, full = straight
    shutil.copytree(reference / "checkpoint" / "ckpt_2", tmp_path / "checkpoint" / "ckpt_2")
    resumed = Wrapper(CPU2, artefacts(**EXACT)).start(
        BlobTrainer(job(tmp_path, mode=mode, start_at=2, epochs=5, save_every=5, **ACCUMULATE)))
    assert resumed == full
    assert final_files(tmp_path / "checkpoint" / "ckpt_5") == \
        final_files(reference / "checkpoint" / "ckpt_5")


def test_evaluate_gives_the_same_numbers_on_one_and_two_processes(tmp_path, straight):
    # 61 test samples do not split evenly into batches of 8 on 2 ranks: padding must not count.
    shutil.copytree(straight[0] / "checkpoint" / "ckpt_2", tmp_path / "checkpoint" / "ckpt_2")
    evaluate = job(tmp_path, mode=JobMode.EVALUATE, start_at=2, epochs=2)
    on_two = Wrapper(CPU2, artefacts(**EXACT)).start(BlobTrainer(evaluate))
    on_one = Wrapper(CPU1, artefacts(**EXACT)).start(BlobTrainer(evaluate))
    assert on_two == on_one
    assert set(on_two) == {"loss", "accuracy"}
    assert on_two["accuracy"] * 61 == pytest.approx(round(on_two["accuracy"] * 61))


def test_evaluate_restores_the_checkpoint_it_names(tmp_path):
    Wrapper(CPU1, artefacts()).start(BlobTrainer(job(tmp_path, epochs=4, save_every=1)))
    first = Wrapper(CPU1, artefacts()).start(
        BlobTrainer(job(tmp_path, mode=JobMode.EVALUATE, start_at=1)))
    last = Wrapper(CPU1, artefacts()).start(
        BlobTrainer(job(tmp_path, mode=JobMode.EVALUATE, start_at=4)))
    untrained = Wrapper(CPU1, artefacts()).start(
        BlobTrainer(job(tmp_path, mode=JobMode.EVALUATE, start_at=0)))
    assert last["loss"] < first["loss"] < untrained["loss"]


def test_validation_set_is_evaluated_after_every_epoch(tmp_path):
    a_config = artefacts(validation_set=artefacts().test_set)
    metrics = Wrapper(CPU1, a_config).start(BlobTrainer(job(tmp_path, epochs=2, save_every=0)))
    assert {"val_loss", "val_accuracy"} <= set(metrics)


class AutocastNet(Net):
    def forward(self, x):
        assert torch.is_autocast_enabled("cpu") and \
            torch.get_autocast_dtype("cpu") == torch.bfloat16, "bf16 autocast is off"
        return super().forward(x)


@pytest.mark.parametrize("p_config", [
    PlatformConfig(platform=Platform.CPU, mixed_precision="bf16", verbose=False),
    PlatformConfig(platform=Platform.CPU, n_procs=2, mixed_precision="bf16", verbose=False),
])
def test_bf16_mixed_precision_runs_the_forward_pass_under_autocast(tmp_path, p_config):
    a_config = artefacts(model=AutocastNet())
    metrics = Wrapper(p_config, a_config).start(BlobTrainer(job(tmp_path, epochs=1)))
    assert metrics["loss"] == metrics["loss"]  # not NaN


def test_one_artefacts_config_serves_several_jobs_unchanged(tmp_path):
    a_config = artefacts()
    before = {k: v.clone() for k, v in a_config.model.state_dict().items()}
    first = Wrapper(CPU1, a_config).start(BlobTrainer(job(tmp_path / "a", epochs=2)))
    second = Wrapper(CPU1, a_config).start(BlobTrainer(job(tmp_path / "b", epochs=2)))
    assert first == second, "the second job started from the first one's trained model"
    after = a_config.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_verbose_false_silences_ddpw(tmp_path, capfd):
    Wrapper(CPU1, artefacts()).start(BlobTrainer(job(tmp_path, epochs=1)))
    out, err = capfd.readouterr()
    assert "[ddpw]" not in out + err and "epoch 1/1" not in out + err
    loud = PlatformConfig(platform=Platform.CPU, verbose=True)
    Wrapper(loud, artefacts()).start(BlobTrainer(job(tmp_path, epochs=1)))
    out, err = capfd.readouterr()
    assert "[ddpw] DDPW: CPU, 1 node(s) x 1 process(s) = world of 1" in out


def test_loaders_with_two_worker_processes_pause_mid_epoch_and_resume_bitwise(tmp_path,
                                                                           straight):
    # Compared with the straight run, whose loaders have no worker processes.
    reference, _ = straight
    with pytest.raises(JobPaused) as paused:
        Wrapper(CPU2, artefacts(num_workers=2, **EXACT)).start(
            PausingTrainer(job(tmp_path, epochs=2, save_every=2, **ACCUMULATE), at=(2, 3)))
    assert Path(paused.value.checkpoint).name == "ckpt_1_batch6"
    resumed = Wrapper(CPU2, artefacts(num_workers=2, **EXACT)).start(
        BlobTrainer(job(tmp_path, mode=JobMode.RESUME, start_at="latest", epochs=2,
                        save_every=2, **ACCUMULATE)))
    epoch_2 = json.loads((reference / "logs" / "metrics.jsonl").read_text().splitlines()[1])
    assert resumed == {k: v for k, v in epoch_2.items() if k in resumed}
    assert final_files(tmp_path / "checkpoint" / "ckpt_2") == \
        final_files(reference / "checkpoint" / "ckpt_2")


def test_the_progress_bars_start_no_thread():
    """tqdm's monitor thread, started by the first bar and ending on its own, once left a
    DataLoader worker hung in CPython's fork (the child waited for the thread-state lock that
    the ending thread held; test_loaders_with_two_worker_processes... timed out): ddpw's bars go
    without it. (In a fresh interpreter: in this one, another bar may have started it.)"""
    code = ("import threading; from ddpw.progress import Bar; before = threading.active_count()\n"
            "for _ in Bar(range(3), disable=False, leave=False):\n"
            "    assert threading.active_count() == before, threading.enumerate()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
