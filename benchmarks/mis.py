"""MIS speed: seconds for the MIS of every unit of a model from cached embeddings, and embedding throughput.

A synthetic stimulus bank the size of one model of the GoogLeNet study is written first
(``--units`` units × N = 20 tasks × (2 queries + 2·K = 18 references), one reference kind). Then:

1. *MIS from cached embeddings*: the vectorized ``task_deltas`` + ``unit_scores`` against a
   baseline measured in the same run — a plain per-task loop over the same features (how the
   formula reads on paper: one cosine at a time).
2. *Embedding throughput* (images/s) of the ``EmbeddingCache`` for a registered backbone at its
   input size (random weights: speed does not depend on the values), on ``--device`` (``auto``: the CPU
   and, when present, CUDA).

    python -m benchmarks.mis                                   # 40 units, resnet50 embedding
    python -m benchmarks.mis --units 80 --backbone googlenet --device cuda --batch-size 256
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from survey_app.embeddings import Embedding, EmbeddingCache, penultimate
from survey_app.material import Material
from survey_app.mis import task_deltas, unit_scores
from survey_app.testing import make_bank


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--units", type=int, default=40, help="units of the model")
    p.add_argument("--tasks", type=int, default=20)
    p.add_argument("--k", type=int, default=9, help="references per side")
    p.add_argument("--dim", type=int, default=1024, help="embedding width for the MIS timing")
    p.add_argument("--backbone", default="resnet50", help="registered model for the throughput timing")
    p.add_argument("--image-size", type=int, default=0, help="embedding input size (0: the backbone's)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--images", type=int, default=256, help="images embedded per throughput measurement")
    p.add_argument("--device", default="auto", help="auto (the CPU, and CUDA when present) | cpu | cuda")
    p.add_argument("--threads", type=int, default=0)
    return p


def reference_deltas(material: Material, vectors: dict) -> list[float]:
    """Baseline: one task at a time, one cosine at a time."""
    out = []
    for tasks in material.tasks.values():
        for t in tasks:
            def s(q, refs):
                return sum(float(torch.nn.functional.cosine_similarity(vectors[q], vectors[e], dim=0))
                           for e in refs) / len(refs)
            out.append((s(t.query_max, t.ref_max) - s(t.query_max, t.ref_min))
                       - (s(t.query_min, t.ref_max) - s(t.query_min, t.ref_min)))
    return out


def time_mis(args, root: Path) -> dict:
    units = [(f"layer{u // 10}", u % 10) for u in range(args.units)]
    make_bank(root, models=("m",), kinds=("natural",), units=units, n_tasks=args.tasks, k=args.k, size=8)
    material = Material(root / "stimuli")
    gen = torch.Generator().manual_seed(0)
    vectors = {i: torch.randn(args.dim, generator=gen) for i in sorted(material.images)}
    cache = EmbeddingCache(Embedding("lookup", "lookup", 8, lambda b: None, torch.device("cpu")))
    cache.vectors = vectors
    t0 = time.perf_counter()
    deltas = task_deltas(material, cache)
    scores = unit_scores(deltas, 16.0)
    fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = reference_deltas(material, vectors)
    slow = time.perf_counter() - t0
    err = max(abs(a - b) for a, b in zip(sorted(deltas["delta"]), sorted(ref)))
    print(f"MIS of {len(scores)} units × {args.tasks} tasks (K={args.k}, {len(material.images)} images, d={args.dim}) "
          f"from cached embeddings: {fast:.3f} s  | per-task loop baseline {slow:.3f} s  | ratio {slow / fast:.1f}× "
          f"| max |ΔΔ| {err:.1e}")
    return {"units": len(scores), "seconds": fast, "loop_seconds": slow, "speedup": slow / fast, "max_error": err}


def time_embedding(args, device: torch.device) -> float:
    from pruning.models import create_model, get_spec
    size = args.image_size or get_spec(args.backbone).input_size
    model = create_model(args.backbone, num_classes=1000)
    emb = Embedding(args.backbone, "bench", size, penultimate(model, device), device)
    images = [Image.new("RGB", (size, size), (i % 251, (7 * i) % 253, (13 * i) % 255)) for i in range(args.images)]
    ids = [f"img{i}" for i in range(args.images)]
    warm = EmbeddingCache(emb, batch_size=args.batch_size)
    warm.features(ids[:args.batch_size], lambda i: images[int(i[3:])])
    cache = EmbeddingCache(emb, batch_size=args.batch_size)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    cache.features(ids, lambda i: images[int(i[3:])])
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"embedding {args.backbone} @ {size}px on {name} (batch {args.batch_size}): {args.images / dt:.1f} images/s "
          f"(decode-free: PIL images in memory; includes resize and host→device copy)")
    return args.images / dt


def main(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        result = {"mis": time_mis(args, Path(tmp)), "embedding_images_per_s": {}}
    if args.device == "auto":      # the CPU, and CUDA beside it when there is one
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    else:
        devices = [torch.device(args.device)]
    for device in devices:
        result["embedding_images_per_s"][device.type] = time_embedding(args, device)
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
