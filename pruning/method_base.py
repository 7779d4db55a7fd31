"""The pruning-method protocol and its registry: ``@register_method(name)`` plus one factory.

A method turns ``(model, rate)`` into boolean masks keyed by parameter name (see
:mod:`pruning.masks`).  The built-in methods register when :mod:`pruning.methods` is imported;
take ``create_method`` and ``METHODS`` from there.
"""
from __future__ import annotations

import inspect
from typing import Callable, Iterable

import torch
from torch import nn

from sparsight.errors import closest
from sparsight.registry import Registry

from .models.layers import unwrap


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
        raise PruningError(f"layer {missing[0]!r} does not exist; valid layers: {sorted(all_layers)}"
                           f"{closest(missing[0], names)}")
    kept = {n: m for n, m in all_layers.items() if not any(n == e or n.startswith(e + ".") for e in exclude)}
    if not kept:
        raise PruningError(f"excluding {exclude} leaves no layer to prune; prunable layers: {sorted(all_layers)}")
    return kept


class PruningMethod:
    name = ""            # set by ``register_method``
    criterion = ""       # what the method ranks by, for meta.json (``{norm}`` is filled in)
    structured = False
    kinds: tuple = (nn.Conv2d, nn.Linear)

    prunes = True        # False for the retrained control, whose only rate is 0
    needs_data = False   # scores filters on reference images (``data=`` batches)
    rewinds = False      # weights are rewound to an early checkpoint after pruning (IMP)

    def masks(self, model: nn.Module, rate: float, exclude: Iterable[str] = (), data=None) -> dict[str, torch.Tensor]:
        rate = check_rate(rate)
        layers = prunable_layers(model, exclude, self.kinds)
        return self.compute(layers, rate)

    def compute(self, layers: dict[str, nn.Module], rate: float) -> dict[str, torch.Tensor]:
        raise NotImplementedError


METHODS = Registry("method", error=PruningError)


def register_method(name: str) -> Callable[[type[PruningMethod]], type[PruningMethod]]:
    """Class decorator: register a pruning method under ``name`` (also its ``name`` attribute)."""
    def named(cls: type[PruningMethod]) -> type[PruningMethod]:
        cls.name = name
        return cls
    return METHODS.register(name, named)


def method_class(name: str) -> type[PruningMethod]:
    """The registered method ``name``, or a ``PruningError`` listing the registered ones."""
    return METHODS.lookup(name)


def create_method(name: str, **kwargs) -> PruningMethod:
    return method_class(name)(**kwargs)


def method_options(name: str, *, norm: str = "l1", input_size: int = 64, seed: int = 0) -> dict:
    """The constructor arguments a registered method takes, picked from common settings."""
    params = inspect.signature(method_class(name).__init__).parameters
    offered = {"norm": norm, "input_size": input_size, "seed": seed}
    return {k: v for k, v in offered.items() if k in params}
