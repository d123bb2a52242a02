"""BatchNorm across processes: on CPU worlds, statistics over the global batch, as on GPUs."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate.utils import gather_object
from jobs import Blobs, artefacts, job
from torch import nn

from ddpw import Platform, PlatformConfig, Trainer, Wrapper
from ddpw.batchnorm import SynchronisedBatchNorm, convert_batch_norm, synchronise_batch_norm

CPU1 = PlatformConfig(platform=Platform.CPU, verbose=False)
CPU2 = PlatformConfig(platform=Platform.CPU, n_procs=2, verbose=False)
TESTS = Path(__file__).resolve().parent

# --- the layer against torch.nn.BatchNorm on the concatenated batch, on 2 real gloo ranks ------

#: name: (BatchNorm class, its keyword arguments, input shapes of ranks 0 and 1, input offset,
#: tolerance)
CASES = {
    "2d": (nn.BatchNorm2d, {}, ((3, 4, 5, 5), (3, 4, 5, 5)), 0.0, 1e-6),
    "1d, cumulative average": (nn.BatchNorm1d, {"momentum": None}, ((6, 4), (6, 4)), 0.0,
                               1e-6),
    "3d, uneven shards": (nn.BatchNorm3d, {}, ((5, 4, 2, 3, 3), (2, 4, 2, 3, 3)), 0.0,
                          1e-6),
    "no affine": (nn.BatchNorm1d, {"affine": False}, ((6, 4, 7), (6, 4, 7)), 0.0, 1e-6),
    "no running statistics": (nn.BatchNorm1d, {"track_running_stats": False},
                              ((6, 4), (6, 4)), 0.0, 1e-6),
    # Large means against a unit spread: the sum of squares less the squared sum would lose
    # nearly every digit of the variance in float32.
    "large mean": (nn.BatchNorm1d, {}, ((8, 4), (8, 4)), 3000.0, 1e-4),
}


def _compare_with_torch(rank: int, case: str) -> None:
    cls, kwargs, shapes, offset, tol = CASES[case]
    g = torch.Generator().manual_seed(len(case))
    reference = cls(4, **kwargs)
    with torch.no_grad():
        if reference.affine:
            reference.weight.copy_(torch.rand(4, generator=g) + 0.5)
            reference.bias.copy_(torch.randn(4, generator=g))
    layer = convert_batch_norm(cls(4, **kwargs))
    layer.load_state_dict(reference.state_dict())
    assert isinstance(layer, SynchronisedBatchNorm)
    for step in range(3):
        xs = [torch.randn(s, generator=g) * (step + 1) + offset for s in shapes]
        weights = [torch.randn(s, generator=g) for s in shapes]  # d loss / d output
        whole = torch.cat(xs).requires_grad_()
        expected = reference(whole)
        (expected * torch.cat(weights)).sum().backward()
        mine = xs[rank].clone().requires_grad_()
        out = layer(mine)
        (out * weights[rank]).sum().backward()
        lo = sum(s[0] for s in shapes[:rank])
        torch.testing.assert_close(out, expected[lo:lo + shapes[rank][0]], atol=tol, rtol=tol)
        torch.testing.assert_close(mine.grad, whole.grad[lo:lo + shapes[rank][0]], atol=tol,
                                   rtol=0)
        for name in ("weight", "bias"):
            ours, theirs = getattr(layer, name), getattr(reference, name)
            if theirs is None:
                assert ours is None
                continue
            # Without DDP each rank holds its own part of the gradient: their sum is the whole.
            grad = ours.grad.clone()
            dist.all_reduce(grad)
            torch.testing.assert_close(grad, theirs.grad, atol=tol * 10, rtol=0)
            ours.grad, theirs.grad = None, None
        for name, buffer in reference.named_buffers():
            torch.testing.assert_close(getattr(layer, name), buffer, atol=tol, rtol=tol)
    layer.eval()
    reference.eval()
    x = torch.randn(shapes[rank], generator=torch.Generator().manual_seed(rank)) + offset
    torch.testing.assert_close(layer(x), reference(x), atol=tol, rtol=tol)


def _bf16_autocast(rank: int) -> None:
    # Under bf16 autocast the layer gets bf16 activations; its statistics stay float32: the
    # running statistics are those of float32 BatchNorm on the same bf16 values.
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    linear = nn.Linear(3, 4)
    reference = nn.BatchNorm1d(4)
    layer = convert_batch_norm(nn.BatchNorm1d(4))
    xs = [torch.randn(16, 3, generator=g) * 4 + 2 for _ in range(2)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = [linear(x) for x in xs]
        out = layer(hidden[rank])
    assert hidden[rank].dtype == out.dtype == torch.bfloat16
    expected = reference(torch.cat(hidden).float())
    torch.testing.assert_close(out, expected[16 * rank:16 * (rank + 1)].bfloat16())
    torch.testing.assert_close(layer.running_mean, reference.running_mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.running_var, reference.running_var, atol=1e-6, rtol=0)


def _layer_worker(rank: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(minutes=2))
    try:
        for case in CASES:
            try:
                _compare_with_torch(rank, case)
            except AssertionError as error:
                raise AssertionError(f"case {case!r}, rank {rank}: {error}") from None
        _bf16_autocast(rank)
    finally:
        dist.destroy_process_group()


def test_the_layer_on_two_ranks_is_torch_batch_norm_on_the_concatenated_batch(
        tmp_path, no_leftover_processes):
    # Two plain processes rather than torch.multiprocessing.spawn, whose resource tracker would
    # outlive the test in pytest's process.
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); from test_batchnorm import "
            f"_layer_worker; _layer_worker(int(sys.argv[1]), sys.argv[2])")
    ranks = [subprocess.Popen([sys.executable, "-c", code, str(rank), str(tmp_path / "store")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    try:
        outputs = [rank.communicate(timeout=300)[0] for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    assert [rank.returncode for rank in ranks] == [0, 0], "\n".join(outputs)


def test_the_layer_is_plain_batch_norm_in_a_world_of_one():
    g = torch.Generator().manual_seed(0)
    reference = nn.BatchNorm2d(3, momentum=None)
    layer = convert_batch_norm(nn.BatchNorm2d(3, momentum=None))
    for _ in range(2):
        x = torch.randn(4, 3, 2, 2, generator=g)
        assert torch.equal(layer(x), reference(x))
    assert torch.equal(layer.running_var, reference.running_var)
    assert int(layer.num_batches_tracked) == 2


# --- conversion ---------------------------------------------------------------------------------


class BatchNormNet(nn.Module):
    """An MLP with BatchNorm and no dropout, so that 1 and 2 processes can agree."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                  nn.Linear(16, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_conversion_keeps_parameters_buffers_and_flags_and_gpus_keep_sync_batch_norm():
    model = nn.Sequential(nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3), nn.Sequential(
        nn.BatchNorm1d(5, affine=False, track_running_stats=False), nn.SyncBatchNorm(2)))
    model[1].weight.requires_grad_(False)
    model[2][1].eval()
    old = [model[1], model[2][0], model[2][1]]
    converted = convert_batch_norm(model)
    new = [converted[1], converted[2][0], converted[2][1]]
    assert all(type(layer) is SynchronisedBatchNorm for layer in new)
    assert new[0].weight is old[0].weight and not new[0].weight.requires_grad
    assert new[0].running_var is old[0].running_var and new[0].bias is old[0].bias
    assert new[1].weight is None and new[1].running_mean is None and not new[1].affine
    assert [layer.training for layer in new] == [True, True, False]
    assert converted[0] is model[0]
    on_gpu = synchronise_batch_norm(BatchNormNet(), torch.device("cuda", 0))
    assert type(on_gpu.body[1]) is nn.SyncBatchNorm  # the plan for GPUs, as data: no GPU here
    on_cpu = synchronise_batch_norm(BatchNormNet(), torch.device("cpu"))
    assert type(on_cpu.body[1]) is SynchronisedBatchNorm


