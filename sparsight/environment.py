"""Where a stage ran: the machine and the versions of the software whose numbers it depends on.

Floating-point results depend on them: the same study trained on a CPU with AVX-512 and on one with
AVX2 only gives different networks, and so different (not wrong) numbers.  Every stage record keeps
this description, and the report lists each distinct one with the stages that ran there.
"""
from __future__ import annotations

import os
import platform
from functools import lru_cache
from importlib import metadata

#: the distributions a study's numbers depend on (missing ones are left out)
PACKAGES = ("torch", "torchvision", "numpy", "scipy", "pandas", "statsmodels", "zennit", "torch-pruning",
            "torch-lucent", "pillow")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def source_revision() -> dict | None:
    """The git commit this code was run from (``revision``) and whether tracked files differ from it
    (``modified``), when the package lives in a git work tree and git is installed; else None."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    revision = git("rev-parse", "HEAD") if top and Path(top).resolve() == root else None
    if not revision:
        return None
    changes = git("status", "--porcelain", "--untracked-files=no")
    return {"revision": revision, "modified": bool(changes)}


@lru_cache(maxsize=1)
def _static() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {"python": platform.python_version(), "platform": platform.platform(terse=True),
            "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "packages": versions,
            **({"source": source} if (source := source_revision()) else {})}


def describe() -> dict:
    """The machine and software of this process: torch's CPU kernel level, and the GPU once CUDA is in use."""
    env = dict(_static())
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        try:
            env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        except (AttributeError, RuntimeError):
            pass
        if torch.cuda.is_initialized():
            env["gpu"] = torch.cuda.get_device_name(torch.cuda.current_device())
    return env


def summary(env: dict) -> str:
    """One line: CPU (kernel level), GPU, Python, torch, the source commit."""
    parts = [f"{env.get('cpu', '?')}" + (f" ({env['cpu_capability']})" if env.get("cpu_capability") else "")
             + (f" × {env['cpu_count']}" if env.get("cpu_count") else "")]
    if env.get("gpu"):
        parts.append(env["gpu"])
    parts.append(f"Python {env.get('python', '?')}")
    torch = env.get("packages", {}).get("torch")
    if torch:
        parts.append(f"torch {torch}")
    source = env.get("source") or {}
    if source.get("revision"):
        parts.append(f"sparsight at commit {source['revision'][:12]}" + (" with local changes" if source.get("modified")
                                                                      else ""))
    return ", ".join(parts)
