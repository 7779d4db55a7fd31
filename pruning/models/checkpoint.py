"""Checkpoints (``model.pt``) and their metadata (``meta.json``), per DESIGN §3.

A checkpoint is a plain dict of tensors, strings and numbers, so it loads with
``torch.load(path, weights_only=True)``; ``load_checkpoint`` rebuilds the model from its arch name.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sparsight.files import atomic_write, atomic_write_text, sha256_file
from sparsight.layout import CHECKPOINT_FILE, META_FILE

from ..masks import apply_masks
from .counting import count_flops, count_params, layer_sizes, measure_sparsity, prunable_weights
from .factory import create_model
from .layers import unwrap
from .registry import MODELS
from .resize import resize_to_state
from .weights import CHECKPOINT_FORMAT, WeightsError, load_state_checked

__all__ = ["CHECKPOINT_FORMAT", "LoadedCheckpoint", "atomic_save", "base_meta", "count_flops", "count_params",
           "file_sha256", "layer_sizes", "load_checkpoint", "measure_sparsity", "prunable_weights", "read_meta",
           "save_checkpoint", "software_version", "write_meta"]


def software_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("sparsight")
    except PackageNotFoundError:  # running from a source tree
        return "0+unknown"


file_sha256 = sha256_file


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically (see :func:`sparsight.files.atomic_write`); return the path."""
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *, num_classes: int, masks: dict | None = None,
                    args: dict | None = None, physical: bool | None = None) -> str:
    """Write ``model.pt`` atomically; return its sha256.

    ``physical`` marks a model whose channels were physically removed (``pruning.physical``), so
    ``load_checkpoint`` resizes the rebuilt arch to the stored shapes; ``None`` takes the mark the
    model carries (``remove_pruned_filters`` / ``load_checkpoint`` set ``model.physically_pruned``).
    """
    model = unwrap(model)
    if physical is None:
        physical = bool(getattr(model, "physically_pruned", False))
    path = Path(path)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    obj = {
        "format": CHECKPOINT_FORMAT,
        "arch": model.arch,
        "num_classes": int(num_classes),
        "model_kwargs": dict(getattr(model, "build_kwargs", {})),
        "state_dict": state,
        "masks": {k: v.detach().cpu().to(torch.bool) for k, v in (masks or {}).items()},
        "args": args or {},
        "physical": bool(physical),
    }
    atomic_save(obj, path)
    return file_sha256(path)


@dataclass
class LoadedCheckpoint:
    model: nn.Module
    arch: str
    num_classes: int
    path: Path
    sha256: str
    masks: dict = field(default_factory=dict)
    args: dict = field(default_factory=dict)

    @property
    def channel_map(self) -> dict[str, list[int]]:
        """Physically pruned models: module name → the parent channel of each of its output channels
        (modules that lost none are absent; an unpruned model has an empty map)."""
        raw = self.args.get("channel_map")
        return json.loads(raw) if raw else {}


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Rebuild a model from ``model.pt``; masks stored with it are applied to the weights."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist")
    try:
        header = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().split("\n")[0].split(". ")[0][:160]
        raise WeightsError(f"cannot read checkpoint {path}: not a readable PyTorch file ({type(err).__name__}: "
                           f"{first}); give a model.pt written by sparsight") from None
    if not isinstance(header, dict) or header.get("format") != CHECKPOINT_FORMAT:
        raise WeightsError(f"{path} is not a sparsight checkpoint (no '{CHECKPOINT_FORMAT}' header); "
                           f"use create_model(arch, weights=...) for a plain state_dict")
    arch = header.get("arch")
    if arch not in MODELS:
        raise WeightsError(f"checkpoint {path} names unknown arch {arch!r}; known: {sorted(MODELS)}")
    model = create_model(arch, num_classes=header["num_classes"], **header.get("model_kwargs", {}))
    if header.get("physical"):  # channels were removed: give the layers the stored shapes first
        resize_to_state(model, header["state_dict"])
    load_state_checked(model, header["state_dict"], path, arch, header["num_classes"])
    masks = header.get("masks", {})
    try:
        apply_masks(model, masks)
    except (KeyError, ValueError) as err:
        raise WeightsError(f"checkpoint {path}: its masks do not fit {arch}: {err.args[0]}") from None
    return LoadedCheckpoint(model.to(map_location), arch, header["num_classes"], path, file_sha256(path),
                            masks, header.get("args", {}))


# ---- meta.json ------------------------------------------------------------------------------
def base_meta(model: nn.Module, *, model_id: str, input_size: int, seed: int, parent: str | None = None,
              **fields) -> dict:
    """The meta.json keys every checkpoint has; callers add method-specific ones."""
    total, nonzero = count_params(model)
    meta = {
        "model_id": model_id, "arch": unwrap(model).arch, "input_size": int(input_size), "parent": parent,
        "method": None, "criterion": None,
        "schedule": None, "rate_requested": 0.0, "sparsity": measure_sparsity(model),
        "params_total": total, "params_nonzero": nonzero, "flops": count_flops(model, input_size),
        "top1": {}, "top5": {}, "retrain": {}, "robustness": {}, "seed": seed,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "software_version": software_version(),
    }
    meta.update(fields)
    return meta


def write_meta(model_dir: str | os.PathLike, meta: dict) -> Path:
    return atomic_write_text(Path(model_dir) / META_FILE, json.dumps(meta, indent=2))


def read_meta(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / META_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no meta.json in {model_dir}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
