"""Folders of JPEGs decoded on the accelerator.

Worker processes only read file bytes; the device decodes them in batches
(``torchvision.io.decode_jpeg(..., device=...)``, nvJPEG on a CUDA GPU), then crops, resizes, flips
and normalizes each image there.  The transforms reproduce the PIL path of
:func:`pruning.data.folders.build_transform` (same resize rule, antialiased bilinear, same crop
sampling), so the two paths give the same tensors up to decoder rounding.

Files that are not JPEGs (PNG, …) or that the device decoder refuses or might misread (CMYK,
RGB-coded Adobe files, …) are decoded on the CPU instead; a file no decoder can read is skipped with
a warning that names it, or raises :class:`~pruning.data.common.CorruptImageError` with
``on_corrupt="error"``.
"""
from __future__ import annotations

import contextlib
import math
import multiprocessing
import queue
import threading
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import io as tvio
from torchvision.transforms import functional as TF

from .common import (IMAGENET_MEAN, IMAGENET_STD, Batch, CorruptImageError, default_workers, epoch_seed, eval_resize,
                     open_image, pick_augment, shift_flip)

JPEG_MAGIC = (0xFF, 0xD8)
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)


class EncodedImages(Dataset):
    """``(file bytes, target, index)`` of ``samples``; bytes are ``None`` when the file cannot be read."""

    def __init__(self, samples: list[tuple[str, int]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError:
            data = None
        return data, target, index


@dataclass
class EncodedBatch:
    """A batch of files' bytes packed into one uint8 tensor (one shared-memory block from a worker)."""
    data: torch.Tensor
    offsets: list[int]
    lengths: list[int]          # -1: the file could not be read
    targets: list[int]
    indices: list[int]
    device_ok: list[bool]       # a baseline/progressive JPEG with 1 or 3 components (the GPU decoder's kind)

    def __len__(self) -> int:
        return len(self.indices)

    def items(self) -> list[tuple[torch.Tensor | None, int, int]]:
        """``(bytes tensor or None, target, index)`` per file; the tensors are views of ``data``."""
        return [(self.data[o:o + n] if n >= 0 else None, t, i)
                for o, n, t, i in zip(self.offsets, self.lengths, self.targets, self.indices)]


def collate_encoded(items) -> EncodedBatch:
    blobs = [d or b"" for d, _, _ in items]
    lengths = [len(d) if d is not None else -1 for d, _, _ in items]
    offsets = [0]
    for blob in blobs[:-1]:
        offsets.append(offsets[-1] + len(blob))
    joined = b"".join(blobs)
    data = torch.frombuffer(bytearray(joined), dtype=torch.uint8) if joined else torch.empty(0, dtype=torch.uint8)
    return EncodedBatch(data, offsets, lengths, [t for _, t, _ in items], [i for _, _, i in items],
                        [device_decodable(b) for b in blobs])


SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
#: the frames nvJPEG decodes: baseline, extended and progressive Huffman coding (lossless, hierarchical and
#: arithmetic-coded frames are left to the CPU decoders)
DEVICE_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2})


def _header_segments(blob: bytes):
    """``(marker, offset)`` of each marker segment of a JPEG up to and including its frame header (SOF);
    nothing for a file that is not a JPEG or whose scan data starts before a frame header."""
    if len(blob) < 4 or blob[0] != JPEG_MAGIC[0] or blob[1] != JPEG_MAGIC[1]:
        return
    i = 2
    while i + 4 <= len(blob):
        if blob[i] != 0xFF:
            return
        marker = blob[i + 1]
        if marker == 0xFF:                          # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker == 0xDA:                          # scan data before any frame header
            return
        yield marker, i
        if marker in SOF_MARKERS:
            return
        i += 2 + ((blob[i + 2] << 8) | blob[i + 3])


