"""Retraining overhead of pruning masks: images/s of masked vs dense training, same run, same model.

The masked run adds what retraining after pruning adds: a ``MaskEnforcer`` step hook that keeps
the pruned weights at zero after every optimizer step (unstructured global masks at 50 %).  Dense
and masked steps are timed in alternating rounds so drifts in clock speed hit both equally.

    python -m benchmarks.mask_overhead                       # GPU if present (bf16 + channels_last)
    python -m benchmarks.mask_overhead --device cpu --models inception-small --image-size 64
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from pruning.masks import MaskEnforcer, apply_masks
from pruning.methods import create_method
from pruning.models import create_model, get_spec
from pruning.training import TrainSettings, resolve_device
from pruning.training.engine import amp_dtype, autocast, build_optimizer, classification_loss


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["googlenet", "resnet50"])
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=20, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating dense/masked rounds")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--method", default="unstructured-global")
    p.add_argument("--rate", type=float, default=0.5)
    return p


def make_step(model, x, y, device, amp, hooks):
    opt = build_optimizer(model.parameters(), TrainSettings(lr=0.01, weight_decay=1e-4))

    def step():
        with autocast(device, amp):
            loss, _ = classification_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for hook in hooks:
            hook()
    return step


def timed(step, steps: int, device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return time.perf_counter() - t0


def main(args) -> dict:
    device = resolve_device(args.device)
    amp = amp_dtype("auto", device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; batch {args.batch_size}; {args.image_size} px; "
          f"amp {amp}; channels_last; {args.rounds} rounds × {args.steps} steps; {args.method} at {args.rate}")
    print(f"{'model':16s} {'dense img/s':>12s} {'masked img/s':>13s} {'overhead':>9s}")
    result = {}
    for arch in args.models:
        torch.manual_seed(0)
        runs = {}
        for kind in ("dense", "masked"):
            model = create_model(arch, num_classes=1000).to(device).train()
            hooks = []
            if kind == "masked":
                masks = create_method(args.method).masks(model, args.rate, exclude=get_spec(arch).stem)
                apply_masks(model, masks)
            model = model.to(memory_format=torch.channels_last)
            if kind == "masked":
                hooks.append(MaskEnforcer(model, masks))
            x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
            x = x.contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 1000, (args.batch_size,), device=device)
            runs[kind] = make_step(model, x, y, device, amp, hooks)
            for _ in range(args.warmup):
                runs[kind]()
        seconds = {"dense": [], "masked": []}
        for _ in range(args.rounds):
            for kind in ("dense", "masked"):
                seconds[kind].append(timed(runs[kind], args.steps, device))
        ips = {k: args.steps * args.batch_size / statistics.median(v) for k, v in seconds.items()}
        overhead = ips["dense"] / ips["masked"] - 1
        print(f"{arch:16s} {ips['dense']:12.1f} {ips['masked']:13.1f} {overhead:8.1%}")
        result[arch] = {"dense": ips["dense"], "masked": ips["masked"], "overhead": overhead}
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
