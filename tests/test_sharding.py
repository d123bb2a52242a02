"""Sharded training, ``PlatformConfig(strategy="fsdp")`` (:mod:`ddpw.sharding`), on real CPU
processes joined by gloo: what it shards, how it trains against DDP, its checkpoints' pause,
resume at other world sizes and strategies, a kill during a save, and the bad inputs."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from accelerate.utils import gather_object
from jobs import Blobs, BlobTrainer, Blocks, Net, PausingTrainer, job, shard_files
from torch import nn

import ddpw.checkpoint as ckpt
from ddpw import ArtefactsConfig, ConfigError, JobMode, Platform, PlatformConfig, Wrapper
from ddpw.checkpoint.export import export
from ddpw.errors import JobPaused, WorkerError

FSDP2 = PlatformConfig(platform=Platform.CPU, n_procs=2, strategy="fsdp", verbose=False)
DDP2 = PlatformConfig(platform=Platform.CPU, n_procs=2, verbose=False)
ONE = PlatformConfig(platform=Platform.CPU, verbose=False)
#: Gradient accumulation and clipping, both of which FSDP does its own way.
LOOP = {"gradient_accumulation_steps": 2, "max_grad_norm": 0.5}
#: A model part of whose rows each rank holds, written by the rank that holds them.
MODEL_0 = "model-00001-of-00002.safetensors"


def adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-4)


def artefacts(**overrides) -> ArtefactsConfig:
    fields = dict(train_set=Blobs(96), validation_set=Blobs(37, seed=1),
                  test_set=Blobs(37, seed=1), batch_size=8, model=Blocks(),
                  optimiser_loader=adam)
    return ArtefactsConfig(**(fields | overrides))


def local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


class ShardTrainer(BlobTrainer):
    """Also reports, from every rank, what it holds: its parameters' and the optimiser state's
    elements (its shards' under FSDP), the model's class and the process's peak memory; and the
    whole model as set-up left it (a restored checkpoint's) with the position it starts from."""

    def setup(self, accelerator, p_config, a_config):
        super().setup(accelerator, p_config, a_config)
        model = accelerator.unwrap_model(self.model)
        self.restored = {k: whole(v).detach().clone() for k, v in model.state_dict().items()}
        self.start = (self.epochs_done, self.batch)

    def train_epoch(self):
        if self.epoch == 1:  # the peak of epoch 1's steps alone, no checkpoint nor evaluation
            Path("/proc/self/clear_refs").write_text("5")
        metrics = super().train_epoch()
        if self.epoch == 1:
            status = Path("/proc/self/status").read_text()
            self.peak_kib = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))
        return metrics

    def run(self):
        metrics = super().run()
        state = [v for s in self.optimiser.state.values() for v in s.values() if v.dim() > 0]
        from torch._dynamo.utils import counters

        mine = {"params": sum(local(p).numel() for p in self.model.parameters()),
                "compiled": counters["frames"]["ok"],
                "state": sum(local(v).numel() for v in state),
                "model": type(self.model).__name__,
                "peak_kib": getattr(self, "peak_kib", None),
                "compared": self._ddpw.pace.compared, "timed": self._ddpw.pace.steps}
        return {**metrics, "ranks": gather_object([mine]), "restored": self.restored,
                "start": self.start}


