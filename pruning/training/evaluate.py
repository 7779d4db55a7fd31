"""Top-1 / top-5 evaluation, summed over processes under DDP."""
from __future__ import annotations

import torch
from torch import nn

from ..models.modes import eval_mode
from .distributed import DistContext


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, ctx: DistContext | None = None, amp: torch.dtype | None = None,
             channels_last: bool = False, device: torch.device | str | None = None) -> dict:
    """Top-1, top-5, mean loss and image count of ``model`` over ``loader``; top-5 is None for a classifier with
    five outputs or fewer (where it is 1 whatever the model learned)."""
    ctx = ctx or DistContext(device=torch.device(device) if device else next(model.parameters()).device)
    dev = ctx.device
    sums = torch.zeros(3, dtype=torch.float64, device=dev)     # top-1 hits, top-5 hits, loss: read once, at the end
    n = skipped = 0.0
    outputs = None
    with eval_mode(model):
        for batch in loader:
            skipped += batch.skipped
            if len(batch.targets) == 0:
                continue
            x = batch.images.to(dev, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = batch.targets.to(dev, non_blocking=True)
            with torch.autocast(device_type=dev.type, dtype=amp) if amp else torch.autocast(dev.type, enabled=False):
                logits = model(x)
            logits = logits.float()
            outputs = logits.shape[1]
            k = min(5, outputs)
            hit = logits.topk(k, dim=1).indices == y[:, None]
            sums += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum(),
                                 nn.functional.cross_entropy(logits, y, reduction="sum")]).double()
            n += len(y)
    correct1, correct5, loss_sum = sums.tolist()
    correct1, correct5, loss_sum, n, skipped = ctx.all_reduce_sum([correct1, correct5, loss_sum, n, skipped])
    n_safe = max(n, 1.0)
    top5 = correct5 / n_safe if outputs is None or outputs > 5 else None
    return {"top1": correct1 / n_safe, "top5": top5, "loss": loss_sum / n_safe, "n": int(n),
            "skipped": int(skipped)}
