"""Retraining and activation mining from JPEG files: device decoding vs a standard PIL DataLoader, same run.

Data: ``--data ROOT`` (an ImageFolder with train/ and val/, e.g. ImageNet), or the benchmark writes
ImageNet-size JPEGs into ``--workdir`` first (500×375 like ImageNet's typical photo, smooth content
with grain, quality 90; the mean file size is printed).

Measured, in images/s, in one run on one device:

1. loader alone, one pass each: the PIL path (``FolderLoader``: PIL decode, RandomResizedCrop and
   flip in ``--workers`` DataLoader workers) vs the device path (``JpegFolderLoader``: workers read
   bytes, the device decodes in batches and crops, flips and normalizes);
2. training ``--arch`` (SGD; bf16 autocast + channels_last, ``--compile`` optional) fed by each loader,
   and fed one batch already in device memory (the ceiling no loader can beat); then sparsight's own
   retraining engine (``Trainer.fit``, second epoch) fed by each loader;
3. activation mining of every unit layer of ``--arch`` over val/ (``stimuli.mining.mine``, k = 200)
   with ``decode="cpu"`` (PIL in workers) vs ``decode="device"``, in fp32 and bf16.

Targets on an H100 (GoogLeNet, 224 px): training ≥ 5,000 images/s from JPEG files and ≥ 4× the PIL
loader; mining ≥ 10,000 images/s.

    python -m benchmarks.jpeg_pipeline                                  # GPU, generated JPEGs
    python -m benchmarks.jpeg_pipeline --data /data/imagenet --compile
    python -m benchmarks.jpeg_pipeline --device cpu --arch inception-small --image-size 64 \\
        --train-images 256 --val-images 256 --batch-size 32 --steps 6 --warmup 2 --workers 1
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
import multiprocessing
from pathlib import Path

import numpy as np
import torch

from pruning.data.folders import FolderLoader, ImageFolderDataset, build_transform, default_workers
from pruning.data.jpeg import JpegFolderLoader
from pruning.models import create_model, get_spec
from pruning.training import resolve_device

CLASSES = 100


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="ImageFolder root with train/ and val/ (default: generate JPEGs)")
    p.add_argument("--workdir", default=None, help="where generated JPEGs go (default: a temporary folder)")
    p.add_argument("--train-images", type=int, default=16384, help="generated training JPEGs")
    p.add_argument("--val-images", type=int, default=16384, help="generated validation JPEGs")
    p.add_argument("--arch", default="googlenet")
    p.add_argument("--image-size", type=int, default=None, help="default: the model's input size")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=-1, help="DataLoader workers for both paths (-1: cores - 1)")
    p.add_argument("--steps", type=int, default=60, help="timed training steps per measurement")
    p.add_argument("--warmup", type=int, default=15, help="untimed training steps first")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for the training runs")
    p.add_argument("--skip", nargs="*", default=[], choices=["loader", "train", "trainer", "mining"])
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p


# ---- data ---------------------------------------------------------------------------------------
def _write_one(job) -> int:
    from PIL import Image

    path, seed = job
    rng = np.random.default_rng(seed)
    h, w = (375, 500) if seed % 4 else (500, 375)
    small = rng.integers(0, 256, (h // 6, w // 6, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.int16)
    img = np.clip(img + rng.integers(-14, 15, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, format="JPEG", quality=90)
    return os.path.getsize(path)


def write_jpegs(root: Path, train: int, val: int) -> float:
    """ImageNet-size JPEGs in ImageFolder layout (``CLASSES`` classes); returns the mean file size in bytes."""
    jobs = []
    for split, n in (("train", train), ("val", val)):
        for c in range(CLASSES):
            (root / split / f"c{c:03d}").mkdir(parents=True, exist_ok=True)
        jobs += [(root / split / f"c{i % CLASSES:03d}" / f"{i:06d}.jpg", i + (0 if split == "train" else 10 ** 7))
                 for i in range(n)]
    # spawn: forking a process that has started torch's thread pools can deadlock the children
    with multiprocessing.get_context("spawn").Pool(max(1, (os.cpu_count() or 2) - 1)) as pool:
        sizes = pool.map(_write_one, jobs, chunksize=64)
    return statistics.mean(sizes)


# ---- measurements -------------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_pass(loader, device) -> float:
    """Images/s of one full pass over the loader (batches on the device)."""
    loader.set_epoch(0)
    _sync(device)
    t0, n = time.perf_counter(), 0
    for batch in loader:
        x = batch.images.to(device, non_blocking=True)
        n += len(x)
    _sync(device)
    return n / (time.perf_counter() - t0)


def _batches(loader, device):
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        for batch in loader:
            yield batch.images.to(device, non_blocking=True), batch.targets.to(device, non_blocking=True)


def train_rate(args, source, device, size: int) -> float:
    """Training images/s of ``args.arch`` fed by ``source`` (a loader, or None: one batch in device memory)."""
    torch.manual_seed(0)
    model = create_model(args.arch, num_classes=CLASSES).to(device).train().to(memory_format=torch.channels_last)
    net = torch.compile(model) if args.compile else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if source is None:
        x = torch.randn(args.batch_size, 3, size, size, device=device)
        y = torch.randint(0, CLASSES, (args.batch_size,), device=device)
        batches = itertools.repeat((x, y))
    else:
        batches = _batches(source, device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16)

    def step(x, y):
        with amp:
            out = net(x.contiguous(memory_format=torch.channels_last))
            out = out.logits if hasattr(out, "logits") else out
            loss = torch.nn.functional.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step(*next(batches))
    _sync(device)
    t0, n = time.perf_counter(), 0
    for _ in range(args.steps):
        x, y = next(batches)
        step(x, y)
        n += len(y)
    _sync(device)
    return n / (time.perf_counter() - t0)


def trainer_rate(args, loader, device) -> float:
    """Images/s of sparsight's retraining engine (``Trainer.fit``: bf16, channels_last, the retraining
    optimizer and schedule) in the second of two epochs over the loader (the first pays for warm-up)."""
    from pruning.training import DistContext, Trainer, TrainSettings

    torch.manual_seed(0)
    settings = TrainSettings(epochs=2, lr=0.01, weight_decay=1e-4, scheduler="exponential", amp="bf16",
                             channels_last="on", compile=args.compile)
    model = create_model(args.arch, num_classes=CLASSES)
    history = Trainer(model, settings, ctx=DistContext(device=device), progress=False).fit(loader)
    return float(history[-1]["images_per_s"])


def mining_rate(args, root: Path, device, size: int, decode: str, precision: str) -> float:
    from stimuli.mining import mine

    torch.manual_seed(0)
    model = create_model(args.arch, num_classes=CLASSES).to(device)
    layers = list(get_spec(args.arch).unit_layers)
    n = len(ImageFolderDataset(root / "val").samples)
    _sync(device)
    t0 = time.perf_counter()
    result = mine(model, root, "val", layers, 200, image_size=size, batch_size=args.batch_size, device=device,
                  num_workers=default_workers(args.workers), decode=decode, precision=precision)
    _sync(device)
    assert result.n_images == n
    return n / (time.perf_counter() - t0)


def main(args) -> dict:
    device = resolve_device(args.device)
    size = args.image_size or get_spec(args.arch).input_size
    workers = default_workers(args.workers)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    results: dict = {"device": name, "cpu_cores": os.cpu_count(), "torch": torch.__version__, "arch": args.arch,
                     "image_size": size, "batch_size": args.batch_size, "workers": workers}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(args.data) if args.data else Path(tmp) / "jpegs"
        if not args.data:
            t0 = time.perf_counter()
            mean_bytes = write_jpegs(root, args.train_images, args.val_images)
            results["generated"] = {"train": args.train_images, "val": args.val_images,
                                    "mean_kB": round(mean_bytes / 1e3, 1),
                                    "seconds": round(time.perf_counter() - t0, 1)}
        print(f"device: {name}; {os.cpu_count()} CPU cores; torch {torch.__version__}; {args.arch} at {size} px; "
              f"batch {args.batch_size}; {workers} workers; data {root}"
              + (f" (generated, mean {results['generated']['mean_kB']} kB)" if not args.data else ""))
        train_set = ImageFolderDataset(root / "train", transform=build_transform(size, train=True, augment="imagenet"))

        def pil():
            return FolderLoader(train_set, args.batch_size, train=True, num_workers=workers,
                                pin_memory=device.type == "cuda")

        def dev():
            return JpegFolderLoader(train_set, args.batch_size, train=True, image_size=size, augment="imagenet",
                                    num_workers=workers, device=device)

        rows = []
        if "loader" not in args.skip:
            base = loader_pass(pil(), device)
            rows += [("loader only", "PIL DataLoader", base, 1.0)]
            ips = loader_pass(dev(), device)
            rows += [("loader only", "device decode", ips, ips / base)]
        if "train" not in args.skip:
            base = train_rate(args, pil(), device, size)
            rows += [("training", "PIL DataLoader", base, 1.0)]
            for label, source in (("device decode", dev()), ("batch in device memory", None)):
                ips = train_rate(args, source, device, size)
                rows += [("training", label, ips, ips / base)]
        if "trainer" not in args.skip:
            base = trainer_rate(args, pil(), device)
            rows += [("retraining", "PIL DataLoader", base, 1.0)]
            ips = trainer_rate(args, dev(), device)
            rows += [("retraining", "device decode", ips, ips / base)]
        if "mining" not in args.skip:
            base = mining_rate(args, root, device, size, "cpu", "fp32")
            rows += [("mining", "PIL DataLoader, fp32", base, 1.0)]
            for label, decode, precision in (("device decode, fp32", "device", "fp32"),
                                             ("device decode, bf16", "device", "bf16")):
                ips = mining_rate(args, root, device, size, decode, precision)
                rows += [("mining", label, ips, ips / base)]
    print(f"{'what':12s} {'path':26s} {'images/s':>10s} {'× PIL':>7s}")
    for what, label, ips, ratio in rows:
        print(f"{what:12s} {label:26s} {ips:10.1f} {ratio:7.2f}")
    results["rows"] = [dict(what=w, path=p, images_per_s=round(i, 1), ratio=round(r, 3)) for w, p, i, r in rows]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