def whole(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: a sharded tensor's slices gathered from every rank (on every rank)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def epochs(path) -> list[dict]:
    """The epochs' metrics of a run whose logs are in ``path / "logs"``."""
    lines = (path / "logs" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The same 2 epochs under DDP and under FSDP, from the same weights, saved every epoch."""
    runs = {}
    for name, p_config in (("ddp", DDP2), ("fsdp", FSDP2)):
        path = tmp_path_factory.mktemp(name)
        result = Wrapper(p_config, artefacts()).start(
            ShardTrainer(job(path, epochs=2, save_every=1, **LOOP)))
        runs[name] = (path, result)
    return runs


def test_fsdp_trains_as_ddp_does_holding_half_of_the_model_and_optimiser_on_each_rank(trained):
    (ddp_path, ddp), (fsdp_path, fsdp) = trained["ddp"], trained["fsdp"]
    total = sum(p.numel() for p in Blocks().parameters())
    assert [r["model"] for r in fsdp["ranks"]] == ["FSDPBlocks"] * 2
    # Stragglers (ddpw.pace): FSDP's collectives run inside the forward and backward passes,
    # where waiting cannot be told from work; DDP's all-reduce ends the backward pass's time.
    assert [r["compared"] for r in fsdp["ranks"]] == [("data", "optimiser")] * 2
    assert [r["compared"] for r in ddp["ranks"]] == [("data", "train_step", "backward",
                                                      "optimiser")] * 2
    assert all(r["timed"] > 0 for r in ddp["ranks"] + fsdp["ranks"])
    assert [r["params"] for r in ddp["ranks"]] == [total] * 2
    # Shard(0) of every tensor: each rank holds its rows (the 3-row output layer splits 2 + 1).
    assert sum(r["params"] for r in fsdp["ranks"]) == total
    assert all(0.49 * total < r["params"] < 0.51 * total for r in fsdp["ranks"])
    assert [r["state"] for r in fsdp["ranks"]] == [2 * r["params"] for r in fsdp["ranks"]]
    # Each rank's peak memory over epoch 1's steps: a 6.3M-parameter model's weights,
    # gradients and Adam's two moments are 100 MB whole; half of them are not held under FSDP.
    saved_mib = [(d["peak_kib"] - f["peak_kib"]) / 1024
                 for d, f in zip(ddp["ranks"], fsdp["ranks"], strict=True)]
    assert all(saved > 25 for saved in saved_mib), saved_mib
    # Not bitwise: a reduce-scatter sums the ranks' gradients in another order than DDP's
    # all-reduce, and clipping's norm adds the shards' squares in another order.
    for d, f in zip(epochs(ddp_path), epochs(fsdp_path), strict=True):
        for key in ("loss", "grad_norm", "val_loss", "val_accuracy"):
            assert f[key] == pytest.approx(d[key], rel=1e-5, abs=1e-7), key
    assert fsdp["epoch"] == 2 and fsdp["grad_norm"] <= LOOP["max_grad_norm"] + 1e-6


def test_a_pause_mid_epoch_resumes_bitwise_and_on_other_worlds_and_strategies(
        tmp_path, trained):
    fsdp_path, fsdp = trained["fsdp"]
    with pytest.raises(JobPaused):
        Wrapper(FSDP2, artefacts()).start(
            PausingTrainer(job(tmp_path, epochs=2, save_every=1, **LOOP), at=(2, 1)))
    paused = ckpt.latest(tmp_path / "checkpoint", "ckpt")
    assert paused == "ckpt_1_batch4"
    ckpt.verify(tmp_path / "checkpoint" / paused)
    saved = tmp_path / "saved"
    shutil.copytree(tmp_path / "checkpoint", saved)
    resumed = Wrapper(FSDP2, artefacts()).start(
        ShardTrainer(job(tmp_path, start_at="latest", epochs=2, save_every=1, **LOOP)))
    assert shard_files(tmp_path / "checkpoint" / "ckpt_2") == \
        shard_files(fsdp_path / "checkpoint" / "ckpt_2")
    assert resumed["loss"] == fsdp["loss"]
    # The same pause taken up by 1 process and by 2 under DDP: each starts from the
    # checkpoint's model exactly, at the same sample of the epoch (the optimiser's state at 1, 3
    # and DDP ranks: test_sharded_checkpoints).
    for name, p_config, checkpoint, start in (("one", ONE, paused, (1, 8)),
                                              ("ddp", DDP2, paused, (1, 4))):
        path = tmp_path / name
        shutil.copytree(saved / checkpoint, path / "checkpoint" / checkpoint)
        other = Wrapper(p_config, artefacts()).start(
            ShardTrainer(job(path, start_at=checkpoint, epochs=2, save_every=0, **LOOP)))
        assert other["start"] == start, name
        exported = export(saved / checkpoint, tmp_path / f"{name}-export")
        expected = safetensors.torch.load_file(exported[0])
        assert set(other["restored"]) == set(expected), name
        assert all(torch.equal(other["restored"][k], expected[k]) for k in expected), name
        assert other["epoch"] == 2, name


def test_ddp_checkpoints_train_on_compiled_under_fsdp_and_evaluate_alike_on_one_and_two(
        tmp_path, trained):
    ddp_path, ddp = trained["ddp"]
    shutil.copytree(ddp_path / "checkpoint" / "ckpt_1", tmp_path / "checkpoint" / "ckpt_1")
    compiled = dataclasses.replace(FSDP2, torch_compile=True)
    on = Wrapper(compiled, artefacts()).start(
        ShardTrainer(job(tmp_path, start_at=1, epochs=2, save_every=1, **LOOP)))
    # The blocks were compiled, on every rank (dynamo compiles the forward that they share,
    # not each block anew; 0 frames without torch_compile).
    assert [r["compiled"] for r in on["ranks"]] == [2, 2]
    assert on["val_loss"] == pytest.approx(ddp["val_loss"], rel=1e-5)
    evaluate = job(tmp_path, mode=JobMode.EVALUATE, start_at=2)
    on_two = Wrapper(FSDP2, artefacts()).start(BlobTrainer(evaluate))
    on_one = Wrapper(ONE, artefacts()).start(BlobTrainer(evaluate))
    assert on_two == pytest.approx(on_one, rel=1e-6)


def test_a_kill_during_a_background_fsdp_save_leaves_the_previous_checkpoint(
        tmp_path, monkeypatch, trained):
    fsdp_path, _ = trained["fsdp"]
    root = tmp_path / "checkpoint"
    shutil.copytree(fsdp_path / "checkpoint" / "ckpt_1", root / "ckpt_1")
    monkeypatch.setenv(ckpt.TEST_FAULT, f"{MODEL_0}:kill")
    with pytest.raises(WorkerError, match=r"rank 0 of 2 died \(killed by SIGKILL\)"):
        Wrapper(FSDP2, artefacts()).start(
            BlobTrainer(job(tmp_path, start_at=1, epochs=2, save_every=1, **LOOP)))
    assert (root / ".ckpt_2.partial" / MODEL_0).is_file()  # the torn write
    assert ckpt.available(root, "ckpt") == ["ckpt_1"] and ckpt.latest(root, "ckpt") == "ckpt_1"
    ckpt.verify(root / "ckpt_1")


# --- bad inputs, refused before any process starts ---------------------------------------------

class Empty(nn.Module):
    def forward(self, x):
        return x


class Normed(Net):
    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(2)


@pytest.mark.parametrize("given, says", [
    ({"strategy": "zero3"}, r"PlatformConfig.strategy='zero3' is not valid: one of 'ddp', "
                            r"'fsdp'"),
    ({"shard_units": ["Block"]}, r"shard_units=\['Block'\] is not valid: None with "
                                 r"strategy='ddp'"),
    ({"strategy": "fsdp", "shard_units": "Block"}, r"shard_units='Block' is not valid: None, "
                                                   r"or a list of the model's block classes"),
])
def test_a_bad_strategy_or_unit_list_is_refused_naming_what_is_valid(given, says):
    with pytest.raises(ConfigError, match=says):
        PlatformConfig(platform=Platform.CPU, n_procs=2, **given)


@pytest.mark.parametrize("model, units, says", [
    (Net(), ["Block"], r"shard_units=\['Block'\]: the model \(Net\) has no Block; its classes "
                       r"are Dropout, Linear, Net, ReLU, Sequential\."),
    (Empty(), None, r"ArtefactsConfig.model \(Empty\) has no parameters"),
    (Normed(), None, r"model_has_batch_norm=False with PlatformConfig.strategy='fsdp', and the "
                     r"model has BatchNorm1d"),
])
def test_a_model_that_cannot_be_sharded_is_refused_before_launch(tmp_path, model, units, says):
    p_config = PlatformConfig(platform=Platform.CPU, n_procs=2, strategy="fsdp",
                              shard_units=units, verbose=False)
    with pytest.raises(ConfigError, match=says):
        Wrapper(p_config, artefacts(model=model)).start(BlobTrainer(job(tmp_path)))


def test_shard_units_name_classes_and_one_process_has_nothing_to_shard(tmp_path):
    from ddpw.sharding import units

    model = Blocks(width=4, depth=2)
    assert units(model) == list(model.blocks)
    # Inner units are sharded before the ones around them: the reverse of the modules' order.
    assert units(model, ["Linear"]) == [model.last, model.blocks[1][0], model.blocks[0][0],
                                        model.first]
    p_config = PlatformConfig(platform=Platform.CPU, strategy="fsdp", shard_units=[nn.Linear])
    assert p_config.shard_units == ("Linear",)
    with pytest.warns(UserWarning, match="strategy='fsdp' with one process on Platform.CPU: "
                                         "nothing to shard"):
        Wrapper(p_config, artefacts(model=Blocks(width=4, depth=2))).start(
            BlobTrainer(job(tmp_path, epochs=1, save_every=0)))


def test_ddpw_launch_gives_accelerates_fsdp_on_gpus_and_refuses_it_on_cpus(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("print('never run')\n")
    launch = [sys.executable, "-m", "ddpw", "--strategy", "fsdp"]
    cpu = subprocess.run([*launch, "--platform", "cpu", "--n-procs", "2", str(script)],
                         capture_output=True, text=True, timeout=60)
    assert cpu.returncode == 2 and "never run" not in cpu.stdout
    assert "Accelerate has no FSDP on CPUs" in cpu.stderr and "Traceback" not in cpu.stderr
    gpu = subprocess.run([*launch, "--shard-units", "Block,Head", "--platform", "gpu",
                          "--n-gpus", "2", "--dry-run", str(script)],
                         capture_output=True, text=True, timeout=60)
    assert gpu.returncode == 0, gpu.stderr
    command = " ".join(json.loads(gpu.stdout)["command"])
    assert ("--use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP "
            "--fsdp_transformer_layer_cls_to_wrap Block,Head") in command
