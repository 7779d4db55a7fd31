"""Pruning methods that rank weights, output filters or input-channel slices by magnitude, and the
random control.

Counts follow ``torch.nn.utils.prune``: ``round(rate * n)`` entries (or filters, or input slices)
are removed per scope, lowest scores first.
"""
from __future__ import annotations

import torch
from torch import nn

from .method_base import PruningError, PruningMethod, check_rate, prunable_layers, register_method
from .structured import filter_masks


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean keep-mask over ``scores`` with the ``k`` lowest entries removed."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        keep[torch.topk(scores.reshape(-1), k, largest=False).indices] = False
    return keep.view(scores.shape)


@register_method("unstructured-local")
class LocalMagnitude(PruningMethod):
    """Unstructured: in every layer remove the ``rate`` share of weights with the smallest |w|."""
    criterion = "l1-magnitude (per layer)"

    def compute(self, layers, rate):
        return {f"{n}.weight": _lowest(m.weight.detach().abs(), round(rate * m.weight.numel()))
                for n, m in layers.items()}


@register_method("unstructured-global")
class GlobalMagnitude(PruningMethod):
    """Unstructured: remove the ``rate`` share of all weights with the smallest |w|, ranked globally."""
    criterion = "l1-magnitude (global)"

    def compute(self, layers, rate):
        weights = [m.weight.detach() for m in layers.values()]
        flat = torch.cat([w.abs().reshape(-1) for w in weights])
        keep = _lowest(flat, round(rate * flat.numel()))
        out, start = {}, 0
        for (n, m), w in zip(layers.items(), weights):
            out[f"{n}.weight"] = keep[start:start + w.numel()].view(w.shape)
            start += w.numel()
        return out


@register_method("control")
class RetrainedControl(PruningMethod):
    """Prunes nothing: the parent retrained as a pruned model is (``prune.control``), so what retraining alone does
    to a unit can be told from what pruning does.  Its only rate is 0."""
    criterion = "none: nothing is pruned (the retrained control)"
    prunes = False

    def compute(self, layers, rate):
        if rate > 0:
            raise PruningError(f"method 'control' prunes nothing, so its rate is 0, not {rate:g}")
        return {f"{n}.weight": torch.ones_like(m.weight, dtype=torch.bool) for n, m in layers.items()}


@register_method("random")
class RandomUnstructured(PruningMethod):
    """Control: in every layer remove a random ``rate`` share of weights (seeded)."""
    criterion = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def compute(self, layers, rate):
        g = torch.Generator().manual_seed(self.seed)
        out = {}
        for n, m in layers.items():
            scores = torch.rand(m.weight.shape, generator=g)
            scores[m.weight.detach().cpu() == 0] = -1.0  # already pruned entries go first (nested masks)
            out[f"{n}.weight"] = _lowest(scores, round(rate * m.weight.numel())).to(m.weight.device)
        return out


@register_method("structured")
class FilterNorm(PruningMethod):
    """Structured: in every conv remove the ``rate`` share of output filters with the lowest Lp norm.

    The BatchNorm that follows a pruned filter has its γ and β masked too, so the channel is
    exactly zero after the nonlinearity and not a constant β.
    """
    criterion = "{norm}-filter-norm (per layer)"
    structured = True
    kinds = (nn.Conv2d,)

    def __init__(self, norm: str = "l1", input_size: int = 64):
        if norm not in ("l1", "l2"):
            raise PruningError(f"unknown norm {norm!r}; choose from ['l1', 'l2']")
        self.p = 1 if norm == "l1" else 2
        self.input_size = input_size

    def masks(self, model, rate, exclude=(), data=None):
        rate = check_rate(rate)
        layers = prunable_layers(model, exclude, self.kinds)
        keep = {}
        for n, m in layers.items():
            w = m.weight.detach()
            keep[n] = _lowest(w.reshape(w.shape[0], -1).norm(p=self.p, dim=1), round(rate * w.shape[0]))
        return filter_masks(model, layers, keep, self.input_size)


@register_method("connection")
class ConnectionSparsity(PruningMethod):
    """Per conv, remove the ``rate · C_in`` input-channel slices ``W[:, c]`` with the lowest L1 norm."""
    criterion = "l1 input-channel slices (per layer)"
    kinds = (nn.Conv2d,)

    def compute(self, layers, rate):
        out = {}
        for n, m in layers.items():
            w = m.weight.detach()
            norms = w.abs().sum(dim=(0, 2, 3))
            keep = _lowest(norms, round(rate * w.shape[1]))
            out[f"{n}.weight"] = keep.view(1, -1, 1, 1).expand_as(w).clone()
        return out


@register_method("imp")
class IterativeMagnitude(GlobalMagnitude):
    """Iterative magnitude pruning (lottery tickets): global |w| masks, survivors rewound to an early epoch.

    After Frankle & Carbin (2019) and Frankle & Bau (2019); the schedule rewinds the surviving
    weights to the parent's early checkpoint before each retraining.
    """
    criterion = "l1-magnitude (global) + rewinding"
    rewinds = True
