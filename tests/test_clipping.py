"""JobConfig.max_grad_norm: the gradients an optimiser steps with, on 2 real processes."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from jobs import BlobTrainer, artefacts, final_files, job

from ddpw import ConfigError, JobConfig, Platform, PlatformConfig, Wrapper

CPU2 = PlatformConfig(platform=Platform.CPU, n_procs=2, verbose=False)
NORMS = "DDPW_TEST_NORMS"


class RecordingAdam(torch.optim.Adam):
    """Adam that notes, at each step, the total norm of the gradients it steps with."""

    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"]
                 if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        with open(Path(os.environ[NORMS]) / f"rank-{os.environ['RANK']}.txt", "a") as f:
            f.write(f"{norm.item()!r}\n")
        return super().step(closure)


def recording_adam(model: torch.nn.Module) -> torch.optim.Optimizer:
    return RecordingAdam(model.parameters(), lr=1e-2)


def stepped_norms(folder: Path) -> list[float]:
    return [float(line) for rank in (0, 1)
            for line in (folder / f"rank-{rank}.txt").read_text().split()]


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_every_optimiser_step_has_clipped_gradients(tmp_path, monkeypatch, precision):
    monkeypatch.setenv(NORMS, str(tmp_path))
    limit = 0.05
    p_config = PlatformConfig(platform=Platform.CPU, n_procs=2, mixed_precision=precision,
                              verbose=False)
    metrics = Wrapper(p_config, artefacts(optimiser_loader=recording_adam)).start(BlobTrainer(
        job(tmp_path, epochs=2, save_every=0, max_grad_norm=limit,
            gradient_accumulation_steps=2)))
    norms = stepped_norms(tmp_path)
    # 150 samples in batches of 8 on 2 ranks: 10 batches an epoch, so 5 optimiser steps.
    assert len(norms) == 2 * 2 * 5
    assert max(norms) <= limit * (1 + 1e-5), norms
    # The limit bites (the unclipped norm is larger), and what is logged says so.
    assert metrics["grad_norm"] <= limit < metrics["grad_norm_unclipped"]
    logged = [json.loads(line) for line in
              (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert all(entry["grad_norm"] <= limit for entry in logged)


def test_a_limit_that_never_bites_changes_nothing(tmp_path):
    runs = {}
    for name, limit in (("plain", None), ("huge", 1e9)):
        folder = tmp_path / name
        Wrapper(CPU2, artefacts()).start(BlobTrainer(
            job(folder, epochs=2, save_every=2, max_grad_norm=limit)))
        runs[name] = final_files(folder / "checkpoint" / "ckpt_2")
    assert runs["huge"] == runs["plain"]


@pytest.mark.parametrize("value", [0, -1.0, float("inf"), "1", True])
def test_a_bad_max_grad_norm_is_refused(value):
    with pytest.raises(ConfigError, match=r"JobConfig\.max_grad_norm=.* is not valid: a "
                                          r"positive number"):
        JobConfig(max_grad_norm=value)


#: The (epoch, batch) whose gradients overflow in OverflowingTrainer.
OVERFLOWS = {(1, 3), (2, 6)}


class OverflowingTrainer(BlobTrainer):
    """fp16's loss scaling, on the CPU where Accelerate makes no GradScaler (fp16 needs CUDA):
    a real GradScaler, put where Accelerate keeps its own before anything is prepared, and a
    loss whose gradients overflow float32 at the batches of :data:`OVERFLOWS`, as fp16's
    gradients do while the scale settles (the loss itself stays finite).

    Without fp16, Accelerate does not unscale the gradients before clipping: the norms are
    the scaled ones. This test is about the steps that overflow, not their size.
    """

    def setup(self, accelerator, p_config, a_config):
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        super().setup(accelerator, p_config, a_config)

    def train_step(self, batch):
        values = super().train_step(batch)
        if (self.epoch, self.batch) in OVERFLOWS:
            # Worth 0, with a gradient 1e38 times the loss's: inf once scaled.
            spike = 1e38 * values["loss"]
            values = {**values, "loss": values["loss"] + (spike - spike.detach())}
        return values


def test_the_steps_that_the_grad_scaler_skips_leave_the_norms_out_and_are_counted(
        tmp_path, monkeypatch):
    monkeypatch.setenv(NORMS, str(tmp_path))
    metrics = Wrapper(CPU2, artefacts(optimiser_loader=recording_adam)).start(
        OverflowingTrainer(job(tmp_path, epochs=2, save_every=0, max_grad_norm=0.05,
                               log_with="tensorboard", log_every_n_steps=1)))
    # The overflows were real: the scaler skipped those optimiser steps, on every rank.
    assert len(stepped_norms(tmp_path)) == 2 * (2 * 10 - len(OVERFLOWS))
    logged = [json.loads(line) for line in
              (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    identity = ("run", "resumed_from")  # each line's run (tracking.Tracking.log_epoch)
    logged = [{k: v for k, v in entry.items() if k not in identity} for entry in logged]
    for entry in logged:
        assert all(math.isfinite(v) for v in entry.values()), entry
    assert [entry["skipped_steps"] for entry in logged] == [1, 1]
    assert metrics == logged[-1]
    # The trackers get no inf or NaN either: a skipped step logs its loss, not its norms.
    from test_tracking import tensorboard_scalars

    scalars = tensorboard_scalars(tmp_path / "logs" / "ddpw")
    skipped_at = [10 * (epoch - 1) + batch + 1 for epoch, batch in sorted(OVERFLOWS)]
    assert [s for s, _ in scalars["step/loss"]] == list(range(1, 21))
    assert [s for s, _ in scalars["step/grad_norm"]] == [
        s for s in range(1, 21) if s not in skipped_at]
    assert all(math.isfinite(v) for points in scalars.values() for _, v in points)
