"""Every benchmark in one command, sized for the machine it runs on; output kept in one log.

On a CUDA GPU each benchmark runs at full size (GoogLeNet/ResNet-50 at 224 px, generated
ImageNet-size JPEGs, 512 feature-visualization steps, 100 survey participants); on a CPU they run
small (the embedded network at 64 px) so the whole set finishes in minutes.  Each benchmark prints
its own ratios against a baseline measured in the same run.  The combined output goes to
``benchmarks/results/<date>-<device>.txt``; copy the tables worth keeping into RESULTS.md.

    python -m benchmarks.run_all                     # or: make benchmarks
    python -m benchmarks.run_all --only jpeg_pipeline mining --data /data/imagenet
    python -m benchmarks.run_all --size cpu           # the small settings, even on a GPU
"""
from __future__ import annotations

import argparse
import datetime
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name → (arguments on a GPU, arguments on a CPU)
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "jpeg_pipeline": (["--compile"],
                      ["--device", "cpu", "--arch", "inception-small", "--image-size", "64", "--train-images", "512",
                       "--val-images", "512", "--batch-size", "32", "--steps", "10", "--warmup", "3"]),
    "train_throughput": ([],
                         ["--device", "cpu", "--batch-size", "16", "--image-size", "112", "--steps", "4", "--warmup",
                          "2", "--modes", "fp32 eager", "bf16 + channels_last"]),
    "mining": ([],
               ["--device", "cpu", "--arch", "inception-small", "--image-size", "64", "--batch-size", "64"]),
    "featurevis": ([],
                   ["--device", "cpu", "--arch", "inception-small", "--image-size", "64", "--steps", "64", "--units",
                    "8"]),
    "mask_overhead": ([],
                      ["--device", "cpu", "--models", "googlenet", "--batch-size", "16", "--image-size", "112",
                       "--steps", "4", "--rounds", "2", "--warmup", "2"]),
    "mis": ([], ["--device", "cpu", "--backbone", "observer-small", "--images", "128"]),
    "dissection": ([],
                   ["--device", "cpu", "--arch", "inception-small", "--image-size", "64", "--images", "256",
                    "--loop-images", "64", "--batch-size", "64"]),
    "survey_load": (["--think-ms", "3000"], ["--think-ms", "3000", "--participants", "40"]),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    p.add_argument("--size", choices=["auto", "gpu", "cpu"], default="auto",
                   help="which settings: 'auto' picks gpu when CUDA is available")
    p.add_argument("--data", default=None, help="ImageFolder root for jpeg_pipeline (default: it generates JPEGs)")
    p.add_argument("--log", default=None, help="log file (default: benchmarks/results/<date>-<device>.txt)")
    return p


def main(args) -> int:
    import torch

    gpu = args.size == "gpu" or (args.size == "auto" and torch.cuda.is_available())
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and gpu else "cpu"
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    log_path = Path(args.log) if args.log else HERE / "results" / f"{stamp}-{re.sub(r'[^A-Za-z0-9]+', '-', device)}.txt"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    failed = []
    with open(log_path, "w") as log:
        def emit(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()
            log.write(text)

        emit(f"# sparsight benchmarks, {stamp}, {'GPU' if gpu else 'CPU'} settings, device: {device}\n")
        for name in args.only:
            extra = list(BENCHMARKS[name][0 if gpu else 1])
            if name == "jpeg_pipeline" and args.data:
                extra += ["--data", args.data]
            cmd = [sys.executable, "-m", f"benchmarks.{name}", *extra]
            emit(f"\n## {name}\n$ python {' '.join(cmd[1:])}\n")
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    cwd=HERE.parent)
            for line in proc.stdout:
                if "Warning" not in line and "warnings.warn" not in line:
                    emit(line)
            code = proc.wait()
            emit(f"({name}: exit {code}, {time.perf_counter() - t0:.0f} s)\n")
            if code:
                failed.append(name)
        emit(f"\n{len(args.only) - len(failed)} of {len(args.only)} benchmarks ran"
             + (f"; failed: {', '.join(failed)}" if failed else "") + f"\nlog: {log_path}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
