"""Train-or-load a model from a study configuration and write ``model.pt`` + ``meta.json``.

Shared by the ``sparsight train`` / ``evaluate`` commands and the study stages.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from .data.folders import make_loader
from .models import base_meta, create_model, get_spec, save_checkpoint, write_meta
from .training import DistContext, Trainer, TrainSettings, evaluate
from .training.engine import amp_dtype, use_channels_last


def build_loaders(cfg, data_root: str | Path, ctx: DistContext, *, train: bool = True, val: bool = True):
    """Train and validation loaders for ``data_root`` according to ``cfg.data``."""
    d = cfg.data
    common = dict(image_size=d.image_size, cache=d.cache, augment=d.augment, on_corrupt=d.on_corrupt,
                  num_workers=d.num_workers, device=ctx.device if d.cache == "memory" else "cpu",
                  rank=ctx.rank, world_size=ctx.world_size, progress=cfg.study.progress and ctx.is_main,
                  seed=cfg.study.seed)
    train_loader = make_loader(data_root, "train", batch_size=d.batch_size, train=True, **common) if train else None
    val_loader = make_loader(data_root, "val", batch_size=d.eval_batch_size, train=False, **common) if val else None
    return train_loader, val_loader


def train_and_save(cfg, data_root: str | Path, out_dir: str | Path, ctx: DistContext, *, model_id: str,
                   arch: str, weights: str = "", settings: TrainSettings) -> dict:
    """Build (or load) ``arch``, train ``settings.epochs`` epochs, save checkpoint and meta; return meta."""
    out_dir = Path(out_dir)
    train_loader, val_loader = build_loaders(cfg, data_root, ctx, train=settings.epochs > 0)
    num_classes = cfg.model.num_classes or len(val_loader.classes)
    torch.manual_seed(settings.seed)  # the initial weights are a function of the seed, on every rank
    model = create_model(arch, num_classes=num_classes, weights=weights or None)
    amp, cl = amp_dtype(settings.amp, ctx.device), use_channels_last(settings.channels_last)
    before = evaluate(model.to(ctx.device), val_loader, ctx=ctx, amp=amp) if weights else None
    trainer = Trainer(model, settings, ctx=ctx, out_dir=out_dir, progress=cfg.study.progress)
    history = trainer.fit(train_loader, val_loader) if settings.epochs > 0 else []
    after = history[-1]["val"] if history else evaluate(trainer.model, val_loader, ctx=ctx, amp=amp, channels_last=cl)
    meta = None
    if ctx.is_main:
        model = trainer.model.float().to(memory_format=torch.contiguous_format)
        save_checkpoint(out_dir / "model.pt", model, num_classes=num_classes,
                        args={"settings": json.dumps(asdict(settings)), "data": str(data_root),
                              "weights": weights, "classes": json.dumps(val_loader.classes)})
        meta = base_meta(model.cpu(), model_id=model_id, input_size=cfg.data.image_size, seed=settings.seed,
                         top1={"before": before and before["top1"], "after": after["top1"]},
                         top5={"before": before and before["top5"], "after": after["top5"]},
                         retrain={k: getattr(settings, k) for k in ("epochs", "optimizer", "lr", "momentum",
                                                                    "weight_decay", "scheduler")},
                         weights=weights or None, classes=val_loader.classes, history=history,
                         stem=list(get_spec(arch).stem))
        write_meta(out_dir, meta)
        trainer.clear_state()
    ctx.barrier()
    return meta
