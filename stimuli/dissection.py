"""Network Dissection (Bau et al. 2017; Frankle & Bau 2019; NetDissect-Lite): which units detect a concept.

A *probe set* (:mod:`stimuli.probes`: Broden, a folder of label maps, or concept-shapes) gives every
image per-pixel concept labels, and possibly whole-image labels.  For every unit (one channel of a
named layer) dissection

1. takes the threshold ``T`` = the ``quantile`` (default 0.995, i.e. the top 0.5 %) of the unit's
   activations over every spatial position of every probe image — exact, the same value as
   ``torch.quantile(values, quantile)`` with linear interpolation, found by streaming a running
   top-k per unit instead of storing all activations;
2. upsamples each activation map to its label map's size (bilinear, ``align_corners=False``) and
   thresholds it, ``M = act > T``;
3. scores every concept ``c`` by ``IoU = Σ|M ∩ L_c| / Σ|M ∪ L_c|``, both sums over the probe images
   annotated in ``c``'s category (Bau et al.: Broden's sources label different categories, and a
   unit firing on an image without, say, part labels is no evidence against a part concept), not an
   average of per-image scores.  A whole-image label (a scene, a texture) covers every pixel.  A unit
   is *interpretable* when its best IoU exceeds ``iou_threshold`` (0.04); the best concept is its label.

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
Whole-image labels and the per-category ``Σ|M|`` are one small matmul of the per-map counts per
batch.  Unions follow as ``Σ|M| (images of c's category) + Σ|L_c| − Σ|M ∩ L_c|``.

    probe = ProbeSet.from_concept_shapes("runs/default/data", "val")
    result = dissect(model, probe, ["inception4a", "inception5a:0-7"], image_size=64)
    result.unit_table("base")        # one row per unit: best concept, IoU, interpretable, status
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import functional as TF

from pruning.data.folders import IMAGENET_MEAN, IMAGENET_STD
from pruning.models.modes import eval_mode
from pruning.models.layers import unwrap

from .probes import ImageLabels, ProbeSet
from .units import Unit, layer_channels, parse_units

UNIT_COLUMNS = ["model_id", "layer", "unit", "status", "concept", "concept_layer", "iou", "interpretable",
                "threshold", "reason"]
MODEL_COLUMNS = ["model_id", "status", "reason", "units", "alive", "dead", "pruned", "interpretable",
                 "interpretable_fraction", "interpretable_fraction_alive", "unique_concepts", "n_images", "quantile",
                 "iou_threshold"]
IOU_COLUMNS = ["model_id", "layer", "unit", "concept_layer", "concept", "intersection", "union", "iou"]
CHUNK_ELEMENTS = 2 ** 24     # most upsampled activation values held at once
CACHE_LIMIT_BYTES = 1 << 30  # probe sets up to this size are decoded once and kept in memory


# ---- batches -----------------------------------------------------------------------------------
@dataclass
class ProbeBatch:
    images: torch.Tensor                   # [B, 3, S, S] uint8 (normalized on the device: ProbeLoader.prepare)
    labels: list[ImageLabels] | None       # B images' labels (label-map sizes may differ)
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
        labels = self.probe.read_labels(index) if self.labels else None
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
            total = len(probe) * 3 * image_size ** 2 + probe.label_bytes()
            cache = "memory" if total <= CACHE_LIMIT_BYTES else "none"
        self.cache = cache
        self._memory: tuple[torch.Tensor, list[ImageLabels]] | None = None
        self.mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return math.ceil(len(self.probe) / self.batch_size)

    def _loader(self, labels: bool):
        return torch.utils.data.DataLoader(_ProbeItems(self.probe, self.image_size, labels), batch_size=self.batch_size,
                                           shuffle=False, num_workers=self.num_workers, collate_fn=_collate)

    def _decode_all(self) -> tuple[torch.Tensor, list[ImageLabels]]:
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
    threshold: torch.Tensor         # [U] float64: the quantile of each unit's activations
    act_min: torch.Tensor           # [U] float64
    act_max: torch.Tensor           # [U] float64
    act_pixels: torch.Tensor        # [U] int64: Σ|M| over the probe set (label-map resolution)
    category_pixels: torch.Tensor   # [U, K] int64: Σ|M| over the images annotated in category k
    intersection: torch.Tensor      # [U, C] int64: Σ|M ∩ L_c|

    @property
    def constant(self) -> torch.Tensor:
        return self.act_max == self.act_min


@dataclass
class Dissection:
    """The outcome of :func:`dissect` for one model."""
    concepts: list[tuple[str, str]]        # (category, concept) of every column
    concept_category: torch.Tensor         # [C] int64: the category index of every column
    label_pixels: torch.Tensor             # [C] int64: Σ|L_c| over the probe set
    layers: dict[str, LayerDissection]
    n_images: int
    quantile: float
    iou_threshold: float
    pruned_model: bool = False

    def union(self, layer: str) -> torch.Tensor:
        """``[U, C]`` Σ|M ∪ L_c| over the images annotated in concept c's category."""
        ld = self.layers[layer]
        return ld.category_pixels[:, self.concept_category] + self.label_pixels[None, :] - ld.intersection

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
        with eval_mode(model), _Capture(model, list(targets)) as capture:
            quant = run.thresholds(capture, quantile)
            thresholds = {layer: q.result() for layer, q in quant.items()}
            # a constant unit has no pixel above its threshold (a rounding error in the upsampling must not add one)
            effective = {layer: torch.where(q.max == q.min, torch.full_like(thresholds[layer], math.inf),
                                            thresholds[layer]) for layer, q in quant.items()}
            counts = run.overlaps(capture, effective, chunk_elements)
    finally:
        model.to(home)
    layers = {layer: LayerDissection(layer, list(chans), thresholds[layer].double().cpu(),
                                     quant[layer].min.double().cpu(), quant[layer].max.double().cpu(),
                                     counts.act_pixels[layer].cpu(), counts.category_pixels[layer].cpu(),
                                     counts.intersection[layer][:, :-1].cpu())
              for layer, chans in targets.items()}
    return Dissection(probe.probe.concept_index, probe.probe.concept_category, counts.label_pixels.cpu(), layers,
                      len(probe.probe), float(quantile), float(iou_threshold), bool(pruned_model))


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

    def overlaps(self, capture: _Capture, thresholds: dict[str, torch.Tensor], chunk_elements: int) -> _Counts:
        """Pass 2: ``Σ|L_c|``, ``Σ|M|`` (all images and per category) and ``Σ|M ∩ L_c|``."""
        probe = self.loader.probe
        counts = _Counts.zeros(self.targets, probe.n_concepts, len(probe.categories), self.device)
        for batch, maps in self._batches(capture, "dissect: overlaps", labels=True):
            for rows, group in _groups_by_size(batch.labels, probe.n_concepts):
                counts.add(maps, rows, group.to(self.device), thresholds, chunk_elements)
        return counts


