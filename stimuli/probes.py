"""Probe sets for Network Dissection: images with concept labels, read from three layouts.

Every layout gives, per image, an :class:`ImageLabels`: *planes* of per-pixel concept ids (a pixel
may carry several concepts, one per plane, e.g. an object and its colour), whole-image concepts
(Broden's scenes and textures) and the *categories* annotated in the image.  Concepts are numbered
by *column* across the whole probe set; each belongs to one category.

*Broden* (Bau et al. 2017; the NetDissect release, e.g. ``broden1_224``; :meth:`ProbeSet.from_broden`)::

    <probe>/index.csv      image,split,ih,iw,sh,sw,<category>,...   one row per image; a category
                           cell lists ``;``-separated label PNGs (relative to images/) or, for
                           whole-image labels, label numbers
    <probe>/category.csv   name,...                                  the categories, in order
    <probe>/label.csv      number,name,category,...                  every label number and name
    <probe>/c_<category>.csv  code,number,name,frequency,coverage     (optional) per-category coverage
    <probe>/images/...     the images and their label PNGs: label number = R + 256·G, 0 = none

A label that occurs in several categories belongs to its *primary* category, the one where it
covers the most pixels (``c_*.csv`` coverage; without those files the image counts in label.csv's
``category`` field), as in NetDissect.  Every image of the index with a label is used (both splits).

*Folder* (:meth:`ProbeSet.from_folder`)::

    <probe>/concepts.json  {"mask_layers": ["object", "colour"], "concepts": {"object": [...], ...}}
    <probe>/images/**/<name>.{png,jpg,jpeg}
    <probe>/masks/**/<name>.png    8-bit label map, one channel per mask layer (category): concept id + 1

*Concept-shapes* (the embedded default; :meth:`ProbeSet.from_concept_shapes`): the folder layout of
one split of :func:`pruning.data.concept_shapes.generate`'s output.

A label map may have another size than its image: activations are compared at label-map
resolution.  A missing or unreadable file, or a label that is not in the concept list, raises
:class:`ProbeError` naming the file.  :func:`write_broden` writes any probe set in Broden's layout.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pruning.data.common import open_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LABEL_MODES = {"L": 1, "P": 1, "LA": 2, "RGB": 3, "RGBA": 4}
BRODEN_META = ("image", "split", "ih", "iw", "sh", "sw")
#: probes of at most this many bytes are fingerprinted by their files' contents, larger ones by modification time
CONTENT_HASH_BYTES = 64 * 2**20


class ProbeError(ValueError):
    """A probe set is missing, incomplete or unreadable; the message names the file."""


@dataclass
class ImageLabels:
    """The concept labels of one probe image at label-map resolution (numpy arrays: they cross from
    DataLoader workers by copy, and hold no shared-memory file descriptor as tensors would)."""
    planes: np.ndarray         # [P, h, w] int32: concept column + 1, 0 = none; a pixel holds a concept once
    scalars: np.ndarray        # [S] int64: concept columns labelling the whole image
    categories: np.ndarray     # [K] bool: the categories annotated in the image (pixels or whole image)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.planes.shape[1]), int(self.planes.shape[2])


def _image_labels(planes: np.ndarray, scalars: Sequence[int], category_of: np.ndarray,
                  n_categories: int) -> ImageLabels:
    """Planes of concept column + 1 → :class:`ImageLabels`; a concept repeated at a pixel (in two planes,
    or in a plane and as a whole-image label) is kept once."""
    planes = np.array(planes, dtype=np.int32)
    scalars = np.unique(np.asarray(scalars, dtype=np.int64))
    if len(planes) and len(scalars):
        planes[np.isin(planes, scalars + 1)] = 0
    for p in range(1, len(planes)):
        for q in range(p):
            planes[p][planes[p] == planes[q]] = 0
    present = np.zeros(n_categories, dtype=bool)
    columns = np.unique(planes)
    present[category_of[columns[columns > 0] - 1]] = True
    present[category_of[scalars]] = True
    return ImageLabels(planes, scalars, present)


def _read_png(path: Path, broden: bool = False) -> tuple[str, np.ndarray]:
    """``(mode, pixels)`` of a label PNG; with ``broden`` a palette image is expanded to RGB (lossless)."""
    try:
        with Image.open(path) as im:
            im.load()
            if broden and im.mode == "P":
                im = im.convert("RGB")
            return im.mode, np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ProbeError(f"cannot decode probe label map {path}: {err}") from None


# ---- label decoders: one per layout ------------------------------------------------------------
class ChannelMaps:
    """Decodes 8-bit label maps with one channel per category (the folder and concept-shapes layouts)."""

    def __init__(self, categories: Sequence[str], sizes: Sequence[int]):
        self.categories, self.sizes = tuple(categories), tuple(int(s) for s in sizes)
        self.offsets = np.cumsum((0,) + self.sizes[:-1]).astype(np.int32)
        self.category_of = np.repeat(np.arange(len(self.sizes)), self.sizes)

    def files(self, entry: Path) -> tuple[Path, ...]:
        return (entry,)

    def shape(self, entry: Path) -> tuple[int, int, int]:
        with Image.open(entry) as im:
            return len(self.sizes), im.size[1], im.size[0]

    def label_bytes(self, entries: Sequence[Path]) -> int:
        """Decoded size of every entry's labels, estimated from the first (one layout for all)."""
        planes, h, w = self.shape(entries[0])
        return 4 * planes * h * w * len(entries)

    def read(self, entry: Path) -> ImageLabels:
        mode, labels = _read_png(entry)
        n = len(self.categories)
        if mode not in LABEL_MODES:
            raise ProbeError(f"probe label map {entry} has PNG mode {mode!r}; use 8-bit L, P, LA, RGB or RGBA")
        if LABEL_MODES[mode] < n:
            raise ProbeError(f"probe label map {entry} has {LABEL_MODES[mode]} channel(s) ({mode}) but the probe "
                             f"has {n} mask layers {list(self.categories)}")
        labels = labels.reshape(labels.shape[0], labels.shape[1], -1)[..., :n].transpose(2, 0, 1).astype(np.int32)
        for i, layer in enumerate(self.categories):
            top = int(labels[i].max())
            if top > self.sizes[i]:
                raise ProbeError(f"probe label map {entry}: mask layer {layer!r} holds value {top}, but the layer "
                                 f"has only {self.sizes[i]} concepts (value = concept id + 1)")
        planes = np.where(labels > 0, labels + self.offsets[:, None, None], 0)
        return _image_labels(planes, (), self.category_of, n)


