"""Reaching into a network: the plain module behind wrappers, a layer by name (an error lists the valid ones),
and one blank forward pass for hooks to observe."""
from __future__ import annotations

import torch
from torch import nn

from sparsight.errors import closest, module_choices

from .modes import eval_mode


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def find_layer(model: nn.Module, layer: str) -> nn.Module:
    """The module called ``layer`` in ``model.named_modules()`` (behind any wrapper); an error lists the
    valid names and the closest ones."""
    modules = dict(unwrap(model).named_modules())
    modules.pop("", None)
    if layer not in modules:
        raise ValueError(f"layer {layer!r} does not exist; valid layers: {module_choices(modules)}"
                         f"{closest(layer, modules)}")
    return modules[layer]


#: What torch says when a feature map shrinks to nothing on the way through a network (an input too small)
TOO_SMALL = ("Output size is too small", "greater than actual input size")


@torch.no_grad()
def trace_blank(model: nn.Module, input_size: int, handles: list = ()) -> None:
    """One forward pass of a blank ``input_size`` image in eval mode, for the hooks in ``handles`` to
    observe; the hooks are removed and the training flag restored afterwards, whatever happens.  An input
    too small for the network is a ``ValueError`` that says so."""
    try:
        with eval_mode(model):
            p = next(model.parameters())
            model(torch.zeros(1, 3, input_size, input_size, device=p.device, dtype=p.dtype))
    except RuntimeError as err:
        if not any(m in str(err) for m in TOO_SMALL):
            raise
        raise ValueError(f"an input of {input_size} px is too small for {getattr(model, 'arch', 'the model')} "
                         f"({str(err).splitlines()[0]}); use a larger data.image_size") from None
    finally:
        for h in handles:
            h.remove()
