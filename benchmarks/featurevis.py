"""Feature visualization speed: seconds per unit of lucent's ``render_vis`` (one unit at a time) vs ``render_units``.

Both produce the same images per unit (DESIGN §6): for each direction, ``--n-plain`` plain images
and ``--n-diverse`` images with lucent's diversity term.  lucent needs two ``render_vis`` calls per
unit and direction (a plain batch and a diverse batch); ``render_units`` packs all units into
batches of ``--batch-size`` images.  Same run, model, image size, steps and transform amounts.
lucent gets a fresh copy of the model with frozen parameters for every call (``render_vis``
leaves hooks on every module and would otherwise accumulate weight gradients), so the ratio
measures batching, not lucent's side effects.  The mean final activation of the plain max images
is printed for both, to show the work is comparable.

    python -m benchmarks.featurevis                        # GoogLeNet, 224 px, 512 steps, GPU if present
    python -m benchmarks.featurevis --arch inception-small --image-size 64 --steps 64 --units 16 --device cpu
    python -m benchmarks.featurevis --quality --weights runs/default/models/base/model.pt --data runs/default/data \
        --arch inception-small --image-size 64 --steps 256 --units 16 --device cpu

``--quality`` adds the quality-normalised speed: seconds per unit until the plain max image reaches the
mean activation of the unit's top natural images (checkpoints 8, 16, 32, … steps; a seeded run
to fewer steps is the beginning of a longer one).
"""
from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
from lucent.optvis import objectives, param, render, transform
from lucent.optvis.param import spatial

from pruning.models import create_model, load_checkpoint
from pruning.training import resolve_device
from stimuli.featurevis import (ANGLES, JITTER1, JITTER2, PAD, PAD_MODE, REFERENCE_SIZE, SCALES, FeatureVisSettings,
                                _hooked, _LayerForward, find_layer, render_units)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="googlenet")
    p.add_argument("--layer", default="inception4a")
    p.add_argument("--weights", default=None, help="a sparsight model.pt instead of --arch with random weights")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=512)
    p.add_argument("--units", type=int, default=8, help="units 0..N-1 of the layer")
    p.add_argument("--lucent-units", type=int, default=0,
                   help="render only the first N units with lucent (0: all); its s/unit is per unit either way")
    p.add_argument("--batch-size", type=int, default=64, help="images optimized at once by render_units")
    p.add_argument("--n-plain", type=int, default=1)
    p.add_argument("--n-diverse", type=int, default=8)
    p.add_argument("--diversity", type=float, default=1.0)
    p.add_argument("--directions", nargs="+", default=["max", "min"])
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quality", action="store_true",
                   help="also the quality-normalised speed: s/unit until the max image reaches the natural top images")
    p.add_argument("--data", default=None, help="ImageFolder root whose val/ split gives the natural targets "
                                                "(default: generated concept-shapes images)")
    p.add_argument("--natural-top", type=int, default=20, help="natural images that define a unit's target")
    p.add_argument("--natural-per-class", type=int, default=30, help="generated val images per class")
    return p


def lucent_transforms(image_size: int) -> list:
    r = image_size / REFERENCE_SIZE
    return [transform.pad(round(PAD * r), mode=PAD_MODE, constant_value=0.5), transform.jitter(round(JITTER1 * r)),
            transform.random_scale(list(SCALES)), transform.random_rotate(list(ANGLES)),
            transform.jitter(max(2, round(JITTER2 * r)))]


def lucent_unit(model, layer: str, unit: int, args, sync) -> tuple[float, torch.Tensor]:
    """Seconds for one unit with ``render_vis`` (two calls per direction) and its plain max image."""
    name = layer.replace(".", "_")     # lucent names modules by path joined with "_"
    seconds, plain_max = 0.0, None
    for direction in args.directions:
        sign = 1 if direction == "max" else -1
        for batch, weight in ((args.n_plain, 0.0), (args.n_diverse, args.diversity)):
            if batch == 0:
                continue
            objective = sign * objectives.channel(name, unit)
            if weight and batch > 1:
                objective = objective - weight * objectives.diversity(name)
            fresh = copy.deepcopy(model).requires_grad_(False)
            sync()
            t0 = time.perf_counter()
            images = render.render_vis(fresh, objective, lambda b=batch: param.image(args.image_size, batch=b),
                                       transforms=lucent_transforms(args.image_size), thresholds=(args.steps,),
                                       show_image=False, progress=False, fixed_image_size=args.image_size)[-1]
            sync()
            seconds += time.perf_counter() - t0
            if direction == "max" and weight == 0.0:
                plain_max = torch.from_numpy(images[:1]).permute(0, 3, 1, 2)
    return seconds, plain_max


