"""Sharded training, ``PlatformConfig(strategy="fsdp")``: the model's parameters, gradients and
optimiser state split across every rank with PyTorch's FSDP2
(:func:`torch.distributed.fsdp.fully_shard`).

Under DDP every rank holds the whole model, its gradients and the optimiser's state: with Adam
in fp32, 16 bytes a parameter on every rank. Under FSDP each rank holds about ``1/N`` of them, and
gathers a unit's parameters just before it computes with them, then frees them again. A unit is
a submodule that is gathered as one: by default the repeated blocks of the model (the items of
its largest :class:`torch.nn.ModuleList`, else of its largest :class:`torch.nn.Sequential`),
then the root for whatever remains; ``PlatformConfig.shard_units`` names the block classes
instead (as Accelerate's ``transformer_layer_cls_to_wrap``).

ddpw applies ``fully_shard`` itself, on CPUs (``gloo``) and GPUs (NCCL) alike, and keeps the
model out of Accelerate's DDP wrapping: Accelerate gives no FSDP on CPUs (it falls back to DDP
without a word), and a model already sharded cannot go through its CPU ``prepare``. As
Accelerate's own FSDP2 preparation does, the model is sharded before the optimiser is built, so
that the optimiser holds the shards. What the Trainer then does differently is here too: no
reduce-scatter on the micro-steps of gradient accumulation (:func:`accumulate`), and mixed
precision as FSDP2's policy (parameters in bf16 or fp16 for the computation, gradients
reduced in fp32) rather than Accelerate's autocast. Under fp16, Accelerate's own gradient scaler
serves: on sharded gradients, DTensor's check for overflows reduces what each rank found over
the mesh, so every rank skips the same steps (measured on CPU with an overflow on one rank).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from .errors import ConfigError

if TYPE_CHECKING:
    from accelerate import Accelerator

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def units(model: torch.nn.Module, names: Sequence[str] | None = None) -> list[torch.nn.Module]:
    """The submodules of ``model`` that become sharded units before the root, inner ones first.

    :param names: the classes (by name) whose instances are units; ``None``: the items with
        parameters of the model's largest ``ModuleList`` (by parameters), else of its largest
        ``Sequential``, else none (the root alone is one unit).
    :raises ConfigError: when ``model`` has no parameters, or a class named is not in it
        (listing the classes it has).
    """
    if not any(True for _ in model.parameters()):
        raise ConfigError(f"ArtefactsConfig.model ({type(model).__name__}) has no parameters: "
                          f"PlatformConfig.strategy='fsdp' has nothing to shard (and an "
                          f"optimiser nothing to train).")
    if names is not None:
        have = {type(m).__name__ for m in model.modules()}
        unknown = [name for name in names if name not in have]
        if unknown:
            raise ConfigError(
                f"PlatformConfig.shard_units={list(names)}: the model "
                f"({type(model).__name__}) has no {', '.join(unknown)}; its classes are "
                f"{', '.join(sorted(have))}.")
        chosen = [m for m in model.modules() if type(m).__name__ in names and m is not model]
        return list(reversed(chosen))  # inner units are sharded before the ones around them
    for kind in (torch.nn.ModuleList, torch.nn.Sequential):
        lists = [m for m in model.modules() if type(m) is kind]
        if lists:
            largest = max(lists, key=_size)
            return [item for item in largest if item is not model and _size(item)]
    return []


def _size(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def shard(model: torch.nn.Module, names: Sequence[str] | None, mixed_precision: str,
          device: torch.device, compile_mode: str | None = None) -> torch.nn.Module:
    """Shard ``model`` across every rank of the default process group, in place, and return it.

    :param names: ``PlatformConfig.shard_units`` (:func:`units`).
    :param mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"``: the units compute in that
        dtype, and their gradients are reduced in float32.
    :param compile_mode: compile each unit but the root with TorchInductor in this mode,
        before sharding it, as torchtitan compiles its blocks; ``None`` compiles nothing.
    """
    # Here, not above: a config that names the strategy is made where torch.distributed's
    # FSDP is not needed.
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = units(model, names)
    dtype = _DTYPES.get(mixed_precision)
    policy = (MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
              if dtype is not None else MixedPrecisionPolicy())
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    model.to(device)
    for block in blocks:
        if compile_mode is not None:
            block.compile(backend="inductor", mode=compile_mode)
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def after_evaluation(model: torch.nn.Module) -> None:
    """Put ``model`` back into training mode after an evaluation, a sharded one with its
    parameters sharded again: FSDP2 keeps the root unit's gathered after a forward pass, for the
    backward pass that follows in training, and none follows an evaluation's. A checkpoint
    or a count of what each rank holds must see the shards."""
    for module in model.modules():
        if is_sharded(module):
            module.reshard()
    model.train()


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` was sharded by :func:`shard`."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def accumulate(accelerator: Accelerator, model: torch.nn.Module) -> Iterator[None]:
    """:meth:`accelerate.Accelerator.accumulate` for a DDP or a sharded model: on the micro-steps
    of gradient accumulation, a sharded model keeps its unreduced gradients (no reduce-scatter)
    until the step that ends with the optimiser's."""
    with accelerator.accumulate(model):
        if is_sharded(model):
            model.set_requires_gradient_sync(accelerator.sync_gradients)
        yield
