"""The training engine for base training and retraining after pruning.

One code path for CPU, a GPU, and DistributedDataParallel under ``torchrun`` (rank 0 writes
files).  Mixed precision (bf16 autocast on a GPU), channels_last, optional ``torch.compile``,
gradient scaling for fp16, progress bars, per-epoch metrics, and resumable state: an interrupted
run restarts from the last finished epoch and ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn
from sparsight.files import atomic_write_text, json_digest
from sparsight.progress import note, progress_bar

from ..models.checkpoint import atomic_save
from ..models.layers import unwrap
from .distributed import DistContext

STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainSettings:
    epochs: int = 10
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    scheduler: str = "onecycle"
    gamma: float = 0.9
    step_size: int = 10
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    grad_clip: float = 0.0
    amp: str = "auto"
    channels_last: str = "auto"
    compile: bool = False
    seed: int = 0

    @classmethod
    def from_section(cls, section, **overrides) -> "TrainSettings":
        """Take the fields this class knows from a config section (or dict), then ``overrides``."""
        src = section if isinstance(section, dict) else vars(section)
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in src.items() if k in known}, **overrides})

    def fingerprint(self) -> str:
        return json_digest(asdict(self), 16)


OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "cosine", "onecycle", "exponential", "step")


def build_optimizer(params: Iterable[nn.Parameter], s: TrainSettings) -> torch.optim.Optimizer:
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, nesterov=s.nesterov and s.momentum > 0,
                               weight_decay=s.weight_decay)
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
    if s.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    raise ValueError(f"unknown optimizer {s.optimizer!r}; choose from {list(OPTIMIZERS)}")


def build_scheduler(opt: torch.optim.Optimizer, s: TrainSettings, steps_per_epoch: int):
    """Return (scheduler, per_step); per_step schedulers advance every batch, others every epoch."""
    total = max(1, s.epochs * steps_per_epoch)
    if s.scheduler == "none":
        return None, False
    if s.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.lr, total_steps=total, pct_start=0.25), True
    if s.scheduler == "cosine":
        warm = int(s.warmup_epochs * steps_per_epoch)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
        return torch.optim.lr_scheduler.LambdaLR(opt, factor), True
    if s.scheduler == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=s.gamma), False
    if s.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=s.step_size, gamma=s.gamma), False
    raise ValueError(f"unknown scheduler {s.scheduler!r}; choose from {list(SCHEDULERS)}")


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: ``auto`` is bf16 on a GPU that supports it and off on the CPU."""
    if amp == "off":
        return None
    if amp == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    raise ValueError(f"unknown amp {amp!r}; choose from ['auto', 'bf16', 'fp16', 'off']")


