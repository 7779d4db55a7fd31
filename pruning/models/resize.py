"""Rebuilding the layer shapes of a physically pruned model (``pruning.physical``) from its state_dict."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .layers import unwrap


def resize_to_state(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Give every Conv2d / BatchNorm / Linear of ``model`` the shapes its entries in ``state_dict`` have.

    Parameters and buffers are replaced by uninitialised tensors of the stored shapes (dtype and
    device kept), and ``in_channels``/``out_channels``/``num_features``/``in_features``/
    ``out_features`` updated, so ``load_state_dict(state_dict, strict=True)`` then fits.
    Modules without entries in ``state_dict`` are left alone.
    """
    model = unwrap(model)

    def fresh(old: torch.Tensor, shape, param: bool):
        t = torch.empty(tuple(shape), dtype=old.dtype, device=old.device)
        return nn.Parameter(t, requires_grad=old.requires_grad) if param else t

    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        w = state_dict.get(prefix + "weight")
        if isinstance(m, nn.Conv2d) and w is not None and w.dim() == 4:
            if tuple(w.shape) != tuple(m.weight.shape):
                m.out_channels, m.in_channels = int(w.shape[0]), int(w.shape[1]) * m.groups
                m.weight = fresh(m.weight, w.shape, True)
                if m.bias is not None:
                    m.bias = fresh(m.bias, (w.shape[0],), True)
        elif isinstance(m, nn.Linear) and w is not None and w.dim() == 2:
            if tuple(w.shape) != tuple(m.weight.shape):
                m.out_features, m.in_features = int(w.shape[0]), int(w.shape[1])
                m.weight = fresh(m.weight, w.shape, True)
                if m.bias is not None:
                    m.bias = fresh(m.bias, (w.shape[0],), True)
        elif isinstance(m, _BatchNorm):
            ref = w if w is not None else state_dict.get(prefix + "running_mean")
            if ref is None or ref.dim() != 1 or int(ref.shape[0]) == m.num_features:
                continue
            n = int(ref.shape[0])
            m.num_features = n
            if m.affine:
                m.weight = fresh(m.weight, (n,), True)
                m.bias = fresh(m.bias, (n,), True)
            if m.track_running_stats and m.running_mean is not None:
                m.running_mean = torch.zeros(n, dtype=m.running_mean.dtype, device=m.running_mean.device)
                m.running_var = torch.ones(n, dtype=m.running_var.dtype, device=m.running_var.device)
    model.physically_pruned = True
    return model