def unit_means(model, layer: str, images: torch.Tensor, units: list[int], device) -> torch.Tensor:
    with _hooked(find_layer(model, layer)) as store, torch.no_grad():
        acts = _LayerForward(model, store, layer, torch.float32, device)(images.to(device))
    return acts[torch.arange(len(units)), torch.tensor(units)].mean((-2, -1)).cpu()


def natural_targets(model, layer: str, units: list[int], args, device) -> torch.Tensor:
    """Each unit's mean activation over its top ``--natural-top`` images of the ``--data`` split (or of
    generated concept-shapes images at ``--image-size``): what a valid visualization must reach."""
    import tempfile

    from pruning.data import concept_shapes
    from stimuli.mining import mine

    root = args.data
    if root is None:
        root = tempfile.mkdtemp(prefix="fv-natural-")
        concept_shapes.generate(root, seed=args.seed, train_per_class=1, val_per_class=args.natural_per_class,
                                image_size=args.image_size)
    result = mine(model, root, "val", [layer], args.natural_top, image_size=args.image_size, batch_size=64,
                  device=device)
    return result.layers[layer].top_values[units].mean(1)


def steps_to_target(model, layer, units, targets, reached_at, device) -> torch.Tensor:
    """Per unit, the first recorded step count whose plain max image reaches the unit's target (inf if none)."""
    out = torch.full((len(units),), float("inf"))
    for steps, images in reached_at:
        acts = unit_means(model, layer, images, units, device)
        hit = (acts >= targets) & torch.isinf(out)
        out[hit] = steps
    return out


def quality_normalised(model, units, lucent_units, args, device, sync) -> dict:
    """Seconds per unit until the plain max image drives the unit as hard as its natural top images
    (``lucent_units``, a prefix of ``units``, for lucent)."""
    targets = natural_targets(model, args.layer, units, args, device)
    checkpoints = [s for s in (8, 16, 32, 64, 128, 256, 512, 1024, 2048) if s <= args.steps] or [args.steps]
    ours, ours_time = [], {}
    for steps in checkpoints:          # the renderer is seeded: a shorter run is the longer run's beginning
        settings = FeatureVisSettings(steps=steps, image_size=args.image_size, batch_size=args.batch_size,
                                      n_diverse=0, n_plain=1, seed=args.seed, patience=0)
        sync()
        t0 = time.perf_counter()
        rendered = render_units(model, args.layer, units, settings, directions=("max",))
        sync()
        ours_time[steps] = (time.perf_counter() - t0) / len(units)
        ours.append((steps, torch.cat([r.images for r in rendered])))
    ours_steps = steps_to_target(model, args.layer, units, targets, ours, device)
    lucent_steps, lucent_per_step = torch.full((len(lucent_units),), float("inf")), 0.0
    for i, unit in enumerate(lucent_units):
        fresh = copy.deepcopy(model).requires_grad_(False)
        objective = objectives.channel(args.layer.replace(".", "_"), unit)
        sync()
        t0 = time.perf_counter()
        images = render.render_vis(fresh, objective, lambda: param.image(args.image_size, batch=1),
                                   transforms=lucent_transforms(args.image_size), thresholds=tuple(checkpoints),
                                   show_image=False, progress=False, fixed_image_size=args.image_size)
        sync()
        lucent_per_step += (time.perf_counter() - t0) / max(checkpoints) / len(lucent_units)
        reached = [(s, torch.from_numpy(img).permute(0, 3, 1, 2)) for s, img in zip(checkpoints, images)]
        lucent_steps[i] = steps_to_target(model, args.layer, [unit], targets[i:i + 1], reached, device)[0]
    ours_per_step = ours_time[max(checkpoints)] / max(checkpoints)
    print(f"\nquality-normalised: seconds per unit until the plain max image reaches the mean activation of the "
          f"unit's top {args.natural_top} natural images (checkpoints {checkpoints})")
    print(f"{'renderer':28s} {'reached':>8s} {'median steps':>13s} {'s/unit to valid':>16s}")
    out = {}
    for key, label, steps, per_step in (("lucent", "lucent render_vis, per unit", lucent_steps, lucent_per_step),
                                        ("ours", "render_units, batched", ours_steps, ours_per_step)):
        finite = steps[torch.isfinite(steps)]
        median = float(finite.median()) if len(finite) else float("inf")
        print(f"{label:28s} {len(finite):4d}/{len(steps):<3d} {median:13.0f} {median * per_step:16.3f}")
        out[key] = {"reached": int(len(finite)), "units": len(steps), "median_steps": median,
                    "s_per_unit_to_valid": median * per_step}
    print("(lucent optimizes the post-ReLU channel from lucent's own start; render_units its default objective)")
    return out


