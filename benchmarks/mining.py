"""Mining throughput: images/s of the streamed mining pass vs a plain forward pass, same batches, same run.

The mining pass is ``ActivationMiner.update``: one forward pass with hooks on every default unit
layer of the model (``get_spec(arch).unit_layers``, all channels), spatial means, and the merge
into running top-k / bottom-k buffers plus statistics on the device.  The plain pass is
``model(x)`` under ``no_grad`` on the same in-memory batches.  Rounds alternate so drifts in clock
speed hit both equally; each mining round starts from buffers already full (steady state).
Target: mining at ≥ 0.9 × the plain forward throughput.

    python -m benchmarks.mining                                      # googlenet, GPU if present
    python -m benchmarks.mining --device cpu --arch inception-small --image-size 64 --batch-size 64 --threads 1
"""
from __future__ import annotations

import argparse
import statistics

import torch

from pruning.training import resolve_device
from stimuli.mining import ActivationMiner

from .common import device_name, seeded_model, timed


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="googlenet")
    p.add_argument("--image-size", type=int, default=None, help="default: the model's input size")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, default=20, help="timed batches per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating plain/mining rounds")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first (they also fill the buffers)")
    p.add_argument("--k", type=int, default=200, help="top-k and bottom-k kept per channel")
    p.add_argument("--layers", nargs="+", default=None, help="default: the model's unit layers")
    p.add_argument("--amp", choices=["none", "bf16"], default="none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    return p


def main(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model, size, layers = seeded_model(args.arch, args.image_size, args.layers, device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    batches = [torch.randn(args.batch_size, 3, size, size, device=device).contiguous(memory_format=fmt)
               for _ in range(args.batches)]
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")
    name = device_name(device)

    def plain():
        with torch.no_grad(), amp:
            for x in batches:
                model(x)

    next_index = [0]

    def feed(miner, xs):
        with amp:
            for x in xs:
                miner.update(x, torch.arange(next_index[0], next_index[0] + len(x)))
                next_index[0] += len(x)

    with ActivationMiner(model, layers, args.k, device=device) as warm:
        while warm.n_seen < max(args.k, args.warmup * args.batch_size):
            feed(warm, batches[:1])
        state = warm.state_dict()
        channels = sum(lm.num_channels for lm in warm.result().values())
    plain()
    seconds = {"plain": [], "mining": []}
    for _ in range(args.rounds):
        seconds["plain"].append(timed(plain, device)[1])
        with ActivationMiner(model, layers, args.k, device=device) as miner:
            miner.load_state_dict(state)
            seconds["mining"].append(timed(lambda: feed(miner, batches), device)[1])
    ips = {kind: args.batches * args.batch_size / statistics.median(s) for kind, s in seconds.items()}
    ratio = ips["mining"] / ips["plain"]
    print(f"device: {name}; torch {torch.__version__}; {args.arch} at {size} px; batch {args.batch_size}; "
          f"{args.rounds} rounds × {args.batches} batches; amp {args.amp}; k {args.k}; "
          f"{len(layers)} layers, {channels} channels")
    print(f"{'plain img/s':>12s} {'mining img/s':>13s} {'ratio':>6s}")
    print(f"{ips['plain']:12.1f} {ips['mining']:13.1f} {ratio:6.3f}  (target >= 0.9)")
    return {"plain": ips["plain"], "mining": ips["mining"], "ratio": ratio, "channels": channels}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
