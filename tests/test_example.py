"""The MNIST example, as a user runs it: train on 2 CPU processes, resume, evaluate."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from ddpw import checkpoint as ckpt

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "mnist" / "main.py"


def run_example(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run the example with ``--demo`` and ``args``; return the run and the accuracy that its
    evaluation of ``ckpt_4`` printed."""
    pytest.importorskip("sklearn", reason="the example's default data need scikit-learn")
    out = subprocess.run([sys.executable, str(EXAMPLE), "--demo", "--platform", "cpu",
                          "--epochs", "4", "--save-every", "2", *args],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    evaluated = re.search(r"evaluate \(start_at=4, epochs=4\): loss [\d.]+, accuracy ([\d.]+)",
                          out.stdout)
    assert evaluated, out.stdout
    return out, float(evaluated.group(1))


def test_the_example_trains_resumes_and_evaluates_on_two_processes(tmp_path):
    _, accuracy = run_example(tmp_path, "--n-procs", "2", "--quiet", "--log-with", "tensorboard")
    assert ckpt.available(tmp_path / "checkpoint", "ckpt") == ["ckpt_2", "ckpt_4"]
    assert accuracy > 0.8, "the CNN did not learn the digits"
    # TensorBoard has each epoch once, across the training and its resumption.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "logs" / "training_logs" / "ddpw"))
    events.Reload()
    steps = [e.step for e in events.Scalars("loss")]
    assert len(steps) == 4 and steps == sorted(set(steps))
    assert [e.step for e in events.Scalars("step/loss")] == list(range(10, steps[-1] + 1, 10))


def test_the_example_trains_in_bf16_on_the_cpu(tmp_path):
    out, accuracy = run_example(tmp_path, "--n-procs", "1", "--mixed-precision", "bf16")
    assert "mixed precision bf16" in out.stdout
    for name in ("ckpt_2", "ckpt_4"):
        manifest = ckpt.read_manifest(tmp_path / "checkpoint" / name)
        assert manifest["mixed_precision"] == "bf16", manifest
    assert accuracy > 0.8, "the CNN did not learn the digits in bf16"


def test_the_example_refuses_fp16_on_the_cpu_in_one_line(tmp_path):
    pytest.importorskip("sklearn", reason="the example's default data need scikit-learn")
    out = subprocess.run([sys.executable, str(EXAMPLE), "--platform", "cpu",
                          "--mixed-precision", "fp16"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].endswith(
        "PlatformConfig.mixed_precision='fp16' is not valid: 'no' or 'bf16' on Platform.CPU: "
        "fp16 needs CUDA.")