@dataclass(frozen=True)
class BrodenRow:
    """One image's labels in a Broden index: label PNGs, whole-image label numbers, label-map size."""
    maps: tuple[Path, ...]
    scalars: tuple[int, ...]
    size: tuple[int, int]      # (sh, sw)


class BrodenMaps:
    """Decodes Broden label PNGs (label number = R + 256·G) into concept columns."""

    def __init__(self, column_of: np.ndarray, category_of: np.ndarray, n_categories: int):
        self.column_of = column_of            # [max label number + 1]: concept column + 1, 0 = not a concept
        self.category_of, self.n_categories = category_of, n_categories

    def files(self, entry: BrodenRow) -> tuple[Path, ...]:
        return entry.maps

    def shape(self, entry: BrodenRow) -> tuple[int, int, int]:
        return (len(entry.maps),) + entry.size

    def label_bytes(self, entries: Sequence[BrodenRow]) -> int:
        """Decoded size of every entry's labels (from the index: no file is read)."""
        return sum(4 * max(len(e.maps), 1) * e.size[0] * e.size[1] for e in entries)

    def read(self, entry: BrodenRow) -> ImageLabels:
        planes = np.zeros((len(entry.maps),) + entry.size, dtype=np.int32)
        for i, path in enumerate(entry.maps):
            mode, px = _read_png(path, broden=True)
            if mode not in ("RGB", "RGBA"):
                raise ProbeError(f"Broden label map {path} has PNG mode {mode!r}; it must be RGB, RGBA or a palette "
                                 f"PNG (label number = R + 256·G)")
            if px.shape[:2] != entry.size:
                raise ProbeError(f"Broden label map {path} is {px.shape[1]}×{px.shape[0]} but index.csv gives "
                                 f"sw×sh = {entry.size[1]}×{entry.size[0]}")
            numbers = px[..., 0].astype(np.int32) + 256 * px[..., 1].astype(np.int32)
            top = int(numbers.max())
            if top >= len(self.column_of):
                unknown = top
            else:
                stray = numbers[(numbers > 0) & (self.column_of[numbers] == 0)]
                unknown = int(stray[0]) if stray.size else 0
            if unknown:
                raise ProbeError(f"Broden label map {path} holds label number {unknown}, which is not a concept of "
                                 f"label.csv in a category of category.csv")
            planes[i] = self.column_of[numbers]
        scalars = self.column_of[np.asarray(entry.scalars, dtype=np.int64)] - 1
        return _image_labels(planes, scalars, self.category_of, self.n_categories)


