"""Concept-shapes: a procedural, vectorized, seed-deterministic image dataset with concept masks.

Every image shows one foreground shape (the class) with a colour and a texture on a textured
background.  Alongside each image a label map stores, per pixel, the shape, colour, texture and
background concept (Network Dissection ground truth).  Layout::

    <root>/train/<shape>/<shape>_00000.png        ImageFolder layout (val/ likewise)
    <root>/masks/train/<shape>/<shape>_00000.png  RGBA label map: R shape, G colour, B texture,
                                                  A background; value = concept id + 1, 0 = none
    <root>/train.csv, val.csv                     per-image concepts and geometry
    <root>/concepts.json                          concept names per layer, generator settings
"""
from __future__ import annotations

import csv
import json
import multiprocessing as mp
import os
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sparsight.files import stable_int

GENERATOR_VERSION = 1
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "crescent", "heart", "arrow", "bowtie")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 175, 60), "blue": (45, 85, 225), "yellow": (235, 210, 40),
    "magenta": (210, 50, 200), "cyan": (40, 200, 215), "orange": (245, 130, 30), "white": (238, 238, 238),
}
TEXTURES = ("solid", "stripes", "checker", "dots", "waves")
BACKGROUNDS = ("smooth", "grid", "gradient", "speckle")
MASK_LAYERS = ("shape", "colour", "texture", "background")
SUPERSAMPLE = 2
CHUNK = 256  # fixed so the bytes do not depend on how generation is split


@dataclass
class SceneParams:
    """Per-image random parameters for ``n`` images (one array per quantity)."""
    shape: np.ndarray
    colour: np.ndarray
    texture: np.ndarray
    background: np.ndarray
    centre: np.ndarray          # (n, 2) in [0, 1] image units
    radius: np.ndarray          # (n,) fraction of the image side
    angle: np.ndarray           # (n,) radians
    colour_jitter: np.ndarray   # (n, 3) additive, 0..255 scale
    tex_freq: np.ndarray        # cycles per object radius
    tex_angle: np.ndarray
    tex_phase: np.ndarray       # (n, 2)
    bg_colours: np.ndarray      # (n, 2, 3) in 0..255
    bg_freq: np.ndarray
    bg_angle: np.ndarray
    bg_grid: np.ndarray         # (n, 6, 6) smooth-noise control points

    def __len__(self) -> int:
        return len(self.shape)

    def take(self, idx) -> "SceneParams":
        return SceneParams(**{k: v[idx] for k, v in vars(self).items()})


def sample_params(labels: np.ndarray, rng: np.random.Generator) -> SceneParams:
    """Draw every random quantity for images whose classes are ``labels``."""
    n = len(labels)
    radius = rng.uniform(0.24, 0.36, n)
    margin = radius * 0.85
    centre = np.stack([rng.uniform(margin, 1 - margin), rng.uniform(margin, 1 - margin)], axis=1)
    grey = rng.uniform(60, 150, (n, 2, 1))
    tint = rng.uniform(-25, 25, (n, 2, 3))
    params = SceneParams(
        shape=labels.astype(np.int64),
        colour=rng.integers(0, len(COLOURS), n),
        texture=rng.integers(0, len(TEXTURES), n),
        background=rng.integers(0, len(BACKGROUNDS), n),
        centre=centre, radius=radius, angle=rng.uniform(-np.pi, np.pi, n),
        colour_jitter=rng.uniform(-18, 18, (n, 3)),
        tex_freq=rng.uniform(2.0, 3.5, n), tex_angle=rng.uniform(0, np.pi, n),
        tex_phase=rng.uniform(0, 2 * np.pi, (n, 2)),
        bg_colours=np.clip(grey + tint, 0, 255), bg_freq=rng.uniform(4, 9, n),
        bg_angle=rng.uniform(0, 2 * np.pi, n), bg_grid=rng.uniform(0, 1, (n, 6, 6)),
    )
    for name, value in vars(params).items():  # float32 keeps rendering fast and memory small
        if value.dtype == np.float64:
            setattr(params, name, value.astype(np.float32))
    return params


