"""Checks that need CUDA: skipped without a GPU, run by scripts/gpu-check on a machine with one.

Each test asserts what it claims from what the job itself saw (:class:`jobs.ProbeTrainer`):
the device of the parameters and of the optimiser's state, the dtype inside ``forward``, the
GradScaler's state, the backend, so that a job that silently ran on the CPU fails them.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import torch
from jobs import (
    BlobTrainer,
    Net,
    PausingProbeTrainer,
    ProbeNet,
    ProbeTrainer,
    artefacts,
    final_files,
    flat_parameters,
    job,
    shard_files,
)

from ddpw import JobMode, JobPaused, Platform, PlatformConfig, Wrapper
from ddpw import checkpoint as ckpt

pytestmark = pytest.mark.gpu

RANK_SCRIPT = Path(__file__).resolve().parent / "scripts" / "gpu_rank.py"
DTYPES = {"no": "torch.float32", "bf16": "torch.bfloat16", "fp16": "torch.float16"}


def gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu(precision: str = "no", n_gpus: int = 1) -> PlatformConfig:
    return PlatformConfig(platform=Platform.GPU, n_gpus=n_gpus, mixed_precision=precision,
                          verbose=False)


def cpu(n_procs: int = 1) -> PlatformConfig:
    return PlatformConfig(platform=Platform.CPU, n_procs=n_procs, verbose=False)


def probe_artefacts():
    return artefacts(model=ProbeNet())


def saved_parameters(folder: Path) -> torch.Tensor:
    """The parameters of the checkpoint in ``folder``, read into a fresh model on the CPU."""
    model = ProbeNet()
    ckpt.read_model(folder, model, "cpu")
    return flat_parameters(model)


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_one_gpu_trains_in_process_on_cuda_with_the_precision_asked(tmp_path, precision):
    result = Wrapper(gpu(precision), probe_artefacts()).start(
        ProbeTrainer(job(tmp_path, epochs=2, max_grad_norm=1.0)))
    assert result["distributed_type"] == "DistributedType.NO"
    assert result["device"] == "cuda"
    assert result["param_devices"] == ["cuda"] and result["optimiser_devices"] == ["cuda"]
    # Autocast computes in the precision asked; the parameters stay in float32.
    assert result["forward_dtype"] == DTYPES[precision]
    assert result["param_dtypes"] == ["torch.float32"]
    assert (result["scaler"] is not None) == (precision == "fp16")
    assert math.isfinite(result["loss"])
    # Clipped under fp16 too: the steps that the GradScaler skipped (its scale starts small
    # and grows every 3 steps, so it overflows now and then) leave no inf or NaN norm.
    assert math.isfinite(result["grad_norm"]) and math.isfinite(result["grad_norm_unclipped"])
    assert ("skipped_steps" in result) == (precision == "fp16")
    # The asynchronous saves copied the state from the GPU into pinned host buffers.
    assert result["staging"] == ["cpu:pinned"]
    assert result["staging_left"] == 0  # freed once the last checkpoint is published


class CompiledProbeTrainer(BlobTrainer):
    """Reports whether the model it trained was compiled, and where it ran."""

    def run(self):
        from accelerate.utils import is_compiled_module

        result = super().run()
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return {**result, "compiled": is_compiled_module(self.model),
                "backend_compile": str(self.accelerator.state.dynamo_plugin.backend),
                "device": self.device.type,
                "param_devices": sorted({p.device.type for p in model.parameters()})}


def test_one_gpu_trains_a_compiled_model_and_saves_the_plain_names(tmp_path):
    p_config = PlatformConfig(platform=Platform.GPU, n_gpus=1, mixed_precision="bf16",
                              torch_compile=True, verbose=False)
    result = Wrapper(p_config, artefacts()).start(CompiledProbeTrainer(
        job(tmp_path, epochs=2, save_every=2)))
    assert result["compiled"] and result["backend_compile"] == "INDUCTOR"
    assert result["device"] == "cuda" and result["param_devices"] == ["cuda"]
    assert math.isfinite(result["loss"])
    from safetensors import safe_open

    with safe_open(tmp_path / "checkpoint" / "ckpt_2" / "model.safetensors", "pt") as saved:
        assert sorted(saved.keys()) == sorted(Net().state_dict())


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_a_gpu_pause_resumes_bitwise_with_the_grad_scaler(tmp_path, precision):
    def start(trainer):
        return Wrapper(gpu(precision), probe_artefacts()).start(trainer)

    straight = start(ProbeTrainer(job(tmp_path / "straight", epochs=3, save_every=3)))
    with pytest.raises(JobPaused) as paused:
        start(PausingProbeTrainer(job(tmp_path, epochs=3, save_every=3), at=(2, 4), rank=0))
    resumed = start(ProbeTrainer(job(tmp_path, start_at="latest", epochs=3, save_every=3)))

    pause_folder = Path(paused.value.checkpoint)
    assert torch.equal(resumed["restored"], saved_parameters(pause_folder))
    names = ["model.safetensors", "optimiser.safetensors"]
    if precision == "fp16":
        at_pause = ckpt.read_part(pause_folder, "scaler")
        # The scale has moved from its start, so a resume that lost it would train otherwise.
        assert (at_pause["scale"], at_pause["_growth_tracker"]) != (256.0, 0), at_pause
        assert resumed["restored_scaler"] == at_pause
        assert resumed["scaler"] == straight["scaler"]
        names.append("scaler.json")
    else:
        assert not (pause_folder / "scaler.json").exists()
    for name in names:
        expected = (tmp_path / "straight" / "checkpoint" / "ckpt_3" / name).read_bytes()
        assert (tmp_path / "checkpoint" / "ckpt_3" / name).read_bytes() == expected, name


@pytest.mark.parametrize("first, then", [("cuda", "cpu"), ("cpu", "cuda")])
def test_a_checkpoint_paused_on_one_device_resumes_on_the_other(tmp_path, first, then):
    platforms = {"cuda": gpu(), "cpu": cpu()}
    with pytest.raises(JobPaused) as paused:
        Wrapper(platforms[first], probe_artefacts()).start(
            PausingProbeTrainer(job(tmp_path, epochs=2, save_every=2), at=(2, 4), rank=0))
    folder = Path(paused.value.checkpoint)
    resumed = Wrapper(platforms[then], probe_artefacts()).start(
        ProbeTrainer(job(tmp_path, start_at="latest", epochs=2, save_every=2)))
    assert resumed["device"] == then
    assert resumed["param_devices"] == [then] and resumed["optimiser_devices"] == [then]
    assert torch.equal(resumed["restored"], saved_parameters(folder))
    # The rest of epoch 2, and nothing more, was trained on the other device.
    state = ckpt.read_part(folder, "state")
    assert len(resumed["seen"][0]) == 150 - state["batches"] * state["batch_size"]
    assert resumed["epoch"] == 2 and math.isfinite(resumed["loss"])
    assert ckpt.available(tmp_path / "checkpoint", "ckpt")[-1] == "ckpt_2"


@pytest.mark.parametrize("n_procs", [1, 2])
def test_a_cpu_job_on_a_cuda_machine_stays_on_the_cpu(tmp_path, n_procs):
    result = Wrapper(cpu(n_procs), probe_artefacts()).start(
        ProbeTrainer(job(tmp_path, epochs=1)))
    assert result["device"] == "cpu"
    assert result["param_devices"] == ["cpu"] and result["optimiser_devices"] == ["cpu"]
    if n_procs == 1:
        assert result["distributed_type"] == "DistributedType.NO"
    else:
        assert result["distributed_type"] == "DistributedType.MULTI_CPU"
        assert result["backend"] == "gloo"
        assert [rank["device"] for rank in result["ranks"]] == ["cpu", "cpu"]
        # The launched processes hold no CUDA memory at all (this one has other tests' own).
        assert [rank["cuda_bytes"] for rank in result["ranks"]] == [0, 0]


def test_a_gpu_checkpoint_evaluates_the_same_on_cpu(tmp_path):
    Wrapper(gpu(), artefacts()).start(BlobTrainer(job(tmp_path, epochs=2)))
    evaluate = job(tmp_path, mode=JobMode.EVALUATE, start_at=2)
    on_gpu = Wrapper(gpu(), artefacts()).start(BlobTrainer(evaluate))
    on_cpu = Wrapper(cpu(), artefacts()).start(BlobTrainer(evaluate))
    assert on_gpu["accuracy"] == on_cpu["accuracy"]
    assert on_gpu["loss"] == pytest.approx(on_cpu["loss"], rel=1e-4)


def check_nccl_world(result: dict, n: int) -> None:
    """What every rank of an ``n``-rank NCCL world must have seen: CUDA, NCCL and, at the end,
    the same parameters."""
    assert result["distributed_type"] == "DistributedType.MULTI_GPU"
    assert len(result["ranks"]) == n
    for rank in result["ranks"]:
        assert rank["backend"] == "nccl"
        assert rank["device"] == "cuda" and rank["param_devices"] == ["cuda"]
    params = result["params"]
    assert all(torch.equal(params[0], p) for p in params[1:])


@pytest.mark.skipif(gpus() < 2, reason="needs 2 CUDA GPUs (NCCL refuses two ranks on one GPU "
                    "of one host; test_two_ranks_on_one_gpu_as_two_hosts stands in)")
def test_two_gpus_form_one_nccl_world(tmp_path):
    result = Wrapper(gpu(n_gpus=2), probe_artefacts()).start(
        ProbeTrainer(job(tmp_path, epochs=1)))
    check_nccl_world(result, 2)
    check_shards(result["seen"])


def check_shards(seen: list[list[int]], epochs: int = 1) -> None:
    """Two ranks trained on ``epochs`` epochs of 150 samples: 10 batches of 8 each per epoch,
    between them every sample, the last batch padded from the start."""
    first, second = map(set, seen)
    assert len(seen[0]) == len(seen[1]) == 80 * epochs
    assert first | second == set(range(150))
    assert epochs > 1 or len(first & second) <= 10, "the ranks trained on the same samples"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_hosts(folder: Path, step: str, timeout: float = 90) -> list[dict]:
    """Run ``gpu_rank.py FOLDER STEP`` as the two ranks of one NCCL world on this one GPU.

    NCCL refuses two ranks on one GPU of one host ("Duplicate GPU detected", NVIDIA/nccl#418),
    but takes them from two hosts: a distinct ``NCCL_HOSTID`` per rank makes each its own host,
    and NCCL's socket transport carries their traffic over the loopback interface.
    """
    port, procs, logs = free_port(), [], [folder / f"{step}-rank-{r}.log" for r in range(2)]
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0",
               "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "NCCL_HOSTID": f"ddpw-test-host-{rank}",
               "NCCL_SOCKET_IFNAME": "lo", "GLOO_SOCKET_IFNAME": "lo", "NCCL_IB_DISABLE": "1"}
        with open(logs[rank], "w") as log:
            procs.append(subprocess.Popen([sys.executable, str(RANK_SCRIPT), str(folder), step],
                                          env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    deadline, hung = time.monotonic() + timeout, False
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            hung = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    said = "\n".join(f"--- rank {r}:\n{log.read_text(errors='replace')}"
                     for r, log in enumerate(logs))
    if hung:
        pytest.fail(f"the 2-rank NCCL world on one GPU hung ({step}), killed after "
                    f"{timeout} s:\n{said}")
    if "Duplicate GPU detected" in said:
        pytest.skip("NCCL refuses two ranks on this one GPU even as two hosts "
                    "(NCCL_HOSTID): a 2-rank NCCL world needs 2 GPUs here")
    assert all(p.returncode == 0 for p in procs), said
    return [cloudpickle.loads((folder / f"{step}-rank-{r}.pkl").read_bytes()) for r in range(2)]


def test_two_ranks_on_one_gpu_as_two_hosts_train_pause_and_resume_through_nccl(tmp_path):
    straight = run_two_hosts(tmp_path, "straight")
    check_nccl_world(straight[0], 2)
    check_shards(straight[0]["seen"], epochs=2)
    paused = run_two_hosts(tmp_path, "pause")
    # Rank 1 alone asked; the pause flags' gloo group beside NCCL told rank 0 at the same step.
    assert paused[0]["paused"] == paused[1]["paused"]
    folder = Path(paused[0]["paused"])
    resumed = run_two_hosts(tmp_path, "resume")
    state = ckpt.read_part(folder, "state")
    check_nccl_world(resumed[0], 2)
    # Each rank trained the rest of epoch 2's 10 batches of 8.
    assert [len(s) for s in resumed[0]["seen"]] == [(10 - state["batches"]) * 8] * 2
    assert torch.equal(resumed[0]["restored"], saved_parameters(folder))
    # Each rank wrote a share: every tensor, wherever it is, bitwise as in the straight run.
    assert final_files(tmp_path / "paused" / "checkpoint" / "ckpt_2") == \
        final_files(tmp_path / "straight" / "checkpoint" / "ckpt_2")


@pytest.mark.skipif(gpus() < 2, reason="needs 2 CUDA GPUs (FSDP shards across two or more)")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_fsdp_on_two_gpus_shards_over_nccl_computes_in_the_policy_dtype_and_resumes_exactly(
        tmp_path, precision):
    sharded = PlatformConfig(platform=Platform.GPU, n_gpus=2, strategy="fsdp",
                             mixed_precision=precision, verbose=False)
    train = {"epochs": 2, "save_every": 1, "max_grad_norm": 1.0}
    straight = Wrapper(sharded, probe_artefacts()).start(
        ProbeTrainer(job(tmp_path / "straight", **train)))
    whole = Wrapper(gpu(precision, n_gpus=2), probe_artefacts()).start(
        ProbeTrainer(job(tmp_path / "ddp", **train)))
    for rank in straight["ranks"]:
        assert (rank["device"], rank["backend"]) == ("cuda", "nccl")
        assert rank["param_devices"] == ["cuda"] and rank["optimiser_devices"] == ["cuda"]
        # FSDP2's policy: the shards stay in float32, each unit computes in the policy's dtype.
        assert rank["param_dtypes"] == ["torch.float32"]
        assert rank["forward_dtype"] == DTYPES[precision]
    # Each GPU holds its shards of the parameters and of Adam's state: less than DDP's whole.
    assert all(s["cuda_bytes"] < w["cuda_bytes"]
               for s, w in zip(straight["ranks"], whole["ranks"], strict=True))
    # A pause mid-epoch resumes bitwise, the fp16 GradScaler's state included.
    paused = tmp_path / "paused"
    with pytest.raises(JobPaused):
        Wrapper(sharded, probe_artefacts()).start(
            PausingProbeTrainer(job(paused, **train), at=(2, 3)))
    resumed = Wrapper(sharded, probe_artefacts()).start(
        ProbeTrainer(job(paused, start_at="latest", **train)))
    assert resumed["scaler"] == straight["scaler"]
    assert shard_files(paused / "checkpoint" / "ckpt_2") == \
        shard_files(tmp_path / "straight" / "checkpoint" / "ckpt_2")


def test_step_phases_are_the_devices_time_read_without_waiting_for_it(monkeypatch):
    from ddpw import hang, pace

    monkeypatch.setattr(hang, "carry", lambda provider, observer=None: True)  # no watch here
    model = torch.nn.Linear(4096, 4096).cuda()
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-3)
    rank = pace.Pace()
    rank.attach(model, torch.device("cuda"), "ddp")
    x = torch.randn(4096, 4096, device="cuda")
    host = []
    for _ in range(6):
        rank.mark("data", "loading")
        rank.mark("train_step", "in train_step")
        began = time.perf_counter()
        loss = model(x)
        for _ in range(20):  # device work that the host only queues
            loss = model(loss)
        host.append(time.perf_counter() - began)
        rank.mark("backward", "in the backward pass")
        loss.float().pow(2).mean().backward()
        rank.mark("optimiser", "in the optimiser step")
        optimiser.step()
        optimiser.zero_grad()
        rank.mark("end", "at the step boundary", unit_done=True)
    torch.cuda.synchronize()
    rank.mark("data", "loading")
    rank.mark("end", "at the step boundary")  # settles the steps that the device has passed
    assert rank.steps == 6 and len(rank.window) == 6
    train_step = [step[1] for step in rank.window]
    # 21 matmuls of 4096^3: milliseconds of the device's time, though the host queued them in
    # far less (the marks are CUDA events, not the host's clock).
    assert min(train_step) > 5 * min(host), (train_step, host)
    assert all(phase > 0 for step in rank.window for phase in step[1:5])
    medians = rank.published()["medians"]
    assert medians[4] >= sum(medians[:4]) * 0.9  # the wall time holds the phases