def _header(blob: bytes) -> tuple[tuple[int, int, int] | None, int | None]:
    """One pass over a JPEG's header: ``(frame, Adobe transform)`` (see :func:`jpeg_frame` and
    :func:`adobe_transform`)."""
    transform = None
    for marker, i in _header_segments(blob):
        start = i + 4
        if marker == 0xEE and blob[start:start + len(ADOBE_ID)] == ADOBE_ID and start + ADOBE_TRANSFORM_AT < len(blob):
            transform = blob[start + ADOBE_TRANSFORM_AT]
        if marker in SOF_MARKERS:
            return ((marker, blob[i + 4], blob[i + 9]) if i + 9 < len(blob) else None), transform
    return None, transform


#: Adobe's APP14 segment: its identifier, and the offset of its colour-transform byte after the length field
ADOBE_ID, ADOBE_TRANSFORM_AT = b"Adobe", 11


def jpeg_frame(blob: bytes) -> tuple[int, int, int] | None:
    """``(SOF marker, sample precision in bits, colour components)`` from a JPEG's frame header; ``None``
    for anything else."""
    return _header(blob)[0]


def adobe_transform(blob: bytes) -> int | None:
    """The colour transform an Adobe APP14 segment declares before the frame header (0: the components are
    stored as they are, e.g. RGB rather than YCbCr; 1: YCbCr; 2: YCCK), ``None`` without one."""
    return _header(blob)[1]


def device_decodable(blob: bytes) -> bool:
    """Whether the device decoder may take ``blob``: an 8-bit Huffman-coded greyscale (1) or YCbCr (3) JPEG.

    CMYK (4) files, other frame types and files that are not JPEGs are decoded on the CPU (nvJPEG may turn
    CMYK into garbage instead of refusing it, and one file it refuses fails its whole batch).  So are three-
    component files whose Adobe segment says their components are stored untransformed (RGB): libjpeg, and
    so PIL and the CPU path, honour that segment; a decoder that assumed YCbCr would return wrong colours.
    """
    frame, transform = _header(blob)
    if frame is None or frame[0] not in DEVICE_SOF_MARKERS or frame[1] != 8 or frame[2] not in (1, 3):
        return False
    return frame[2] == 1 or transform != 0


