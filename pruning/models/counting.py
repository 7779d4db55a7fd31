"""Parameter, FLOP and sparsity counts of conv / linear networks (for meta.json and physical pruning)."""
from __future__ import annotations

import torch
from torch import nn

from .modes import eval_mode
from .layers import unwrap


def prunable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights of conv and linear layers, by parameter name."""
    model = unwrap(model)
    return {f"{name}.weight": m.weight for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight is not None}


def measure_sparsity(model: nn.Module, scope=None, reference: dict[str, int] | None = None) -> dict:
    """Fraction of zero weights in conv/linear layers: over ``scope`` (the pruned layers; all if None),
    over all layers, and per layer.  ``reference`` (layer → weight count of the parent) counts weights
    that physical pruning removed as zeros."""
    per_layer, counts = {}, {}
    for name, w in prunable_weights(model).items():
        layer = name.removesuffix(".weight")
        n = (reference or {}).get(layer, w.numel())
        z = n - int((w != 0).sum())
        per_layer[layer] = round(z / n, 6)
        counts[layer] = (z, n)
    scope = list(counts) if scope is None else [s for s in scope if s in counts]

    def share(names):
        zeros, total = sum(counts[k][0] for k in names), sum(counts[k][1] for k in names)
        return round(zeros / max(total, 1), 6)
    return {"total": share(scope), "all_layers": share(list(counts)), "per_layer": per_layer, "scope": scope}


def layer_sizes(model: nn.Module) -> dict[str, int]:
    """Weight count of every conv/linear layer (the reference for physically pruned children)."""
    return {n.removesuffix(".weight"): w.numel() for n, w in prunable_weights(model).items()}


def count_params(model: nn.Module) -> tuple[int, int]:
    params = list(unwrap(model).parameters())
    return sum(p.numel() for p in params), sum(int((p != 0).sum()) for p in params)


def count_flops(model: nn.Module, input_size: int, device: torch.device | str = "cpu") -> int:
    """Dense FLOPs of one forward pass at ``input_size`` (torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = unwrap(model)
    x = torch.zeros(1, 3, input_size, input_size, device=device, dtype=next(model.parameters()).dtype)
    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())
