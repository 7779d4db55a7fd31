"""Weights a model starts from: a local file (a sparsight checkpoint or a plain state_dict) or a torchvision
weights name resolved only from the local ``TORCH_HOME`` cache (nothing is downloaded), read and fitted to
a model with errors that name the file and what does not fit."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from torch import nn

from sparsight.files import looks_like_path, sha256_file

from .registry import get_spec


class WeightsError(ValueError):
    """A weights file is missing, unreadable, or does not fit the requested architecture."""


CHECKPOINT_FORMAT = "sparsight-checkpoint/1"   # header of a sparsight checkpoint (see .checkpoint)


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