# ---- probe sets --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeSet:
    """Probe images with their labels (see the module docstring for the layouts)."""
    images: tuple[Path, ...]
    entries: tuple                             # per image: what ``decoder`` reads (a label map path, a BrodenRow)
    categories: tuple[str, ...]
    concepts: tuple[tuple[str, str], ...]      # (category, name) of every concept column
    decoder: ChannelMaps | BrodenMaps
    root: Path = Path(".")

    def __post_init__(self):
        if len(self.images) != len(self.entries):
            raise ValueError(f"{len(self.images)} images but {len(self.entries)} label entries")

    @classmethod
    def from_dirs(cls, images_dir: str | Path, masks_dir: str | Path, concepts_file: str | Path,
                  root: str | Path | None = None) -> ProbeSet:
        layers, names = read_concepts(concepts_file)
        images, masks = _index(Path(images_dir), Path(masks_dir))
        concepts = tuple((layer, name) for layer in layers for name in names[layer])
        decoder = ChannelMaps(layers, [len(names[layer]) for layer in layers])
        return cls(tuple(images), tuple(masks), layers, concepts, decoder, Path(root or images_dir))

    @classmethod
    def from_concept_shapes(cls, data_root: str | Path, split: str = "val") -> ProbeSet:
        """A concept-shapes split: ``<data>/<split>/``, ``<data>/masks/<split>/``, ``<data>/concepts.json``."""
        root = Path(data_root)
        return cls.from_dirs(root / split, root / "masks" / split, root / "concepts.json", root)

    @classmethod
    def from_folder(cls, probe: str | Path) -> ProbeSet:
        """A folder probe: ``<probe>/concepts.json``, ``<probe>/images/**``, ``<probe>/masks/**``."""
        probe = Path(probe).expanduser()
        if not probe.is_dir():
            raise ProbeError(f"probe folder {probe} does not exist (expected concepts.json, images/, masks/)")
        return cls.from_dirs(probe / "images", probe / "masks", probe / "concepts.json", probe)

    @classmethod
    def from_broden(cls, probe: str | Path) -> ProbeSet:
        """A Broden release: ``index.csv``, ``category.csv``, ``label.csv`` (and ``c_*.csv``), ``images/``."""
        return _read_broden(Path(probe).expanduser())

    def __len__(self) -> int:
        return len(self.images)

    @property
    def concept_index(self) -> list[tuple[str, str]]:
        """``(category, concept)`` of every concept column."""
        return list(self.concepts)

    @property
    def n_concepts(self) -> int:
        return len(self.concepts)

    @property
    def concept_category(self) -> torch.Tensor:
        """``[C]`` int64: the category index of every concept column."""
        index = {c: i for i, c in enumerate(self.categories)}
        return torch.tensor([index[c] for c, _ in self.concepts], dtype=torch.long)

    def subset(self, indices: Iterable[int]) -> ProbeSet:
        idx = list(indices)
        return dataclasses.replace(self, images=tuple(self.images[i] for i in idx),
                                   entries=tuple(self.entries[i] for i in idx))

    def sample(self, max_images: int, seed: int = 0) -> ProbeSet:
        """A seeded sample of ``max_images`` images (kept in probe order); all when 0 or enough."""
        if max_images <= 0 or max_images >= len(self):
            return self
        return self.subset(sorted(random.Random(seed).sample(range(len(self)), max_images)))

    def fingerprint(self) -> str:
        """Hash of the concept list, whole-image labels and every file's relative path and size, and of the
        files' contents up to :data:`CONTENT_HASH_BYTES` in all (so a copied probe, with new modification
        times, is the same probe); above it, of their modification times instead (a full Broden release)."""
        h = hashlib.sha256(json.dumps([self.categories, self.concepts], sort_keys=True).encode())
        files = [(path, path.stat()) for image, entry in zip(self.images, self.entries)
                 for path in (image,) + self.decoder.files(entry)]
        by_content = sum(st.st_size for _, st in files) <= CONTENT_HASH_BYTES
        for path, st in files:
            stamp = hashlib.sha256(path.read_bytes()).hexdigest() if by_content else st.st_mtime_ns
            h.update(f"{_relative(path, self.root)}:{st.st_size}:{stamp}\n".encode())
        for entry in self.entries:
            if isinstance(entry, BrodenRow):
                h.update(f"{entry.scalars}{entry.size}\n".encode())
        return h.hexdigest()

    def label_bytes(self) -> int:
        """About how many bytes every image's decoded labels take."""
        return self.decoder.label_bytes(self.entries)

    def read_image(self, index: int) -> Image.Image:
        return open_image(self.images[index], what="probe image", error=ProbeError)

    def read_labels(self, index: int) -> ImageLabels:
        return self.decoder.read(self.entries[index])


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def open_probe(probe: str | Path | None = "", data_root: str | Path | None = None, split: str = "val") -> ProbeSet:
    """The probe folder ``probe`` (Broden when it has an index.csv, else the folder layout) if given, else
    the concept-shapes masks of ``data_root/split``."""
    if probe:
        path = Path(probe).expanduser()
        if (path / "index.csv").is_file():
            return ProbeSet.from_broden(path)
        if path.is_dir() and not (path / "concepts.json").exists():
            raise ProbeError(f"probe folder {path} has neither index.csv (Broden) nor concepts.json (folder layout)")
        return ProbeSet.from_folder(path)
    if data_root is None:
        raise ProbeError("no probe set: give a probe folder (Broden or folder layout) or a concept-shapes data root")
    root = Path(data_root)
    if not (root / "masks").is_dir():
        raise ProbeError(f"data folder {root} has no concept masks (masks/); Network Dissection needs a probe set "
                         f"with per-pixel labels: set dissection.probe (or --probe) to a Broden or folder probe")
    return ProbeSet.from_concept_shapes(root, split)


