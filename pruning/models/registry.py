"""Model registry: one factory, ``create_model(name, num_classes, weights=None)``.

``weights`` is a local file (a sparsight checkpoint or a plain state_dict) or a torchvision
weights name such as ``"IMAGENET1K_V1"`` that is resolved only from the local ``TORCH_HOME``
cache; nothing is downloaded.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from sparsight.errors import closest, module_choices
from sparsight.files import looks_like_path, sha256_file
from sparsight.registry import Registry

from .modes import eval_mode
from .small import InceptionSmall, ObserverNet


class WeightsError(ValueError):
    """A weights file is missing, unreadable, or does not fit the requested architecture."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]
    input_size: int
    stem: tuple[str, ...] = ()             # layers excluded from pruning by default
    unit_layers: tuple[str, ...] = ()      # default layers whose units are studied
    torchvision_name: str | None = None    # for torchvision weights names
    description: str = ""
    defaults: dict = field(default_factory=dict)
    weights_kwargs: dict = field(default_factory=dict)   # builder kwargs torchvision's own weights need


MODELS = Registry("model")

CHECKPOINT_FORMAT = "sparsight-checkpoint/1"   # header of a sparsight checkpoint (see .checkpoint)


def register_model(name: str, input_size: int, *, stem: tuple[str, ...] = (), unit_layers: tuple[str, ...] = (),
                   torchvision_name: str | None = None, defaults: dict | None = None,
                   weights_kwargs: dict | None = None):
    """Decorator: register a builder ``fn(num_classes=..., **kw) -> nn.Module`` as model ``name``.

    The builder's docstring is the model's one-line description.
    """
    def spec(builder: Callable[..., nn.Module]) -> ModelSpec:
        return ModelSpec(name, builder, input_size, stem=stem, unit_layers=unit_layers,
                         torchvision_name=torchvision_name, description=(builder.__doc__ or "").strip(),
                         defaults=dict(defaults or {}), weights_kwargs=dict(weights_kwargs or {}))
    return MODELS.register(name, spec)


def get_spec(name: str) -> ModelSpec:
    return MODELS.lookup(name)


def _torchvision(name: str, num_classes: int, **kw) -> nn.Module:
    import torchvision
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kw)


GOOGLENET_BLOCKS = ("inception3a", "inception3b", "inception4a", "inception4b", "inception4c", "inception4d",
                    "inception4e", "inception5a", "inception5b")
RESNET_BLOCKS = ("layer1", "layer2", "layer3", "layer4")


@register_model("inception-small", 64, stem=("conv1", "conv2", "conv3"),
                unit_layers=("inception3a", "inception3b", "inception4a", "inception4b", "inception5a"))
def inception_small(num_classes: int = 10, **kw) -> nn.Module:
    """small GoogLeNet-shaped net of the embedded default study"""
    return InceptionSmall(num_classes=num_classes, **kw)


@register_model("observer-small", 64, stem=("stem.0",), unit_layers=("layers.1", "layers.2"))
def observer_small(num_classes: int = 10, **kw) -> nn.Module:
    """independent residual observer net (MIS embedding of the default study)"""
    return ObserverNet(num_classes=num_classes, **kw)


# torchvision's GoogLeNet weights were converted from TensorFlow and expect transform_input
@register_model("googlenet", 224, stem=("conv1", "conv2", "conv3"), unit_layers=GOOGLENET_BLOCKS,
                torchvision_name="googlenet", weights_kwargs={"transform_input": True})
def googlenet(num_classes: int = 1000, aux_logits: bool = False, transform_input: bool = False, **kw) -> nn.Module:
    """torchvision GoogLeNet (aux heads optional)"""
    import torchvision
    return torchvision.models.googlenet(weights=None, num_classes=num_classes, aux_logits=aux_logits,
                                        transform_input=transform_input, init_weights=True, **kw)


@register_model("resnet18", 224, stem=("conv1",), unit_layers=RESNET_BLOCKS, torchvision_name="resnet18")
def resnet18(num_classes: int = 1000, **kw) -> nn.Module:
    """torchvision ResNet-18"""
    return _torchvision("resnet18", num_classes, **kw)


@register_model("resnet50", 224, stem=("conv1",), unit_layers=RESNET_BLOCKS, torchvision_name="resnet50")
def resnet50(num_classes: int = 1000, **kw) -> nn.Module:
    """torchvision ResNet-50"""
    return _torchvision("resnet50", num_classes, **kw)


@register_model("vgg16", 224, stem=("features.0",), unit_layers=("features.16", "features.23", "features.30"),
                torchvision_name="vgg16")
def vgg16(num_classes: int = 1000, **kw) -> nn.Module:
    """torchvision VGG-16"""
    return _torchvision("vgg16", num_classes, **kw)


@register_model("alexnet", 224, stem=("features.0",),
                unit_layers=("features.3", "features.6", "features.8", "features.10"), torchvision_name="alexnet")
def alexnet(num_classes: int = 1000, **kw) -> nn.Module:
    """torchvision AlexNet"""
    return _torchvision("alexnet", num_classes, **kw)


# ---- weights ---------------------------------------------------------------------------------
def torchvision_weights(arch: str, name: str):
    """The torchvision weights enum member for ``name`` (``IMAGENET1K_V1``, ``DEFAULT``, or qualified)."""
    import torchvision

    spec = get_spec(arch)
    if spec.torchvision_name is None:
        raise WeightsError(f"model {arch!r} has no torchvision weights; give a local weights file instead")
    enum = torchvision.models.get_model_weights(spec.torchvision_name)
    member = name.split(".")[-1]
    valid = ["DEFAULT"] + [w.name for w in enum]
    if member not in valid:
        raise WeightsError(f"unknown weights {name!r} for {arch}; choose from {valid} or give a local file path")
    return enum.DEFAULT if member == "DEFAULT" else enum[member]