@dataclass
class _GroupLabels:
    """The labels of batch rows with one label-map size, stacked."""
    planes: torch.Tensor       # [G, P, h, w] int32: concept column + 1 per pixel and plane; 0 = none
    scalars: torch.Tensor      # [G, C] float64: 1 where a whole-image label names the concept
    present: torch.Tensor      # [G, K] float64: 1 where the image is annotated in the category
    size: tuple[int, int]      # (h, w)

    def to(self, device) -> _GroupLabels:
        return _GroupLabels(self.planes.to(device, non_blocking=True), self.scalars.to(device),
                            self.present.to(device), self.size)

    def columns(self, n_concepts: int) -> torch.Tensor:
        """``[G, h·w, P]`` int64: the concept column of every pixel and plane; ``n_concepts`` = none."""
        g, depth, h, w = self.planes.shape
        cols = torch.where(self.planes > 0, self.planes.long() - 1, n_concepts)
        return cols.permute(0, 2, 3, 1).reshape(g, h * w, depth)


def _groups_by_size(labels: list[ImageLabels], n_concepts: int) -> Iterator[tuple[list[int], _GroupLabels]]:
    """Batch rows grouped by label-map size, their planes padded to the group's most and stacked."""
    groups: dict[tuple, list[int]] = {}
    for i, lab in enumerate(labels):
        groups.setdefault(lab.size, []).append(i)
    for (h, w), rows in groups.items():
        depth = max(int(labels[i].planes.shape[0]) for i in rows)
        planes = torch.zeros(len(rows), depth, h, w, dtype=torch.int32)
        scalars = torch.zeros(len(rows), n_concepts, dtype=torch.float64)
        for g, i in enumerate(rows):
            planes[g, :labels[i].planes.shape[0]] = torch.from_numpy(labels[i].planes)
            scalars[g, torch.from_numpy(labels[i].scalars)] = 1.0
        present = torch.from_numpy(np.stack([labels[i].categories for i in rows])).double()
        yield rows, _GroupLabels(planes, scalars, present, (h, w))


