"""The model factory: ``create_model(name, num_classes, weights=None)`` builds a registered architecture and
loads its weights (:mod:`.weights`)."""
from __future__ import annotations

import os

import torch
from torch import nn

from .registry import get_spec
from .weights import fitted_state, load_state_checked, read_state_dict, resolve_weights


def check_weights_fit(arch: str, weights: str | os.PathLike, num_classes: int, new_classifier: bool = False) -> None:
    """The :class:`WeightsError` :func:`create_model` would raise for these weights, found without allocating the
    model (it is built on the meta device): for a study's plan."""
    spec = get_spec(arch)
    path, weight_kwargs = resolve_weights(arch, weights)
    state, header = read_state_dict(path, arch)
    with torch.device("meta"):
        model = spec.builder(num_classes=num_classes, **_build_kwargs(spec, header, weight_kwargs))
    fitted_state(model.state_dict(), state, path, arch, num_classes, new_classifier)


def _build_kwargs(spec, header: dict, weight_kwargs: dict, kwargs: dict | None = None) -> dict:
    """The builder's keyword arguments: the spec's defaults, then a checkpoint's, the weights', the caller's."""
    return {**spec.defaults, **header.get("model_kwargs", {}), **weight_kwargs, **(kwargs or {})}


def create_model(name: str, num_classes: int = 1000, weights: str | os.PathLike | None = None,
                 new_classifier: bool = False, **kwargs) -> nn.Module:
    """Build a registered model; load ``weights`` (local file or cached torchvision name) if given, all but
    their classifier with ``new_classifier``."""
    spec = get_spec(name)
    path, weight_kwargs = (None, {}) if not weights else resolve_weights(name, weights)
    state, header = ({}, {}) if path is None else read_state_dict(path, name)
    build_kwargs = _build_kwargs(spec, header, weight_kwargs, kwargs)
    model = spec.builder(num_classes=num_classes, **build_kwargs)
    model.arch = name
    model.build_kwargs = build_kwargs
    if path is not None:
        load_state_checked(model, state, path, name, num_classes, new_classifier)
    return model

