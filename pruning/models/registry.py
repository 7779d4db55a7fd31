"""The architectures: each registered (``MODELS``) with its input size, stem layers (not pruned by default), unit
layers (studied by default) and, for torchvision's, the name its weights go by.  :mod:`.factory` builds them and
:mod:`.weights` finds and loads what they start from."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from sparsight.registry import Registry

from .small import InceptionSmall, ObserverNet


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
