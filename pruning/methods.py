"""Pruning methods: small scoring objects in a registry; each turns (model, rate) into masks.

Every method returns boolean masks keyed by parameter name (see :mod:`pruning.masks`).  Counts
follow ``torch.nn.utils.prune``: ``round(rate * n)`` entries (or filters, or input slices) are
removed per scope, lowest scores first.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .models.registry import unwrap


class PruningError(ValueError):
    """A bad rate, layer list or method name."""


def check_rate(rate: float) -> float:
    if not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise PruningError(f"rate {rate!r} is outside [0, 1)")
    return float(rate)


def prunable_layers(model: nn.Module, exclude: Iterable[str] = (),
                    kinds=(nn.Conv2d, nn.Linear)) -> dict[str, nn.Module]:
    """Conv/linear layers by module name, minus ``exclude`` (a name excludes its submodules too)."""
    model = unwrap(model)
    all_layers = {n: m for n, m in model.named_modules() if isinstance(m, kinds)}
    names = {n for n, _ in model.named_modules() if n}
    exclude = list(exclude)
    missing = [e for e in exclude if e not in names]
    if missing:
        raise PruningError(f"layer {missing[0]!r} does not exist; valid layers: {sorted(all_layers)}")
    kept = {n: m for n, m in all_layers.items() if not any(n == e or n.startswith(e + ".") for e in exclude)}
    if not kept:
        raise PruningError(f"excluding {exclude} leaves no layer to prune; prunable layers: {sorted(all_layers)}")
    return kept


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean keep-mask over ``scores`` with the ``k`` lowest entries removed."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        keep[torch.topk(scores.reshape(-1), k, largest=False).indices] = False
    return keep.view(scores.shape)


class PruningMethod:
    name = ""
    structured = False
    kinds: tuple = (nn.Conv2d, nn.Linear)

    needs_data = False   # scores filters on reference images (``data=`` batches)
    rewinds = False      # weights are rewound to an early checkpoint after pruning (IMP)

    def masks(self, model: nn.Module, rate: float, exclude: Iterable[str] = (), data=None) -> dict[str, torch.Tensor]:
        rate = check_rate(rate)
        layers = prunable_layers(model, exclude, self.kinds)
        return self.compute(layers, rate)

    def compute(self, layers: dict[str, nn.Module], rate: float) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class LocalMagnitude(PruningMethod):
    """Unstructured: in every layer remove the ``rate`` share of weights with the smallest |w|."""
    name = "unstructured-local"

    def compute(self, layers, rate):
        return {f"{n}.weight": _lowest(m.weight.detach().abs(), round(rate * m.weight.numel()))
                for n, m in layers.items()}


class GlobalMagnitude(PruningMethod):
    """Unstructured: remove the ``rate`` share of all weights with the smallest |w|, ranked globally."""
    name = "unstructured-global"

    def compute(self, layers, rate):
        weights = [m.weight.detach() for m in layers.values()]
        flat = torch.cat([w.abs().reshape(-1) for w in weights])
        keep = _lowest(flat, round(rate * flat.numel()))
        out, start = {}, 0
        for (n, m), w in zip(layers.items(), weights):
            out[f"{n}.weight"] = keep[start:start + w.numel()].view(w.shape)
            start += w.numel()
        return out


class RandomUnstructured(PruningMethod):
    """Control: in every layer remove a random ``rate`` share of weights (seeded)."""
    name = "random"

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
    was_training = model.training
    try:
        model.eval()
        p = next(model.parameters())
        model(torch.zeros(1, 3, input_size, input_size, device=p.device, dtype=p.dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
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


class FilterNorm(PruningMethod):
    """Structured: in every conv remove the ``rate`` share of output filters with the lowest Lp norm.

    The BatchNorm that follows a pruned filter has its γ and β masked too, so the channel is
    exactly zero after the nonlinearity and not a constant β.
    """
    name = "structured"
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


class ConnectionSparsity(PruningMethod):
    """Per conv, remove the ``rate · C_in`` input-channel slices ``W[:, c]`` with the lowest L1 norm."""
    name = "connection"
    kinds = (nn.Conv2d,)

    def compute(self, layers, rate):
        out = {}
        for n, m in layers.items():
            w = m.weight.detach()
            norms = w.abs().sum(dim=(0, 2, 3))
            keep = _lowest(norms, round(rate * w.shape[1]))
            out[f"{n}.weight"] = keep.view(1, -1, 1, 1).expand_as(w).clone()
        return out


class IterativeMagnitude(GlobalMagnitude):
    """Iterative magnitude pruning (lottery tickets): global |w| masks, survivors rewound to an early epoch.

    After Frankle & Carbin (2019) and Frankle & Bau (2019); the schedule rewinds the surviving
    weights to the parent's early checkpoint before each retraining.
    """
    name = "imp"
    rewinds = True


METHODS: dict[str, type[PruningMethod]] = {}


def register_method(cls: type[PruningMethod]) -> type[PruningMethod]:
    METHODS[cls.name] = cls
    return cls


for _cls in (LocalMagnitude, GlobalMagnitude, RandomUnstructured, FilterNorm, ConnectionSparsity, IterativeMagnitude):
    register_method(_cls)


def create_method(name: str, **kwargs) -> PruningMethod:
    try:
        cls = METHODS[name]
    except KeyError:
        raise PruningError(f"unknown method {name!r}; choose from {sorted(METHODS)}") from None
    return cls(**kwargs)


def method_options(name: str, *, norm: str = "l1", input_size: int = 64, seed: int = 0) -> dict:
    """The constructor arguments a registered method takes, picked from common settings."""
    import inspect

    if name not in METHODS:
        raise PruningError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    offered = {"norm": norm, "input_size": input_size, "seed": seed}
    params = inspect.signature(METHODS[name].__init__).parameters
    return {k: v for k, v in offered.items() if k in params}


from . import criteria  # noqa: E402,F401  (registers the filter-relevance criteria)