def use_channels_last(setting: str) -> bool:
    """``auto`` turns it on: measured faster for these conv nets on CPU and GPU (benchmarks/)."""
    return setting in ("auto", "on")


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def classification_loss(output, targets: torch.Tensor,
                        label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy; GoogLeNet's auxiliary heads (a namedtuple in training) add 0.3 × their losses."""
    ce = nn.functional.cross_entropy
    if isinstance(output, tuple):
        logits, *aux = output
        loss = ce(logits, targets, label_smoothing=label_smoothing)
        loss = loss + 0.3 * sum(ce(a, targets, label_smoothing=label_smoothing) for a in aux if a is not None)
        return loss, logits
    return ce(output, targets, label_smoothing=label_smoothing), output


def _seed_epoch(seed: int, epoch: int) -> None:
    torch.manual_seed((seed * 1_000_003 + epoch * 104_729 + 1) % (2 ** 63))


class StopTraining(Exception):
    """Raised by a callback to interrupt training (the saved state allows resuming)."""


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    train_top1: float
    lr: float
    images: int
    seconds: float
    images_per_s: float
    skipped: int
    val: dict
    #: images of steps that every process skipped because one process's batch was all corrupt (DDP only)
    dropped: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class Trainer:
    """Trains ``model`` with ``settings``; ``out_dir`` (if given) receives resumable state and metrics.

    ``step_hooks`` run after every optimizer step (the pruning module re-applies masks there);
    ``batch_hooks`` get (trainer, epoch, batch_index) before each batch.
    """

    def __init__(self, model: nn.Module, settings: TrainSettings, *, ctx: DistContext | None = None,
                 out_dir: str | os.PathLike | None = None, progress: bool = True,
                 step_hooks: Iterable[Callable[["Trainer"], None]] = (),
                 batch_hooks: Iterable[Callable[["Trainer", int, int], None]] = ()):
        self.ctx = ctx or DistContext()
        self.device = self.ctx.device
        self.settings = settings
        self.out_dir = Path(out_dir) if out_dir else None
        self.progress = progress and self.ctx.is_main
        self.step_hooks, self.batch_hooks = list(step_hooks), list(batch_hooks)
        self.amp = amp_dtype(settings.amp, self.device)
        self.channels_last = use_channels_last(settings.channels_last)
        self.model = model.to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp is torch.float16)
        self.history: list[dict] = []
        self.global_step = 0

    # ---- model wrappers ------------------------------------------------------------------
    def _wrapped(self) -> nn.Module:
        net = self.model
        if self.ctx.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            net = nn.parallel.DistributedDataParallel(net, device_ids=ids)
        if self.settings.compile:
            net = torch.compile(net)
        return net

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    # ---- resumable state -----------------------------------------------------------------
    def _state_path(self) -> Path | None:
        return self.out_dir / STATE_FILE if self.out_dir else None

    def _save_state(self, epoch: int, opt, sched) -> None:
        if not (self.out_dir and self.ctx.is_main):
            return
        atomic_save({"epoch": epoch, "fingerprint": self.settings.fingerprint(),
                     "model": unwrap(self.model).state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict() if sched else {}, "scaler": self.scaler.state_dict(),
                     "global_step": self.global_step, "history": json.dumps(self.history)}, self._state_path())

    def resume_point(self) -> int:
        """The epoch :meth:`fit` would start from: after the last finished one of a resumable state written with
        these settings, else 0."""
        path = self._state_path()
        if path is None or not path.is_file():
            return 0
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state["epoch"] + 1 if state.get("fingerprint") == self.settings.fingerprint() else 0

    def _load_state(self, opt, sched) -> int:
        """Restore the last finished epoch; return the epoch to start from."""
        path = self._state_path()
        if path is None or not path.is_file():
            return 0
        state = torch.load(path, map_location=self.device, weights_only=True)
        if state.get("fingerprint") != self.settings.fingerprint():
            import warnings
            warnings.warn(f"{path} was written with other training settings; starting from scratch", stacklevel=2)
            return 0
        unwrap(self.model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.global_step = state["global_step"]
        self.history = json.loads(state["history"])
        return state["epoch"] + 1

    # ---- the loop ------------------------------------------------------------------------
    def fit(self, train_loader, val_loader=None, *, resume: bool = True) -> list[dict]:
        """Train for ``settings.epochs`` epochs; return per-epoch metrics (also in metrics.jsonl)."""
        s = self.settings
        opt = build_optimizer([p for p in self.model.parameters() if p.requires_grad], s)
        sched, per_step = build_scheduler(opt, s, len(train_loader))
        start = self._load_state(opt, sched) if resume else 0
        self._rewrite_log()
        net = self._wrapped()
        for epoch in range(start, s.epochs):
            metrics = self._train_epoch(net, train_loader, opt, sched if per_step else None, epoch)
            if sched is not None and not per_step:
                sched.step()
            if val_loader is not None:
                from .evaluate import evaluate
                metrics.val = evaluate(self.model, val_loader, ctx=self.ctx, amp=self.amp,
                                       channels_last=self.channels_last)
            self.history.append(metrics.to_dict())
            self._save_state(epoch, opt, sched)
            self._log(metrics)
        return self.history

    def _train_epoch(self, net: nn.Module, loader, opt, step_sched, epoch: int) -> EpochMetrics:
        s = self.settings
        _seed_epoch(s.seed, epoch)
        loader.set_epoch(epoch)
        net.train()
        # sums stay on the device: reading them every step would wait for the GPU at every step
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        seen, skipped, dropped = 0, 0, 0
        together = self.ctx.distributed
        t0 = time.perf_counter()
        bar = progress_bar(loader, desc=f"epoch {epoch + 1}/{s.epochs}", enabled=self.progress, leave=False,
                   dynamic_ncols=True)
        for b, batch in enumerate(bar):
            for hook in self.batch_hooks:
                hook(self, epoch, b)
            skipped += batch.skipped
            empty = len(batch.targets) == 0
            # under DDP every process takes the same steps: were one to skip its empty batch alone, the
            # others would wait for it in the gradient all-reduce for ever
            if self.ctx.any(empty) if together else empty:
                dropped += len(batch.targets)
                continue
            x, y = self._to_device(batch.images), batch.targets.to(self.device, non_blocking=True)
            with autocast(self.device, self.amp):
                loss, logits = classification_loss(net(x), y, s.label_smoothing)
            opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if s.grad_clip > 0:
                self.scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip)
            self.scaler.step(opt)
            self.scaler.update()
            if step_sched is not None:
                step_sched.step()
            self.global_step += 1
            for hook in self.step_hooks:
                hook(self)
            n = len(y)
            loss_sum += loss.detach().double() * n
            correct += (logits.detach().argmax(1) == y).sum()
            seen += n
            if self.progress and b % 10 == 0:
                bar.set_postfix(loss=f"{float(loss_sum) / seen:.3f}", acc=f"{int(correct) / seen:.3f}")
        loss_sum, correct = float(loss_sum), int(correct)
        seconds = time.perf_counter() - t0
        loss_sum, correct, seen, skipped, dropped = self.ctx.all_reduce_sum([loss_sum, correct, seen, skipped,
                                                                             dropped])
        return EpochMetrics(epoch=epoch, train_loss=loss_sum / max(seen, 1), train_top1=correct / max(seen, 1),
                            lr=opt.param_groups[0]["lr"], images=int(seen), seconds=round(seconds, 3),
                            images_per_s=round(seen / max(seconds, 1e-9), 1), skipped=int(skipped), val={},
                            dropped=int(dropped))

    def _rewrite_log(self) -> None:
        """``metrics.jsonl`` holds exactly the epochs of the history a fit starts from (none when it starts from
        scratch), so an epoch an interrupted run logged before it is trained again is not there twice."""
        if not (self.out_dir and self.ctx.is_main):
            return
        path = self.out_dir / METRICS_FILE
        if self.history or path.exists():
            atomic_write_text(path, "".join(json.dumps(h) + "\n" for h in self.history))

    def _log(self, m: EpochMetrics) -> None:
        if not self.ctx.is_main:
            return
        if self.out_dir:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / METRICS_FILE, "a") as fh:
                fh.write(json.dumps(m.to_dict()) + "\n")
        if self.progress:
            val = f" val top1 {m.val['top1']:.3f}" if m.val else ""
            skip = f" ({m.skipped} corrupt images skipped)" if m.skipped else ""
            if m.dropped:
                skip += f" ({m.dropped} images left out with a batch another process found all corrupt)"
            note(f"epoch {m.epoch + 1}/{self.settings.epochs}: loss {m.train_loss:.3f} "
                 f"train top1 {m.train_top1:.3f}{val} · {m.images_per_s:.0f} img/s{skip}")

    def clear_state(self) -> None:
        """Remove the resumable state once the final checkpoint is written."""
        path = self._state_path()
        if path is not None and self.ctx.is_main and path.exists():
            path.unlink()
