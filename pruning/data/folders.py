"""ImageFolder datasets (ImageNet layout included), transforms, and loaders for CPU and GPU.

Corrupt files never surface as an unexplained traceback: with ``on_corrupt="error"`` a
:class:`CorruptImageError` names the file; with ``"skip"`` the file is dropped with a warning that
names it, and the loaders count the skips.
"""
from __future__ import annotations

import hashlib
import math
import os
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.transforms import functional as TF

from .common import (IMAGENET_MEAN, IMAGENET_STD, Batch, CorruptImageError, default_workers, epoch_seed, eval_resize,
                     open_image, pick_augment, shift_flip)
from .jpeg import JpegFolderLoader

SPLITS = ("train", "val")


class DataLayoutError(FileNotFoundError):
    """A data folder does not have the expected ImageFolder layout."""


class ImageFolderDataset(datasets.ImageFolder):
    """torchvision ImageFolder whose corrupt files raise a named error or yield ``None``."""

    def __init__(self, root: str | os.PathLike, transform=None, on_corrupt: str = "skip"):
        root = Path(root)
        if not root.is_dir():
            raise DataLayoutError(f"image folder {root} does not exist")
        try:
            super().__init__(str(root), transform=transform, loader=open_image)
        except FileNotFoundError as err:
            raise DataLayoutError(f"image folder {root}: {err} (expected {root}/<class>/<image>)") from None
        if on_corrupt not in ("skip", "error"):
            raise ValueError(f"unknown on_corrupt {on_corrupt!r}; choose from ['error', 'skip']")
        self.on_corrupt = on_corrupt

    def __getitem__(self, index: int):
        try:
            return super().__getitem__(index)
        except CorruptImageError as err:
            if self.on_corrupt == "error":
                raise
            warnings.warn(f"skipping corrupt image: {err}", stacklevel=2)
            return None


def collate_skipping(items) -> Batch:
    """Stack the decodable samples and count the corrupt ones (``None``)."""
    good = [it for it in items if it is not None]
    skipped = len(items) - len(good)
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped)
    images = torch.stack([g[0] for g in good])
    targets = torch.as_tensor([g[1] for g in good], dtype=torch.long)
    return Batch(images, targets, skipped)


def eval_crop(image_size: int, augment: str = "auto") -> transforms.Compose:
    """The evaluation geometry, image to image: the shorter side resized (to ``size/0.875`` for ImageNet-size
    inputs), then the centre ``image_size`` crop: what a network sees, and what an exemplar shows."""
    return transforms.Compose([transforms.Resize(eval_resize(image_size, augment)), transforms.CenterCrop(image_size)])


def build_transform(image_size: int, train: bool, augment: str = "auto") -> transforms.Compose:
    """Standard transforms: ImageNet RandomResizedCrop/flip or resize/centre-crop; small-image shifts."""
    augment = pick_augment(augment, image_size)
    norm = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if not train or augment == "none":
        return transforms.Compose([*eval_crop(image_size, augment).transforms, *norm])
    if augment == "imagenet":
        return transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
                                   *norm])
    return transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size),
                               transforms.RandomCrop(image_size, padding=image_size // 8, padding_mode="reflect"),
                               transforms.RandomHorizontalFlip(), *norm])


