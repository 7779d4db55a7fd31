"""One mechanism for applying pruning masks, reversible or enforced through training.

Masks are boolean tensors keyed by parameter name (``"inception3a.branch1.conv.weight"``);
``False`` marks a pruned entry.  ``masked(model, masks)`` zeroes the entries for the duration of a
``with`` block and restores the original values afterwards; ``MaskEnforcer`` re-zeroes them after
every optimizer step so pruned connections never regrow during retraining.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def masked_params(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, nn.Parameter]:
    """The parameters ``masks`` name; an unknown name is a ``KeyError`` and a wrong shape a ``ValueError``."""
    params = dict(model.named_parameters())
    unknown = [k for k in masks if k not in params]
    if unknown:
        raise KeyError(f"mask for unknown parameter {unknown[0]!r}; parameters include {sorted(params)[:8]} ...")
    for name, mask in masks.items():
        if mask.shape != params[name].shape:
            raise ValueError(f"mask {name!r} has shape {tuple(mask.shape)}, parameter {tuple(params[name].shape)}")
    return {k: params[k] for k in masks}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the pruned entries in place (permanently)."""
    for name, p in masked_params(model, masks).items():
        p.mul_(masks[name].to(device=p.device, dtype=p.dtype))


@contextlib.contextmanager
def masked(model: nn.Module, masks: dict[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Within the block the model computes with pruned entries zeroed; afterwards it is unchanged."""
    params = masked_params(model, masks)
    saved = {k: p.detach().clone() for k, p in params.items()}
    try:
        apply_masks(model, masks)
        yield model
    finally:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(saved[k])


class MaskEnforcer:
    """A training step hook: keeps pruned entries at zero after each optimizer step.

    One fused ``torch._foreach_mul_`` over all masked parameters per step (masks cast once to the
    parameters' dtype, device and memory layout, channels_last included: the fused kernel needs equal
    strides), so the cost is a single pass over the masked weights.  A model moved, cast or re-laid out after
    the enforcer was built (``.cuda()``, ``.to(memory_format=...)``) gets its masks cast again at the next step.
    """

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]):
        params = masked_params(model, masks)
        self.params = list(params.values())
        self.masks = [masks[k] for k in params]
        # .to() moves and re-lays out every parameter at once: one with a layout (a conv weight) tells
        self._probe = next((i for i, p in enumerate(self.params) if p.dim() == 4), 0)
        self._cast()

    def _cast(self) -> None:
        self.masks = [torch.empty_like(p).copy_(m) for p, m in zip(self.params, self.masks)]

    def _stale(self) -> bool:
        p, m = self.params[self._probe], self.masks[self._probe]
        return m.device != p.device or m.dtype != p.dtype or m.stride() != p.stride()

    @torch.no_grad()
    def __call__(self, trainer=None) -> None:
        if self.params:
            if self._stale():
                self._cast()
            torch._foreach_mul_(self.params, self.masks)


def mask_sparsity(masks: dict[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return sum(int((~m.bool()).sum()) for m in masks.values()) / max(total, 1)
