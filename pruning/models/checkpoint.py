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

from sparsight.files import atomic_write_text, sha256_file

from .registry import MODELS, WeightsError, create_model, load_state_checked, unwrap

CHECKPOINT_FORMAT = "sparsight-checkpoint/1"


def software_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("sparsight")
    except PackageNotFoundError:  # running from a source tree
        return "0+unknown"


file_sha256 = sha256_file


def atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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
        path = path / "model.pt"
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
        from ..physical import resize_to_state
        resize_to_state(model, header["state_dict"])
    load_state_checked(model, header["state_dict"], path, arch, header["num_classes"])
    masks = header.get("masks", {})
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            if name not in params or params[name].shape != mask.shape:
                raise WeightsError(f"checkpoint {path}: mask {name!r} does not match a parameter of {arch}")
            params[name].mul_(mask.to(params[name].dtype))
    return LoadedCheckpoint(model.to(map_location), arch, header["num_classes"], path, file_sha256(path),
                            masks, header.get("args", {}))


# ---- measurements for meta.json -------------------------------------------------------------
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
    was_training = model.training
    model.eval()
    x = torch.zeros(1, 3, input_size, input_size, device=device, dtype=next(model.parameters()).dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops())


def base_meta(model: nn.Module, *, model_id: str, input_size: int, seed: int, parent: str | None = None,
              **fields) -> dict:
    """The meta.json keys every checkpoint has; callers add method-specific ones."""
    total, nonzero = count_params(model)
    meta = {
        "model_id": model_id, "arch": unwrap(model).arch, "parent": parent, "method": None, "criterion": None,
        "schedule": None, "rate_requested": 0.0, "sparsity": measure_sparsity(model),
        "params_total": total, "params_nonzero": nonzero, "flops": count_flops(model, input_size),
        "top1": {}, "top5": {}, "retrain": {}, "robustness": {}, "seed": seed,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "software_version": software_version(),
    }
    meta.update(fields)
    return meta


def write_meta(model_dir: str | os.PathLike, meta: dict) -> Path:
    return atomic_write_text(Path(model_dir) / "meta.json", json.dumps(meta, indent=2))


def read_meta(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / "meta.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no meta.json in {model_dir}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