# ---- shapes as implicit functions of local coordinates (u, v), object radius = 1 -----------
def _regular_polygon(u, v, sides, r=1.0, turn=0.0):
    inside = np.ones(u.shape, dtype=bool)
    for k in range(sides):
        a = turn + 2 * np.pi * k / sides
        inside &= u * np.cos(a) + v * np.sin(a) <= r * np.cos(np.pi / sides)
    return inside


def _star(u, v):
    rho, theta = np.hypot(u, v), np.arctan2(v, u)
    t = np.abs(((theta * 5 / (2 * np.pi)) % 1.0) - 0.5) * 2  # 1 at the tips, 0 between
    return rho <= 0.42 + 0.58 * t


def _heart(u, v):
    x, y = u * 1.15, -v * 1.15 + 0.25
    return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0


def _arrow(u, v):
    shaft = (np.abs(v) <= 0.22) & (u >= -0.95) & (u <= 0.15)
    head = (u >= 0.05) & (np.abs(v) <= (0.95 - u) * 0.95)
    return shaft | head


SHAPE_FUNCS = {
    "circle": lambda u, v: u * u + v * v <= 1.0,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.8,
    "triangle": lambda u, v: _regular_polygon(u, v, 3, r=0.95, turn=np.pi / 2),
    "star": _star,
    "cross": lambda u, v: ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95)),
    "ring": lambda u, v: (u * u + v * v <= 1.0) & (u * u + v * v >= 0.55 ** 2),
    "crescent": lambda u, v: (u * u + v * v <= 1.0) & ((u - 0.5) ** 2 + v * v > 0.8 ** 2),
    "heart": _heart,
    "arrow": _arrow,
    "bowtie": lambda u, v: (np.abs(v) <= np.abs(u) * 0.9) & (np.abs(u) <= 0.95),
}
assert tuple(SHAPE_FUNCS) == SHAPES


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of (n, g, g) control points to (n, size, size)."""
    g = grid.shape[-1]
    pos = np.linspace(0, g - 1, size, dtype=np.float32)
    lo = np.clip(np.floor(pos).astype(int), 0, g - 2)
    frac = pos - lo
    interp = np.zeros((size, g), dtype=np.float32)
    interp[np.arange(size), lo] = 1 - frac
    interp[np.arange(size), lo + 1] = frac
    return np.einsum("yi,nij,xj->nyx", interp, grid, interp)


def _texture(kind: int, x, y, freq, angle, phase):
    """Texture value in [0, 1] on rotated, object-relative coordinates."""
    xr = x * np.cos(angle) + y * np.sin(angle)
    yr = -x * np.sin(angle) + y * np.cos(angle)
    a, b = 2 * np.pi * freq * xr + phase[..., 0], 2 * np.pi * freq * yr + phase[..., 1]
    name = TEXTURES[kind]
    if name == "solid":
        return np.ones_like(x)
    if name == "stripes":
        return (np.sin(a) > 0).astype(np.float32)
    if name == "checker":
        return ((np.sin(a) > 0) ^ (np.sin(b) > 0)).astype(np.float32)
    if name == "dots":
        return (np.cos(a) * np.cos(b) > 0.45).astype(np.float32)
    return 0.5 + 0.5 * np.sin(a + 1.5 * np.sin(0.5 * b))  # waves


def _background(kind: int, x, y, p: SceneParams, size: int):
    name = BACKGROUNDS[kind]
    f, ang = p.bg_freq[:, None, None], p.bg_angle[:, None, None]
    if name == "smooth":
        return _upsample(p.bg_grid, size)
    if name == "grid":
        gx, gy = (x * f) % 1.0, (y * f) % 1.0
        return ((gx < 0.12) | (gy < 0.12)).astype(np.float32)
    if name == "gradient":
        return np.clip(0.5 + 0.7 * ((x - 0.5) * np.cos(ang) + (y - 0.5) * np.sin(ang)), 0, 1)
    coarse = _upsample(p.bg_grid, size)  # speckle: fine noise from the grid values, seeded
    return (np.sin(2 * np.pi * (x * f * 3.1 + coarse * 7.0)) * np.sin(2 * np.pi * y * f * 2.7) > 0.3).astype(np.float32)


def render(p: SceneParams, image_size: int, noise: np.ndarray | None = None):
    """Render images (n, H, W, 3) uint8 and the foreground mask (n, H, W) bool."""
    n, s = len(p), image_size * SUPERSAMPLE
    coords = (np.arange(s, dtype=np.float32) + 0.5) / s
    y, x = np.meshgrid(coords, coords, indexing="ij")
    x, y = np.broadcast_to(x, (n, s, s)), np.broadcast_to(y, (n, s, s))
    cx, cy = p.centre[:, 0, None, None], p.centre[:, 1, None, None]
    r, ang = p.radius[:, None, None], p.angle[:, None, None]
    dx, dy = (x - cx) / r, (y - cy) / r
    u = dx * np.cos(ang) + dy * np.sin(ang)
    v = -dx * np.sin(ang) + dy * np.cos(ang)

    inside = np.zeros((n, s, s), dtype=bool)
    for k, name in enumerate(SHAPES):
        idx = np.flatnonzero(p.shape == k)
        if len(idx):
            inside[idx] = SHAPE_FUNCS[name](u[idx], v[idx])

    tex = np.ones((n, s, s), dtype=np.float32)
    bgv = np.zeros((n, s, s), dtype=np.float32)
    for k in range(len(TEXTURES)):
        idx = np.flatnonzero(p.texture == k)
        if len(idx):
            tex[idx] = _texture(k, dx[idx], dy[idx], p.tex_freq[idx, None, None],
                                p.tex_angle[idx, None, None], p.tex_phase[idx, None, None, :])
    for k in range(len(BACKGROUNDS)):
        idx = np.flatnonzero(p.background == k)
        if len(idx):
            bgv[idx] = _background(k, x[idx], y[idx], p.take(idx), s)

    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    fg_rgb = np.clip(palette[p.colour] + p.colour_jitter, 0, 255)[:, None, None, :]
    fg = fg_rgb * (0.5 + 0.5 * tex[..., None])
    c0, c1 = p.bg_colours[:, 0, None, None, :], p.bg_colours[:, 1, None, None, :]
    bg = c0 + (c1 - c0) * bgv[..., None]
    img = np.where(inside[..., None], fg, bg)

    # box-filter the supersampled image; the mask is the majority of each pixel's samples
    f = SUPERSAMPLE
    img = img.reshape(n, image_size, f, image_size, f, 3).mean(axis=(2, 4))
    cover = inside.reshape(n, image_size, f, image_size, f).mean(axis=(2, 4))
    if noise is not None:
        img = img + noise
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), cover >= 0.5


def label_maps(p: SceneParams, fg: np.ndarray) -> np.ndarray:
    """(n, H, W, 4) uint8: shape, colour, texture (on the object) and background (off it), id + 1."""
    n = len(p)
    out = np.zeros(fg.shape + (4,), dtype=np.uint8)
    for layer, ids in enumerate((p.shape, p.colour, p.texture)):
        out[..., layer] = np.where(fg, (ids + 1).astype(np.uint8)[:, None, None], 0)
    out[..., 3] = np.where(fg, 0, (p.background + 1).astype(np.uint8)[:, None, None])
    assert out.shape[0] == n
    return out


def _split_rng(seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng(stable_int(f"concept-shapes/{seed}/{split}"))


def _write_chunk(root: Path, split: str, seed: int, chunk_no: int, params: SceneParams,
                 files: list[str], image_size: int) -> list[float]:
    """Render one chunk and write its images and label maps; return foreground fractions."""
    noise_rng = _split_rng(seed, f"{split}/noise/{chunk_no}")
    noise = noise_rng.normal(0, 4.0, (len(params), image_size, image_size, 3)).astype(np.float32)
    images, fg = render(params, image_size, noise)
    maps = label_maps(params, fg)
    for j, rel in enumerate(files):
        _save_png(root / rel, images[j], "RGB")
        _save_png(root / "masks" / rel, maps[j], "RGBA")
    return fg.mean(axis=(1, 2)).tolist()


def generate_split(root: Path, split: str, per_class: int, image_size: int, seed: int,
                   workers: int = 0) -> int:
    """Write one split (images, label maps, index CSV); return the number of images."""
    rng = _split_rng(seed, split)
    labels = rng.permutation(np.repeat(np.arange(len(SHAPES)), per_class))
    params = sample_params(labels, rng)
    within = np.zeros(len(labels), dtype=np.int64)
    counts = np.zeros(len(SHAPES), dtype=np.int64)
    for i, c in enumerate(labels):
        within[i] = counts[c]
        counts[c] += 1
    files = [f"{split}/{SHAPES[c]}/{SHAPES[c]}_{w:05d}.png" for c, w in zip(labels, within)]
    for name in SHAPES:
        (root / split / name).mkdir(parents=True, exist_ok=True)
        (root / "masks" / split / name).mkdir(parents=True, exist_ok=True)

    starts = range(0, len(labels), CHUNK)
    workers = workers or min(len(starts), os.cpu_count() or 1)
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) if workers > 1 \
            else _InlineExecutor() as pool:
        jobs = [pool.submit(_write_chunk, root, split, seed, k, params.take(slice(s, s + CHUNK)),
                            files[s:s + CHUNK], image_size) for k, s in enumerate(starts)]
        fractions = [f for job in jobs for f in job.result()]

    rows = [dict(file=files[i], shape=SHAPES[labels[i]], colour=list(COLOURS)[params.colour[i]],
                 texture=TEXTURES[params.texture[i]], background=BACKGROUNDS[params.background[i]],
                 cx=round(float(params.centre[i, 0]), 4), cy=round(float(params.centre[i, 1]), 4),
                 radius=round(float(params.radius[i]), 4), angle=round(float(params.angle[i]), 4),
                 foreground_fraction=round(fractions[i], 4)) for i in range(len(labels))]
    with open(root / f"{split}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


class _InlineExecutor:
    """Runs submitted work at once, in this process (for one worker)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args) -> Future:
        future = Future()
        future.set_result(fn(*args))
        return future


