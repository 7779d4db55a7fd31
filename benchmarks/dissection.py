"""Network Dissection on a Broden-size concept list: ``dissect`` vs a per-image, per-unit loop in the
manner of NetDissect-Lite's tally, same probe, same model, same run; their counts must be equal.

The probe is generated, written in the Broden release layout (:func:`stimuli.probes.write_broden`)
and read back: images at ``--image-size`` with label maps at half that size, concepts by category
as in Broden (colour 11, object 584, part 234, material 32, scene 468, texture 47), blocky colour
and object maps on every image, part maps on a third and material maps on half of them, one scene
and one texture label per image.  Both sides read the labels from the same in-memory cache, so
PNG decoding is not timed.  The loop keeps every feature map, takes each unit's threshold with
``numpy.quantile``, then for every image and unit above its threshold upsamples the one map, finds
the pixels above it and counts the labels there with ``numpy.bincount`` (whole-image labels and the
per-category pixel counts added per unit).  ``dissect`` streams two batched passes.

    python -m benchmarks.dissection                       # googlenet at 224 px, GPU if present
    python -m benchmarks.dissection --device cpu --arch inception-small --image-size 64 --images 96 --threads 1
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pruning.training import resolve_device
from stimuli.dissection import ProbeLoader, _Capture, dissect
from stimuli.probes import ImageLabels, ProbeSet, open_probe, write_broden

from .common import device_name, seeded_model, timed

BRODEN_SIZES = {"color": 11, "object": 584, "part": 234, "material": 32, "scene": 468, "texture": 47}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="googlenet")
    p.add_argument("--image-size", type=int, default=None, help="default: the model's input size")
    p.add_argument("--images", type=int, default=2000, help="probe images dissected by dissect")
    p.add_argument("--loop-images", type=int, default=64, help="the first images, dissected by both (counts compared)")
    p.add_argument("--layers", nargs="+", default=None, help="default: the model's unit layers")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--workdir", default=None, help="where the probe is written (default: a temporary folder)")
    return p


class _Generated:
    """Labels made from an image index: a stand-in decoder that :func:`write_broden` writes out."""

    def __init__(self, size: int, offsets: dict[str, int], category_of: np.ndarray):
        self.size, self.offsets, self.category_of = size, offsets, category_of

    def files(self, entry):
        return ()

    def shape(self, entry):
        return 4, self.size, self.size

    def read(self, index: int) -> ImageLabels:
        from stimuli.probes import _image_labels

        rng = np.random.default_rng(index)
        s = self.size
        planes = np.zeros((4, s, s), dtype=np.int32)

        def blocks(category: str, grid: int, empty: float) -> np.ndarray:
            ids = rng.integers(1, BRODEN_SIZES[category] + 1, (grid, grid)) + self.offsets[category]
            ids[rng.random((grid, grid)) < empty] = 0
            return np.kron(ids, np.ones((-(-s // grid), -(-s // grid)), dtype=np.int32))[:s, :s]

        planes[0] = blocks("color", 8, 0.1)
        planes[1] = blocks("object", 4, 0.3)
        if index % 3 == 0:
            planes[2] = blocks("part", 8, 0.6)
        if index % 2 == 0:
            planes[3] = blocks("material", 4, 0.5)
        scalars = [self.offsets[c] + int(rng.integers(0, BRODEN_SIZES[c])) for c in ("scene", "texture")]
        return _image_labels(planes, scalars, self.category_of, len(BRODEN_SIZES))


def make_probe(root: Path, n: int, image_size: int) -> ProbeSet:
    """``n`` images with Broden-size labels, written in the Broden layout under ``root`` and read back."""
    (root / "raw").mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(n):
        path = root / "raw" / f"{i:06d}.png"
        rng = np.random.default_rng(10_000 + i)
        pixels = np.kron(rng.integers(0, 256, (8, 8, 3)), np.ones((-(-image_size // 8),) * 2 + (1,)))
        Image.fromarray(pixels[:image_size, :image_size].astype(np.uint8), "RGB").save(path)
        images.append(path)
    categories = tuple(BRODEN_SIZES)
    offsets, start = {}, 0
    for c in categories:
        offsets[c], start = start, start + BRODEN_SIZES[c]
    concepts = tuple((c, f"{c}-{j}") for c in categories for j in range(BRODEN_SIZES[c]))
    category_of = np.repeat(np.arange(len(categories)), list(BRODEN_SIZES.values()))
    generated = ProbeSet(tuple(images), tuple(range(n)), categories, concepts,
                         _Generated(image_size // 2, offsets, category_of), root / "raw")
    return open_probe(write_broden(generated, root / "broden"))


def loop_counts(model, loader: ProbeLoader, layers: list[str], device, tally_thresholds: dict[str, np.ndarray],
                quantile: float = 0.995):
    """The per-image, per-unit tally: its own thresholds (``numpy.quantile``), then ``Σ|M ∩ L_c|`` and the
    unions for every unit of ``layers``, counted at ``tally_thresholds`` (``dissect``'s, so that a pixel
    within a rounding error of the threshold cannot make the counts differ)."""
    probe = loader.probe
    n_concepts, categories = probe.n_concepts, probe.concept_category.numpy()
    features = {layer: [] for layer in layers}
    with torch.no_grad(), _Capture(model, layers) as capture:
        for batch in loader.batches(labels=False):
            model(loader.prepare(batch.images, device))
            for layer in layers:
                features[layer].append(capture.outputs[layer].cpu())
    _, labels = loader._decode_all()
    out = {}
    for layer in layers:
        acts = torch.cat(features[layer])                                  # [N, U, H, W]
        units = acts.shape[1]
        flat = acts.transpose(0, 1).reshape(units, -1).double().numpy()
        own = np.quantile(flat, quantile, axis=1)
        thresholds = tally_thresholds[layer].copy()
        thresholds[flat.max(axis=1) == flat.min(axis=1)] = np.inf
        both = np.zeros((units, n_concepts + 1), np.int64)
        cat_pixels = np.zeros((units, len(probe.categories)), np.int64)
        label_pixels = np.zeros(n_concepts + 1, np.int64)
        for g, lab in enumerate(labels):
            h, w = lab.size
            planes = lab.planes.astype(np.int64) - 1
            planes[planes < 0] = n_concepts
            scalars, present = lab.scalars, lab.categories
            label_pixels += np.bincount(planes.ravel(), minlength=n_concepts + 1)
            label_pixels[scalars] += h * w
            for u in range(units):
                fmap = acts[g, u]
                if not float(fmap.max()) > thresholds[u]:
                    continue
                # upsampled on dissect's device: CPU and CUDA bilinear kernels may round an ulp apart
                up = F.interpolate(fmap[None, None].to(device), size=(h, w), mode="bilinear", align_corners=False)
                ys, xs = np.nonzero(up[0, 0].cpu().numpy() > thresholds[u])
                both[u] += np.bincount(planes[:, ys, xs].ravel(), minlength=n_concepts + 1)
                both[u, scalars] += len(ys)
                cat_pixels[u, present] += len(ys)
        inter = both[:, :n_concepts]
        out[layer] = (own, inter, cat_pixels[:, categories] + label_pixels[None, :n_concepts] - inter)
    return out


def main(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model, size, layers = seeded_model(args.arch, args.image_size, args.layers, device)
    name = device_name(device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        t0 = time.perf_counter()
        probe = make_probe(root, args.images, size)
        made = time.perf_counter() - t0
        loop_probe = probe.subset(range(min(args.loop_images, len(probe))))
        full = ProbeLoader(probe, size, args.batch_size, cache="memory")
        small = ProbeLoader(loop_probe, size, args.batch_size, cache="memory")
        full._decode_all(), small._decode_all()                                   # decoding is not timed
        def forward():
            with torch.no_grad():
                for batch in small.batches(labels=False):
                    model(small.prepare(batch.images, device))

        forward()
        _, forward_s = timed(forward, device)
        ours_small, ours_small_s = timed(lambda: dissect(model, small, layers, device=device), device)
        at = {layer: ours_small.layers[layer].threshold.to(torch.float32).double().numpy() for layer in layers}
        loop, loop_s = timed(lambda: loop_counts(model, small, layers, device, at), device)
        _, ours_s = timed(lambda: dissect(model, full, layers, device=device), device)
    equal = all(np.array_equal(ours_small.layers[layer].intersection.numpy(), loop[layer][1])
                and np.array_equal(ours_small.union(layer).numpy(), loop[layer][2]) for layer in layers)
    close = all(np.allclose(ours_small.layers[layer].threshold.numpy(), loop[layer][0], rtol=1e-5, atol=1e-6)
                for layer in layers)
    units = sum(len(ours_small.layers[layer].units) for layer in layers)
    result = {"device": name, "arch": args.arch, "image_size": size, "units": units, "concepts": probe.n_concepts,
              "images": len(probe), "loop_images": len(loop_probe), "equal": bool(equal),
              "thresholds_close": bool(close),
              "ours_img_s": len(probe) / ours_s, "ours_small_img_s": len(loop_probe) / ours_small_s,
              "loop_img_s": len(loop_probe) / loop_s, "speedup": loop_s / ours_small_s, "probe_seconds": made,
              "forward_s": forward_s, "ours_counting_s": max(ours_small_s - 2 * forward_s, 0.0),
              "loop_counting_s": max(loop_s - forward_s, 0.0)}
    print(f"device: {name}; torch {torch.__version__}; {args.arch} at {size} px; {len(layers)} layers, {units} units; "
          f"{probe.n_concepts} concepts in {len(probe.categories)} categories; label maps {size // 2} px; "
          f"probe written and read back in {made:.1f} s")
    print(f"{'':28s} {'images':>7s} {'img/s':>9s} {'s beyond the forward passes':>28s}")
    print(f"{'dissect':28s} {len(probe):7d} {result['ours_img_s']:9.1f}")
    print(f"{'dissect (loop images)':28s} {len(loop_probe):7d} {result['ours_small_img_s']:9.1f} "
          f"{result['ours_counting_s']:28.2f}")
    print(f"{'per-image per-unit loop':28s} {len(loop_probe):7d} {result['loop_img_s']:9.1f} "
          f"{result['loop_counting_s']:28.2f}")
    print(f"(one forward pass over the loop images: {forward_s:.2f} s; dissect makes two, the loop one)")
    print(f"speed-up on the same images: {result['speedup']:.1f}×; thresholds within 1e-5 of numpy.quantile: "
          f"{close}; counts equal at the same thresholds: {equal}")
    if not (equal and close):
        raise SystemExit("dissect and the loop disagree")
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
