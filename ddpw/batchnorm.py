"""BatchNorm whose statistics cover the global batch, on GPUs and on CPU worlds alike.

:func:`synchronise_batch_norm` is what ``ArtefactsConfig(model_has_batch_norm=True)`` does in a
world of several processes: on a GPU it converts the model's BatchNorm layers to
:class:`torch.nn.SyncBatchNorm`; on CPUs, where DDP refuses that class ("SyncBatchNorm layers
only work with GPU modules"), to :class:`SynchronisedBatchNorm`, which computes the same thing
through the job's ``gloo`` process group. Either way, training on ``N`` processes with
``batch_size`` samples each normalises, and updates the running statistics, as one process would
with batches of ``N * batch_size``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin


class SynchronisedBatchNorm(_BatchNorm):
    """BatchNorm over the batches of every rank of the default process group, on any device.

    In training mode with more than one process, each channel's mean and (biased) variance are
    those of the samples of all ranks together, gradients flow through them to every rank's
    input, and the running statistics take the global mean and unbiased variance, with
    ``momentum`` (or, with ``momentum=None``, the cumulative average) as in
    :class:`torch.nn.BatchNorm2d`. The statistics are computed in float32 whatever the input's
    dtype (bf16 under autocast, say); the output has the input's dtype. In eval mode, or in a
    world of one, the layer is plain BatchNorm: eval mode uses the running statistics (or, with
    ``track_running_stats=False``, the local batch's, as :class:`torch.nn.SyncBatchNorm` does).

    Every rank must call the layer at the same points, as DDP's forward passes do. It accepts
    inputs of shape ``(N, C, ...)``, like :class:`torch.nn.SyncBatchNorm`. Build it with
    :func:`convert_batch_norm` rather than by hand.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        """Normalise ``input`` with the global batch's statistics (see the class)."""
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # the cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            tracked = not self.training or self.track_running_stats
            return F.batch_norm(
                input, self.running_mean if tracked else None,
                self.running_var if tracked else None, self.weight, self.bias,
                self.training or self.running_mean is None, factor, self.eps)
        x = input.float()  # a copy only when the input is not float32 already
        mean, var, count = _global_moments(x)
        if count < 2:
            raise ValueError(f"Expected more than 1 value per channel when training, got "
                             f"{count} over all ranks (input size {list(input.size())})")
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                unbiased = var * (count / (count - 1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        shape = (1, -1) + (1,) * (input.dim() - 2)
        out = (x - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            out = out * self.weight.float().view(shape)
        if self.bias is not None:
            out = out + self.bias.float().view(shape)
        return out.to(input.dtype)


def _global_moments(x: Tensor) -> tuple[Tensor, Tensor, int]:
    """Each channel's mean and biased variance over the ``x`` of every rank, and the number of
    values per channel.

    Every rank sends its count, mean and sum of squared deviations, and the parts are combined
    as Chan et al. combine partial variances: unlike the sum of squares less the squared sum,
    this loses no precision when a channel's mean is large against its spread. The few numbers
    sent are combined in float64, in which counts stay exact.
    """
    dims = [0, *range(2, x.dim())]
    count = x.numel() // x.size(1)
    mean = x.sum(dims) / max(count, 1)
    m2 = (x - mean.view((1, -1) + (1,) * (x.dim() - 2))).square().sum(dims)
    n = torch.full_like(mean, float(count), dtype=torch.float64)
    parts = _GatherRanks.apply(torch.stack([n, mean.double(), m2.double()]))  # (ranks, 3, C)
    counts, means, m2s = parts[:, 0], parts[:, 1], parts[:, 2]
    total = counts.sum(0)
    global_mean = (counts * means).sum(0) / total
    global_m2 = m2s.sum(0) + (counts * (means - global_mean).square()).sum(0)
    return global_mean.float(), (global_m2 / total).float(), int(total[0].item())


class _GatherRanks(torch.autograd.Function):
    """All-gather along a new first dimension, differentiable: the gradient of each rank's part
    is the sum of the gradients that every rank's use of it received."""

    @staticmethod
    def forward(ctx: Any, part: Tensor) -> Tensor:
        parts = [torch.empty_like(part) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, part.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[dist.get_rank()]


def convert_batch_norm(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with every BatchNorm layer in it (``BatchNorm1d/2d/3d``, and
    :class:`torch.nn.SyncBatchNorm`) replaced by a :class:`SynchronisedBatchNorm` that shares
    its parameters and buffers and keeps its ``requires_grad`` and training flags.

    Lazy BatchNorm layers that have not seen an input are left as they are.
    """
    converted = module
    if (isinstance(module, _BatchNorm) and not isinstance(module, SynchronisedBatchNorm)
            and not isinstance(module, LazyModuleMixin)):
        converted = SynchronisedBatchNorm(module.num_features, module.eps, module.momentum,
                                          module.affine, module.track_running_stats,
                                          bias=module.bias is not None)
        # The same Parameter objects, so requires_grad and any optimiser reference carry over.
        if module.weight is not None:
            converted.weight = module.weight
        if module.bias is not None:
            converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.training = module.training
        if hasattr(module, "qconfig"):
            converted.qconfig = module.qconfig
    for name, child in module.named_children():
        converted.add_module(name, convert_batch_norm(child))
    return converted


def synchronise_batch_norm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` with its BatchNorm layers synchronised across the ranks of a world computing
    on ``device``: :class:`torch.nn.SyncBatchNorm` on a GPU, :class:`SynchronisedBatchNorm` on
    the CPU."""
    if device.type == "cpu":
        return convert_batch_norm(model)
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