def _save_png(path: Path, array: np.ndarray, mode: str) -> None:
    Image.fromarray(array, mode=mode).save(path, format="PNG", compress_level=1)


def generate(root: str | Path, *, seed: int = 0, train_per_class: int = 500, val_per_class: int = 100,
             image_size: int = 64, workers: int = 0) -> dict:
    """Generate the dataset under ``root`` and return its description (also in concepts.json)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    n_train = generate_split(root, "train", train_per_class, image_size, seed, workers)
    n_val = generate_split(root, "val", val_per_class, image_size, seed, workers)
    info = {
        "dataset": "concept-shapes", "generator_version": GENERATOR_VERSION, "seed": seed,
        "image_size": image_size, "train_per_class": train_per_class, "val_per_class": val_per_class,
        "n_train": n_train, "n_val": n_val, "classes": list(SHAPES),
        "mask_layers": list(MASK_LAYERS),
        "concepts": {"shape": list(SHAPES), "colour": list(COLOURS), "texture": list(TEXTURES),
                     "background": list(BACKGROUNDS)},
        "mask_encoding": "RGBA PNG under masks/<split>/...: channel i holds layer i's concept id + 1; 0 = none",
    }
    (root / "concepts.json").write_text(json.dumps(info, indent=2))
    return info


def read_label_map(path: str | Path) -> np.ndarray:
    """Load one label map as (H, W, 4) uint8 in ``MASK_LAYERS`` order."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGBA"))
