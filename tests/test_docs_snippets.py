"""The code that the documentation shows runs and does what the pages say it does.

Pages include Python from files (``literalinclude``) rather than pasting it: the scripts in
``docs/snippets/`` and the MNIST example (which ``test_example.py`` runs). This module runs every
snippet, the seed example that the README and the front page show, and the examples in the
module docstrings that the API pages show, and checks that no page shows Python that is not run
here.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

import ddpw.trainer
import ddpw.utils
from ddpw import checkpoint as ckpt

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SNIPPETS = DOCS / "snippets"
EXAMPLE = ROOT / "examples" / "mnist"

#: The snippets, each run by a test below.
TESTED = {"quick_start.py", "function_task.py", "pause_and_resume.py", "checkpoint_files.py",
          "accelerate_script.py", "collective_timeout.py", "tracking.py", "sweep.py",
          "slurm_job.py"}  # on the real cluster, in test_slurm.py

PYTHON_BLOCK = re.compile(
    r"^\.\. (?:code-block|code|sourcecode)::[ \t]*(?:python3?|py|pycon)[ \t]*$", re.MULTILINE)
INCLUDE = re.compile(r"^\.\. literalinclude::[ \t]*(\S+)", re.MULTILINE)


def pages() -> list[Path]:
    return [ROOT / "README.rst",
            *sorted(p for p in DOCS.rglob("*.rst") if "_build" not in p.relative_to(DOCS).parts)]


def python_blocks(text: str) -> list[str]:
    """The Python code blocks written into a reST text, dedented."""
    blocks = []
    for match in PYTHON_BLOCK.finditer(text):
        lines = text[match.end():].splitlines()[1:]
        while lines and (not lines[0].strip() or lines[0].strip().startswith(":")):
            lines.pop(0)  # the directive's options and the blank line after them
        body = []
        for line in lines:
            if line.strip() and not line.startswith((" ", "\t")):
                break
            body.append(line)
        blocks.append(textwrap.dedent("\n".join(body)).strip() + "\n")
    return blocks


def literal_blocks(docstring: str) -> list[str]:
    """The literal blocks (after a paragraph ending in ``::``) of a docstring, dedented."""
    lines = inspect.cleandoc(docstring).splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if not line.rstrip().endswith("::"):
            continue
        body = []
        for following in lines[i + 1:]:
            if following.strip() and not following.startswith(" "):
                break
            body.append(following)
        blocks.append(textwrap.dedent("\n".join(body)).strip() + "\n")
    return blocks


def run_python(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def run_snippet(name: str, cwd: Path) -> str:
    out = run_python([str(SNIPPETS / name)], cwd)
    assert out.returncode == 0, out.stderr
    return out.stdout


# --- what the pages show -------------------------------------------------------------------------

def test_python_is_written_into_no_page_but_the_seed_example():
    written = {page.relative_to(ROOT).as_posix(): len(python_blocks(page.read_text()))
               for page in pages()}
    assert {page: n for page, n in written.items() if n} == {"README.rst": 1,
                                                             "docs/index.rst": 1}, (
        "put Python code in docs/snippets/ and include it with literalinclude, so that it is run")


def test_every_included_file_exists_and_every_snippet_is_shown_and_tested():
    included = set()
    for page in pages():
        for target in INCLUDE.findall(page.read_text()):
            path = (page.parent / target).resolve()
            assert path.is_file(), f"{page.relative_to(ROOT)} includes {target}, which is missing"
            included.add(path)
    python = {path for path in included if path.suffix == ".py"}
    allowed = {EXAMPLE / "src.py", EXAMPLE / "main.py"}
    assert {path for path in python if path.parent != SNIPPETS} <= allowed
    snippets = {path.name for path in SNIPPETS.glob("*.py")}
    assert {path.name for path in python if path.parent == SNIPPETS} == snippets, (
        "a snippet that no page shows")
    assert snippets == TESTED, "a snippet that no test runs"


def test_the_seed_example_on_the_front_page_and_in_the_readme_runs(tmp_path):
    pytest.importorskip("sklearn", reason="the example's default data need scikit-learn")
    (readme,) = python_blocks((ROOT / "README.rst").read_text())
    (index,) = python_blocks((DOCS / "index.rst").read_text())
    assert index == readme, "the front page and the README show different seed examples"
    short = readme.replace("epochs=50", "epochs=1")  # the same job, shorter
    assert short != readme
    shutil.copy(EXAMPLE / "src.py", tmp_path)
    (tmp_path / "seed.py").write_text(short + "print('metrics:', metrics)\n")
    out = run_python(["seed.py"], tmp_path)
    assert out.returncode == 0, out.stderr
    metrics = ast.literal_eval(out.stdout.split("metrics:", 1)[1].strip())
    assert metrics["epoch"] == 1  # saved, as the last epoch is, though save_every=5
    assert ckpt.available(tmp_path / "checkpoint", "ckpt") == ["ckpt_1"]


# --- the snippets --------------------------------------------------------------------------------

def test_quick_start(tmp_path):
    out = run_snippet("quick_start.py", tmp_path)
    trained = ast.literal_eval(out.split("trained:", 1)[1].splitlines()[0].strip())
    evaluated = ast.literal_eval(out.split("evaluated:", 1)[1].splitlines()[0].strip())
    assert trained["epoch"] == 3
    assert set(evaluated) == {"loss", "accuracy"} and evaluated["accuracy"] > 0.9
    assert ckpt.available(tmp_path / "checkpoint", "ckpt") == ["ckpt_1", "ckpt_2", "ckpt_3"]
    assert ckpt.latest(tmp_path / "checkpoint", "ckpt") == "ckpt_3"
    lines = (tmp_path / "logs" / "training_logs" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3


def test_function_task(tmp_path):
    results = [ast.literal_eval(line) for line in
               run_snippet("function_task.py", tmp_path).splitlines()]
    assert [r["rank"] for r in results] == [0, 1]
    assert [r["total"] for r in results] == [1229, 1229]  # the primes below 10,000
    assert sum(r["found"] for r in results) == 1229


def test_a_training_sweep_trains_each_point_in_its_own_folders(tmp_path):
    out = run_snippet("sweep.py", tmp_path)
    assert out.splitlines() == ["lr=0.5 seed=0: epoch 2", "lr=0.05 seed=0: epoch 2"]
    (sweep,) = (tmp_path / "logs" / "console_logs" / "sweeps").iterdir()
    for task, name in (("0-lr_0.5-seed_0", "lr0.5-seed0"), ("1-lr_0.05-seed_0", "lr0.05-seed0")):
        record = json.loads((sweep / "points" / task / "point.json").read_text())
        assert record["state"] == "done" and record["result"][0]["epoch"] == 2
        # The Trainer claimed its checkpoint folder, which no other point may use.
        assert record["checkpoint_folder"] == str(tmp_path / "checkpoints" / name)
        assert ckpt.available(tmp_path / "checkpoints" / name, "ckpt") == ["ckpt_2"]


def test_pause_and_resume(tmp_path):
    out = run_snippet("pause_and_resume.py", tmp_path)
    assert "paused: interrupted/ckpt_1_batch6" in out
    assert "the resumed run is bitwise the run that never stopped" in out
    assert ckpt.available(tmp_path / "interrupted", "ckpt") == ["ckpt_1", "ckpt_1_batch6",
                                                                "ckpt_2"]


def test_checkpoint_files(tmp_path):
    out = run_snippet("checkpoint_files.py", tmp_path).splitlines()
    # what the checkpoints page says that it prints
    assert out[:3] == [
        "['ckpt_1', 'ckpt_2', 'ckpt_latest']",
        "['model.safetensors', 'optimiser.json', 'optimiser.safetensors', 'rank-0.json', "
        "'rank-0.safetensors', 'state.json']",
        "2"]
    assert out[3].startswith("checkpoint damaged/ckpt_2 is damaged: the BLAKE3 hash of "
                             "model.safetensors differs from the manifest's")
    page = (DOCS / "guides" / "checkpoints.rst").read_text()
    assert all(line in page for line in out), "the checkpoints page shows another output"


def test_tracking_keeps_the_best_and_stops_early_as_the_guide_says(tmp_path):
    out = run_snippet("tracking.py", tmp_path)
    stopped = int(re.search(r"stopped after epoch (\d+)", out).group(1))
    kept = re.search(r"kept: (.*)", out).group(1).split()
    lines = (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["val_loss"] for line in lines]  # unrounded, as ddpw judged
    assert len(losses) == stopped < 30  # it did stop early
    best = min(range(stopped), key=lambda e: (losses[e], e)) + 1
    assert stopped == best + 3  # the patience: 3 epochs without a better val_loss
    ranked = sorted(range(1, stopped + 1), key=lambda e: (losses[e - 1], e))
    assert set(kept) == {f"ckpt_{e}" for e in (*ranked[:2], stopped)}
    assert "tags: epoch loss lr step/loss step/lr step/samples_per_s val_accuracy val_loss" in out
    assert ("goodput/: attempts checkpoint_s held_percent lost_s lost_steps other_s percent "
            "restore_s startup_s training_s validation_s waiting_s wall_s") in out
    assert "step/loss logged at steps: [2, 4, 6, 8, 10] ..." in out


def test_an_unmodified_accelerate_script_under_ddpw_launch(tmp_path):
    out = run_python(["-m", "ddpw", "--platform", "cpu", "--n-procs", "2",
                      str(SNIPPETS / "accelerate_script.py")], tmp_path)
    assert out.returncode == 0, out.stderr
    accuracy = re.search(r"\[rank0\]: 2 processes, accuracy ([\d.]+)", out.stdout)
    assert accuracy and float(accuracy.group(1)) > 0.9, out.stdout
    (folder,) = (tmp_path / "logs" / "console_logs").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == [
        "rank-0.stderr.log", "rank-0.stdout.log", "rank-1.stderr.log", "rank-1.stdout.log",
        "times.json"]  # the script's start-up and run, for its goodput line


def test_collective_timeout(tmp_path, monkeypatch):
    from accelerate.utils import InitProcessGroupKwargs

    from ddpw import JobConfig, Platform, PlatformConfig

    run_snippet("collective_timeout.py", tmp_path)
    monkeypatch.syspath_prepend(str(SNIPPETS))
    spec = importlib.util.spec_from_file_location("collective_timeout",
                                                  SNIPPETS / "collective_timeout.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    trainer = module.PatientClassifier(JobConfig())
    kwargs = trainer.accelerator_kwargs(PlatformConfig(platform=Platform.CPU))
    (handler,) = kwargs["kwargs_handlers"]
    assert isinstance(handler, InitProcessGroupKwargs)
    assert handler.timeout == timedelta(minutes=5)
    assert "dataloader_config" in kwargs, "ddpw's own Accelerator arguments were dropped"


# --- the examples in the docstrings that the API pages show --------------------------------------

def run_docstring_example(tmp_path: Path, docstring: str, prelude: str, epilogue: str) -> str:
    (block,) = literal_blocks(docstring)
    script = tmp_path / "example.py"
    script.write_text(textwrap.dedent(prelude) + block + textwrap.dedent(epilogue))
    out = run_python([str(script)], tmp_path)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_the_trainer_example_in_ddpw_trainer(tmp_path):
    out = run_docstring_example(tmp_path, ddpw.trainer.__doc__, """
        import torch
        import torch.nn.functional as F
        from torch.utils.data import TensorDataset

        from ddpw import ArtefactsConfig, JobConfig, JobMode, Platform, PlatformConfig, Trainer
        from ddpw import Wrapper
    """, """
        x = torch.randn(64, 4)
        data = TensorDataset(x, (x.sum(1) > 0).long())
        a_config = ArtefactsConfig(train_set=data, test_set=data, batch_size=16,
                                   model=torch.nn.Linear(4, 2),
                                   optimiser_loader=lambda m: torch.optim.SGD(m.parameters(), 0.5))
        wrapper = Wrapper(PlatformConfig(platform=Platform.CPU, verbose=False), a_config)
        wrapper.start(MyTrainer(JobConfig(epochs=2, save_every=2)))
        print(wrapper.start(MyTrainer(JobConfig(job_type=JobMode.EVALUATE, start_at=2))))
    """)
    assert set(ast.literal_eval(out.strip())) == {"loss", "accuracy"}


def test_the_function_example_in_ddpw_utils(tmp_path):
    out = run_docstring_example(tmp_path, ddpw.utils.__doc__, """
        import torch

        from ddpw import Platform, PlatformConfig, Wrapper
    """, """
        p_config = PlatformConfig(platform=Platform.CPU, n_procs=2, verbose=False)
        print(Wrapper(p_config).start(count_samples, [7, 8, 9]))
    """)
    assert ast.literal_eval(out.strip()) == [6, 6]  # 3 samples on each of 2 ranks


# --- style ---------------------------------------------------------------------------------------

def test_the_code_in_docs_passes_ruff():
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (the test extra installs it)")
    out = subprocess.run([sys.executable, "-m", "ruff", "check", str(DOCS)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