# ---- the folder layout -------------------------------------------------------------------------
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
        raise ProbeError(f"{path}: {len(layers)} mask layers, but a PNG label map holds at most 4 "
                         f"(use the Broden layout for more)")
    if not isinstance(concepts, dict):
        raise ProbeError(f"{path}: 'concepts' must map every mask layer to its list of concept names")
    for layer in layers:
        names = concepts.get(layer)
        if not isinstance(names, list) or not names or not all(isinstance(x, str) for x in names):
            raise ProbeError(f"{path}: 'concepts' has no list of concept names for mask layer {layer!r}")
        if len(names) > 255:
            raise ProbeError(f"{path}: mask layer {layer!r} has {len(names)} concepts; 8-bit label maps hold 255 "
                             f"(use the Broden layout for more)")
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


# ---- the Broden layout -------------------------------------------------------------------------
def _csv_rows(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            fields = reader.fieldnames or []
    except FileNotFoundError:
        raise ProbeError(f"Broden file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ProbeError(f"cannot read Broden file {path}: {err}") from None
    missing = [c for c in required if c not in fields]
    if missing:
        raise ProbeError(f"Broden file {path} has no column {missing[0]!r} (columns: {', '.join(fields)})")
    return rows


def _number(text: str, path: Path, line: int, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ProbeError(f"{path} line {line}: {what} {text!r} is not a whole number") from None


def _primary_categories(root: Path, categories: tuple[str, ...], labels: dict[int, dict[str, str]]) -> dict[int, int]:
    """``{label number: category index}``: the category where the label covers the most (the later one on
    ties, as NetDissect-Lite); labels of no category are left out."""
    score: dict[int, list[float]] = {n: [0.0] * len(categories) for n in labels}
    present = [c for c in categories if (root / f"c_{c}.csv").is_file()]
    if present and len(present) < len(categories):
        missing = next(c for c in categories if c not in present)
        raise ProbeError(f"Broden file {root / f'c_{missing}.csv'} does not exist (the other categories have one)")
    if present:
        for k, cat in enumerate(categories):
            path = root / f"c_{cat}.csv"
            for line, row in enumerate(_csv_rows(path, ("number", "coverage")), start=2):
                n = _number(row["number"], path, line, "label number")
                if n in score:
                    try:
                        score[n][k] = max(float(row["coverage"]), 1e-300)
                    except ValueError:
                        raise ProbeError(f"{path} line {line}: coverage {row['coverage']!r} is not a number") from None
    else:
        for n, row in labels.items():
            for part in filter(None, (row.get("category") or "").split(";")):
                m = re.fullmatch(r"\s*([^()]+?)\s*(?:\((\d+)\))?\s*", part)
                if m and m.group(1) in categories:
                    score[n][categories.index(m.group(1))] = max(float(m.group(2) or 1), 1e-300)
    primary = {}
    for n, s in score.items():
        if max(s) > 0:
            primary[n] = max(range(len(s)), key=lambda k: (s[k], k))
    return primary


def _read_broden(root: Path) -> ProbeSet:
    if not root.is_dir():
        raise ProbeError(f"Broden folder {root} does not exist (expected index.csv, category.csv, label.csv, images/)")
    categories = tuple(row["name"] for row in _csv_rows(root / "category.csv", ("name",)))
    if not categories:
        raise ProbeError(f"Broden file {root / 'category.csv'} lists no category")
    label_path = root / "label.csv"
    labels = {}
    for line, row in enumerate(_csv_rows(label_path, ("number", "name")), start=2):
        n = _number(row["number"], label_path, line, "label number")
        if n > 0:
            labels[n] = row
    primary = _primary_categories(root, categories, labels)
    numbers = sorted(primary)
    if not numbers:
        raise ProbeError(f"{label_path}: no label belongs to a category of category.csv ({', '.join(categories)})")
    column_of = np.zeros(max(labels) + 1, dtype=np.int32)
    column_of[numbers] = np.arange(1, len(numbers) + 1, dtype=np.int32)
    category_of = np.array([primary[n] for n in numbers], dtype=np.int64)
    concepts = tuple((categories[primary[n]], labels[n]["name"]) for n in numbers)

    index_path = root / "index.csv"
    images, rows = [], []
    for line, row in enumerate(_csv_rows(index_path, BRODEN_META[:1] + BRODEN_META[4:]), start=2):
        image = root / "images" / row["image"]
        if not image.is_file():
            raise ProbeError(f"{index_path} line {line}: image {image} does not exist")
        maps, scalars = [], []
        for cat in categories:
            for token in filter(None, (t.strip() for t in (row.get(cat) or "").split(";"))):
                if token.isdigit():
                    n = int(token)
                    if n == 0:
                        continue           # a label dropped when the release was built (NetDissect ignores 0)
                    if n >= len(column_of) or not column_of[n]:
                        raise ProbeError(f"{index_path} line {line}: whole-image label {n} ({cat}) is not a concept: "
                                         f"not in label.csv, or in no category of category.csv")
                    scalars.append(n)
                else:
                    path = root / "images" / token
                    if not path.is_file():
                        raise ProbeError(f"{index_path} line {line}: label map {path} does not exist")
                    maps.append(path)
        if not maps and not scalars:
            continue                       # no label in any category: not part of the probe (as NetDissect)
        size = (_number(row["sh"], index_path, line, "sh"), _number(row["sw"], index_path, line, "sw"))
        images.append(image)
        rows.append(BrodenRow(tuple(maps), tuple(scalars), size))
    if not images:
        raise ProbeError(f"Broden index {index_path} lists no image")
    return ProbeSet(tuple(images), tuple(rows), categories, concepts, BrodenMaps(column_of, category_of,
                                                                              len(categories)), root)


def write_broden(probe: ProbeSet, out: str | Path) -> Path:
    """Write ``probe`` in Broden's layout under ``out`` (label numbers = concept column + 1; images copied
    as PNG; one label PNG per plane; whole-image labels as numbers); returns ``out``."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    columns = probe.concept_category.tolist()
    coverage = np.zeros(len(probe.concepts))
    frequency = np.zeros(len(probe.concepts), dtype=np.int64)
    index = []
    for i in range(len(probe)):
        labels = probe.read_labels(i)
        h, w = labels.size
        name = f"probe_{i:06d}"
        image = probe.read_image(i)
        image.save(out / "images" / f"{name}.png")
        cells: dict[str, list[str]] = {c: [] for c in probe.categories}
        for p, plane in enumerate(labels.planes):
            if not plane.any() and (p or labels.planes.any() or len(labels.scalars)):
                continue                   # an image without any label keeps one empty map: it stays in the set
            file = f"{name}_plane{p}.png"
            rgb = np.stack([plane % 256, plane // 256, np.zeros_like(plane)], axis=-1).astype(np.uint8)
            Image.fromarray(rgb, "RGB").save(out / "images" / file)
            top = np.bincount(probe.concept_category.numpy()[plane[plane > 0] - 1], minlength=len(probe.categories))
            cells[probe.categories[int(top.argmax())]].append(file)
            counts = np.bincount(plane.ravel(), minlength=len(probe.concepts) + 1)[1:]
            coverage += counts / (h * w)
            frequency += counts > 0
        for c in labels.scalars.tolist():
            cells[probe.categories[columns[c]]].append(str(c + 1))
            coverage[c] += 1
            frequency[c] += 1
        index.append({"image": f"{name}.png", "split": "val", "ih": image.size[1], "iw": image.size[0],
                      "sh": h, "sw": w, **{c: ";".join(v) for c, v in cells.items()}})
    _write_csv(out / "index.csv", list(BRODEN_META) + list(probe.categories), index)
    _write_csv(out / "category.csv", ["name", "first", "last", "count", "frequency"],
               [{"name": cat, "first": 0, "last": 0, "count": columns.count(k), "frequency": 0}
                for k, cat in enumerate(probe.categories)])
    labels_rows = [{"number": j + 1, "name": name, "category": f"{cat}({frequency[j]})",
                    "frequency": frequency[j], "coverage": f"{coverage[j]:.6f}", "syns": ""}
                   for j, (cat, name) in enumerate(probe.concepts)]
    _write_csv(out / "label.csv", ["number", "name", "category", "frequency", "coverage", "syns"], labels_rows)
    for k, cat in enumerate(probe.categories):
        rows = [{"code": code + 1, "number": r["number"], "name": r["name"], "frequency": r["frequency"],
                 "coverage": r["coverage"]}
                for code, r in enumerate(r for j, r in enumerate(labels_rows) if columns[j] == k)]
        _write_csv(out / f"c_{cat}.csv", ["code", "number", "name", "frequency", "coverage"], rows)
    return out


def _write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)