class DeviceDecoder:
    """Encoded images → uint8 RGB ``(3, H, W)`` tensors on ``device``, JPEGs batched on the device."""

    def __init__(self, device: torch.device | str = "cpu", on_corrupt: str = "skip"):
        if on_corrupt not in ("skip", "error"):
            raise ValueError(f"unknown on_corrupt {on_corrupt!r}; choose from ['error', 'skip']")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            # torchvision keeps one nvJPEG decoder and builds a new one whenever the device differs, and
            # "cuda" differs from "cuda:0": name the index, as the study's own device does
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.on_corrupt = on_corrupt

    def __call__(self, datas: list, paths: list[str], device_ok: list[bool]) -> list[torch.Tensor | None]:
        """One tensor per input, ``None`` for a skipped corrupt file; ``device_ok`` marks the inputs the
        device decoder may take (see :func:`device_decodable`)."""
        out: list[torch.Tensor | None] = [None] * len(datas)
        jpegs = [i for i, (d, ok) in enumerate(zip(datas, device_ok)) if ok and d is not None]
        if jpegs:
            if self.device.type == "cuda":
                # nvJPEG writes its outputs on a stream of its own, without waiting for this one: memory
                # freed here but still read by queued kernels must not be handed to it yet
                torch.cuda.current_stream(self.device).synchronize()
            try:
                decoded = tvio.decode_jpeg([datas[i] for i in jpegs], mode=tvio.ImageReadMode.RGB, device=self.device)
                for i, img in zip(jpegs, decoded):
                    out[i] = img
            except RuntimeError:  # one bad file fails the batch: decode them one by one
                for i in jpegs:
                    out[i] = self._one_on_device(datas[i])
        for i, img in enumerate(out):
            if img is None:
                out[i] = self._fallback(datas[i], paths[i])
        return out

    def _one_on_device(self, data: torch.Tensor) -> torch.Tensor | None:
        try:
            return tvio.decode_jpeg(data, mode=tvio.ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return None

    def _fallback(self, data, path: str) -> torch.Tensor | None:
        """CPU decoders: torchvision's, then PIL's; a file neither reads is corrupt."""
        img = None
        if data is not None:
            try:
                img = tvio.decode_image(data, mode=tvio.ImageReadMode.RGB)
            except RuntimeError:
                img = None
        if img is None:
            try:
                img = TF.pil_to_tensor(open_image(path))
            except CorruptImageError:
                if self.on_corrupt == "error":
                    raise
                warnings.warn(f"skipping corrupt image: cannot decode image {path}", stacklevel=3)
                return None
        return img.to(self.device, non_blocking=True)


# ---- per-image geometry, matching the PIL transforms -----------------------------------------------
def resized_shape(height: int, width: int, shorter: int) -> tuple[int, int]:
    """torchvision's ``Resize(shorter)`` output size: the shorter side to ``shorter``, the other truncated."""
    if height <= width:
        return shorter, int(shorter * width / height)
    return int(shorter * height / width), shorter


#: CUDA's antialiased kernel holds a block's filter weights in shared memory and refuses downscales beyond
#: about 90× ("Too much shared memory required"); larger ones are resized on the CPU, by the same filter
GPU_ANTIALIAS_MAX_FACTOR = 64


def _resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``(3, h, w)`` → float ``(1, 3, *size)`` in [0, 255], antialiased bilinear (PIL's filter)."""
    x = img[None].float()
    factor = max(x.shape[-2] / size[0], x.shape[-1] / size[1])
    if x.device.type != "cpu" and factor > GPU_ANTIALIAS_MAX_FACTOR:
        return F.interpolate(x.cpu(), size=size, mode="bilinear", antialias=True, align_corners=False).to(x.device)
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


def center_crop(img: torch.Tensor, image_size: int, augment: str) -> torch.Tensor:
    """Resize the shorter side, then take the centre ``image_size`` square (float, 0–255)."""
    h, w = resized_shape(img.shape[-2], img.shape[-1], eval_resize(image_size, augment))
    x = _resize(img, (h, w))
    top, left = int(round((h - image_size) / 2.0)), int(round((w - image_size) / 2.0))
    return x[..., top:top + image_size, left:left + image_size]


def sample_resized_crop(height: int, width: int, generator: torch.Generator,
                        scale=RRC_SCALE, ratio=RRC_RATIO) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` drawn as torchvision's RandomResizedCrop draws them, from ``generator``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class DeviceTransform:
    """A list of decoded uint8 images → one normalized float batch, augmented as the PIL path is.

    Per image one crop view and one antialiased resize (no uint8 round trip); flips, scaling and
    normalization run once on the whole batch.
    """

    def __init__(self, image_size: int, *, train: bool, augment: str, device: torch.device):
        self.image_size, self.train = image_size, train
        self.augment = pick_augment(augment, image_size)
        self.scale = (255 * torch.tensor(IMAGENET_STD, device=device)).view(1, 3, 1, 1)
        self.shift = (255 * torch.tensor(IMAGENET_MEAN, device=device)).view(1, 3, 1, 1)

    def __call__(self, images: list[torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        size = self.image_size
        if self.train and self.augment == "imagenet":
            crops, flips = [], []
            for img in images:
                top, left, h, w = sample_resized_crop(img.shape[-2], img.shape[-1], generator)
                crops.append(_resize(img[:, top:top + h, left:left + w], (size, size)))
                flips.append(torch.rand(1, generator=generator).item() < 0.5)
            x = torch.cat(crops)
            flip = torch.tensor(flips)
            flip = flip.pin_memory().to(x.device, non_blocking=True) if x.is_cuda else flip
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        else:
            x = torch.cat([center_crop(img, size, self.augment) for img in images])
            if self.train and self.augment == "shift-flip":
                x = shift_flip(x, generator)
        return (x - self.shift) / self.scale


# ---- loaders --------------------------------------------------------------------------------------
class JpegFolderLoader:
    """Training/evaluation batches from an ImageFolder, decoded and augmented on ``device``.

    Same interface as :class:`~pruning.data.folders.FolderLoader` (``set_epoch``, ``len``,
    iteration over :class:`Batch`).  On a CUDA device a background thread decodes the next batches
    on a side stream while the model works on the current one.
    """

    def __init__(self, dataset, batch_size: int, *, train: bool, image_size: int, augment: str = "auto",
                 seed: int = 0, num_workers: int = -1, device: torch.device | str = "cuda", rank: int = 0,
                 world_size: int = 1, prefetch: int = 3, background: bool | None = None):
        self.dataset, self.train, self.seed = dataset, train, seed
        self.device = torch.device(device)
        self.decoder = DeviceDecoder(self.device, dataset.on_corrupt)
        self.transform = DeviceTransform(image_size, train=train, augment=augment, device=self.device)
        self.prefetch = prefetch
        self.background = self.device.type == "cuda" if background is None else background
        self.epoch = 0
        workers = default_workers(num_workers)
        encoded = EncodedImages(dataset.samples)
        self.sampler = DistributedSampler(encoded, num_replicas=world_size, rank=rank, shuffle=train, seed=seed,
                                          drop_last=False) if world_size > 1 else None
        self.order_generator = torch.Generator()
        self.loader = DataLoader(
            encoded, batch_size=batch_size, shuffle=train and self.sampler is None, sampler=self.sampler,
            drop_last=train, collate_fn=collate_encoded, generator=self.order_generator,
            **_worker_options(workers, self.device, persistent=True))
        self.aug_generator = torch.Generator()

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.order_generator.manual_seed(epoch_seed(self.seed, epoch))
        self.aug_generator.manual_seed(epoch_seed(self.seed + 1, epoch))
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def _prepare(self, batch: EncodedBatch) -> Batch:
        items = batch.items()
        datas = [it[0] for it in items]
        paths = [self.dataset.samples[it[2]][0] for it in items]
        decoded = self.decoder(datas, paths, batch.device_ok)
        keep = [i for i, img in enumerate(decoded) if img is not None]
        skipped = len(items) - len(keep)
        if not keep:
            return Batch(torch.empty(0, device=self.device), torch.empty(0, dtype=torch.long, device=self.device),
                         skipped)
        images = self.transform([decoded[i] for i in keep], self.aug_generator)
        targets = torch.as_tensor([items[i][1] for i in keep], dtype=torch.long).to(self.device, non_blocking=True)
        return Batch(images, targets, skipped)

    def __iter__(self):
        if self.background and self.prefetch > 0:
            yield from _prefetched(self.loader, self._prepare, self.device, self.prefetch)
        else:
            for items in self.loader:
                yield self._prepare(items)


#: what the fork server imports once, before it forks any worker: each worker then starts in ~0.05 s
#: instead of importing torch and torchvision again (~1.3 s, paid by every loader that starts workers)
FORK_SERVER_PRELOAD = (__name__,)


def _worker_options(workers: int, device: torch.device, persistent: bool = False) -> dict:
    """DataLoader worker settings.  With CUDA in use the workers (which only read files) start from a
    fork server: they are started from the decode thread, and forking a process whose other threads
    hold CUDA or allocator locks can deadlock the child."""
    if not workers:
        return {"num_workers": 0}
    if device.type == "cuda":
        multiprocessing.set_forkserver_preload(list(FORK_SERVER_PRELOAD))   # no effect once the server runs
    return {"num_workers": workers, "prefetch_factor": 4, "persistent_workers": persistent,
            "multiprocessing_context": "forkserver" if device.type == "cuda" else None}


def _prefetched(source, prepare, device: torch.device, depth: int):
    """Run ``prepare`` over ``source`` in a background thread, ``depth`` results ahead, in order.

    On a CUDA device the thread works on a side stream; each result is handed over with an event
    the consumer's stream waits for.  An error in the thread is raised in the consumer; a consumer
    that stops early stops the thread.
    """
    cuda = device.type == "cuda"
    side = torch.cuda.Stream(device=device) if cuda else None
    results: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def work():
        try:
            with (torch.cuda.device(device) if cuda else contextlib.nullcontext()), \
                    (torch.cuda.stream(side) if cuda else contextlib.nullcontext()):
                for items in source:
                    if stop.is_set():
                        return
                    out = prepare(items)
                    event = None
                    if cuda:
                        event = torch.cuda.Event()
                        event.record(side)
                    _put(results, (out, event), stop)
            _put(results, (done, None), stop)
        except BaseException as err:  # surfaced in the consumer
            _put(results, (err, None), stop)

    thread = threading.Thread(target=work, daemon=True, name="jpeg-decode")
    thread.start()
    try:
        while True:
            out, event = results.get()
            if out is done:
                return
            if isinstance(out, BaseException):
                raise out
            if cuda:
                current = torch.cuda.current_stream(device)
                current.wait_event(event)
                for t in _tensors(out):
                    t.record_stream(current)
            yield out
    finally:
        stop.set()
        thread.join()


def _put(results: queue.Queue, item, stop: threading.Event) -> None:
    """Put ``item`` unless the consumer has gone (``stop``): never block forever on a full queue."""
    while not stop.is_set():
        try:
            results.put(item, timeout=0.05)
            return
        except queue.Full:
            continue


def _tensors(out):
    """The CUDA tensors of a result (``record_stream`` exists only for them)."""
    values = [out] if isinstance(out, torch.Tensor) else list(vars(out).values())
    return [v for v in values if isinstance(v, torch.Tensor) and v.is_cuda]


# ---- sequential pass for activation mining --------------------------------------------------------
@dataclass
class DecodedSpan:
    images: torch.Tensor          # normalized (n, 3, S, S) on the device
    indices: torch.Tensor         # dataset indices of the kept images
    positions: int                # dataset positions covered, corrupt ones included
    skipped: int


def decoded_spans(samples: list[tuple[str, int]], positions, *, image_size: int, batch_size: int,
                  device: torch.device | str, on_corrupt: str = "skip", num_workers: int = -1,
                  prefetch: int = 3, background: bool | None = None):
    """The images at ``positions`` of ``samples``, in that order, decoded and centre-cropped on ``device``."""
    device = torch.device(device)
    decoder = DeviceDecoder(device, on_corrupt)
    transform = DeviceTransform(image_size, train=False, augment="auto", device=device)
    workers = default_workers(num_workers)
    encoded = torch.utils.data.Subset(EncodedImages(samples), list(positions))
    loader = DataLoader(encoded, batch_size=batch_size, shuffle=False, collate_fn=collate_encoded,
                        **_worker_options(workers, device))

    def prepare(batch: EncodedBatch) -> DecodedSpan:
        items = batch.items()
        decoded = decoder([it[0] for it in items], [samples[it[2]][0] for it in items], batch.device_ok)
        keep = [i for i, img in enumerate(decoded) if img is not None]
        indices = torch.as_tensor([items[i][2] for i in keep], dtype=torch.long)
        images = (transform([decoded[i] for i in keep], None) if keep
                  else torch.empty(0, 3, image_size, image_size, device=device))
        return DecodedSpan(images, indices, len(items), len(items) - len(keep))

    if (device.type == "cuda" if background is None else background) and prefetch > 0:
        yield from _prefetched(loader, prepare, device, prefetch)
    else:
        for items in loader:
            yield prepare(items)