def resolve_weights(arch: str, weights: str | os.PathLike) -> tuple[Path, dict]:
    """Find the local file behind ``weights``; return it and the builder kwargs the weights need."""
    weights = str(weights)
    if looks_like_path(weights):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(f"weights file {path} does not exist (model {arch})")
        return path, _known_file_kwargs(arch, path)
    member = torchvision_weights(arch, weights)
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(member.url)
    if not path.is_file():
        raise WeightsError(
            f"torchvision weights {type(member).__name__}.{member.name} for {arch} are not in the local cache: "
            f"expected {path}. Nothing is downloaded at run time: copy the file there (or set TORCH_HOME) "
            f"or pass the path of a local weights file.")
    return path, _weights_kwargs(arch, member)


@functools.lru_cache(maxsize=64)
def _content_digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def weights_digest(arch: str, weights: str | os.PathLike | None) -> str:
    """What identifies the weights a study starts from, so a changed file reruns what was trained on it: the
    sha256 of the file, a local one or the torchvision cache file a name stands for (a study's own weights
    placed under torchvision's file name are as usual as a download); the reason where the weights cannot be
    found (the stage that loads them says so)."""
    if not weights:
        return ""
    try:
        path, _ = resolve_weights(arch, weights)
    except (WeightsError, ValueError) as err:
        return f"unavailable: {err}"
    stat = Path(path).stat()
    return _content_digest(str(path), stat.st_size, stat.st_mtime_ns)


def _weights_kwargs(arch: str, member) -> dict:
    """The builder kwargs torchvision's weights ``member`` of ``arch`` need (its registry entry's)."""
    return dict(get_spec(arch).weights_kwargs)


def _known_file_kwargs(arch: str, path: Path) -> dict:
    """The builder kwargs of torchvision weights given as a file: found by its name, or, renamed, by its content
    (torchvision's file names end in the first 8 hex digits of the file's sha256)."""
    spec = get_spec(arch)
    if spec.torchvision_name is None or not _weights_kwargs(arch, None):
        return {}
    import torchvision
    members = list(torchvision.models.get_model_weights(spec.torchvision_name))
    for member in members:
        if os.path.basename(member.url) == path.name:
            return _weights_kwargs(arch, member)
    digest = sha256_file(path)[:8]
    for member in members:
        if os.path.splitext(os.path.basename(member.url))[0].endswith(f"-{digest}"):
            return _weights_kwargs(arch, member)
    return {}


def read_state_dict(path: Path, arch: str) -> tuple[dict, dict]:
    """Tensors of a weights file and, for a sparsight checkpoint, its header (arch, kwargs, masks)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        raise WeightsError(f"cannot read weights file {path}: {type(err).__name__}: {err}") from None
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        if obj.get("arch") != arch:
            raise WeightsError(f"weights file {path} holds a {obj.get('arch')!r} checkpoint, "
                               f"but model {arch!r} was requested")
        return obj["state_dict"], obj
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"weights file {path} is not a state_dict or sparsight checkpoint")
    return {k.removeprefix("module."): v for k, v in obj.items()}, {}


def _classifier_hint(own: dict, state: dict, num_classes: int) -> str:
    """Where only the classifier's number of classes differs (say ImageNet weights for a 5-class dataset), what
    the numbers are and what to do."""
    differ = [k for k in own if state[k].shape != own[k].shape]
    counts = {state[k].shape[0] for k in differ}
    if len(counts) != 1 or any(state[k].shape[1:] != own[k].shape[1:] or own[k].shape[0] != num_classes
                               for k in differ):
        return ""
    return (f" — only the classifier differs: the file's has {counts.pop()} classes, the model's {num_classes} (the "
            f"data's class folders, or model.num_classes); these weights fit data with that many classes, or set "
            f"model.new_classifier = true to train a fresh classifier on them")


def load_state_checked(model: nn.Module, state: dict, path: Path, arch: str, num_classes: int,
                       new_classifier: bool = False) -> None:
    """``load_state_dict(strict=True)`` with an error that names the file, arch and mismatches; with
    ``new_classifier`` the tensors that differ only in their number of classes (the classifier, and GoogLeNet's
    auxiliary ones) keep the model's fresh initialization."""
    model.load_state_dict(fitted_state(model.state_dict(), state, path, arch, num_classes, new_classifier), strict=True)


def fitted_state(own: dict, state: dict, path: Path, arch: str, num_classes: int,
                 new_classifier: bool = False) -> dict:
    """The tensors of ``state`` to load into a model whose state_dict is ``own`` (see :func:`load_state_checked`);
    a :class:`WeightsError` naming the file, arch and mismatches where they do not fit."""
    state = {k: v for k, v in state.items() if k in own or not k.startswith(("aux1.", "aux2."))}
    if new_classifier and all(k in state for k in own) and _classifier_hint(own, state, num_classes):
        state = {k: own[k] if k in own and state[k].shape != own[k].shape else v for k, v in state.items()}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:4]) + (" ..." if len(shapes) > 4 else ""))
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        hint = "" if missing or unexpected else _classifier_hint(own, state, num_classes)
        raise WeightsError(f"weights file {path} does not fit model {arch!r} with num_classes={num_classes}: "
                           + ", ".join(parts) + hint)
    return state


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