def split_dir(root: str | os.PathLike, split: str) -> Path:
    """``root/split``, or a clear error listing what the folder holds; where the other split exists too, its
    class folders must be the same (a class's label is its place among them, so a class missing from one
    split would shift every later label of that split)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {list(SPLITS)}")
    path = Path(root) / split
    if not path.is_dir():
        found = sorted(p.name for p in Path(root).iterdir()) if Path(root).is_dir() else []
        raise DataLayoutError(f"data folder {root} has no {split}/ folder (found: {found}); expected "
                              f"{root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg")
    check_split_classes(root)
    return path


def class_folders(path: str | os.PathLike) -> list[str]:
    """The class folders of one split, in label order (as torchvision's ImageFolder finds them)."""
    return sorted(entry.name for entry in os.scandir(path) if entry.is_dir())


def class_difference(expected: list[str], found: list[str]) -> tuple[list[str], list[str]]:
    """``(the classes of expected that found lacks, the classes found has beyond them)``, each sorted."""
    return sorted(set(expected) - set(found)), sorted(set(found) - set(expected))


def _holds_an_image(folder: Path) -> bool:
    with os.scandir(folder) as entries:     # stops at the first image: cheap on ImageNet's folders too
        return any(e.is_file() and has_file_allowed_extension(e.name, IMG_EXTENSIONS) for e in entries)


def check_split_classes(root: str | os.PathLike) -> None:
    """Stop when ``root/train`` and ``root/val`` (both present) hold different class folders, or a class folder
    of a split holds no image."""
    train, val = Path(root) / "train", Path(root) / "val"
    if train.is_dir() and val.is_dir():
        a, b = class_folders(train), class_folders(val)
        if a != b:
            lacks, extra = class_difference(a, b)
            parts = ([f"val/ lacks {len(lacks)} class(es) train/ has: {lacks[:5]}"] if lacks else []) + \
                    ([f"val/ has {len(extra)} class(es) train/ lacks: {extra[:5]}"] if extra else [])
            raise DataLayoutError(f"data folder {root}: {'; '.join(parts)}; both splits need the same class "
                                  f"folders, since a class's label is its place among them")
    for split in (train, val):
        empty = [name for name in class_folders(split) if not _holds_an_image(split / name)] if split.is_dir() else []
        if empty:
            raise DataLayoutError(f"data folder {root}: {split.name}/ has {len(empty)} class folder(s) without an "
                                  f"image file: {empty[:5]}; add images ({', '.join(IMG_EXTENSIONS[:4])}, …) or "
                                  f"remove them")


def check_num_classes(num_classes: int, classes: list[str]) -> int:
    """``num_classes`` (0: the data's count) when the classifier has an output for every class of the data."""
    if num_classes and num_classes < len(classes):
        raise DataLayoutError(f"model.num_classes = {num_classes} gives fewer outputs than the {len(classes)} class "
                              f"folders of the data ({classes[:5]}{', …' if len(classes) > 5 else ''}); set it to "
                              f"{len(classes)} or to 0 (the data's count)")
    return num_classes


def folder_digest(root: str | os.PathLike) -> str:
    """sha256 over the class folders and image file names of each split of ``root``: it changes when a class or
    an image is added, removed or renamed (a file rewritten under its old name is not noticed).  Within one
    process it is listed again only when a folder's modification time changed (ImageNet: 1.3M names)."""
    root = Path(root)
    folders = [root / split for split in SPLITS if (root / split).is_dir()]
    stamp = tuple((str(d), d.stat().st_mtime_ns) for f in folders for d in [f, *sorted(f.iterdir())] if d.is_dir())
    if _DIGESTS.get(str(root), (None,))[0] != stamp:
        _DIGESTS[str(root)] = (stamp, _list_digest(root))
    return _DIGESTS[str(root)][1]


_DIGESTS: dict[str, tuple] = {}


def _list_digest(root: Path) -> str:
    h = hashlib.sha256()
    for split in SPLITS:
        path = Path(root) / split
        if not path.is_dir():
            continue
        for name in class_folders(path):
            files = sorted(e.name for e in os.scandir(path / name) if e.is_file() and has_file_allowed_extension(
                e.name, IMG_EXTENSIONS))
            h.update(f"{split}/{name}:{len(files)}\n".encode())
            h.update("\n".join(files).encode())
    return h.hexdigest()


class FolderLoader:
    """Batches from an ImageFolder through a DataLoader (workers, pinned memory, DDP sharding)."""

    def __init__(self, dataset: ImageFolderDataset, batch_size: int, *, train: bool, seed: int = 0,
                 num_workers: int = -1, pin_memory: bool = False, rank: int = 0, world_size: int = 1):
        self.dataset, self.train, self.seed = dataset, train, seed
        workers = default_workers(num_workers)
        self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=seed,
                                          drop_last=False) if world_size > 1 else None
        self.generator = torch.Generator()
        self.loader = DataLoader(
            dataset, batch_size=batch_size, shuffle=train and self.sampler is None, sampler=self.sampler,
            num_workers=workers, pin_memory=pin_memory, drop_last=train, collate_fn=collate_skipping,
            persistent_workers=False, prefetch_factor=4 if workers else None, generator=self.generator)

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(epoch_seed(self.seed, epoch))
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


