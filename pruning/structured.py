"""Masks over whole output filters: each conv's BatchNorm is found by tracing, and masked with it."""
from __future__ import annotations

import torch
from torch import nn

from .models.layers import trace_blank, unwrap


@torch.no_grad()
def following_batchnorms(model: nn.Module, input_size: int = 64) -> dict[str, str]:
    """Map each conv to the BatchNorm that directly consumes its output (traced with hooks)."""
    model = unwrap(model)
    produced: dict[int, str] = {}
    pairs: dict[str, str] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: produced.__setitem__(id(out), name)))
        elif isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_pre_hook(
                lambda mod, inp, name=name: pairs.__setitem__(produced[id(inp[0])], name)
                if id(inp[0]) in produced else None))
    trace_blank(model, input_size, handles)
    return pairs


def filter_masks(model: nn.Module, layers: dict[str, nn.Conv2d], keep: dict[str, torch.Tensor],
                 input_size: int = 64) -> dict[str, torch.Tensor]:
    """Weight masks from per-filter keep vectors, plus γ/β masks of the BatchNorm after each conv."""
    bns = following_batchnorms(model, input_size)
    masks = {}
    for n, k in keep.items():
        w = layers[n].weight
        masks[f"{n}.weight"] = k.view(-1, *([1] * (w.dim() - 1))).expand_as(w).clone()
        if layers[n].bias is not None:
            masks[f"{n}.bias"] = k.clone()
        if n in bns:
            masks[f"{bns[n]}.weight"] = k.clone()
            masks[f"{bns[n]}.bias"] = k.clone()
    return masks
