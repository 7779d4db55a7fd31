"""Pruning schedules: one-shot and iterative, with retraining that never lets pruned entries regrow.

``prune_and_retrain`` takes a trained model and a ``PruneJob`` and returns the pruned, retrained
model with its masks.  Each step computes masks at the step's cumulative target rate on the
current (already pruned and retrained) weights, intersects them with the previous masks, applies
them, optionally rewinds the surviving weights (IMP), and retrains with a ``MaskEnforcer`` step
hook.  Physical channel removal, when asked for, happens once after the last step; the smaller
model computes the same function as the masked one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from sparsight.registry import Registry

from .masks import MaskEnforcer, apply_masks, mask_sparsity
from .methods import PruningError, check_rate, create_method, method_class, method_options
from .models.modes import module_mode
from .training import DistContext, Trainer, TrainSettings, evaluate
from .training.engine import amp_dtype

StepRates = Callable[[float, int], list[float]]

SCHEDULES = Registry("schedule", error=PruningError, sorted_choices=False)


def register_schedule(name: str) -> Callable[[StepRates], StepRates]:
    """Decorator: register ``fn(rate, steps) -> cumulative step rates`` as schedule ``name``."""
    return SCHEDULES.register(name)


def schedule_rates(name: str) -> StepRates:
    """The step-rate function of schedule ``name``, or a ``PruningError`` listing the schedules."""
    return SCHEDULES.lookup(name)


@register_schedule("oneshot")
def oneshot_rates(rate: float, steps: int) -> list[float]:
    """One step straight to ``rate``."""
    return [rate]


@register_schedule("iterative")
def iterative_rates(rate: float, steps: int) -> list[float]:
    """``steps`` steps, each removing the same share of what is left."""
    if steps < 1:
        raise PruningError(f"iterative schedule needs at least one step, got {steps}")
    return [1.0 - (1.0 - rate) ** (s / steps) for s in range(1, steps + 1)]


def step_rates(rate: float, schedule: str, steps: int = 1) -> list[float]:
    """Cumulative target rates: ``[rate]`` one-shot; S steps each removing the same share of what is left."""
    rate = check_rate(rate)
    return schedule_rates(schedule)(rate, steps)


@dataclass(frozen=True)
class PruneJob:
    """One pruned model of a study: method × schedule × rate (and how it is done)."""
    method: str
    rate: float
    schedule: str = "oneshot"
    steps: int = 1
    exclude: tuple[str, ...] = ()
    physical: bool = False
    norm: str = "l1"
    seed: int = 0
    copy: int = 1           # which retrained copy (``prune.copies``): the same pruning, its own retraining seed

    def __post_init__(self):
        if not method_class(self.method).prunes and self.rate:
            raise PruningError(f"method {self.method!r} prunes nothing, so its rate is 0, not {self.rate:g}")
        check_rate(self.rate)
        step_rates(self.rate, self.schedule, self.steps)
        if self.copy < 1:
            raise PruningError(f"copy {self.copy} of a job: copies count from 1")

    @property
    def is_physical(self) -> bool:
        return self.physical and method_class(self.method).structured

    @property
    def model_id(self) -> str:
        suffix = ("-physical" if self.is_physical else "") + (f"-c{self.copy}" if self.copy > 1 else "")
        return f"{self.method}-{self.schedule}-r{self.rate:.2f}{suffix}"

    def method_instance(self, input_size: int):
        return create_method(self.method, **method_options(self.method, norm=self.norm, input_size=input_size,
                                                           seed=self.seed))


def intersect(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Masks that keep only what both keep: an entry pruned once stays pruned."""
    out = dict(old)
    for k, m in new.items():
        out[k] = m & old[k].to(m.device) if k in old else m
    return out


@dataclass
class PruneOutcome:
    model: nn.Module
    masks: dict[str, torch.Tensor]
    steps: list[dict] = field(default_factory=list)
    physical: object = None   # pruning.physical.PhysicalResult when channels were removed

    @property
    def before(self) -> dict | None:
        """Accuracy right after the last pruning step, before its retraining."""
        return self.steps[-1]["before"] if self.steps else None

    @property
    def before_recalibrated(self) -> dict | None:
        """Accuracy right after the last pruning step with re-estimated BatchNorm statistics (if asked for)."""
        return self.steps[-1].get("before_recalibrated") if self.steps else None

    @property
    def after(self) -> dict | None:
        return self.steps[-1]["after"] if self.steps else None


