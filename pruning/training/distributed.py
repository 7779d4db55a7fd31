"""Device choice and the DistributedDataParallel context (one code path for 1..N processes)."""
from __future__ import annotations

import datetime
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist

from sparsight.config import DEVICE_PATTERN, pattern_text
from sparsight.errors import UserError
from sparsight.study import Study


class DeviceUnavailableError(UserError, RuntimeError):
    """The study or command asks for a device this machine does not have."""


def resolve_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` → this process's GPU when there is one, else the CPU; ``cuda`` without one is an error."""
    if preference == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if not re.fullmatch(DEVICE_PATTERN, str(preference)):
        raise ValueError(f"unknown device {preference!r}; expected {pattern_text(DEVICE_PATTERN)}")
    device = torch.device(preference)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(f"device {preference!r} requested but CUDA is not available; "
                                         f"use 'cpu' or 'auto' (--device, or study.device in the study file)")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


# How long a process waits for the others at a collective (rank 0 may build a shared stage meanwhile).
STAGE_WAIT_HOURS = 12


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False
    _control: object = field(default=None, init=False, repr=False, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum numbers over processes (identity in a single process)."""
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any process (``flag`` itself in one process).  Runs on a CPU (gloo) group,
        so it never waits for a GPU's queued work; every process must call it at the same point."""
        if not self.distributed:
            return flag
        if self._control is None:   # created by the first call, which every process makes together
            self._control = (dist.group.WORLD if dist.get_backend() == "gloo" else
                             dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=STAGE_WAIT_HOURS)))
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._control)
        return bool(t.item())

    def all_gather_object(self, obj) -> list:
        """Every process's ``obj`` (picklable), in rank order (``[obj]`` in a single process)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` (picklable; tensors on the CPU) on every process; ``obj`` itself in one process."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def close(self, clean: bool = True) -> None:
        """Leave the process group this context joined.  ``clean`` (a normal end): first wait for every
        rank, so no rank tears its connections down while a peer still has a collective in flight (a
        gloo peer then aborts at exit); after an error no barrier, which could wait forever."""
        if self.initialized_here and self.distributed:
            if clean:
                dist.barrier()
            dist.destroy_process_group()
            self.initialized_here = False


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def init_distributed(device_preference: str = "auto") -> DistContext:
    """Join the process group when launched by ``torchrun``; otherwise a single-process context."""
    if not launched_by_torchrun():
        return DistContext(device=resolve_device(device_preference))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = resolve_device(device_preference, local)
    here = False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # generous timeout: other ranks wait at a barrier while rank 0 alone runs a long stage (dissection, MIS)
        # on CUDA the group is bound to this rank's GPU, so barriers and collectives never guess the device
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=STAGE_WAIT_HOURS),
                                device_id=device if device.type == "cuda" else None)
        here = True
    return DistContext(rank, world, local, device, here)


@contextmanager
def open_study(config) -> Iterator[Study]:
    """``with open_study(cfg) as study:`` the study joined to its process group (one process, or every
    rank under ``torchrun``), left again on exit whatever happens inside."""
    ctx = init_distributed(config.study.device)
    try:
        yield Study(config, ctx)
    except BaseException:
        ctx.close(clean=False)
        raise
    ctx.close()