@dataclass
class _Counts:
    """The sums of pass 2 on the device: ``label_pixels [C]``; per layer ``act_pixels [U]``,
    ``category_pixels [U, K]`` and ``intersection [U, C]``."""
    label_pixels: torch.Tensor
    act_pixels: dict[str, torch.Tensor]
    category_pixels: dict[str, torch.Tensor]
    intersection: dict[str, torch.Tensor]

    @classmethod
    def zeros(cls, targets: dict[str, list[int]], n_concepts: int, n_categories: int, device) -> _Counts:
        def z(*shape):
            return torch.zeros(*shape, dtype=torch.long, device=device)
        return cls(z(n_concepts), {layer: z(len(ch)) for layer, ch in targets.items()},
                   {layer: z(len(ch), n_categories) for layer, ch in targets.items()},
                   {layer: z(len(ch), n_concepts + 1) for layer, ch in targets.items()})   # + a "none" column

    def add(self, acts: dict[str, torch.Tensor], rows: list[int], labels: _GroupLabels,
            thresholds: dict[str, torch.Tensor], chunk_elements: int) -> None:
        """Add the overlaps of batch rows ``rows`` (one label-map size).

        Only (image, unit) maps whose maximum exceeds the unit's threshold are upsampled — bilinear
        values never exceed the largest of their four neighbours, so the others have no pixel above it
        (and a rounding error cannot invent one) — and the pixel intersections are counted over the
        above-threshold pixels alone: one ``bincount`` of (unit, concept column) pairs per chunk.  The
        per-map counts ``|M|`` then give whole-image intersections and per-category ``Σ|M|`` by one
        matmul each (float64: exact for counts below 2**53).
        """
        n_concepts = len(self.label_pixels)
        width = n_concepts + 1
        (h, w), g = labels.size, len(rows)
        hw = h * w
        columns = labels.columns(n_concepts)
        self.label_pixels += torch.bincount(columns.reshape(-1), minlength=width)[:n_concepts]
        self.label_pixels += (labels.scalars.sum(dim=0) * hw).round().long()
        rows_t = torch.as_tensor(rows, dtype=torch.long, device=columns.device)
        step = max(1, chunk_elements // hw)
        for layer, a in acts.items():
            a = a.index_select(0, rows_t)                                      # [G, U, H, W]
            t = thresholds[layer]
            gi, ui = torch.nonzero(a.amax(dim=(2, 3)) > t, as_tuple=True)     # maps that reach above T
            per_map = torch.zeros(g, a.shape[1], dtype=torch.float64, device=a.device)
            flat_inter = self.intersection[layer].view(-1)
            for s in range(0, len(gi), step):
                gk, uk = gi[s:s + step], ui[s:s + step]
                up = F.interpolate(a[gk, uk].unsqueeze(1), size=(h, w), mode="bilinear", align_corners=False)
                above = up.view(len(gk), hw) > t[uk].unsqueeze(1)              # M for each (image, unit) map
                n = above.sum(dim=1)
                self.act_pixels[layer].index_add_(0, uk, n)
                per_map.index_put_((gk, uk), n.double(), accumulate=True)
                if columns.shape[2]:
                    k, p = torch.nonzero(above, as_tuple=True)
                    pairs = (uk[k].unsqueeze(1) * width + columns[gk[k], p]).reshape(-1)
                    flat_inter += torch.bincount(pairs, minlength=flat_inter.numel())
            self.category_pixels[layer] += (per_map.T @ labels.present).round().long()
            if labels.scalars.any():
                self.intersection[layer][:, :n_concepts] += (per_map.T @ labels.scalars).round().long()


# ---- tables ------------------------------------------------------------------------------------
def skipped_units(model_id: str, units: Sequence[Unit], reason: str) -> pd.DataFrame:
    """Unit rows of a model that was not dissected (e.g. physically pruned: channels renumbered)."""
    return pd.DataFrame([{"model_id": model_id, "layer": u.layer, "unit": u.unit, "status": "skipped", "concept": "",
                          "concept_layer": "", "iou": 0.0, "interpretable": False, "threshold": math.nan,
                          "reason": reason} for u in units], columns=UNIT_COLUMNS)
