"""Checks that need CUDA: skipped without a GPU, run by scripts/gpu-check on a machine with one."""

from __future__ import annotations

import pytest
import torch
from jobs import BlobTrainer, InspectingTrainer, artefacts, job

from ddpw import JobMode, Platform, PlatformConfig, Wrapper

pytestmark = pytest.mark.gpu


def gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_one_gpu_trains_in_process_with_mixed_precision(tmp_path, precision):
    p_config = PlatformConfig(platform=Platform.GPU, n_gpus=1, mixed_precision=precision,
                              verbose=False)
    result = Wrapper(p_config, artefacts()).start(InspectingTrainer(job(tmp_path, epochs=2)))
    assert result["loss"] == result["loss"]
    assert result["distributed_type"] == "DistributedType.NO"


def test_a_gpu_checkpoint_evaluates_the_same_on_cpu(tmp_path):
    gpu = PlatformConfig(platform=Platform.GPU, n_gpus=1, verbose=False)
    cpu = PlatformConfig(platform=Platform.CPU, verbose=False)
    Wrapper(gpu, artefacts()).start(BlobTrainer(job(tmp_path, epochs=2)))
    evaluate = job(tmp_path, mode=JobMode.EVALUATE, start_at=2)
    on_gpu = Wrapper(gpu, artefacts()).start(BlobTrainer(evaluate))
    on_cpu = Wrapper(cpu, artefacts()).start(BlobTrainer(evaluate))
    assert on_gpu["accuracy"] == on_cpu["accuracy"]
    assert on_gpu["loss"] == pytest.approx(on_cpu["loss"], rel=1e-4)


@pytest.mark.skipif(gpus() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_form_one_nccl_world(tmp_path):
    p_config = PlatformConfig(platform=Platform.GPU, n_gpus=2, verbose=False)
    result = Wrapper(p_config, artefacts()).start(InspectingTrainer(job(tmp_path, epochs=1)))
    assert result["distributed_type"] == "DistributedType.MULTI_GPU"
    assert torch.equal(result["params"][0], result["params"][1])


def test_a_gpu_pause_resumes_bitwise(tmp_path):
    from jobs import PausingTrainer

    from ddpw import JobPaused

    gpu = PlatformConfig(platform=Platform.GPU, n_gpus=1, verbose=False)
    Wrapper(gpu, artefacts()).start(BlobTrainer(job(tmp_path / "straight", epochs=3,
                                                    save_every=3)))
    with pytest.raises(JobPaused):
        Wrapper(gpu, artefacts()).start(PausingTrainer(job(tmp_path, epochs=3, save_every=3),
                                                       at=(2, 4), rank=0))
    Wrapper(gpu, artefacts()).start(BlobTrainer(job(tmp_path, start_at="latest", epochs=3,
                                                    save_every=3)))
    for name in ("model.safetensors", "optimiser.safetensors"):
        straight = (tmp_path / "straight" / "checkpoint" / "ckpt_3" / name).read_bytes()
        assert (tmp_path / "checkpoint" / "ckpt_3" / name).read_bytes() == straight
