"""PlatformConfig.torch_compile: the model compiled by TorchInductor through Accelerate's dynamo
plugin on 2 real CPU processes (a C++ compiler is needed, which the test set-up installs), its
checkpoints those of the plain model, and the plan it makes as data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.utils import is_compiled_module
from jobs import Blobs, BlobTrainer, Net, artefacts, job
from safetensors.torch import load_file

from ddpw import ConfigError, JobMode, Platform, PlatformConfig, Wrapper
from ddpw.plan import MachineFacts, resolve_plan

SCRIPTS = Path(__file__).resolve().parent / "scripts"


def cpu2(compiled: bool) -> PlatformConfig:
    return PlatformConfig(platform=Platform.CPU, n_procs=2, verbose=False,
                          torch_compile=compiled)


class CompileReportingTrainer(BlobTrainer):
    """Also reports whether the model it trained was compiled, and the names it saved."""

    def run(self):
        metrics = super().run()
        return {**metrics, "compiled": is_compiled_module(self.model),
                "backend": str(self.accelerator.state.dynamo_plugin.backend)}


def saved_names(folder: Path) -> list[str]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return sorted(index["weight_map"])


def final_weights(folder: Path) -> dict[str, torch.Tensor]:
    weights = {}
    for file in folder.glob("model-*.safetensors"):
        weights.update(load_file(file))
    return weights


def test_a_compiled_run_and_a_plain_one_resume_each_others_checkpoints(tmp_path):
    # Compiled, then plain from its checkpoint, then compiled again from the plain one's: each
    # resumes the other's checkpoints in one chain of runs.
    a_config = artefacts()
    # The first run validates on the test set: a compiled evaluation of its weights, for free.
    validated = artefacts(validation_set=Blobs(61, seed=1))
    runs = []
    for epoch, compiled in enumerate((True, False, True), 1):
        out = Wrapper(cpu2(compiled), validated if epoch == 1 else a_config).start(
            CompileReportingTrainer(
                job(tmp_path, start_at=epoch - 1, epochs=epoch, save_every=1)))
        assert (out["compiled"], out["backend"]) == (compiled, "INDUCTOR" if compiled else "NO")
        assert out["epoch"] == epoch
        # The plain model's names: no "_orig_mod." (torch.compile) nor "module." (DDP).
        folder = tmp_path / "checkpoint" / f"ckpt_{epoch}"
        assert saved_names(folder) == sorted(Net().state_dict())
        assert final_weights(folder).keys() == Net().state_dict().keys()
        runs.append(out)

    # The same weights evaluated compiled (the first run's validation) and plain agree
    # (inductor's kernels round differently; training itself is not compared, as the dropout
    # masks of compiled code come from another random stream).
    plain = Wrapper(cpu2(False), a_config).start(CompileReportingTrainer(
        job(tmp_path, JobMode.EVALUATE, start_at=1)))
    assert plain["compiled"] is False
    assert runs[0]["val_loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert runs[0]["val_accuracy"] == plain["accuracy"]


def test_an_unmodified_accelerate_script_is_compiled_by_ddpw_launch(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ddpw", "--platform", "cpu", "--n-procs", "2",
                          "--torch-compile", str(SCRIPTS / "accelerate_train.py"),
                          "--epochs", "1"], cwd=tmp_path, text=True, capture_output=True,
                         timeout=600, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["compiled"] is True and result["params_equal"]


def facts(cxx: str | None) -> MachineFacts:
    return MachineFacts(cuda_devices=0, mps_available=False, cpu_count=8, cxx_compiler=cxx)


@pytest.mark.parametrize("n_procs", [1, 2])
def test_the_plan_compiles_the_trainers_model_and_a_scripts(n_procs):
    config = PlatformConfig(platform=Platform.CPU, n_procs=n_procs, torch_compile=True,
                            torch_compile_mode="max-autotune")
    plan = resolve_plan(config, facts("/usr/bin/g++"))
    assert plan.accelerator_kwargs["dynamo_plugin"] == {"backend": "inductor",
                                                        "mode": "max-autotune"}
    if n_procs == 1:  # the script runs in this process, without accelerate launch
        assert plan.env["ACCELERATE_DYNAMO_BACKEND"] == "INDUCTOR"
        assert plan.env["ACCELERATE_DYNAMO_MODE"] == "max-autotune"
    else:
        args = list(plan.launch_args)
        assert args[args.index("--dynamo_backend") + 1] == "inductor"
        assert args[args.index("--dynamo_mode") + 1] == "max-autotune"


def test_a_plain_plan_compiles_nothing():
    plan = resolve_plan(PlatformConfig(platform=Platform.CPU, n_procs=2), facts(None))
    assert "dynamo_plugin" not in plan.accelerator_kwargs
    args = list(plan.launch_args)
    assert args[args.index("--dynamo_backend") + 1] == "no" and "--dynamo_mode" not in args


def test_compiling_on_the_cpu_without_a_cxx_compiler_is_refused_before_launch():
    config = PlatformConfig(platform=Platform.CPU, n_procs=2, torch_compile=True)
    with pytest.raises(ConfigError, match=r"PlatformConfig\.torch_compile=True on Platform\.CPU "
                                          r"needs a C\+\+ compiler.*apt install g\+\+"):
        resolve_plan(config, facts(None))


def test_this_machine_has_the_cxx_compiler_that_the_compile_tests_need():
    """The test set-up (.ci/run) installs one: without it the tests above prove nothing."""
    assert MachineFacts.probe().cxx_compiler is not None


@pytest.mark.parametrize("field, value, message", [
    ("torch_compile", "yes", r"PlatformConfig\.torch_compile='yes' is not valid: True or False"),
    ("torch_compile_mode", "fast", r"PlatformConfig\.torch_compile_mode='fast' is not valid: "
                                   r"one of 'default', 'reduce-overhead'"),
])
def test_bad_compile_fields_are_refused(field, value, message):
    with pytest.raises(ConfigError, match=message):
        PlatformConfig(platform=Platform.CPU, **{field: value})
