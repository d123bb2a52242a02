"""The MNIST example, as a user runs it: train on 2 CPU processes, resume, evaluate."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from ddpw import checkpoint as ckpt

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "mnist" / "main.py"


def test_the_example_trains_resumes_and_evaluates_on_two_processes(tmp_path):
    pytest.importorskip("sklearn", reason="the example's default data need scikit-learn")
    out = subprocess.run([sys.executable, str(EXAMPLE), "--demo", "--platform", "cpu",
                          "--n-procs", "2", "--epochs", "4", "--save-every", "2", "--quiet"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert ckpt.available(tmp_path / "checkpoint", "ckpt") == ["ckpt_2", "ckpt_4"]
    evaluated = re.search(r"evaluate \(start_at=4, epochs=4\): loss [\d.]+, accuracy ([\d.]+)",
                          out.stdout)
    assert evaluated, out.stdout
    assert float(evaluated.group(1)) > 0.8, "the CNN did not learn the digits"
