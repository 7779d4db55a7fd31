"""Robustness beyond test accuracy (DESIGN.md §5, after Liebenwein et al. 2021).

* Corruptions in pixel space [0, 1] on batches (N×3×H×W), severities 1–5 in the spirit of
  ImageNet-C (Hendrycks & Dietterich 2019), seeded through a ``torch.Generator``.
* :func:`corruption_accuracy` — top-1 on clean and corrupted validation images, one loader pass.
* :func:`noise_similarity` — top-1 agreement of a pruned model with its parent on
  ``x + 2ε(U − 0.5)`` in the network's (normalized) input space.
* :func:`robustness_report` — both, JSON-ready for ``meta["robustness"]``.
* Study tables from meta dicts: :func:`accuracy_table` (with excess error), :func:`noise_table`,
  :func:`prune_potential`, :func:`write_study_tables`.
"""
from __future__ import annotations

import base64
import io
import math
import numbers
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.stats import binomtest
from torch import nn

from sparsight.files import atomic_write_text
from sparsight.layout import ROBUSTNESS_TABLES, Layout
from sparsight.registry import Registry

from .data.folders import IMAGENET_MEAN, IMAGENET_STD
from .models.modes import eval_mode

SEVERITIES = (1, 2, 3, 4, 5)

# Severity tables (index = severity − 1), ImageNet-C values unless noted.
GAUSSIAN_NOISE_SIGMA = (0.08, 0.12, 0.18, 0.26, 0.38)
SHOT_NOISE_PHOTONS = (60.0, 25.0, 12.0, 5.0, 3.0)
BLUR_SIGMA_AT_224 = (1.0, 2.0, 3.0, 4.0, 6.0)  # scaled by min(H, W) / 224
BLUR_TRUNCATE = 4.0  # kernel radius = ceil(truncate · σ), as scipy/skimage
CONTRAST_FACTOR = (0.4, 0.3, 0.2, 0.1, 0.05)
BRIGHTNESS_SHIFT = (0.1, 0.2, 0.3, 0.4, 0.5)  # added to HSV value
JPEG_QUALITY = (25, 18, 15, 10, 7)
PIXELATE_FACTOR = (0.6, 0.5, 0.4, 0.3, 0.25)