# --- through the Wrapper: 2 processes of batch B train as 1 process of batch 2B ---------------


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    # Not Adam: it divides by the root of tiny second moments, which would magnify the rounding
    # differences between one reduction order and another.
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)


class BatchNormTrainer(Trainer):
    def train_step(self, batch):
        x, y, index = batch
        self.__dict__.setdefault("steps", []).append(index.tolist())
        return F.cross_entropy(self.model(x), y)

    def evaluate_step(self, batch):
        x, y, _ = batch
        return {"loss": F.cross_entropy(self.model(x), y, reduction="none")}

    def run(self):
        metrics = super().run()
        model = self.accelerator.unwrap_model(self.model)
        return {**metrics, "state": gather_object([{k: v.detach().cpu().clone() for k, v in
                                                    model.state_dict().items()}]),
                "steps": gather_object([self.steps]),
                "layers": [type(m).__name__ for m in model.modules()]}


def _train(p_config, path, batch_size, batch_norm=True):
    a_config = artefacts(train_set=Blobs(128), model=BatchNormNet(), optimiser_loader=sgd,
                         batch_size=batch_size, model_has_batch_norm=batch_norm)
    return Wrapper(p_config, a_config).start(BatchNormTrainer(job(path, epochs=2, save_every=0)))


def test_two_cpu_processes_train_batch_norm_as_one_process_with_the_global_batch(tmp_path):
    one = _train(CPU1, tmp_path / "one", batch_size=16)
    two = _train(CPU2, tmp_path / "two", batch_size=8)
    # The same global batches: each step of the two ranks covers one step of the single process.
    steps_one, (steps_rank0, steps_rank1) = one["steps"][0], two["steps"]
    assert len(steps_one) == len(steps_rank0) == 16
    assert [sorted(a + b) for a, b in zip(steps_rank0, steps_rank1, strict=True)] == \
        [sorted(step) for step in steps_one]
    assert "BatchNorm1d" in one["layers"] and "SynchronisedBatchNorm" in two["layers"]
    reference, (rank0, rank1) = one["state"][0], two["state"]
    assert int(rank0["body.1.num_batches_tracked"]) == 16
    for name, value in reference.items():
        assert torch.equal(rank0[name], rank1[name]), f"the ranks disagree on {name}"
        assert torch.allclose(rank0[name].double(), value.double(), atol=1e-6, rtol=0), name
    # Per-rank BatchNorm, the alternative, would not have passed: its statistics differ.
    per_rank = _train(CPU2, tmp_path / "per-rank", batch_size=8, batch_norm=False)["state"][0]
    assert not torch.allclose(per_rank["body.1.running_var"], reference["body.1.running_var"],
                              atol=1e-3)


def test_batch_norm_in_bf16_on_two_cpu_processes_keeps_the_global_batch_statistics(tmp_path):
    """Under bf16 autocast the statistics are still those of the global batch, in float32."""
    def bf16(n_procs: int) -> PlatformConfig:
        return PlatformConfig(platform=Platform.CPU, n_procs=n_procs, mixed_precision="bf16",
                              verbose=False)

    one = _train(bf16(1), tmp_path / "one", batch_size=16)["state"][0]
    rank0, rank1 = _train(bf16(2), tmp_path / "two", batch_size=8)["state"]
    per_rank = _train(bf16(2), tmp_path / "per-rank", batch_size=8, batch_norm=False)["state"][0]
    for name in ("body.1.running_mean", "body.1.running_var"):
        assert rank0[name].dtype == torch.float32, name
        assert torch.equal(rank0[name], rank1[name]), f"the ranks disagree on {name}"
        gap, per_rank_gap = [float((state[name] - one[name]).abs().max())
                             for state in (rank0, per_rank)]
        # bf16's rounding differs with the batch's split; per-rank statistics differ far more.
        assert gap < per_rank_gap / 10, (name, gap, per_rank_gap)
