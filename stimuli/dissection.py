"""Network Dissection (Bau et al. 2017; Frankle & Bau 2019; NetDissect-Lite): which units detect a concept.

A *probe set* is a list of images, each with a per-pixel concept *label map*.  For every unit (one
channel of a named layer) dissection

1. takes the threshold ``T`` = the ``quantile`` (default 0.995, i.e. the top 0.5 %) of the unit's
   activations over every spatial position of every probe image — exact, the same value as
   ``torch.quantile(values, quantile)`` with linear interpolation, found by streaming a running
   top-k per unit instead of storing all activations;
2. upsamples each activation map to its label map's size (bilinear, ``align_corners=False``) and
   thresholds it, ``M = act > T``;
3. scores every concept ``c`` by ``IoU = Σ|M ∩ L_c| / Σ|M ∪ L_c|``, both sums over the whole probe set
   (not an average of per-image scores).  A unit is *interpretable* when its best IoU exceeds
   ``iou_threshold`` (0.04); the best concept is its label.

Units constant over the probe set are reported as ``dead`` (``pruned`` when they are exactly zero
in a pruned model) and are never interpretable.  There are two passes over the probe set
(thresholds, then overlaps), one forward pass per batch with hooks on every requested layer at
once; hooks are always removed and the model's train/eval flags restored.  In the second pass only
the (image, unit) maps whose maximum exceeds ``T`` are upsampled (bilinear values never exceed the
largest raw value), and ``Σ|M ∩ L_c|`` is counted over the above-threshold pixels alone with one
``bincount`` of (unit, concept) pairs per chunk — exact integers, vectorized over units, images and
concepts, with work that grows with the active pixels rather than with pixels × concepts (a dense
``[units, pixels] × [pixels, concepts]`` matmul over every upsampled map took 11× longer for
inception-small on concept-shapes, and its cost grows with the number of concepts, ~1200 in Broden).
Unions follow as ``|M| + |L_c| − |M ∩ L_c|``.

Probe-set layouts
-----------------
*Concept-shapes* (the embedded default; :meth:`ProbeSet.from_concept_shapes`): images under
``<data>/<split>/<class>/<name>.png``, label maps under ``<data>/masks/<split>/<class>/<name>.png``
and ``<data>/concepts.json``, as :func:`pruning.data.concept_shapes.generate` writes them.

*Broden-style folder* (any probe set; :meth:`ProbeSet.from_folder`)::

    <probe>/concepts.json                 {"mask_layers": ["object", "colour", ...],
                                           "concepts": {"object": ["sky", "tree", ...], ...}}
    <probe>/images/**/<name>.{png,jpg,jpeg}
    <probe>/masks/**/<name>.png           label map of the image with the same relative path

A label map is an 8-bit PNG with one channel per mask layer, in ``mask_layers`` order (L or P: one
layer; LA: two; RGB: three; RGBA: four; channels beyond the mask layers are ignored).  A pixel's
value in channel ``i`` is the id of its concept in mask layer ``i`` plus one (the index into
``concepts[mask_layers[i]]`` + 1); 0 means no concept of that layer.  A label map may have another
size than its image: activations are compared at label-map resolution.  Images are resized
(whole, no crop) to the network's input size and normalized with the ImageNet statistics.  A missing
or unreadable file, or a concept id beyond its layer's list, raises :class:`ProbeError` naming the
file.

    probe = ProbeSet.from_concept_shapes("runs/default/data", "val")
    result = dissect(model, probe, ["inception4a", "inception5a:0-7"], image_size=64)
    result.unit_table("base")        # one row per unit: best concept, IoU, interpretable, status
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import nn
from torchvision.transforms import functional as TF

from pruning.data.folders import IMAGENET_MEAN, IMAGENET_STD, open_image
from pruning.models.registry import unwrap

from .mining import _EvalMode
from .units import Unit, layer_channels, parse_units

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LABEL_MODES = {"L": 1, "P": 1, "LA": 2, "RGB": 3, "RGBA": 4}
UNIT_COLUMNS = ["model_id", "layer", "unit", "status", "concept", "concept_layer", "iou", "interpretable",
                "threshold", "reason"]
MODEL_COLUMNS = ["model_id", "status", "reason", "units", "alive", "dead", "pruned", "interpretable",
                 "interpretable_fraction", "interpretable_fraction_alive", "unique_concepts", "n_images", "quantile",
                 "iou_threshold"]
IOU_COLUMNS = ["model_id", "layer", "unit", "concept_layer", "concept", "intersection", "union", "iou"]
CHUNK_ELEMENTS = 2 ** 24     # most upsampled activation values held at once
CACHE_LIMIT_BYTES = 1 << 30  # probe sets up to this size are decoded once and kept in memory


class ProbeError(ValueError):
    """A probe set is missing, incomplete or unreadable; the message names the file."""


# ---- probe sets --------------------------------------------------------------------------------
def read_concepts(path: str | Path) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
    """``(mask_layers, {layer: concept names})`` from a ``concepts.json``."""
    path = Path(path)
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise ProbeError(f"probe concept list {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProbeError(f"cannot read probe concept list {path}: {err}") from None
    layers, concepts = info.get("mask_layers") if isinstance(info, dict) else None, \
        info.get("concepts") if isinstance(info, dict) else None
    if not isinstance(layers, list) or not layers or not all(isinstance(x, str) for x in layers):
        raise ProbeError(f"{path}: 'mask_layers' must be a non-empty list of layer names")
    if len(layers) > 4:
        raise ProbeError(f"{path}: {len(layers)} mask layers, but a PNG label map holds at most 4")
    if not isinstance(concepts, dict):
        raise ProbeError(f"{path}: 'concepts' must map every mask layer to its list of concept names")
    for layer in layers:
        names = concepts.get(layer)
        if not isinstance(names, list) or not names or not all(isinstance(x, str) for x in names):
            raise ProbeError(f"{path}: 'concepts' has no list of concept names for mask layer {layer!r}")
        if len(names) > 255:
            raise ProbeError(f"{path}: mask layer {layer!r} has {len(names)} concepts; 8-bit label maps hold 255")
    return tuple(layers), {layer: tuple(concepts[layer]) for layer in layers}


def _index(images_dir: Path, masks_dir: Path) -> tuple[list[Path], list[Path]]:
    """Images under ``images_dir`` (sorted by relative path) and their label maps under ``masks_dir``."""
    if not images_dir.is_dir():
        raise ProbeError(f"probe image folder {images_dir} does not exist")
    images = sorted((p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                    key=lambda p: p.relative_to(images_dir).as_posix())
    if not images:
        raise ProbeError(f"probe image folder {images_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    masks = [masks_dir / p.relative_to(images_dir).with_suffix(".png") for p in images]
    for image, mask in zip(images, masks):
        if not mask.is_file():
            raise ProbeError(f"probe image {image} has no label map: {mask} does not exist")
    return images, masks


@dataclass(frozen=True)
class ProbeSet:
    """Images with per-pixel concept label maps (see the module docstring for the layouts)."""
    images: tuple[Path, ...]
    masks: tuple[Path, ...]
    mask_layers: tuple[str, ...]
    concepts: dict[str, tuple[str, ...]]
    root: Path = Path(".")

    def __post_init__(self):
        if len(self.images) != len(self.masks):
            raise ValueError(f"{len(self.images)} images but {len(self.masks)} label maps")

    @classmethod
    def from_dirs(cls, images_dir: str | Path, masks_dir: str | Path, concepts_file: str | Path,
                  root: str | Path | None = None) -> ProbeSet:
        layers, concepts = read_concepts(concepts_file)
        images, masks = _index(Path(images_dir), Path(masks_dir))
        return cls(tuple(images), tuple(masks), layers, concepts, Path(root or images_dir))

    @classmethod
    def from_concept_shapes(cls, data_root: str | Path, split: str = "val") -> ProbeSet:
        """A concept-shapes split: ``<data>/<split>/``, ``<data>/masks/<split>/``, ``<data>/concepts.json``."""
        root = Path(data_root)
        return cls.from_dirs(root / split, root / "masks" / split, root / "concepts.json", root)

    @classmethod
    def from_folder(cls, probe: str | Path) -> ProbeSet:
        """A Broden-style folder: ``<probe>/concepts.json``, ``<probe>/images/**``, ``<probe>/masks/**``."""
        probe = Path(probe).expanduser()
        if not probe.is_dir():
            raise ProbeError(f"probe folder {probe} does not exist (expected concepts.json, images/, masks/)")
        return cls.from_dirs(probe / "images", probe / "masks", probe / "concepts.json", probe)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def concept_index(self) -> list[tuple[str, str]]:
        """``(mask layer, concept)`` of every concept column, layer by layer."""
        return [(layer, name) for layer in self.mask_layers for name in self.concepts[layer]]

    @property
    def n_concepts(self) -> int:
        return sum(len(self.concepts[layer]) for layer in self.mask_layers)

    def subset(self, indices: Iterable[int]) -> ProbeSet:
        idx = list(indices)
        return ProbeSet(tuple(self.images[i] for i in idx), tuple(self.masks[i] for i in idx), self.mask_layers,
                        self.concepts, self.root)

    def sample(self, max_images: int, seed: int = 0) -> ProbeSet:
        """A seeded sample of ``max_images`` images (kept in sorted order); all when 0 or enough."""
        if max_images <= 0 or max_images >= len(self):
            return self
        return self.subset(sorted(random.Random(seed).sample(range(len(self)), max_images)))

    def fingerprint(self) -> str:
        """Hash of the concept list and every file's relative path, size and modification time."""
        h = hashlib.sha256(json.dumps([self.mask_layers, self.concepts], sort_keys=True).encode())
        for path in self.images + self.masks:
            st = path.stat()
            h.update(f"{_relative(path, self.root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def read_image(self, index: int) -> Image.Image:
        return open_image(self.images[index], what="probe image", error=ProbeError)

    def read_labels(self, index: int) -> np.ndarray:
        """The label map of image ``index`` as ``[mask layers, h, w]`` uint8 (concept id + 1; 0 = none)."""
        path = self.masks[index]
        try:
            with Image.open(path) as im:
                im.load()
                mode, labels = im.mode, np.asarray(im)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise ProbeError(f"cannot decode probe label map {path}: {err}") from None
        n_layers = len(self.mask_layers)
        if mode not in LABEL_MODES:
            raise ProbeError(f"probe label map {path} has PNG mode {mode!r}; use 8-bit L, P, LA, RGB or RGBA")
        if LABEL_MODES[mode] < n_layers:
            raise ProbeError(f"probe label map {path} has {LABEL_MODES[mode]} channel(s) ({mode}) but the probe "
                             f"has {n_layers} mask layers {list(self.mask_layers)}")
        labels = labels.reshape(labels.shape[0], labels.shape[1], -1)[..., :n_layers].transpose(2, 0, 1)
        for i, layer in enumerate(self.mask_layers):
            top = int(labels[i].max())
            if top > len(self.concepts[layer]):
                raise ProbeError(f"probe label map {path}: mask layer {layer!r} holds value {top}, but the layer "
                                 f"has only {len(self.concepts[layer])} concepts (value = concept id + 1)")
        return np.ascontiguousarray(labels, dtype=np.uint8)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def open_probe(probe: str | Path | None = "", data_root: str | Path | None = None, split: str = "val") -> ProbeSet:
    """A Broden-style folder ``probe`` if given, else the concept-shapes masks of ``data_root/split``."""
    if probe:
        return ProbeSet.from_folder(probe)
    if data_root is None:
        raise ProbeError("no probe set: give a Broden-style probe folder or a concept-shapes data root")
    root = Path(data_root)
    if not (root / "masks").is_dir():
        raise ProbeError(f"data folder {root} has no concept masks (masks/); Network Dissection needs a probe set "
                         f"with per-pixel labels: set dissection.probe (or --probe) to a Broden-style folder")
    return ProbeSet.from_concept_shapes(root, split)


# ---- batches -----------------------------------------------------------------------------------
@dataclass
class ProbeBatch:
    images: torch.Tensor                   # [B, 3, S, S] uint8 (normalized on the device: ProbeLoader.prepare)
    labels: list[torch.Tensor] | None      # B label maps [mask layers, h, w] uint8 (sizes may differ)
    indices: list[int]


class _ProbeItems(torch.utils.data.Dataset):
    def __init__(self, probe: ProbeSet, image_size: int, labels: bool):
        self.probe, self.image_size, self.labels = probe, image_size, labels

    def __len__(self) -> int:
        return len(self.probe)

    def __getitem__(self, index: int):
        img = self.probe.read_image(index)
        if img.size != (self.image_size, self.image_size):
            img = TF.resize(img, [self.image_size, self.image_size], antialias=True)
        labels = torch.from_numpy(self.probe.read_labels(index)) if self.labels else None
        return TF.pil_to_tensor(img), labels, index


def _collate(items) -> tuple[torch.Tensor, list | None, list[int]]:
    images = torch.stack([it[0] for it in items])
    labels = [it[1] for it in items] if items[0][1] is not None else None
    return images, labels, [it[2] for it in items]


class ProbeLoader:
    """Batches of a probe set at the network's input size; decoded once and kept in memory when small.

    ``cache``: ``"auto"`` (in memory up to ``CACHE_LIMIT_BYTES``), ``"memory"`` or ``"none"`` (decode on
    every pass, with ``num_workers`` DataLoader workers).  One loader serves every model of a study.
    """

    def __init__(self, probe: ProbeSet, image_size: int, batch_size: int = 64, *, cache: str = "auto",
                 num_workers: int = 0, progress: bool = False):
        if cache not in ("auto", "memory", "none"):
            raise ValueError(f"unknown cache {cache!r}; choose from ['auto', 'memory', 'none']")
        if batch_size < 1 or image_size < 1:
            raise ValueError(f"batch_size and image_size must be at least 1, got {batch_size} and {image_size}")
        self.probe, self.image_size, self.batch_size = probe, int(image_size), int(batch_size)
        self.num_workers, self.progress = num_workers, progress
        if cache == "auto":
            with Image.open(probe.masks[0]) as first:
                h, w = first.size
            per_image = 3 * image_size ** 2 + len(probe.mask_layers) * h * w
            cache = "memory" if len(probe) * per_image <= CACHE_LIMIT_BYTES else "none"
        self.cache = cache
        self._memory: tuple[torch.Tensor, list[torch.Tensor]] | None = None
        self.mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return math.ceil(len(self.probe) / self.batch_size)

    def _loader(self, labels: bool):
        return torch.utils.data.DataLoader(_ProbeItems(self.probe, self.image_size, labels), batch_size=self.batch_size,
                                           shuffle=False, num_workers=self.num_workers, collate_fn=_collate)

    def _decode_all(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self._memory is None:
            from sparsight.progress import progress_bar

            images, labels = [], []
            for imgs, labs, _ in progress_bar(self._loader(True), desc="decode probe", leave=False,
                                              enabled=self.progress):
                images.append(imgs)
                labels += labs
            self._memory = torch.cat(images), labels
        return self._memory

    def batches(self, labels: bool = True) -> Iterator[ProbeBatch]:
        """Every image once, in probe order; label maps only when ``labels``."""
        if self.cache == "memory":
            images, maps = self._decode_all()
            for start in range(0, len(images), self.batch_size):
                stop = min(start + self.batch_size, len(images))
                yield ProbeBatch(images[start:stop], maps[start:stop] if labels else None, list(range(start, stop)))
            return
        for imgs, labs, idx in self._loader(labels):
            yield ProbeBatch(imgs, labs, idx)

    def prepare(self, images: torch.Tensor, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 batch → network input on ``device``: ImageNet-normalized in ``dtype`` (the model's)."""
        x = images.to(device, non_blocking=True).to(dtype) / 255
        return (x - self.mean.to(x)) / self.std.to(x)


# ---- units -------------------------------------------------------------------------------------
def resolve_targets(model: nn.Module, units: Sequence[Unit | str], input_size: int) -> dict[str, list[int]]:
    """``{layer: sorted channels}`` from ``Unit`` objects, ``"layer:3"`` / ``"layer:0-7"`` strings, or bare
    layer names (every channel).  Unknown layers raise ``ValueError`` listing the valid ones."""
    if isinstance(units, (str, Unit)):
        units = [units]
    wanted: dict[str, set[int] | None] = {}
    for item in units:
        if isinstance(item, Unit):
            parsed = [item]
        elif isinstance(item, str) and ":" not in item:
            wanted[item.strip()] = None
            continue
        elif isinstance(item, str):
            parsed = parse_units(item)
        else:
            raise TypeError(f"a unit is a Unit, 'layer:index' or a layer name, not {type(item).__name__}")
        for u in parsed:
            if wanted.get(u.layer, set()) is not None:
                wanted.setdefault(u.layer, set()).add(u.unit)
    if not wanted:
        raise ValueError("no units to dissect")
    channels = layer_channels(model, list(wanted), input_size)
    targets = {}
    for layer, chosen in wanted.items():
        if chosen is None:
            targets[layer] = list(range(channels[layer]))
            continue
        bad = [u for u in sorted(chosen) if u >= channels[layer]]
        if bad:
            raise ValueError(f"unit {layer}:{bad[0]} is out of range: {layer} has {channels[layer]} channels")
        targets[layer] = sorted(chosen)
    return targets


class _Capture:
    """Forward hooks that keep the outputs of ``layers`` of one forward pass; removed on exit."""

    def __init__(self, model: nn.Module, layers: list[str]):
        modules = dict(unwrap(model).named_modules())
        self.layers = list(layers)
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [modules[name].register_forward_hook(self._hook(name)) for name in layers]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor) or output.dim() != 4:
                shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise ValueError(f"layer {name!r} gives {shape}; dissection needs spatial maps [B, C, H, W]")
            self.outputs[name] = output.detach()
        return hook

    def __enter__(self) -> _Capture:
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


# ---- results -----------------------------------------------------------------------------------
@dataclass
class LayerDissection:
    """Thresholds and overlap counts of the dissected channels of one layer (CPU tensors)."""
    layer: str
    units: list[int]
    threshold: torch.Tensor      # [U] float64: the quantile of each unit's activations
    act_min: torch.Tensor        # [U] float64
    act_max: torch.Tensor        # [U] float64
    act_pixels: torch.Tensor     # [U] int64: Σ|M| over the probe set (label-map resolution)
    intersection: torch.Tensor   # [U, C] int64: Σ|M ∩ L_c|

    @property
    def constant(self) -> torch.Tensor:
        return self.act_max == self.act_min


@dataclass
class Dissection:
    """The outcome of :func:`dissect` for one model."""
    concepts: list[tuple[str, str]]        # (mask layer, concept) of every column
    label_pixels: torch.Tensor             # [C] int64: Σ|L_c| over the probe set
    layers: dict[str, LayerDissection]
    n_images: int
    quantile: float
    iou_threshold: float
    pruned_model: bool = False

    def union(self, layer: str) -> torch.Tensor:
        ld = self.layers[layer]
        return ld.act_pixels[:, None] + self.label_pixels[None, :] - ld.intersection

    def iou(self, layer: str) -> torch.Tensor:
        """``[U, C]`` float64 IoU of every dissected unit of ``layer`` with every concept (0 for an empty union)."""
        inter, union = self.layers[layer].intersection.double(), self.union(layer).double()
        return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))

    def status(self, layer: str) -> list[str]:
        ld = self.layers[layer]
        zero = (ld.act_max == 0) & (ld.act_min == 0)
        return ["ok" if not c else "pruned" if z and self.pruned_model else "dead"
                for c, z in zip(ld.constant.tolist(), zero.tolist())]

    def unit_table(self, model_id: str) -> pd.DataFrame:
        """One row per unit (:data:`UNIT_COLUMNS`): the best concept (first column on ties; none when every
        IoU is 0), its IoU, ``interpretable`` (best IoU > ``iou_threshold``), the threshold and the status."""
        rows = []
        for layer, ld in self.layers.items():
            iou = self.iou(layer)
            best = iou.argmax(dim=1) if iou.shape[1] else torch.zeros(len(ld.units), dtype=torch.long)
            for j, (unit, status) in enumerate(zip(ld.units, self.status(layer))):
                value = float(iou[j, best[j]]) if status == "ok" and iou.shape[1] else 0.0
                ok = value > 0                      # no label at all when the unit's mask meets no concept
                concept_layer, concept = self.concepts[int(best[j])] if ok else ("", "")
                rows.append({"model_id": model_id, "layer": layer, "unit": unit, "status": status, "concept": concept,
                             "concept_layer": concept_layer, "iou": value,
                             "interpretable": bool(ok and value > self.iou_threshold),
                             "threshold": float(ld.threshold[j]),
                             "reason": "" if status == "ok" else f"constant activation {float(ld.act_max[j]):.4g}"})
        return pd.DataFrame(rows, columns=UNIT_COLUMNS)

    def iou_table(self, model_id: str) -> pd.DataFrame:
        """Long table of every live unit × concept with a non-empty intersection (the others have IoU 0)."""
        parts = []
        names = np.array([c for _, c in self.concepts], dtype=object)
        cats = np.array([layer for layer, _ in self.concepts], dtype=object)
        for layer, ld in self.layers.items():
            alive = ~ld.constant
            inter, union, iou = ld.intersection, self.union(layer), self.iou(layer)
            rows, cols = torch.nonzero((inter > 0) & alive[:, None], as_tuple=True)
            if not len(rows):
                continue
            parts.append(pd.DataFrame({
                "model_id": model_id, "layer": layer, "unit": np.asarray(ld.units, dtype=np.int64)[rows.numpy()],
                "concept_layer": cats[cols.numpy()], "concept": names[cols.numpy()],
                "intersection": inter[rows, cols].numpy(), "union": union[rows, cols].numpy(),
                "iou": iou[rows, cols].numpy()}))
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=IOU_COLUMNS)


def summarize(units: pd.DataFrame, *, n_images: int = 0, quantile: float = math.nan,
              iou_threshold: float = math.nan) -> pd.DataFrame:
    """One row per model of a unit table (:data:`UNIT_COLUMNS`): units, alive (status ``ok``), dead and
    pruned units, interpretable units (and their share of all and of the alive units), and unique
    concepts — distinct (concept layer, concept) labels of the interpretable units."""
    rows = []
    for model_id, t in units.groupby("model_id", sort=False):
        skipped = bool((t["status"] == "skipped").all())
        interp = t[t["interpretable"].astype(bool)]
        alive = int((t["status"] == "ok").sum())
        rows.append({"model_id": model_id, "status": "skipped" if skipped else "ok",
                     "reason": t["reason"].iloc[0] if skipped else "", "units": len(t), "alive": alive,
                     "dead": int((t["status"] == "dead").sum()), "pruned": int((t["status"] == "pruned").sum()),
                     "interpretable": len(interp),
                     "interpretable_fraction": len(interp) / len(t) if len(t) and not skipped else math.nan,
                     "interpretable_fraction_alive": len(interp) / alive if alive else math.nan,
                     "unique_concepts": len(interp[["concept_layer", "concept"]].drop_duplicates()),
                     "n_images": n_images, "quantile": quantile, "iou_threshold": iou_threshold})
    return pd.DataFrame(rows, columns=MODEL_COLUMNS)


# ---- the two passes ----------------------------------------------------------------------------
class _Quantiles:
    """Exact per-unit quantiles of a stream of activation maps (running top-k per unit) and min/max."""

    def __init__(self, quantile: float, n_images: int):
        self.quantile, self.n_images = quantile, n_images
        self.top: torch.Tensor | None = None
        self.k = 0
        self.n = 0

    def update(self, acts: torch.Tensor) -> None:
        """``acts``: ``[B, U, H, W]`` maps of the dissected units for one batch."""
        values = acts.transpose(0, 1).reshape(acts.shape[1], -1)
        if self.top is None:
            total = self.n_images * acts.shape[2] * acts.shape[3]
            self.lo = math.floor(self.quantile * (total - 1))
            self.k = total - self.lo   # the top-k holds the sorted values at positions lo .. total-1
            self.total = total
            self.top = values[:, :0]
            self.min = values.amin(dim=1)
            self.max = values.amax(dim=1)
        else:
            torch.minimum(self.min, values.amin(dim=1), out=self.min)
            torch.maximum(self.max, values.amax(dim=1), out=self.max)
        merged = torch.cat([self.top, values], dim=1)
        self.top = torch.topk(merged, min(self.k, merged.shape[1]), dim=1, sorted=False).values
        self.n += values.shape[1]

    def result(self) -> torch.Tensor:
        """Linear interpolation between the order statistics at ⌊q(n−1)⌋ and ⌈q(n−1)⌉, as torch.quantile."""
        if self.n != self.total:
            raise RuntimeError(f"saw {self.n} activations per unit, expected {self.total}")
        desc = self.top.sort(dim=1, descending=True).values
        below = desc[:, self.k - 1]
        above = desc[:, max(self.k - 2, 0)]
        frac = self.quantile * (self.total - 1) - self.lo
        return torch.lerp(below, above, torch.full_like(below, frac))


def _label_columns(labels: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """``[G, L, h, w]`` uint8 label maps → ``[G, h·w, L]`` concept columns: concept ``j`` of mask layer ``l``
    is column ``offset_l + j``; "no concept" of layer ``l`` is the spare column ``C + l`` (dropped later)."""
    g, n_layers, h, w = labels.shape
    total = sum(sizes)
    offsets = torch.tensor([sum(sizes[:i]) for i in range(n_layers)], device=labels.device)
    spare = total + torch.arange(n_layers, device=labels.device)
    lab = labels.permute(0, 2, 3, 1).reshape(g, h * w, n_layers).long()
    return torch.where(lab > 0, offsets + lab - 1, spare)


@torch.no_grad()
def dissect(model: nn.Module, probe: ProbeSet | ProbeLoader, units: Sequence[Unit | str], *,
            image_size: int | None = None, quantile: float = 0.995, iou_threshold: float = 0.04,
            batch_size: int = 64, device=None, pruned_model: bool = False, progress: bool = False,
            chunk_elements: int = CHUNK_ELEMENTS) -> Dissection:
    """Network Dissection of ``units`` of ``model`` on ``probe``.

    ``units``: ``Unit`` objects, ``"layer:3"`` / ``"layer:0-7"`` strings or bare layer names (every
    channel).  ``probe`` is a :class:`ProbeSet` (read at ``image_size``, in batches of ``batch_size``)
    or a :class:`ProbeLoader` (reused across models).  The model runs on ``device`` (default: where its
    parameters are) in eval mode, and is moved back and its train/eval flags restored afterwards.
    ``pruned_model`` marks constant-zero units ``pruned`` instead of ``dead``.  ``chunk_elements``
    bounds the number of upsampled activation values held at once.
    """
    if not 0.0 <= quantile < 1.0:
        raise ValueError(f"quantile must lie in [0, 1), got {quantile}")
    if isinstance(probe, ProbeSet):
        if image_size is None:
            raise ValueError("give image_size (the network's input size) with a ProbeSet")
        probe = ProbeLoader(probe, image_size, batch_size, progress=progress)
    params = [p for p in model.parameters() if p.is_floating_point()]
    home = params[0].device if params else torch.device("cpu")
    device = torch.device(device) if device is not None else home
    targets = resolve_targets(model, units, probe.image_size)
    run = _Run(model, probe, targets, device, params[0].dtype if params else torch.float32, progress)
    model.to(device)
    try:
        with _EvalMode(model), _Capture(model, list(targets)) as capture:
            quant = run.thresholds(capture, quantile)
            thresholds = {layer: q.result() for layer, q in quant.items()}
            # a constant unit has no pixel above its threshold (a rounding error in the upsampling must not add one)
            effective = {layer: torch.where(q.max == q.min, torch.full_like(thresholds[layer], math.inf),
                                            thresholds[layer]) for layer, q in quant.items()}
            label_pixels, act_pixels, inter = run.overlaps(capture, effective, chunk_elements)
    finally:
        model.to(home)
    layers = {layer: LayerDissection(layer, list(chans), thresholds[layer].double().cpu(),
                                     quant[layer].min.double().cpu(), quant[layer].max.double().cpu(),
                                     act_pixels[layer].cpu(), inter[layer].cpu())
              for layer, chans in targets.items()}
    return Dissection(probe.probe.concept_index, label_pixels.cpu(), layers, len(probe.probe), float(quantile),
                      float(iou_threshold), bool(pruned_model))


@dataclass
class _Run:
    """The two passes of one dissection over a probe loader."""
    model: nn.Module
    loader: ProbeLoader
    targets: dict[str, list[int]]
    device: torch.device
    dtype: torch.dtype
    progress: bool

    def _batches(self, capture: _Capture, desc: str, labels: bool):
        """``(batch, {layer: [B, U, H, W] maps of the dissected channels})``, one forward pass per batch."""
        from sparsight.progress import progress_bar

        index = {layer: torch.as_tensor(ch, dtype=torch.long, device=self.device) for layer, ch in self.targets.items()}
        for batch in progress_bar(self.loader.batches(labels=labels), total=len(self.loader), desc=desc, leave=False,
                                  enabled=self.progress):
            capture.outputs.clear()
            self.model(self.loader.prepare(batch.images, self.device, self.dtype))
            missing = [layer for layer in self.targets if layer not in capture.outputs]
            if missing:
                raise RuntimeError(f"layer {missing[0]!r} did not run in the forward pass (is it used in eval mode?)")
            yield batch, {layer: capture.outputs[layer].index_select(1, index[layer]) for layer in self.targets}

    def thresholds(self, capture: _Capture, quantile: float) -> dict[str, _Quantiles]:
        """Pass 1: every unit's exact activation quantile, minimum and maximum."""
        quant = {layer: _Quantiles(quantile, len(self.loader.probe)) for layer in self.targets}
        for _, maps in self._batches(capture, "dissect: thresholds", labels=False):
            for layer, m in maps.items():
                quant[layer].update(m)
        return quant

    def overlaps(self, capture: _Capture, thresholds: dict[str, torch.Tensor], chunk_elements: int):
        """Pass 2: ``Σ|L_c|`` ``[C]``, ``Σ|M|`` ``{layer: [U]}`` and ``Σ|M ∩ L_c|`` ``{layer: [U, C]}``."""
        sizes = [len(self.loader.probe.concepts[layer]) for layer in self.loader.probe.mask_layers]
        total, width = sum(sizes), sum(sizes) + len(sizes)   # a spare "no concept" column per mask layer
        inter = {layer: torch.zeros(len(ch), width, dtype=torch.long, device=self.device)
                 for layer, ch in self.targets.items()}
        act_pixels = {layer: torch.zeros(len(ch), dtype=torch.long, device=self.device)
                      for layer, ch in self.targets.items()}
        label_pixels = torch.zeros(total, dtype=torch.long, device=self.device)
        for batch, maps in self._batches(capture, "dissect: overlaps", labels=True):
            for rows, labels in _groups_by_size(batch.labels):
                label_pixels += _overlap_group(maps, rows, labels.to(self.device), sizes, thresholds, inter,
                                               act_pixels, chunk_elements)
        return label_pixels, act_pixels, {layer: t[:, :total] for layer, t in inter.items()}


def _groups_by_size(labels: list[torch.Tensor]) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Batch rows grouped by label-map size, with their label maps stacked ``[G, L, h, w]``."""
    groups: dict[tuple, list[int]] = {}
    for i, lab in enumerate(labels):
        groups.setdefault(tuple(lab.shape), []).append(i)
    for rows in groups.values():
        yield rows, torch.stack([labels[i] for i in rows])


def _overlap_group(acts: dict[str, torch.Tensor], rows: list[int], labels: torch.Tensor, sizes: list[int],
                   thresholds: dict[str, torch.Tensor], inter: dict[str, torch.Tensor],
                   act_pixels: dict[str, torch.Tensor], chunk_elements: int) -> torch.Tensor:
    """Add the overlaps of batch rows ``rows`` (label maps ``labels [G, L, h, w]``, one size) into ``inter``
    (``[U, C + L]``, spare columns included) and ``act_pixels``; return the label pixel counts ``[C]``.

    Only (image, unit) maps whose maximum exceeds the unit's threshold are upsampled — bilinear values
    never exceed the largest of their four neighbours, so the others have no pixel above it (and a
    rounding error cannot invent one) — and the intersections are counted over the above-threshold
    pixels alone: one ``bincount`` of (unit, concept column) pairs per chunk, exact integers.
    """
    g, n_layers, h, w = labels.shape
    hw = h * w
    total = sum(sizes)
    width = total + n_layers
    cols = _label_columns(labels, sizes)                                   # [G, hw, L]
    label_pixels = torch.bincount(cols.reshape(-1), minlength=width)[:total]
    rows_t = torch.as_tensor(rows, dtype=torch.long, device=labels.device)
    step = max(1, chunk_elements // hw)
    for layer, a in acts.items():
        a = a.index_select(0, rows_t)                                      # [G, U, H, W]
        t = thresholds[layer]
        gi, ui = torch.nonzero(a.amax(dim=(2, 3)) > t, as_tuple=True)     # maps that reach above T
        flat_inter = inter[layer].view(-1)
        for s in range(0, len(gi), step):
            gk, uk = gi[s:s + step], ui[s:s + step]
            up = F.interpolate(a[gk, uk].unsqueeze(1), size=(h, w), mode="bilinear", align_corners=False)
            above = up.view(len(gk), hw) > t[uk].unsqueeze(1)              # M for each (image, unit) map
            act_pixels[layer].index_add_(0, uk, above.sum(dim=1))
            k, p = torch.nonzero(above, as_tuple=True)
            pairs = (uk[k].unsqueeze(1) * width + cols[gk[k], p]).reshape(-1)
            flat_inter += torch.bincount(pairs, minlength=flat_inter.numel())
    return label_pixels


# ---- tables ------------------------------------------------------------------------------------
def skipped_units(model_id: str, units: Sequence[Unit], reason: str) -> pd.DataFrame:
    """Unit rows of a model that was not dissected (e.g. physically pruned: channels renumbered)."""
    return pd.DataFrame([{"model_id": model_id, "layer": u.layer, "unit": u.unit, "status": "skipped", "concept": "",
                          "concept_layer": "", "iou": 0.0, "interpretable": False, "threshold": math.nan,
                          "reason": reason} for u in units], columns=UNIT_COLUMNS)