# ---- normalization ---------------------------------------------------------------------
def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return mean, std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Network input (ImageNet-normalized) → pixel space; not clamped."""
    mean, std = _stats(x)
    return x * std + mean


def normalize(x01: torch.Tensor) -> torch.Tensor:
    """Pixel space [0, 1] → network input (ImageNet-normalized)."""
    mean, std = _stats(x01)
    return (x01 - mean) / std


# ---- corruptions -----------------------------------------------------------------------
Corruption = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]

#: name -> corruption, in registration order; a corruption's position seeds its noise
#: (:func:`corruption_accuracy`), so new ones go last
CORRUPTIONS = Registry("corruption")


def register_corruption(name: str) -> Callable[[Corruption], Corruption]:
    """Decorator: register ``fn(x01, severity, generator)`` as corruption ``name``."""
    return CORRUPTIONS.register(name)


def _noise_like(x: torch.Tensor, generator: torch.Generator, kind: str) -> torch.Tensor:
    """Standard normal (``kind='normal'``) or uniform [0, 1) noise drawn on the generator's device."""
    draw = torch.randn if kind == "normal" else torch.rand
    return draw(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


@register_corruption("gaussian_noise")
def gaussian_noise(x01: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Additive i.i.d. Gaussian noise with σ from :data:`GAUSSIAN_NOISE_SIGMA`."""
    sigma = GAUSSIAN_NOISE_SIGMA[severity - 1]
    return (x01 + sigma * _noise_like(x01, generator, "normal")).clamp_(0, 1)


def gaussian_kernel1d(sigma: float, radius: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalized 1-D Gaussian of length ``2·radius + 1``."""
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def blur_params(severity: int, height: int, width: int) -> tuple[float, int]:
    """σ scaled from 224 px to the image size, and the kernel radius (reflect padding needs < side)."""
    sigma = BLUR_SIGMA_AT_224[severity - 1] * min(height, width) / 224
    radius = max(1, math.ceil(BLUR_TRUNCATE * sigma))
    return sigma, min(radius, min(height, width) - 1)


@register_corruption("gaussian_blur")
def gaussian_blur(x01: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Separable Gaussian blur, edges extended by their nearest pixel as ImageNet-C's
    ``skimage.filters.gaussian`` (mode ``'nearest'``); σ per :data:`BLUR_SIGMA_AT_224`."""
    n, c, h, w = x01.shape
    sigma, radius = blur_params(severity, h, w)
    k = gaussian_kernel1d(sigma, radius, x01.dtype, x01.device)
    y = x01.reshape(n * c, 1, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    return y.reshape(n, c, h, w).clamp_(0, 1)


@register_corruption("contrast")
def contrast(x01: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Blend every channel towards its own mean over the image, as ImageNet-C: ``(x − m_c)·c + m_c``."""
    c = CONTRAST_FACTOR[severity - 1]
    mean = x01.mean(dim=(2, 3), keepdim=True)
    return ((x01 - mean) * c + mean).clamp_(0, 1)


@register_corruption("jpeg")
def jpeg(x01: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """JPEG round trip per image through Pillow (libjpeg, uint8, CPU) at :data:`JPEG_QUALITY`.

    Pillow, as ImageNet-C uses; torchvision's ``encode_jpeg`` is deprecated since 0.29.
    """
    quality = JPEG_QUALITY[severity - 1]
    out = []
    for img in to_uint8(x01).permute(0, 2, 3, 1).cpu().numpy():
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        out.append(torch.from_numpy(np.asarray(Image.open(buf).convert("RGB")).copy()))
    return torch.stack(out).permute(0, 3, 1, 2).to(device=x01.device, dtype=x01.dtype).div_(255)


@register_corruption("brightness")
def brightness(x01: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Add a shift to the HSV value (V = max(R, G, B)), clipped to 1, keeping hue and saturation.

    With H and S fixed, RGB is proportional to V, so the result is ``x · V'/V``; black pixels
    (V = 0, S = 0 by convention) become grey ``V'``.  Same as ImageNet-C's HSV round trip.
    """
    shift = BRIGHTNESS_SHIFT[severity - 1]
    x01 = x01.clamp(0, 1)
    v = x01.amax(dim=1, keepdim=True)
    v_new = (v + shift).clamp(max=1)
    scaled = x01 * (v_new / v.clamp(min=1e-12))
    return torch.where(v > 0, scaled, v_new.expand_as(x01)).clamp_(0, 1)


@register_corruption("shot_noise")
def shot_noise(x01: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Poisson photon noise: ``Poisson(x · λ) / λ`` with λ from :data:`SHOT_NOISE_PHOTONS`."""
    lam = SHOT_NOISE_PHOTONS[severity - 1]
    rate = (x01.clamp(0, 1) * lam).to(generator.device)
    return (torch.poisson(rate, generator=generator).to(x01.device) / lam).clamp_(0, 1)


def to_uint8(x01: torch.Tensor) -> torch.Tensor:
    """Round pixel values in [0, 1] to uint8."""
    return (x01.clamp(0, 1) * 255).round_().to(torch.uint8)


def box_resample_matrix(n_out: int, n_in: int) -> torch.Tensor:
    """Row-stochastic (n_out × n_in) matrix of PIL's BOX resampling along one axis.

    Mirrors Pillow's ``precompute_coeffs``: output pixel ``i`` averages the input pixels whose
    centres fall in a box of width ``max(n_in / n_out, 1)`` around ``(i + 0.5) · n_in / n_out``.
    """
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    center = (torch.arange(n_out, dtype=torch.float64) + 0.5)[:, None] * scale
    x = torch.arange(n_in, dtype=torch.float64)[None]
    t = (x - center + 0.5) / filterscale
    xmin = (center - support + 0.5).floor().clamp(min=0)
    xmax = (center + support + 0.5).floor().clamp(max=n_in)
    w = ((t > -0.5) & (t <= 0.5) & (x >= xmin) & (x < xmax)).double()
    nearest = (center.floor().clamp(max=n_in - 1) == x).double()  # never an empty row
    w = torch.where(w.sum(1, keepdim=True) > 0, w, nearest)
    return w / w.sum(1, keepdim=True)


def box_resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize the last two axes with PIL's BOX filter (in float, without uint8 rounding)."""
    rows = box_resample_matrix(height, x.shape[-2]).to(x)
    cols = box_resample_matrix(width, x.shape[-1]).to(x)
    return rows @ x @ cols.T


@register_corruption("pixelate")
def pixelate(x01: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """BOX-downsample to ``factor · size``, then BOX-upsample back, as ImageNet-C does with PIL."""
    factor = PIXELATE_FACTOR[severity - 1]
    h, w = x01.shape[-2:]
    small = box_resize(x01, max(1, int(h * factor)), max(1, int(w * factor)))
    return box_resize(small, h, w).clamp_(0, 1)


#: The parameter each corruption's severity sets, and its values by severity (for the study's methods text).
SEVERITY_PARAMETERS = {"gaussian_noise": ("σ", GAUSSIAN_NOISE_SIGMA), "shot_noise": ("photons", SHOT_NOISE_PHOTONS),
                       "gaussian_blur": ("σ at 224 px", BLUR_SIGMA_AT_224), "contrast": ("factor", CONTRAST_FACTOR),
                       "brightness": ("value shift", BRIGHTNESS_SHIFT), "jpeg": ("quality", JPEG_QUALITY),
                       "pixelate": ("factor", PIXELATE_FACTOR)}


def corruption_parameters(name: str, severities) -> str:
    """What ``severities`` of corruption ``name`` mean, e.g. ``"σ 0.12, 0.26 at severities 2, 4"``."""
    check_corruption(name)
    label, values = SEVERITY_PARAMETERS[name]
    sevs = [check_severity(s) for s in severities]
    return (f"{label} {', '.join(f'{values[s - 1]:g}' for s in sevs)} at severit{'y' if len(sevs) == 1 else 'ies'} "
            f"{', '.join(str(s) for s in sevs)}")


def check_corruption(name: str) -> Corruption:
    """The corruption registered as ``name``, or a ``ValueError`` listing the registered ones."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {sorted(CORRUPTIONS)}")
    return CORRUPTIONS[name]


def check_severity(severity) -> int:
    if isinstance(severity, bool) or not isinstance(severity, numbers.Integral) or severity not in SEVERITIES:
        raise ValueError(f"unknown severity {severity!r}; choose from {list(SEVERITIES)}")
    return int(severity)


def corrupt(x01: torch.Tensor, name: str, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply corruption ``name`` at ``severity`` (1–5) to a pixel-space batch N×3×H×W.

    Without a generator, a fresh CPU generator seeded 0 is used, so calls are reproducible.
    The input is never modified; the output is a new tensor clamped to [0, 1].
    """
    fn = check_corruption(name)
    severity = check_severity(severity)
    if x01.dim() != 4 or x01.shape[1] != 3:
        raise ValueError(f"expected a batch N×3×H×W, got shape {tuple(x01.shape)}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    return fn(x01, severity, generator)


# ---- evaluation ------------------------------------------------------------------------
def derived_seed(seed: int, *parts: int) -> int:
    """A stable 63-bit seed from ``seed`` and integer parts (batch index, corruption, severity …)."""
    s = seed % (2 ** 63)
    for p in parts:
        s = (s * 1_000_003 + int(p) + 7919) % (2 ** 63)
    return s


def _device(model: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _batches(loader, max_images: int, device: torch.device, shard: tuple[int, int] = (0, 1)):
    """(index, position of its first image in the whole pass, images, targets) on ``device``; empty
    batches skipped, truncated at ``max_images``.

    ``shard=(rank, world_size)``: only every world_size-th batch, by its index in the whole pass (each
    rank reads the same loader), so that the noise a batch gets does not depend on the number of ranks.
    """
    rank, world = shard
    seen = 0
    for b, batch in enumerate(loader):
        if len(batch.targets) == 0:
            continue
        take = len(batch.targets) if max_images <= 0 else min(len(batch.targets), max_images - seen)
        if take <= 0:
            break
        if b % world == rank:
            yield b, seen, batch.images[:take].to(device), batch.targets[:take].to(device)
        seen += take


def _summed(reduce, values: list[int]) -> list[int]:
    """``values`` summed over the ranks (``reduce``: e.g. ``DistContext.all_reduce_sum``; None: one process)."""
    return values if reduce is None else [int(round(v)) for v in reduce([float(v) for v in values])]


def _hits(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per image: whether ``model``'s top-1 is the label (bool, on the CPU)."""
    return (model(x).argmax(dim=1) == y).cpu()


def pack_bits(flags: np.ndarray) -> str:
    """Bool flags as base64 text (8 to a byte): per-image results small enough for ``meta.json``."""
    return base64.b64encode(np.packbits(np.asarray(flags, dtype=bool)).tobytes()).decode("ascii")


def unpack_bits(text: str, n: int) -> np.ndarray:
    """The first ``n`` flags of :func:`pack_bits` text."""
    return np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))[:n].astype(bool)


def _per_image(marks: dict[str, list[tuple[int, torch.Tensor]]], n: int, reduce) -> dict[str, np.ndarray]:
    """Per distribution, one flag per image of the whole pass from this rank's ``(position, flags)``
    batches; ``reduce`` sums the ranks' vectors in one call (each rank fills only its own positions)."""
    flags = np.zeros((len(marks), n), dtype=np.int64)
    for row, batches in enumerate(marks.values()):
        for start, ok in batches:
            flags[row, start:start + len(ok)] = ok.numpy()
    if reduce is not None:
        flags = np.asarray(_summed(reduce, flags.ravel().tolist())).reshape(flags.shape)
    return {k: flags[row].astype(bool) for row, k in enumerate(marks)}


def corruption_accuracy(model: nn.Module, loader, corruptions, severities, *, device=None, max_images: int = 0,
                        seed: int = 0, shard: tuple[int, int] = (0, 1), reduce=None) -> dict:
    """Clean top-1 and top-1 under every (corruption, severity) in one pass over ``loader``.

    The noise of batch ``b`` under (corruption, severity) is seeded from ``(seed, b, corruption,
    severity)``, so a result does not depend on which other corruptions are evaluated.
    Returns ``{"clean": top1, "corruptions": {name: {str(severity): top1}}, "n": images}``
    (top-1 values are ``None`` when the loader yields no images), ``"per_class"``: images per class
    index, and ``"correct"``: per distribution (``"clean"``, ``"<name>:<severity>"``) a bool array, one
    flag per image in loader order (what a bootstrap over images pairs across models).  Under
    ``torchrun`` each rank takes its ``shard`` of the batches and ``reduce`` sums over the ranks: the
    result equals one process's.
    """
    names = list(corruptions)
    for c in names:
        check_corruption(c)
    sevs = [check_severity(s) for s in severities]
    dev = _device(model, device)
    gen = torch.Generator(device=dev)
    keys = ["clean"] + [f"{c}:{s}" for c in names for s in sevs]
    marks: dict[str, list] = {k: [] for k in keys}
    n, per_class = 0, torch.zeros(len(getattr(loader, "classes", None) or []), dtype=torch.long)
    with eval_mode(model), torch.no_grad():
        for b, start, x, y in _batches(loader, max_images, dev, shard):
            marks["clean"].append((start, _hits(model, x, y)))
            x01 = denormalize(x).clamp_(0, 1)
            for c in names:
                for s in sevs:
                    gen.manual_seed(derived_seed(seed, b, list(CORRUPTIONS).index(c), s))
                    marks[f"{c}:{s}"].append((start, _hits(model, normalize(CORRUPTIONS[c](x01, s, gen)), y)))
            n += len(y)
            counts = torch.bincount(y.cpu(), minlength=len(per_class))
            per_class = torch.cat([per_class, torch.zeros(len(counts) - len(per_class), dtype=torch.long)])
            per_class += counts
    if reduce is not None:
        n, *counts = _summed(reduce, [n, *per_class.tolist()])
        per_class = torch.tensor(counts, dtype=torch.long)
    correct = _per_image(marks, n, reduce)
    share = (lambda k: float(correct[k].sum()) / n) if n else (lambda k: None)  # None (JSON null) without images
    return {"clean": share("clean"), "corruptions": {c: {str(s): share(f"{c}:{s}") for s in sevs} for c in names},
            "n": n, "per_class": per_class.tolist(), "correct": correct}


def noise_levels(levels: int, eps_max: float) -> list[float]:
    """``linspace(0, eps_max, levels)`` as Python floats."""
    if levels < 1:
        raise ValueError(f"noise levels must be ≥ 1, got {levels}")
    if levels == 1:
        return [0.0]
    return [eps_max * i / (levels - 1) for i in range(levels)]


def noise_similarity(model: nn.Module, parent: nn.Module, loader, *, levels: int = 15, eps_max: float = 0.7,
                     device=None, max_images: int = 0, seed: int = 0, shard: tuple[int, int] = (0, 1),
                     reduce=None) -> dict:
    """Top-1 agreement of ``model`` and ``parent`` on ``x + 2ε(U − 0.5)`` (normalized input space).

    Both networks see the same noisy image; ε runs over ``linspace(0, eps_max, levels)``.
    Returns ``{"eps": [...], "agreement": [...], "n": images}`` (Liebenwein et al. 2021).
    ``shard`` and ``reduce`` as in :func:`corruption_accuracy`.
    """
    eps = noise_levels(levels, eps_max)
    dev = _device(model, device)
    gen = torch.Generator(device=dev)
    agree = [0] * len(eps)
    n = 0
    with eval_mode(model, parent), torch.no_grad():
        for b, _, x, _ in _batches(loader, max_images, dev, shard):
            for i, e in enumerate(eps):
                gen.manual_seed(derived_seed(seed, b, i))
                xn = x + 2 * e * (_noise_like(x, gen, "uniform") - 0.5) if e > 0 else x
                agree[i] += int((model(xn).argmax(dim=1) == parent(xn).argmax(dim=1)).sum())
            n += len(x)
    if reduce is not None:
        n, *agree = _summed(reduce, [n, *agree])
    return {"eps": eps, "agreement": [a / n if n else None for a in agree], "n": n}


def _setting(section, key: str):
    return section[key] if isinstance(section, dict) else getattr(section, key)


def robustness_report(model: nn.Module, parent: nn.Module | None, loader, section, *, device=None,
                      seed: int = 0, shard: tuple[int, int] = (0, 1), reduce=None) -> dict:
    """Corruption accuracy and (with a parent) noise similarity, ready for ``meta["robustness"]``; its
    ``correct`` holds the per-image results (:func:`pack_bits`) that :func:`prune_potential` resamples.

    ``section`` is the study's ``evaluate`` section (or a dict with the same keys).  ``loader`` should
    already hold the evaluation subset (``pruning.workflows.robustness_loader``: seeded and
    class-stratified); ``max_images`` only caps it.  ``images_per_class`` records what was used.
    Under ``torchrun``, ``shard`` and ``reduce`` share the batches out (:func:`corruption_accuracy`).
    """
    corruptions = list(_setting(section, "corruptions"))
    severities = [int(s) for s in _setting(section, "severities")]
    max_images = int(_setting(section, "max_images"))
    acc = corruption_accuracy(model, loader, corruptions, severities, device=device, max_images=max_images,
                              seed=seed, shard=shard, reduce=reduce)
    classes = list(getattr(loader, "classes", None) or [])
    counts = acc["per_class"] + [0] * max(0, len(classes) - len(acc["per_class"]))
    report = {
        "clean": acc["clean"], "corruptions": acc["corruptions"], "n": acc["n"],
        "correct": {k: pack_bits(v) for k, v in acc["correct"].items()},
        "images_per_class": {(classes[i] if i < len(classes) else str(i)): int(k) for i, k in enumerate(counts)},
        "settings": {"corruptions": corruptions, "severities": severities, "max_images": max_images, "seed": seed,
                     "noise_levels": int(_setting(section, "noise_levels")),
                     "noise_eps_max": float(_setting(section, "noise_eps_max"))},
    }
    if parent is not None:
        report["noise_similarity"] = noise_similarity(
            model, parent, loader, levels=report["settings"]["noise_levels"],
            eps_max=report["settings"]["noise_eps_max"], device=device, max_images=max_images, seed=seed,
            shard=shard, reduce=reduce)
    return report


# ---- study tables ----------------------------------------------------------------------
KEY_COLUMNS = ["model_id", "arch", "method", "schedule", "rate_requested", "sparsity"]
ACCURACY_COLUMNS = KEY_COLUMNS + ["distribution", "severity", "top1", "error", "excess_error", "n_images", "chance",
                                  "base_above_chance"]
NOISE_COLUMNS = ["model_id", "arch", "method", "schedule", "rate_requested", "eps", "agreement"]
POTENTIAL_COLUMNS = ["arch", "method", "schedule", "distribution", "potential", "potential_ci_low",
                     "potential_ci_high", "parent_error", "potential_drop", "n_rates", "n_images", "parent_above_chance"]
#: level of the prune potential's bootstrap interval
POTENTIAL_LEVEL = 0.95
#: one-sided level of the test that a parent is above chance on a distribution
CHANCE_ALPHA = 0.05


def is_base(meta: dict) -> bool:
    """The unpruned parent of a study: no pruning method."""
    return not meta.get("method")


def has_report(meta: dict) -> bool:
    """Whether ``meta`` holds a robustness report with a clean top-1."""
    return (meta.get("robustness") or {}).get("clean") is not None


def _sparsity(meta: dict) -> float:
    s = meta.get("sparsity")
    if isinstance(s, dict):
        s = s.get("total")
    return float("nan") if s is None else float(s)


def _keys(meta: dict) -> dict:
    return {"model_id": meta.get("model_id"), "arch": meta.get("arch"), "method": meta.get("method") or None,
            "schedule": meta.get("schedule") or None, "rate_requested": float(meta.get("rate_requested") or 0.0),
            "sparsity": _sparsity(meta)}


def base_for(meta: dict, metas: list[dict]) -> dict | None:
    """The base model of ``meta``: the only base in ``metas``, else the only one of the same arch."""
    bases = [m for m in metas if is_base(m) and has_report(m)]
    if len(bases) > 1:
        bases = [m for m in bases if m.get("arch") == meta.get("arch")]
    if len(bases) > 1:
        raise ValueError(f"several base models for {meta.get('model_id')!r}: "
                         f"{sorted(str(m.get('model_id')) for m in bases)}")
    return bases[0] if bases else None


def top1_by_distribution(robustness: dict) -> dict[tuple[str, int], float]:
    """``{("clean", 0): top1, (corruption, severity): top1, …}`` from a robustness report (``None`` left out)."""
    out = {} if robustness.get("clean") is None else {("clean", 0): float(robustness["clean"])}
    for name, by_sev in (robustness.get("corruptions") or {}).items():
        for sev, top1 in by_sev.items():
            if top1 is not None:
                out[name, int(sev)] = float(top1)
    return out


def chance_level(meta: dict) -> float | None:
    """1 / classes of the images a robustness report was measured on; None when it does not say."""
    classes = len((meta.get("robustness") or {}).get("images_per_class") or {})
    return 1.0 / classes if classes else None


def above_chance(robustness: dict, distribution: str, chance: float | None, alpha: float = CHANCE_ALPHA) -> bool | None:
    """Whether top-1 on ``distribution`` beats ``chance`` at every one of its severities: an exact one-sided
    binomial test at ``alpha`` on each severity's correct count (pooled, a severity at chance would hide behind a
    milder one, and its points would still enter every mean over corruptions); None where the report lacks the
    image count or the chance level."""
    n = int((robustness or {}).get("n") or 0)
    top1 = [v for (d, _), v in top1_by_distribution(robustness).items() if d == distribution]
    if not n or chance is None or not top1:
        return None
    return all(binomtest(round(v * n), n, chance, alternative="greater").pvalue < alpha for v in top1)


def base_above_chance(base: dict | None) -> dict[str, bool | None]:
    """:func:`above_chance` of the base model on each distribution of its report (empty without a base)."""
    if base is None:
        return {}
    rob = base["robustness"]
    return {d: above_chance(rob, d, chance_level(base)) for d in {d for d, _ in top1_by_distribution(rob)}}


def accuracy_table(metas: list[dict]) -> pd.DataFrame:
    """Long table of top-1/error per model and distribution, with excess error against the base.

    ``excess_error = (e_shift(model) − e_shift(base)) − (e_clean(model) − e_clean(base))``; NaN where
    the base lacks that distribution.  ``n_images`` and ``chance`` (1 / classes) say what a top-1 rests
    on; ``base_above_chance`` whether the base beats chance on the distribution (:func:`above_chance`;
    empty where untestable): where it does not, the distribution measures nothing about pruning.
    Models without a robustness report are skipped.
    """
    rows = []
    for meta in metas:
        if not has_report(meta):
            continue
        mine = top1_by_distribution(meta["robustness"])
        base = base_for(meta, metas)
        ref = top1_by_distribution(base["robustness"]) if base else {}
        chance, informative = chance_level(meta), base_above_chance(base)
        for (dist, sev), top1 in mine.items():
            excess = float("nan")
            if (dist, sev) in ref:
                e, e0 = 1 - top1, 1 - ref[dist, sev]
                excess = (e - e0) - ((1 - mine["clean", 0]) - (1 - ref["clean", 0]))
            rows.append({**_keys(meta), "distribution": dist, "severity": sev, "top1": top1, "error": 1 - top1,
                         "excess_error": excess, "n_images": meta["robustness"].get("n"), "chance": chance,
                         "base_above_chance": informative.get(dist)})
    return pd.DataFrame(rows, columns=ACCURACY_COLUMNS)


def noise_table(metas: list[dict]) -> pd.DataFrame:
    """Long table of noise-similarity agreement per model and ε (models with a parent report only)."""
    rows = []
    for meta in metas:
        ns = (meta.get("robustness") or {}).get("noise_similarity")
        if not ns:
            continue
        keys = {k: v for k, v in _keys(meta).items() if k in NOISE_COLUMNS}
        rows += [{**keys, "eps": float(e), "agreement": float("nan") if a is None else float(a)}
                 for e, a in zip(ns["eps"], ns["agreement"])]
    return pd.DataFrame(rows, columns=NOISE_COLUMNS)


def mean_errors(robustness: dict) -> dict[str, float]:
    """Error per distribution: clean, and each corruption averaged over its severities."""
    by_dist: dict[str, list[float]] = {}
    for (dist, _), top1 in top1_by_distribution(robustness).items():
        by_dist.setdefault(dist, []).append(1 - top1)
    return {d: sum(v) / len(v) for d, v in by_dist.items()}


def paired_mean_errors(robustness: dict, reference: dict) -> dict[str, tuple[float, float]]:
    """Per distribution, (model error, reference error) averaged over the severities both have."""
    mine, ref = top1_by_distribution(robustness), top1_by_distribution(reference)
    pairs: dict[str, list[tuple[float, float]]] = {}
    for key in mine.keys() & ref.keys():
        pairs.setdefault(key[0], []).append((1 - mine[key], 1 - ref[key]))
    return {d: (sum(p[0] for p in v) / len(v), sum(p[1] for p in v) / len(v)) for d, v in pairs.items()}


def _flag_keys(dist: str, severities) -> list[str]:
    """Keys of ``report["correct"]`` for ``dist`` at ``severities`` (clean has one)."""
    return ["clean"] if dist == "clean" else [f"{dist}:{s}" for s in severities]


def _paired_severities(meta: dict, base: dict, dist: str) -> list[int]:
    """The severities of ``dist`` that both ``meta`` and ``base`` report (as :func:`paired_mean_errors`)."""
    mine, ref = top1_by_distribution(meta["robustness"]), top1_by_distribution(base["robustness"])
    return sorted(s for d, s in mine.keys() & ref.keys() if d == dist)


def _resampled_weights(n: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """(draws, n) counts of each image in a bootstrap resample of the ``n`` images."""
    return np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(draws)]).astype(np.float64)


def potential_interval(base: dict, members: list[dict], dist: str, delta: float, bootstrap: int,
                       rng: np.random.Generator, chunk: int = 100) -> tuple[float, float]:
    """Bootstrap interval (:data:`POTENTIAL_LEVEL`) of a series' prune potential on ``dist``: the images are
    resampled, the same for the base and every pruned model (their errors are paired image by image),
    and the potential recomputed.  NaN where a report lacks its per-image results (``correct``)."""
    n = int(base["robustness"].get("n") or 0)
    if not (bootstrap and members and n):
        return float("nan"), float("nan")
    columns, owners = [], []   # a column of flags per (model, severity), owned by member i or by i's base copy −1−i
    for i, m in enumerate(members):
        keys = _flag_keys(dist, _paired_severities(m, base, dist))
        for who, meta in ((i, m), (-1 - i, base)):
            stored = meta["robustness"].get("correct") or {}
            if not keys or int(meta["robustness"].get("n") or 0) != n or any(k not in stored for k in keys):
                return float("nan"), float("nan")
            columns += [unpack_bits(stored[k], n) for k in keys]
            owners += [who] * len(keys)
    flags, owners = np.stack(columns, axis=1).astype(np.float64), np.asarray(owners)
    rates = np.array([float(m.get("rate_requested") or 0.0) for m in members])
    levels = np.unique(rates)
    potentials = []
    for start in range(0, bootstrap, chunk):
        errors = 1 - _resampled_weights(n, min(chunk, bootstrap - start), rng) @ flags / n   # (draws, columns)
        excess = np.stack([errors[:, owners == i].mean(axis=1) - errors[:, owners == -1 - i].mean(axis=1)
                           for i in range(len(members))], axis=1)
        # the retrained copies of one rate are averaged first, as the potential itself averages them
        keeps = np.stack([excess[:, rates == r].mean(axis=1) <= delta + 1e-12 for r in levels], axis=1)
        potentials.append(np.where(keeps, levels, 0.0).max(axis=1))
    tail = (1 - POTENTIAL_LEVEL) / 2
    low, high = np.quantile(np.concatenate(potentials), [tail, 1 - tail], method="inverted_cdf")
    return float(low), float(high)


def _excess_by_rate(errors: list[tuple[float, dict]], dist: str) -> dict[float, float]:
    """Rate → the models' error on ``dist`` above the base's, averaged over the retrained copies of that rate."""
    by_rate: dict[float, list[float]] = {}
    for rate, err in errors:
        if dist in err:
            by_rate.setdefault(rate, []).append(err[dist][0] - err[dist][1])
    return {rate: sum(v) / len(v) for rate, v in by_rate.items()}


def prune_potential(metas: list[dict], delta: float = 0.005, bootstrap: int = 0, seed: int = 0) -> pd.DataFrame:
    """Prune potential per (arch, method, schedule) and distribution (Liebenwein et al. 2021).

    The potential is the largest requested rate whose error (corruptions: averaged over severities; retrained
    copies of one rate, ``prune.copies``: averaged too) stays within ``base error + delta`` on that
    distribution, 0.0 if no rate does; with ``bootstrap`` resamples of the images, its interval
    (:func:`potential_interval`).
    ``potential_drop`` = clean potential − potential on the distribution.  Where the base is not above
    chance on a distribution (``parent_above_chance`` false) every rate "keeps" its error, so the
    potential and its drop are left empty (NaN) instead of reading noise at chance as robustness.
    """
    groups: dict[tuple, list[dict]] = {}
    for meta in metas:
        if is_base(meta) or not has_report(meta) or not float(meta.get("rate_requested") or 0.0):
            continue        # a model pruned at rate 0 (the retrained control) has no rate to reach
        k = _keys(meta)
        groups.setdefault((k["arch"], k["method"], k["schedule"]), []).append(meta)
    rows = []
    rng = np.random.default_rng(seed)
    for (arch, method, schedule), members in groups.items():
        base = base_for(members[0], metas)
        if base is None:
            continue
        base_err = mean_errors(base["robustness"])
        errors = [(float(m.get("rate_requested") or 0.0), paired_mean_errors(m["robustness"], base["robustness"]))
                  for m in members]
        potentials, intervals, informative = {}, {}, base_above_chance(base)
        for dist in sorted(base_err, key=lambda d: (d != "clean", d)):
            rates = [r for r, excess in _excess_by_rate(errors, dist).items() if excess <= delta + 1e-12]
            at_chance = informative.get(dist) is False
            potentials[dist] = float("nan") if at_chance else max(rates, default=0.0)
            measured = [m for (_, err), m in zip(errors, members) if dist in err]
            intervals[dist] = (float("nan"),) * 2 if at_chance else potential_interval(
                base, measured, dist, delta, bootstrap, rng)
        for dist, pot in potentials.items():
            rows.append({"arch": arch, "method": method, "schedule": schedule, "distribution": dist,
                         "potential": pot, "potential_ci_low": intervals[dist][0],
                         "potential_ci_high": intervals[dist][1], "parent_error": base_err[dist],
                         "potential_drop": potentials["clean"] - pot,
                         "n_rates": len(_excess_by_rate(errors, dist)), "n_images": base["robustness"].get("n"),
                         "parent_above_chance": informative.get(dist)})
    return pd.DataFrame(rows, columns=POTENTIAL_COLUMNS)


def write_study_tables(out_dir: str | os.PathLike, metas: list[dict], delta: float = 0.005, bootstrap: int = 0,
                       seed: int = 0) -> list[Path]:
    """Write ``robustness/{accuracy,noise_similarity,prune_potential}.csv`` (:data:`ROBUSTNESS_TABLES`) under
    ``out_dir``."""
    layout = Layout(Path(out_dir))
    tables = {"accuracy": accuracy_table(metas), "noise_similarity": noise_table(metas),
              "prune_potential": prune_potential(metas, delta, bootstrap, seed)}
    assert tuple(tables) == ROBUSTNESS_TABLES
    return [atomic_write_text(layout.robustness_table(name), df.to_csv(index=False)) for name, df in tables.items()]
