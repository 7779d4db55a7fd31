"""Training throughput (images/s) of GoogLeNet and ResNet-50 on the device this runs on.

Three settings, measured in the same run on synthetic data already in device memory:
fp32 eager (the baseline), bf16 autocast + channels_last, and the same plus torch.compile.
Ratios are printed against the fp32 eager baseline of the same model.

    python -m benchmarks.train_throughput                        # GPU if present, else CPU
    python -m benchmarks.train_throughput --device cpu --batch-size 16 --image-size 112 --steps 5
"""
from __future__ import annotations

import argparse
import time

import torch

from pruning.models import create_model
from pruning.training import TrainSettings, resolve_device
from pruning.training.engine import autocast, build_optimizer, classification_loss

MODES = {
    "fp32 eager": dict(amp=None, channels_last=False, compile=False),
    "bf16 + channels_last": dict(amp=torch.bfloat16, channels_last=True, compile=False),
    "bf16 + channels_last + compile": dict(amp=torch.bfloat16, channels_last=True, compile=True),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["googlenet", "resnet50"])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation happens here)")
    return p


def measure(arch: str, mode: dict, args, device: torch.device) -> float:
    torch.manual_seed(0)
    model = create_model(arch, num_classes=1000).to(device).train()
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    if mode["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = build_optimizer(model.parameters(), TrainSettings(lr=0.01))
    net = torch.compile(model) if mode["compile"] else model

    def step():
        with autocast(device, mode["amp"]):
            loss, _ = classification_loss(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    return args.steps * args.batch_size / (time.perf_counter() - t0)


def main(args) -> dict:
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; batch {args.batch_size}; {args.image_size} px; "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    print(f"{'model':10s} {'mode':34s} {'images/s':>10s} {'× fp32 eager':>13s}")
    result: dict = {}
    for arch in args.models:
        baseline = None
        result[arch] = {}
        for mode_name in args.modes:
            try:
                ips = measure(arch, MODES[mode_name], args, device)
            except Exception as err:  # e.g. no compiler toolchain for torch.compile
                print(f"{arch:10s} {mode_name:34s} {'failed':>10s}  ({type(err).__name__}: {str(err)[:60]})")
                result[arch][mode_name] = None
                continue
            baseline = baseline or (ips if mode_name == "fp32 eager" else None)
            ratio = f"{ips / baseline:13.2f}" if baseline else f"{'-':>13s}"
            print(f"{arch:10s} {mode_name:34s} {ips:10.1f} {ratio}")
            result[arch][mode_name] = ips
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
