"""Feature visualizations: many units rendered at once with lucent's image parameterization.

The image is lucent's (``lucent.optvis.param``): a Fourier-parameterized (``fft_image``),
colour-decorrelated (``to_valid_rgb(..., decorrelate=True)``) batch, one image per
(unit, direction, slot), optimized with Adam under the Lucid transforms
pad 16 → jitter 16 → scale {1, .975, 1.025, .95, 1.05} → rotate −5…5° → jitter 8 → crop.

Choices (DESIGN §6):

- Transforms are drawn per image and applied to the whole batch in one ``affine_grid`` /
  ``grid_sample`` call: jitter, scale and rotation compose into one affine map per image, so the
  image is resampled once (lucent resamples at every step of the chain).  The image is padded
  first (``PAD_MODE``: reflect, as lucid's ``pad``; ``"constant"`` pads with 0.5); the model sees
  the centred ``image_size`` window of the transformed canvas (a crop, not a resize, so the scale
  augmentation is not undone).  Samples beyond the padded canvas (rotated corners) continue the
  padding.  Jitters are integer offsets and angles integer degrees, as in lucid.
- Amounts are defined at 224 px and scaled by ``image_size / 224`` (pad 16 → 5 px at 64 px).
- Model inputs are ImageNet-normalized; the loss is −Σ_b s_b · mean_hw(act[b, u_b]) plus
  ``diversity`` · Σ_{i≠j} cos(Gram_i, Gram_j) over the diverse images of each (unit, direction):
  lucent's ``channel − diversity · objectives.diversity`` per group, up to lucent's 1/n factor.
- Seeds: every image has its own seed from (seed, layer, unit, direction, slot); its
  initialization and all its transform draws come from that seed alone, so a plain image does not
  depend on the rest of its batch (up to floating-point differences of batched kernels).
  Diverse images interact with their group by design.
- One forward hook on the target layer; the forward stops there (a private exception).
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from lucent.optvis.param import color, spatial
from torch import nn
from torch.overrides import TorchFunctionMode

from sparsight.progress import progress_bar

from pruning.data.folders import IMAGENET_MEAN, IMAGENET_STD
from pruning.models.modes import eval_mode
from pruning.models.layers import find_layer, unwrap

REFERENCE_SIZE = 224                       # the size the transform amounts below are defined at
PAD, JITTER1, JITTER2 = 16, 16, 8
SCALES = (1.0, 0.975, 1.025, 0.95, 1.05)
ANGLES = tuple(range(-5, 6))               # degrees
PAD_MODE = "reflect"                       # or "constant" (0.5 grey)
INIT_SD = 0.01                             # lucent's default initial spectrum scale
DIRECTIONS = {"max": 1.0, "min": -1.0}


OBJECTIVES = ("pre-relu", "post-relu")


@dataclass
class FeatureVisSettings:
    """How feature visualizations are optimized (defaults: the fast 512-step lucid recipe).

    ``objective``: ``"pre-relu"`` optimizes the unit's value before its final ReLU (found by
    tracing the forward pass; the layer output itself where there is none), ``"post-relu"`` the
    layer output.  ``redirect_steps``: for this many first steps every ReLU passes lucid's
    redirected gradient.  ``patience``: an image stops (its pixels are frozen) once its objective
    has not improved by ``tolerance`` (relative) over ``patience`` steps; 0 never stops early, and
    ``steps`` is the cap.  ``rescue_steps``: max images whose unit is still silent after ``steps`` go
    on for up to this many more steps, each until its unit fires (0: never).
    """
    steps: int = 512
    lr: float = 0.05
    image_size: int = 224
    batch_size: int = 64       # images optimized at once (whole diverse groups are kept together)
    n_diverse: int = 8
    n_plain: int = 1
    diversity: float = 1.0
    seed: int = 0
    decorrelate: bool = True
    fft: bool = True
    objective: str = "pre-relu"
    redirect_steps: int = 16
    patience: int = 0
    tolerance: float = 0.01
    rescue_steps: int = 0


@dataclass
class Rendered:
    """Images for one (layer, unit, direction); plain images first."""
    layer: str
    unit: int
    direction: str              # "max" | "min"
    images: torch.Tensor        # [n_plain + n_diverse, 3, H, W] in [0, 1], CPU
    activations: torch.Tensor   # [n] final mean activation of the unit (layer output, untransformed image)
    seeds: list[int]            # per-image seed (source "fv:<seed>")
    steps: torch.Tensor | None = None       # [n] optimization steps each image took
    objectives: torch.Tensor | None = None  # [n] final value of the optimized quantity (pre- or post-ReLU)


def render_units(model: nn.Module, layer: str, units: list[int], settings: FeatureVisSettings, *,
                 directions=("max", "min"), device=None, progress: bool = False,
                 identities: list[int] | None = None) -> list[Rendered]:
    """Render ``settings.n_plain + n_diverse`` images per unit and direction, many units at once.

    ``identities``: the unit index each image's seed is drawn from (default: ``units``; a physically
    pruned model's renumbered channels pass their parent indices, so they get the masked model's seeds).

    Returns one ``Rendered`` per (unit, direction), units outer.  The model is left as it was
    (training flags, ``requires_grad``, device, no hooks), also when rendering fails.
    """
    model = unwrap(model)
    module = find_layer(model, layer)
    if settings.objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {settings.objective!r}; choose from {list(OBJECTIVES)}")
    bad = [d for d in directions if d not in DIRECTIONS]
    if bad or not directions:
        raise ValueError(f"unknown directions {bad}; choose from {sorted(DIRECTIONS)}")
    if any(u < 0 for u in units):
        raise ValueError(f"units must be non-negative, got {units}")
    if settings.n_plain < 0 or settings.n_diverse < 0 or settings.n_plain + settings.n_diverse < 1:
        raise ValueError("need n_plain + n_diverse >= 1 images per unit and direction")
    if identities is not None and len(identities) != len(units):
        raise ValueError(f"{len(identities)} identities for {len(units)} units")
    groups = _plan(layer, units, directions, settings, identities)
    batches = _pack(groups, settings)
    first = next(model.parameters(), None)
    home = first.device if first is not None else torch.device("cpu")
    device = _canonical(torch.device(device) if device is not None else home)
    results: dict[tuple[int, int], tuple] = {}
    bar = progress_bar(total=len(batches) * settings.steps, desc=f"featurevis {layer}", enabled=progress,
                       leave=False)
    moved = device != _canonical(home)
    layouts = {p: p.stride() for p in model.parameters() if p.dim() == 4}
    try:
        if moved:
            model.to(device)
        model.to(memory_format=torch.channels_last)     # measured faster for these convolutions (CPU and GPU)
        with _frozen(model), _hooked(module) as store:
            forward = _LayerForward(model, store, layer, first.dtype if first is not None else torch.float32, device)
            for batch in batches:
                for spec, *out in zip(batch, *_optimize(forward, batch, settings, device, bar)):
                    results[spec.group, spec.index] = out
    finally:
        if moved:
            model.to(home)
        with torch.no_grad():
            # strides, not memory formats: a 1×1 convolution's weight is "contiguous" in both layouts
            for p, stride in layouts.items():
                if p.stride() != stride:
                    p.data = torch.empty_strided(p.shape, stride, dtype=p.dtype, device=p.device).copy_(p.data)
        bar.close()
    out = []
    for g, group in enumerate(groups):
        images, acts, objectives, steps = zip(*(results[g, s.index] for s in group))
        out.append(Rendered(layer, group[0].unit, group[0].direction, torch.stack(images), torch.stack(acts),
                            [s.seed for s in group], steps=torch.stack(steps), objectives=torch.stack(objectives)))
    return out


class _Spec(NamedTuple):
    group: int        # index of the (unit, direction) group
    index: int        # position in the group (plain images first)
    unit: int
    direction: str
    diverse: bool
    seed: int


def _image_seed(seed: int, layer: str, unit: int, direction: str, slot: str) -> int:
    key = f"{seed}/{layer}/{unit}/{direction}/{slot}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def _plan(layer, units, directions, settings, identities=None) -> list[list[_Spec]]:
    slots = [(f"plain{i}", False) for i in range(settings.n_plain)]
    slots += [(f"diverse{i}", True) for i in range(settings.n_diverse)]
    ident = dict(zip(units, identities if identities is not None else units))
    return [[_Spec(g, i, unit, d, diverse, _image_seed(settings.seed, layer, ident[unit], d, slot))
             for i, (slot, diverse) in enumerate(slots)]
            for g, (unit, d) in enumerate(itertools.product(units, directions))]


def _pack(groups: list[list[_Spec]], settings) -> list[list[_Spec]]:
    """Batches of at most ``batch_size`` images; whole groups when diverse images interact."""
    size = max(1, settings.batch_size)
    if settings.diversity == 0 or settings.n_diverse < 2:
        flat = [s for g in groups for s in g]
        return [flat[i:i + size] for i in range(0, len(flat), size)]
    batches: list[list[_Spec]] = []
    for group in groups:     # a group larger than batch_size gets a batch of its own
        if batches and len(batches[-1]) + len(group) <= size:
            batches[-1].extend(group)
        else:
            batches.append(list(group))
    return batches


class _Stop(Exception):
    """Raised by the hook to end the forward pass at the target layer."""


@contextmanager
def _hooked(module: nn.Module):
    store: dict = {}

    def hook(mod, inputs, output):
        store["out"] = output
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


class _RedirectedReLU(torch.autograd.Function):
    """ReLU whose gradient also flows where the input is negative, unless it would push the input lower
    (Lucid's redirected ReLU): per image, used only where the ordinary ReLU gradient is all zero."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        relu_grad = grad * (x > 0)
        redirected = grad * ~((x < 0) & (grad > 0))      # descent moves x by −grad
        passes = relu_grad.flatten(1).norm(dim=1) > 0 if grad.dim() > 1 else relu_grad.norm() > 0
        shape = (-1,) + (1,) * (grad.dim() - 1) if grad.dim() > 1 else ()
        return torch.where(passes.view(shape), relu_grad, redirected)


_RELUS = {torch.relu, torch.relu_, F.relu, torch.Tensor.relu, torch.Tensor.relu_}


class _ReluTrace(TorchFunctionMode):
    """Watches one forward pass: remembers the input of every ReLU (and of every ``torch.cat`` of ReLU
    outputs, the inception block output) so the target layer's output can be traced back to its values
    before the final ReLU; with ``redirect`` the ReLUs pass redirected gradients."""

    def __init__(self, redirect: bool):
        super().__init__()
        self.redirect = redirect
        self.parts: dict[int, tuple[torch.Tensor, list[torch.Tensor], int]] = {}   # id(out) -> (out, inputs, dim)

    def sources(self, out: torch.Tensor) -> list[torch.Tensor] | None:
        """The ReLU inputs ``out`` is made of (one, or several concatenated along channels), in order."""
        found = self.parts.get(id(out))
        return found[1] if found is not None and found[0] is out and found[2] == 1 else None

    def pre_activation(self, out: torch.Tensor) -> torch.Tensor | None:
        parts = self.sources(out)
        return None if parts is None else (parts[0] if len(parts) == 1 else torch.cat(parts, 1))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELUS:
            x = args[0]
            out = _RedirectedReLU.apply(x) if self.redirect else torch.relu(x)   # out of place, even for relu_
            self.parts[id(out)] = (out, [x], 1)
            return out
        out = func(*args, **kwargs)
        if func is torch.cat:
            tensors = args[0] if args else kwargs["tensors"]
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            parts = [self.sources(t) for t in tensors]
            if parts and all(p is not None for p in parts) and dim in (1, -3):
                self.parts[id(out)] = (out, [x for p in parts for x in p], 1)
        return out


class _PreActivationTaps:
    """The pre-ReLU values of the target layer from forward hooks on the modules that produce them (the
    BatchNorms before the final ReLUs), found once by a traced pass: the optimization loop then runs the
    model without tracing every operation. Each value is kept as a copy, since the model's own ReLU may
    run in place on it (torchvision's GoogLeNet: ``F.relu(x, inplace=True)``) and would leave the
    post-ReLU value in a tensor kept by reference."""

    def __init__(self, modules: list[nn.Module]):
        self.modules, self.store, self.handles = modules, {}, []

    @classmethod
    def find(cls, model: nn.Module, forward, images: torch.Tensor) -> _PreActivationTaps | None:
        produced: dict[int, tuple[torch.Tensor, nn.Module]] = {}
        handles = [m.register_forward_hook(lambda m, i, o: produced.__setitem__(id(o), (o, m))
                                           if isinstance(o, torch.Tensor) else None)
                   for m in model.modules() if m is not model]
        mode = _ReluTrace(redirect=False)
        try:
            with torch.no_grad():
                forward.run(images, mode)
        finally:
            for h in handles:
                h.remove()
        parts = mode.sources(forward.store.get("last_out"))
        if not parts:
            return None
        found = [produced.get(id(x)) for x in parts]
        modules = [f[1] for f, x in zip(found, parts) if f is not None and f[0] is x]
        if len(modules) != len(parts) or len(set(map(id, modules))) != len(modules):
            return None
        return cls(modules)

    def __enter__(self):
        self.handles = [m.register_forward_hook(lambda m, i, o, k=k: self.store.__setitem__(k, o.clone()))
                        for k, m in enumerate(self.modules)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def value(self) -> torch.Tensor:
        parts = [self.store.pop(k) for k in range(len(self.modules))]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


class _LayerForward:
    """ImageNet-normalize images in [0, 1] and return the target layer's output; with ``objective`` =
    ``"pre-relu"`` also the same channels before their final ReLU (the output itself if it has none)."""

    def __init__(self, model, store, layer, dtype, device="cpu"):
        self.model, self.store, self.layer, self.dtype = model, store, layer, dtype
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    taps: _PreActivationTaps | None = None      # set by ``use_taps``: pre-ReLU values without tracing
    taps_checked = False
    width: int | None = None                    # the layer's channel count, set by ``check_units``

    def check_units(self, units: list[int], image_f) -> None:
        """Raise a one-line error if a unit is not a channel of the layer (one forward of one image of
        ``image_f()``, the first time only)."""
        if self.width is None:
            with torch.no_grad():
                self.width = int(self(image_f()[:1]).shape[1])
        if max(units) >= self.width:
            raise ValueError(f"unit {max(units)} out of range: {self.layer!r} has {self.width} channels "
                             f"(units 0–{self.width - 1})")

    def run(self, images: torch.Tensor, mode=None) -> torch.Tensor:
        """The target layer's output for ``images`` in [0, 1] (under the torch function ``mode``, if any)."""
        x = (images - self.mean) / self.std
        self.store.pop("out", None)
        try:
            if mode is None:
                self.model(x.to(self.dtype))
            else:
                with mode:
                    self.model(x.to(self.dtype))
        except _Stop:
            pass
        out = self.store.pop("out", None)
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            raise RuntimeError(f"layer {self.layer!r} did not produce a [N, C, H, W] tensor in the forward pass")
        self.store["last_out"] = out
        return out

    def use_taps(self, images: torch.Tensor) -> None:
        self.taps, self.taps_checked = _PreActivationTaps.find(self.model, self, images), True

    def __call__(self, images: torch.Tensor, *, trace: bool = False, redirect: bool = False):
        if trace and not redirect and self.taps is not None:
            with self.taps:
                out = self.run(images)
            pre = self.taps.value()
            return out, pre
        mode = _ReluTrace(redirect) if trace or redirect else None
        out = self.run(images, mode)
        if not trace:
            return out
        pre = mode.pre_activation(out)
        return out, (pre if pre is not None else out)


@contextmanager
def _frozen(model: nn.Module):
    """Eval mode and no parameter gradients for the duration; exact flags restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    with eval_mode(model):
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)


def _canonical(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


@contextmanager
def _lucent_device(device: torch.device):
    """lucent's ``spatial`` module puts its tensors on a module-level device (cuda:0 or cpu)."""
    old = spatial.device
    spatial.device = device
    try:
        yield
    finally:
        spatial.device = old


def _lucent_image(batch: int, settings: FeatureVisSettings, device: torch.device):
    """lucent's parameterization for a batch: (parameter tensor, function → images in [0, 1])."""
    shape = (batch, 3, settings.image_size, settings.image_size)
    make = spatial.fft_image if settings.fft else spatial.pixel_image
    with torch.random.fork_rng(devices=[]), _lucent_device(device):   # lucent draws from the global RNG
        (param,), image_f = make(shape, sd=INIT_SD)
    if settings.decorrelate:
        # lucent's colour step copies its matrix to a fixed device (cuda:0 or cpu) at every call, a blocking
        # host-to-GPU copy per step: apply the same matrix, made once on our device, instead
        matrix = torch.tensor(color.color_correlation_normalized.T, device=device)
        image_f = _decorrelated(image_f, matrix)
    return param, color.to_valid_rgb(image_f, decorrelate=False)


def _decorrelated(image_f, matrix):
    return lambda: (image_f().permute(0, 2, 3, 1) @ matrix).permute(0, 3, 1, 2)


def _draw_transforms(generator: torch.Generator, steps: int) -> torch.Tensor:
    """[steps, 6] integer draws: jitter1 x, y; scale index; angle index; jitter2 x, y."""
    high = torch.tensor([JITTER1, JITTER1, len(SCALES), len(ANGLES), JITTER2, JITTER2], dtype=torch.float64)
    return (torch.rand(steps, 6, generator=generator, dtype=torch.float64) * high).long()


@functools.lru_cache(maxsize=None)
def _view_tables(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """SCALES and ANGLES (radians) as tensors, made once per dtype and device: made at every step, each would be
    a blocking host-to-GPU copy that keeps the CPU from queueing the next step while the GPU runs this one."""
    return (torch.tensor(SCALES, dtype=dtype, device=device),
            torch.deg2rad(torch.tensor(ANGLES, dtype=dtype, device=device)))


def _random_views(images: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Apply one lucid transform chain per image (``draws`` [B, 6] from ``_draw_transforms``)."""
    b, _, size, _ = images.shape
    r = size / REFERENCE_SIZE
    pad = math.ceil(PAD * r)
    if PAD_MODE == "reflect":
        canvas, fill, padding_mode = F.pad(images, [pad] * 4, mode="reflect"), 0.0, "reflection"
    else:
        canvas, fill, padding_mode = F.pad(images - 0.5, [pad] * 4), 0.5, "zeros"
    d = draws.to(images.dtype)
    shift1 = (d[:, 0:2] - JITTER1 // 2) * r                      # [B, 2] (x, y) pixels
    shift2 = (d[:, 4:6] - JITTER2 // 2) * r
    scales, angles = _view_tables(images.dtype, images.device)
    scale, angle = scales[draws[:, 2]], angles[draws[:, 3]]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # output pixel x (centred) reads input pixel  R(-angle) (x + shift2) / scale + shift1
    a = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)   # [B, 2, 2]
    t = (a @ shift2.unsqueeze(-1)).squeeze(-1) + shift1
    full = size + 2 * pad
    theta = torch.cat([a * (size / full), (t * (2 / full)).unsqueeze(-1)], -1)
    grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)
    return F.grid_sample(canvas, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False) + fill


def _unit_means(acts: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    return acts[torch.arange(len(units), device=acts.device), units].mean((-2, -1))


def _pairs(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the images with a group (≥ 0) and the mask of their same-group pairs i ≠ j."""
    idx = torch.nonzero(groups >= 0).squeeze(1)
    same = groups[idx, None] == groups[None, idx]
    return idx, same.fill_diagonal_(False)


def _diversity(acts: torch.Tensor, groups: torch.Tensor, pairs=None) -> torch.Tensor:
    """Σ over ordered pairs i ≠ j of the same group of cos(Gram_i, Gram_j) (lucent's, negated)."""
    idx, same = pairs if pairs is not None else _pairs(groups)
    flat = acts[idx].flatten(2).float()
    grams = F.normalize((flat @ flat.transpose(1, 2)).flatten(1), dim=1)
    return ((grams @ grams.T) * same).sum()


def _optimize(forward: _LayerForward, batch: list[_Spec], settings: FeatureVisSettings, device, bar):
    """Optimize one batch; returns (images, activations, objective values, steps used), one entry per image.

    After ``settings.steps``, max images whose unit is still silent (layer output ≤ 0 on the
    untransformed image) go on alone for up to ``settings.rescue_steps`` more steps, each until its
    unit fires; the others keep their pixels, so they are exactly what they would be without it."""
    param, image_f = _lucent_image(len(batch), settings, device)
    generators = [torch.Generator().manual_seed(s.seed) for s in batch]
    with torch.no_grad():   # each image's start and transforms come from its own seed
        param.copy_(torch.stack([torch.randn(param.shape[1:], generator=g) for g in generators]) * INIT_SD)
    # the rescue's transforms are drawn after the main ones, which stay as they were without it
    draws = torch.stack([torch.cat([_draw_transforms(g, settings.steps), _draw_transforms(g, settings.rescue_steps)])
                         for g in generators], 1).to(device)      # [steps + rescue_steps, B, 6]
    units = torch.tensor([s.unit for s in batch], device=device)
    signs = torch.tensor([DIRECTIONS[s.direction] for s in batch], device=device)
    groups = torch.tensor([s.group if s.diverse else -1 for s in batch], device=device)
    diverse = settings.diversity != 0 and any(s.diverse for s in batch)
    pairs = _pairs(groups) if diverse else None
    forward.check_units([s.unit for s in batch], image_f)
    pre = settings.objective == "pre-relu"
    if pre and not forward.taps_checked:
        with torch.no_grad():
            forward.use_taps(image_f()[:1])
    optimizer = torch.optim.Adam([param], lr=settings.lr)
    everyone = torch.arange(len(batch), device=device)

    def step(index: int, live: torch.Tensor, held: torch.Tensor | None) -> torch.Tensor:
        """One Adam step of the images ``live`` at transform draw ``index``; ``held`` (a mask, or None)
        marks the images whose pixels must not move.  Returns the live images' objective values."""
        optimizer.zero_grad(set_to_none=True)
        redirect = index < settings.redirect_steps
        out = forward(_random_views(image_f()[live], draws[index][live]), trace=pre, redirect=redirect)
        acts, layer_out = (out[1], out[0]) if pre else (out, out)
        objective = signs[live] * _unit_means(acts, units[live]).float()
        loss = -objective.sum()
        if diverse:     # on the layer's output, as lucent's objectives.diversity (only the objective is pre-ReLU)
            loss = loss + settings.diversity * _diversity(layer_out, groups[live],
                                                          None if len(live) < len(batch) else pairs)
        loss.backward()
        kept = param.detach()[held].clone() if held is not None else None  # Adam's momentum would move them
        optimizer.step()
        if kept is not None:
            with torch.no_grad():
                param[held] = kept
        return objective.detach()

    plateau = _Plateau(len(batch), settings.patience, settings.tolerance, device)
    for index in range(settings.steps):
        # only images still improving are rendered and passed through the model
        running = plateau.n_active == len(batch)
        live = everyone if running else everyone[plateau.active]
        objective = step(index, live, None if running else ~plateau.active)
        bar.update()
        if plateau.update(objective, live) and index >= settings.redirect_steps:
            bar.update(settings.steps - index - 1)
            break
    if settings.rescue_steps:
        with torch.no_grad():
            acts = _unit_means(forward(image_f()), units).float()
        silent = (signs > 0) & (acts <= 0)
    for index in range(settings.steps, settings.steps + settings.rescue_steps):
        if not bool(silent.any()):
            break
        live = everyone[silent]
        step(index, live, ~silent)
        plateau.steps[live] += 1
        with torch.no_grad():
            acts[live] = _unit_means(forward(image_f()[live]), units[live]).float()
        silent &= acts <= 0
    with torch.no_grad():
        images = image_f()
        out, before = forward(images, trace=True)
        acts = _unit_means(out, units).float()
        objective = _unit_means(before if pre else out, units).float()
    return images.cpu(), acts.cpu(), objective.cpu(), plateau.steps.cpu()


class _Plateau:
    """Per-image early stopping: an image stops once its objective has not risen by ``tolerance``
    (relative to its size, at least 1e-3 absolute) over the last ``patience`` steps."""

    def __init__(self, n: int, patience: int, tolerance: float, device):
        self.patience, self.tolerance = patience, tolerance
        self.active = torch.ones(n, dtype=torch.bool, device=device) if patience > 0 else None
        self.n_active = n       # read from the device once per step, in update()
        self.steps = torch.zeros(n, dtype=torch.long, device=device)
        self.best = torch.full((n,), -float("inf"), device=device)
        self.since = torch.zeros(n, dtype=torch.long, device=device)

    def update(self, objective: torch.Tensor, live: torch.Tensor) -> bool:
        """Record one step of the images ``live`` (their ``objective``); True once every image has stopped."""
        self.steps[live] += 1
        if self.active is None:
            return False
        best = self.best[live]
        first = torch.isinf(best)
        margin = torch.where(first, torch.zeros_like(best), torch.clamp(best.abs() * self.tolerance, min=1e-3))
        improved = first | (objective > best + margin)
        self.best[live] = torch.where(improved, objective, best)
        self.since[live] = torch.where(improved, torch.zeros_like(self.since[live]), self.since[live] + 1)
        # an image still at or below zero has not started: it keeps going (a dead start is not a plateau)
        self.active &= (self.since < self.patience) | (self.best <= 0)
        self.n_active = int(self.active.sum())
        return self.n_active == 0
