"""Whole weights from a sharded model, and the EMA.

Under FSDP no rank holds whole weights, so whatever needs them (checkpoints, EMA export, samples,
the exported model) gathers them on every rank at once, one tensor at a time, and rank 0 keeps
them and rebuilds a plain copy of the model. DDP takes the same path, so both strategies share it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

if TYPE_CHECKING:  # type hints only: the engine imports this module
    from tasks.training.engine import Recipe



def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor as a whole: FSDP's sharded parameters (and norms over them) are DTensors."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def gather_whole(tensors: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor] | None:
    """Each tensor whole, on the CPU, on the ranks where `keep` (else None). Sharded tensors are
    all-gathered one at a time (so no rank holds more than one whole tensor it does not keep), and
    every rank must call this, in step."""
    gathered = {}
    for name, tensor in tensors.items():
        tensor = whole(tensor)
        if keep:
            gathered[name] = tensor.detach().cpu().contiguous()
    return gathered if keep else None


def full_state_dict(module: nn.Module, keep: bool, overrides: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor] | None:
    """The module's whole state dict (see gather_whole); `overrides` replace entries (the EMA's
    parameters)."""
    return gather_whole({**module.state_dict(), **(overrides or {})}, keep)


class ExponentialAverage:
    """EMA of the trainable parameters, exported instead of them when ema_decay > 0. Each copy
    lives in its parameter's own layout (a rank's shard under FSDP), so updates need no
    communication; buffers and frozen weights are taken from the model when the EMA is read."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.names = [name for name, param in model.named_parameters() if param.requires_grad]
        self.shadows = [param.detach().clone() for param in model.parameters() if param.requires_grad]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = [param.detach() for param in model.parameters() if param.requires_grad]
        torch._foreach_lerp_(self.shadows, current, 1.0 - self.decay)

    def by_name(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadows))

    @torch.no_grad()
    def load_full(self, weights: dict[str, torch.Tensor]) -> None:
        """Whole EMA weights from a checkpoint, cut to this rank's shards where sharded."""
        for name, shadow in self.by_name().items():
            value = weights[name].to(device=shadow.device, dtype=shadow.dtype)
            if isinstance(shadow, DTensor):
                value = distribute_tensor(value, shadow.device_mesh, shadow.placements)
            shadow.copy_(value)


def inference_copy(accelerator, recipe: Recipe, model: nn.Module, ema: ExponentialAverage | None) -> nn.Module | None:
    """On rank 0, a plain (unsharded, unwrapped) copy of the model with the weights to sample
    and export (the EMA's, when kept); None on the other ranks, which only help gather."""
    weights = full_state_dict(accelerator.unwrap_model(model), accelerator.is_main_process, ema.by_name() if ema else None)
    if weights is None:
        return None
    with torch.random.fork_rng(devices=[]):  # building initialises weights: leave training's RNG stream alone
        plain = recipe.build()
    plain.load_state_dict(weights)
    return plain.to(accelerator.device).train(accelerator.unwrap_model(model).training)
