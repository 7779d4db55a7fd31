"""Pieces several benchmarks share: a timer that waits for the GPU, the device's name, a seeded model."""
from __future__ import annotations

import time
from typing import Callable

import torch

from pruning.models import create_model, get_spec


def timed(fn: Callable, device: torch.device) -> tuple[object, float]:
    """``(fn(), seconds)``, with the GPU's queued work finished before and after."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - t0


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


def seeded_model(arch: str, image_size: int | None, layers: list[str] | None, device: torch.device):
    """``(model in eval mode on device, input size, unit layers)``: seed 0, 1000 classes; the model's
    input size and unit layers unless given."""
    spec = get_spec(arch)
    torch.manual_seed(0)
    model = create_model(arch, num_classes=1000).to(device).eval()
    return model, image_size or spec.input_size, layers or list(spec.unit_layers)
