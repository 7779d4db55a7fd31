"""Image embeddings for the MIS surrogate: a registry of backbones plus a content-addressed cache.

Backbones (``create_embedding(name, ...)``):

- ``observer`` — the study's observer network (penultimate features), the default-study choice;
- any registered model name (``googlenet``, ``resnet50``, …) with local weights (``mis.embedding_weights``:
  a file, or a torchvision weights name found in the ``TORCH_HOME`` cache);
- ``dreamsim`` — the DreamSim perceptual embedding, when the ``dreamsim`` package and its weights are
  present locally (never downloaded);
- ``pixels`` — raw pixels centred on grey, a model-free baseline.

An :class:`EmbeddingCache` computes each image once (keyed by its content hash, i.e. the bank file
name), in batches on the backbone's device, and keeps the vectors in one file per backbone.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from sparsight.layout import Layout
from sparsight.registry import Registry

from pruning.data.common import IMAGENET_MEAN, IMAGENET_STD
from pruning.models.checkpoint import atomic_save


@dataclass
class Embedding:
    """``fn`` maps a batch of uint8 images ``[B, 3, H, W]`` (already at ``size``) to features ``[B, D]``."""
    name: str
    key: str               # identifies the backbone and its weights (cache file name)
    size: int
    fn: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        return self.fn(to_batch(images, self.size).to(self.device)).float().cpu()


def to_batch(images: list[Image.Image], size: int) -> torch.Tensor:
    arrays = [np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def penultimate(model: torch.nn.Module, device, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Features = the input of the model's last ``nn.Linear`` (hook added and removed per call)."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer whose input could serve as the embedding")
    head = linears[-1]
    model = model.eval().to(device)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def fn(batch: torch.Tensor) -> torch.Tensor:
        captured = []
        handle = head.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0].flatten(1)))
        try:
            model((batch.float() / 255 - mean_t) / std_t)
        finally:
            handle.remove()
        return captured[0]
    return fn


def _digest(path: Path) -> str:
    from sparsight.files import sha256_file
    return sha256_file(path)[:12]


#: Embeddings of their own (any registered image model is one too, with its weights).
EMBEDDINGS = Registry("embedding")


@EMBEDDINGS.register("pixels")
def _pixels(_run_dir, _weights, device, size):
    return Embedding("pixels", f"pixels-{size or 16}", size or 16, lambda b: b.flatten(1).float() / 255 - 0.5,
                     torch.device(device))


@EMBEDDINGS.register("observer")
def _observer(run_dir, _weights, device, size):
    from pruning.models import load_checkpoint
    from sparsight.config import load_study
    layout = Layout(run_dir)
    path = layout.checkpoint("observer")
    if not path.is_file():
        raise FileNotFoundError(f"no observer network at {path}; train it with `sparsight run` or choose another "
                                f"mis.embedding")
    model = load_checkpoint(path, map_location=device).model
    toml = layout.study_toml
    size = size or (load_study(toml).data.image_size if toml.is_file() else 64)
    return Embedding("observer", f"observer-{_digest(path)}-{size}", size, penultimate(model, device),
                     torch.device(device))


def _registered(name: str):
    def build(_run_dir, weights, device, size):
        from pruning.models import create_model, get_spec
        from pruning.models.weights import resolve_weights
        if not weights:
            raise ValueError(f"mis.embedding = {name!r} needs local weights: set mis.embedding_weights to a file or a "
                             f"torchvision weights name present in the TORCH_HOME cache")
        path, _ = resolve_weights(name, weights)
        model = create_model(name, num_classes=1000, weights=weights)
        size = size or get_spec(name).input_size
        return Embedding(name, f"{name}-{_digest(path)}-{size}", size, penultimate(model, device), torch.device(device))
    return build


@EMBEDDINGS.register("dreamsim")
def _dreamsim(_run_dir, weights, device, size):
    try:
        from dreamsim import dreamsim
    except ImportError:
        raise ValueError("mis.embedding = 'dreamsim' needs the dreamsim package (pip install dreamsim) and its "
                         "weights in a local folder (mis.embedding_weights)") from None
    cache = Path(weights or os.environ.get("DREAMSIM_CACHE", "models")).expanduser()
    if not cache.is_dir() or not any(cache.rglob("*.pth")):
        raise FileNotFoundError(f"no DreamSim weights under {cache}; nothing is downloaded at run time — put the "
                                f"DreamSim checkpoint folder there or set mis.embedding_weights to it")
    model, _preprocess = dreamsim(pretrained=True, cache_dir=str(cache), device=str(device))
    size = size or 224

    @torch.no_grad()
    def fn(batch):
        return model.embed(batch.float() / 255)
    return Embedding("dreamsim", f"dreamsim-{size}", size, fn, torch.device(device))


def embedding_names() -> list[str]:
    from pruning.models import MODELS
    return sorted(set(EMBEDDINGS) | {m for m in MODELS if m not in ("inception-small", "observer-small")})


def create_embedding(name: str, run_dir: str | os.PathLike | None = None, *, weights: str = "",
                     device: str | torch.device = "cpu", size: int = 0) -> Embedding:
    """The embedding backbone ``name`` (see the module docstring); errors list the valid names."""
    from pruning.models import MODELS
    if name in EMBEDDINGS:
        return EMBEDDINGS[name](run_dir, weights, device, size)
    if name in MODELS:
        return _registered(name)(run_dir, weights, device, size)
    raise ValueError(f"unknown embedding {name!r}; choose from {embedding_names()}")


class EmbeddingCache:
    """Vectors of bank images by content id, computed once per backbone and stored in ``path``."""

    def __init__(self, embedding: Embedding, path: str | os.PathLike | None = None, batch_size: int = 128,
                 progress: bool = False):
        self.embedding, self.batch_size, self.progress = embedding, batch_size, progress
        self.path = Path(path) if path else None
        self.vectors: dict[str, torch.Tensor] = {}
        if self.path and self.path.is_file():
            stored = torch.load(self.path, map_location="cpu", weights_only=True)
            if stored.get("key") == embedding.key:
                self.vectors = dict(zip(stored["ids"], stored["features"]))

    def features(self, ids: list[str], load: Callable[[str], Image.Image]) -> torch.Tensor:
        """``[len(ids), D]`` features; images not cached yet are loaded with ``load(id)`` and embedded."""
        from sparsight.progress import progress_bar
        missing = list(dict.fromkeys(i for i in ids if i not in self.vectors))
        for start in progress_bar(range(0, len(missing), self.batch_size), desc=f"embed ({self.embedding.name})",
                                  unit="batch", enabled=bool(self.progress and missing), leave=False):
            chunk = missing[start:start + self.batch_size]
            feats = self.embedding([load(i) for i in chunk])
            self.vectors.update(zip(chunk, feats))
        if missing and self.path:
            self.save()
        return torch.stack([self.vectors[i] for i in ids]) if ids else torch.empty(0)

    def save(self) -> Path:
        ids = sorted(self.vectors)
        return atomic_save({"key": self.embedding.key, "ids": ids,
                            "features": torch.stack([self.vectors[i] for i in ids])}, self.path)