def recalibrate_batchnorm(model: nn.Module, loader, batches: int) -> int:
    """Re-estimate every BatchNorm's running mean and variance on ``batches`` batches of ``loader``
    (a cumulative average; weights untouched; training flags restored).  Returns the batches used.

    Pruning removes channels that the statistics of the layers after them were estimated with, so
    stale statistics can collapse a pruned network to one class before any retraining.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or batches <= 0:
        return 0
    momenta = [(m, m.momentum) for m in norms]
    device = next(model.parameters()).device
    used = 0
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        with module_mode(model, training=True), torch.no_grad():
            for batch in loader:
                if used >= batches:
                    break
                if len(batch.targets) == 0:
                    continue
                model(batch.images.to(device))
                used += 1
    finally:
        for m, momentum in momenta:
            m.momentum = momentum
    return used


def _rank0_masks(ctx, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank 0's masks on every rank: scores computed on each rank can differ in their last bits (GPU
    reductions), and ranks that kept different near-tied weights would drift apart while retraining."""
    if ctx.world_size == 1:
        return masks
    mine = {k: m.cpu() for k, m in masks.items()}
    return {k: m.to(masks[k].device) for k, m in ctx.broadcast_object(mine).items()}


def prune_and_retrain(model: nn.Module, job: PruneJob, *, settings: TrainSettings, train_loader, val_loader,
                      ctx: DistContext | None = None, reference=None, rewind_state: dict | None = None,
                      work_dir: str | Path | None = None, progress: bool = True,
                      input_size: int = 64, recalibrate_batches: int = 0) -> PruneOutcome:
    """Run ``job`` on ``model`` (modified in place) and return it with its masks and per-step records.

    With ``recalibrate_batches`` the BatchNorm statistics are re-estimated after each pruning step
    (:func:`recalibrate_batchnorm`); the step records top-1 with stale (``before``) and with
    re-estimated statistics (``before_recalibrated``), and retraining starts from the latter.
    """
    ctx = ctx or DistContext(device=next(model.parameters()).device)
    amp = amp_dtype(settings.amp, ctx.device)      # every evaluation at the precision retraining validates at
    method = job.method_instance(input_size)
    if method.rewinds and rewind_state is None:
        raise PruningError(f"method {job.method!r} rewinds weights; pass rewind_state (an early state_dict)")
    masks: dict[str, torch.Tensor] = {}
    outcome = PruneOutcome(model, masks)
    for i, target in enumerate(step_rates(job.rate, job.schedule, job.steps)):
        new = _rank0_masks(ctx, method.masks(model, target, job.exclude, data=reference))
        masks = intersect(masks, new)
        if method.rewinds:
            model.load_state_dict(rewind_state)
        apply_masks(model, masks)
        before = evaluate(model, val_loader, ctx=ctx, amp=amp) if val_loader is not None else None
        recalibrated = None
        if recalibrate_batches > 0 and train_loader is not None:
            recalibrate_batchnorm(model, train_loader, recalibrate_batches)
            recalibrated = evaluate(model, val_loader, ctx=ctx, amp=amp) if val_loader is not None else None
        history = []
        if settings.epochs > 0:
            out = Path(work_dir) / f"step{i + 1}" if work_dir else None
            trainer = Trainer(model, settings, ctx=ctx, out_dir=out, progress=progress)
            trainer.step_hooks.append(MaskEnforcer(trainer.model, masks))
            history = trainer.fit(train_loader, val_loader)
            trainer.clear_state()
            model = trainer.model.to(memory_format=torch.contiguous_format)
        after = history[-1]["val"] if history else (recalibrated or before)
        outcome.steps.append({"step": i + 1, "target_rate": round(target, 6),
                              "mask_sparsity": round(mask_sparsity(masks), 6), "before": before,
                              "before_recalibrated": recalibrated, "after": after, "history": history})
    if job.is_physical:
        from .physical import remove_pruned_filters

        result = remove_pruned_filters(model, masks, input_size=input_size)
        masks, outcome.physical = result.masks, result
    outcome.model, outcome.masks = model, masks
    return outcome