class MemoryLoader:
    """Batches from images decoded once into one uint8 tensor; augmentation done per batch.

    Suits small datasets (the embedded default): no worker processes competing with the model
    for two CPU cores, and on a GPU the whole set can live in device memory.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, batch_size: int, *, train: bool,
                 seed: int = 0, augment: str = "shift-flip", rank: int = 0, world_size: int = 1,
                 skipped: int = 0, device: torch.device | str = "cpu"):
        self.images, self.targets = images.to(device), targets.to(device)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.augment = augment if train else "none"
        self.rank, self.world_size = rank, world_size
        self.skipped = skipped
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        self.generator = torch.Generator(device="cpu")
        self.epoch = 0

    @property
    def num_samples(self) -> int:
        return len(self.targets)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> torch.Tensor:
        n = len(self.targets)
        if self.train:
            self.generator.manual_seed(epoch_seed(self.seed, self.epoch))
            order = torch.randperm(n, generator=self.generator)
        else:
            order = torch.arange(n)
        if self.world_size > 1:  # pad to a multiple of the world size, then take this rank's share
            total = math.ceil(n / self.world_size) * self.world_size
            order = torch.cat([order, order[: total - n]])[self.rank::self.world_size]
        return order

    def __len__(self) -> int:
        per_rank = math.ceil(len(self.targets) / self.world_size)
        return per_rank // self.batch_size if self.train else math.ceil(per_rank / self.batch_size)

    def __iter__(self):
        order = self._order()
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size].to(self.images.device)
            x = self.images.index_select(0, idx).float().div_(255)
            if self.augment == "shift-flip":
                x = shift_flip(x, self.generator)
            elif self.augment == "imagenet":
                x = random_resized_crop(x, self.generator)
            # every process decoded the whole set: rank 0 alone reports its skips, so their sum counts each once
            skipped = self.skipped if b == 0 and self.rank == 0 else 0
            yield Batch((x - self.mean) / self.std, self.targets.index_select(0, idx), skipped)


def random_resized_crop(x: torch.Tensor, generator: torch.Generator, scale=(0.35, 1.0)) -> torch.Tensor:
    """Per-image random-resized crop and flip on a batch via affine grids (GPU friendly)."""
    n = x.shape[0]
    area = torch.empty(n).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    ratio = torch.exp(log_ratio)
    sw = torch.sqrt(area * ratio).clamp(max=1.0)
    sh = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - sw)
    cy = (torch.rand(n, generator=generator) * 2 - 1) * (1 - sh)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = sw * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = sh, cy
    grid = torch.nn.functional.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def decode_to_memory(dataset: ImageFolderDataset, image_size: int, progress: bool = False):
    """Decode every image of an ImageFolder once (resize + centre crop) into uint8 (N, 3, S, S)."""
    from sparsight.progress import progress_bar

    prep = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size)])
    images = torch.empty(len(dataset.samples), 3, image_size, image_size, dtype=torch.uint8)
    targets = torch.empty(len(dataset.samples), dtype=torch.long)
    keep, skipped = [], 0
    bar = progress_bar(dataset.samples, desc="decode", enabled=progress, leave=False)
    for i, (path, target) in enumerate(bar):
        try:
            img = prep(open_image(path))
        except CorruptImageError as err:
            if dataset.on_corrupt == "error":
                raise
            warnings.warn(f"skipping corrupt image: {err}", stacklevel=2)
            skipped += 1
            continue
        images[i] = TF.pil_to_tensor(img)
        targets[i] = target
        keep.append(i)
    if skipped:
        keep_t = torch.as_tensor(keep, dtype=torch.long)
        images, targets = images[keep_t], targets[keep_t]
    return images, targets, skipped


MEMORY_CACHE_LIMIT_BYTES = 2 * 1024 ** 3


DECODE_CHOICES = ("auto", "cpu", "device")


def decodes_on_device(decode: str, device: torch.device | str) -> bool:
    """Whether JPEG folders are decoded on ``device`` ('auto': on a CUDA GPU)."""
    if decode not in DECODE_CHOICES:
        raise ValueError(f"unknown decode {decode!r}; choose from {list(DECODE_CHOICES)}")
    return decode == "device" or (decode == "auto" and torch.device(device).type == "cuda")


def stratified_subset(targets, max_images: int, seed: int = 0) -> list[int]:
    """Sorted indices of a seeded, class-stratified sample of at most ``max_images`` of ``targets``.

    Every class gets ``max_images // classes`` images (all it has when it has fewer); what is left
    goes one image at a time to classes that still have images, in a seeded order, so class counts
    differ by at most one where the data allow.  ``max_images <= 0`` or at least the set size: all.
    """
    targets = torch.as_tensor(list(targets), dtype=torch.long)
    n = len(targets)
    if max_images <= 0 or max_images >= n:
        return list(range(n))
    g = torch.Generator().manual_seed(int(seed))
    classes = sorted(set(targets.tolist()))
    pools = {c: (targets == c).nonzero().flatten() for c in classes}
    pools = {c: idx[torch.randperm(len(idx), generator=g)].tolist() for c, idx in pools.items()}
    take = {c: min(len(pools[c]), max_images // len(classes)) for c in classes}
    left = max_images - sum(take.values())
    while left > 0:
        open_classes = [c for c in classes if take[c] < len(pools[c])]
        for i in torch.randperm(len(open_classes), generator=g).tolist()[:left]:
            take[open_classes[i]] += 1
            left -= 1
    return sorted(i for c in classes for i in pools[c][:take[c]])


def make_loader(root: str | os.PathLike, split: str, *, image_size: int, batch_size: int, train: bool,
                seed: int = 0, cache: str = "auto", augment: str = "auto", on_corrupt: str = "skip",
                num_workers: int = -1, device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
                progress: bool = False, decode: str = "auto", subset: list[int] | None = None):
    """A loader over ``root/split`` (only the images at ``subset``, dataset indices, when given) for a
    model on ``device``.

    Small sets (``cache='auto'``) are decoded once into memory (kept on ``device`` with
    ``cache='memory'``); larger ones stream from the files, decoded by PIL in DataLoader workers or,
    on a GPU (``decode='auto'`` or ``'device'``), by the device itself (:mod:`pruning.data.jpeg`).
    """
    path = split_dir(root, split)
    augment = pick_augment(augment, image_size)
    dataset = ImageFolderDataset(path, transform=build_transform(image_size, train, augment), on_corrupt=on_corrupt)
    if subset is not None:
        dataset.samples = [dataset.samples[i] for i in subset]
        dataset.imgs, dataset.targets = dataset.samples, [t for _, t in dataset.samples]
    if len(dataset) == 0:
        raise DataLayoutError(f"image folder {path} holds no images")
    in_memory = cache == "memory" or (
        cache == "auto" and len(dataset) * 3 * image_size ** 2 <= MEMORY_CACHE_LIMIT_BYTES and image_size <= 128)
    if in_memory:
        images, targets, skipped = decode_to_memory(dataset, image_size, progress)
        loader = MemoryLoader(images, targets, batch_size, train=train, seed=seed, augment=augment, rank=rank,
                              world_size=world_size, skipped=skipped, device=device if cache == "memory" else "cpu")
    elif decodes_on_device(decode, device):
        loader = JpegFolderLoader(dataset, batch_size, train=train, image_size=image_size, augment=augment,
                                  seed=seed, num_workers=num_workers, device=device, rank=rank,
                                  world_size=world_size)
    else:
        loader = FolderLoader(dataset, batch_size, train=train, seed=seed, num_workers=num_workers,
                              pin_memory=torch.device(device).type == "cuda", rank=rank, world_size=world_size)
    loader.classes = dataset.classes
    return loader


def reference_batches(root: str | os.PathLike, split: str, *, image_size: int, per_class: int, seed: int = 0,
                      batch_size: int = 64, on_corrupt: str = "skip") -> list[Batch]:
    """A seeded sample of ``per_class`` images of every class, decoded without augmentation.

    Data-driven pruning criteria (LRP, gradient, Taylor) score filters on this reference set.
    """
    dataset = ImageFolderDataset(split_dir(root, split), transform=build_transform(image_size, train=False),
                                 on_corrupt=on_corrupt)
    targets = torch.as_tensor(dataset.targets)
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(len(dataset.classes)):
        idx = (targets == c).nonzero().flatten()
        chosen += idx[torch.randperm(len(idx), generator=g)[:per_class]].tolist()
    chosen.sort()
    batches = []
    for start in range(0, len(chosen), batch_size):
        batch = collate_skipping([dataset[i] for i in chosen[start:start + batch_size]])
        if len(batch.targets):
            batches.append(batch)
    return batches
