"""What the folder loaders (:mod:`.folders`) and the device-decoding loader (:mod:`.jpeg`) share:
normalization constants, the batch type, decoding with named errors, seeds and augmentation."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError

from sparsight.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CorruptImageError(UserError, RuntimeError):
    """An image file could not be decoded; the message names the file."""


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as 8-bit RGB.  Pillow's own conversion clips high-bit-depth greyscale (16-bit PNG, mode ``I;16``
    or ``I``; float TIFF, mode ``F``) at 255, which turns the image white; those are scaled to 8 bits instead:
    16-bit by 65535 (``I`` values above 255 are taken as 16-bit), float by 1 when they lie in [0, 1]."""
    if im.mode.startswith("I") or im.mode == "F":
        import numpy as np
        values = np.asarray(im, dtype=np.float64)
        top = values.max(initial=0.0)
        if im.mode.startswith("I;16") or (im.mode == "I" and top > 255):
            scale = 65535.0
        else:
            scale = 1.0 if im.mode == "F" and top <= 1.0 else 255.0
        return Image.fromarray(np.clip(np.rint(values / scale * 255.0), 0, 255).astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


def open_image(path: str | os.PathLike, *, what: str = "image", error: type[Exception] = None) -> Image.Image:
    """Decode an image fully as RGB (:func:`to_rgb`), or raise ``error`` (CorruptImageError) naming the file as
    ``what``."""
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise (error or CorruptImageError)(f"cannot decode {what} {path}: {err}") from None


@dataclass
class Batch:
    images: torch.Tensor
    targets: torch.Tensor
    skipped: int = 0

    def pin_memory(self) -> "Batch":
        """Page-locked copies (a DataLoader with ``pin_memory=True`` calls this), so that the trainer's
        ``non_blocking`` copy to the GPU really is asynchronous."""
        return Batch(self.images.pin_memory(), self.targets.pin_memory(), self.skipped)


def eval_resize(image_size: int, augment: str) -> int:
    """Shorter-side size before the evaluation centre crop: ``size/0.875`` for ImageNet-size inputs."""
    return int(round(image_size / 0.875)) if augment == "imagenet" or image_size >= 128 else image_size


def pick_augment(augment: str, image_size: int) -> str:
    if augment == "auto":
        return "shift-flip" if image_size < 128 else "imagenet"
    return augment


def default_workers(num_workers: int) -> int:
    if num_workers >= 0:
        return num_workers
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + 17) % (2 ** 63)


def shift_flip(x: torch.Tensor, generator: torch.Generator, pad_fraction: float = 0.125) -> torch.Tensor:
    """Per-image random translation (reflect padding) and horizontal flip, vectorized."""
    n, _, h, w = x.shape
    pad = max(1, int(round(h * pad_fraction)))
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None])  # (n, h)
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None])  # (n, w)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    idx_r = rows[:, None, :, None].expand(n, x.shape[1], h, padded.shape[3])
    out = padded.gather(2, idx_r)
    idx_c = cols[:, None, None, :].expand(n, x.shape[1], h, w)
    return out.gather(3, idx_c)