def main(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device != spatial.device:
        raise SystemExit(f"lucent renders on {spatial.device} only (its module-level device); got {device}")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    model = (load_checkpoint(args.weights).model if args.weights else create_model(args.arch)).to(device).eval()
    units = list(range(args.units))
    lucent_units = units[:args.lucent_units] if args.lucent_units else units
    settings = FeatureVisSettings(steps=args.steps, image_size=args.image_size, batch_size=args.batch_size,
                                  n_diverse=args.n_diverse, n_plain=args.n_plain, diversity=args.diversity,
                                  seed=args.seed)
    per_unit = args.n_plain + args.n_diverse
    print(f"device: {name}; torch {torch.__version__}; {args.arch} {args.layer}; {args.image_size} px; "
          f"{args.steps} steps; {args.units} units × {len(args.directions)} directions × {per_unit} images; "
          f"batch {args.batch_size}; lucent on {len(lucent_units)} of them")
    # warm-up (allocator, kernels) for both
    lucent_unit(model, args.layer, 0, argparse.Namespace(**{**vars(args), "steps": 2}), sync)
    render_units(model, args.layer, units[:1], FeatureVisSettings(**{**vars(settings), "steps": 2}),
                 directions=args.directions)

    lucent_seconds, lucent_images = 0.0, []
    for unit in lucent_units:
        seconds, image = lucent_unit(model, args.layer, unit, args, sync)
        lucent_seconds += seconds
        lucent_images.append(image)
    sync()
    t0 = time.perf_counter()
    rendered = render_units(model, args.layer, units, settings, directions=args.directions)
    sync()
    ours_seconds = time.perf_counter() - t0

    print(f"{'renderer':28s} {'s/unit':>8s} {'images/s':>9s} {'act (plain max)':>16s}")
    rows = [("lucent render_vis, per unit", lucent_seconds, lucent_images, lucent_units),
            ("render_units, batched", ours_seconds, [r.images[:1] for r in rendered if r.direction == "max"], units)]
    for label, seconds, images, rendered_units in rows:
        act = float("nan")
        if "max" in args.directions and args.n_plain:
            act = unit_means(model, args.layer, torch.cat(images), rendered_units, device).mean().item()
        n_images = len(rendered_units) * len(args.directions) * per_unit
        print(f"{label:28s} {seconds / len(rendered_units):8.3f} {n_images / seconds:9.1f} {act:16.3f}")
    lucent_per_unit, ours_per_unit = lucent_seconds / len(lucent_units), ours_seconds / len(units)
    print(f"speed-up (lucent s/unit ÷ render_units s/unit): {lucent_per_unit / ours_per_unit:.2f}×")
    result = {"lucent_s_per_unit": lucent_per_unit, "ours_s_per_unit": ours_per_unit,
              "speedup": lucent_per_unit / ours_per_unit, "units": len(units), "lucent_units": len(lucent_units)}
    if args.quality:
        result["quality"] = quality_normalised(model, units, lucent_units, args, device, sync)
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
