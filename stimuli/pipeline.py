"""Stimuli for every unit of a model: mine → select tasks → natural rows → feature visualizations.

``make_stimuli`` fills the bank for one model.  Natural tasks (IMI/MIS protocol) take references
and queries from the mined exemplars; synthetic tasks keep the same natural queries and replace
the references by feature visualizations (K per side: 1 plain + K−1 diverse).  Units that are
constant over the dataset are skipped and recorded as ``dead`` (``pruned`` when they are exactly
zero in a pruned model), never silently dropped.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from sparsight.files import json_digest
from sparsight.progress import progress_bar

from pruning.data.folders import default_workers, eval_crop, open_image

from .bank import StimulusBank
from .exemplars import OverlappingExemplars, select_tasks
from .featurevis import FeatureVisSettings, render_units
from .mining import mine
from .units import REMOVED_CHANNEL, ChannelMap, Unit


@dataclass
class StimuliSettings:
    """What ``make_stimuli`` needs from a study's ``stimuli`` section (plus data and seed)."""
    split: str = "val"
    kinds: tuple[str, ...] = ("natural", "synthetic")
    n_tasks: int = 20
    n_references: int = 9
    query_percentile: float = 0.0
    image_size: int = 64
    batch_size: int = 256
    fv_steps: int = 512
    fv_lr: float = 0.05
    fv_image_size: int = 0
    fv_batch_units: int = 64
    fv_diversity: float = 1.0
    fv_objective: str = "pre-relu"
    fv_redirect_steps: int = 16
    fv_patience: int = 32
    fv_tolerance: float = 0.01
    fv_rescue_steps: int = 0
    skip_dead: bool = True
    seed: int = 0
    on_corrupt: str = "skip"
    decode: str = "auto"
    num_workers: int = 0
    mining_precision: str = "fp32"
    synthetic_units: int = 0

    @classmethod
    def from_config(cls, cfg) -> StimuliSettings:
        s = cfg.stimuli
        return cls(split=s.split, kinds=tuple(s.kinds), n_tasks=s.n_tasks, n_references=s.n_references,
                   query_percentile=s.query_percentile, image_size=cfg.data.image_size,
                   batch_size=cfg.data.eval_batch_size, fv_steps=s.fv_steps, fv_lr=s.fv_lr,
                   fv_image_size=s.fv_image_size, fv_batch_units=s.fv_batch_units, fv_diversity=s.fv_diversity,
                   fv_objective=s.fv_objective, fv_redirect_steps=s.fv_redirect_steps, fv_patience=s.fv_patience,
                   fv_tolerance=s.fv_tolerance, fv_rescue_steps=s.fv_rescue_steps,
                   skip_dead=cfg.units.skip_dead, seed=cfg.study.seed, on_corrupt=cfg.data.on_corrupt,
                   decode=cfg.data.decode, num_workers=default_workers(cfg.data.num_workers),
                   mining_precision=s.mining_precision,
                   synthetic_units=s.synthetic_units)

    @property
    def k(self) -> int:
        return self.n_tasks * (self.n_references + 1)


@dataclass
class ExemplarImages:
    """Dataset images shown as exemplars: decoded, resized and centre-cropped once, stored once."""
    files: list[str]
    bank: StimulusBank
    image_size: int
    names: dict[int, str] = field(default_factory=dict)

    def __post_init__(self):
        self.display = eval_crop(self.image_size)      # the crop the network was shown, nothing more

    def name(self, index: int) -> str:
        if index not in self.names:
            img: Image.Image = self.display(open_image(self.files[index]))
            self.names[index] = self.bank.add_image(img)
        return self.names[index]


def _row(model_id, unit: Unit, task: int, role: str, kind: str, image: str, source: str, activation: float,
         rank: int, steps: int = 0) -> dict:
    return {"model_id": model_id, "layer": unit.layer, "unit": unit.unit, "task": task, "role": role, "kind": kind,
            "image": image, "source": source, "activation": float(activation), "rank": int(rank), "steps": int(steps)}


def visualization_validity(synthetic: pd.DataFrame, tasks) -> tuple[float, bool]:
    """``(reach, valid)`` of one unit's feature visualizations (its synthetic part rows).

    ``reach`` = mean activation of the max visualizations / mean activation of the unit's natural max
    references; valid when they drive the unit at least as hard as those references do (Olah et al.
    2017: visualizations are super-stimuli) and harder than the min visualizations.
    """
    refs = synthetic.drop_duplicates("image")
    fv_max = float(refs.loc[refs["role"] == "ref_max", "activation"].mean())
    fv_min = float(refs.loc[refs["role"] == "ref_min", "activation"].mean())
    natural = [act for t in tasks for role, _, _, act in t.items() if role == "ref_max"]
    target = float(np.mean(natural)) if natural else float("nan")
    reach = fv_max / target if target > 0 else float("nan")
    valid = bool(fv_max >= target and fv_max > fv_min) if np.isfinite(target) else False
    return reach, valid


def _source(images: ExemplarImages, index: int, root: Path) -> str:
    """The exemplar's file relative to the split folder (e.g. ``circle/00012.png``)."""
    return Path(os.path.relpath(images.files[index], root)).as_posix()


def natural_rows(model_id: str, unit: Unit, tasks, images: ExemplarImages, root: Path) -> list[dict]:
    rows = []
    for t in tasks:
        for role, idx, rank, act in t.items():
            rows.append(_row(model_id, unit, t.task, role, "natural", images.name(idx), _source(images, idx, root),
                             act, rank))
    return rows


def _dead_reason(layer_mining, unit: int, pruned_model: bool) -> str | None:
    if not bool(layer_mining.dead[unit]):
        return None
    zero = float(layer_mining.max[unit]) == 0.0 and float(layer_mining.min[unit]) == 0.0
    return "pruned" if zero and pruned_model else "dead"


def _state_path(work_dir: Path | None, model_id: str, layers: list[str], record, shard: tuple[int, int]) -> Path | None:
    """Where a model's mining pass keeps its state: one file per selection of layers and recorded units, so a
    pass for a few units (``sparsight stimuli --unit``) leaves the study's full pass in place.  A state file of
    the earlier naming (one per model) is taken over by the first selection that asks for it."""
    if work_dir is None:
        return None
    rank, world = shard
    selection = json_digest([layers, record], 12)
    tail = "state.pt" if world == 1 else f"state.rank{rank}-of-{world}.pt"
    path, earlier = work_dir / f"{model_id}.{selection}.{tail}", work_dir / f"{model_id}.{tail}"
    if not path.exists() and earlier.is_file():
        os.replace(earlier, path)        # read there: used when it was written for this pass, else replaced
    return path


def _mine_units(model, model_id: str, units: list[Unit], data_root, settings: StimuliSettings, channel: ChannelMap, *,
                device, work_dir: Path | None, progress: bool, shard: tuple[int, int], gather):
    """One mining pass over the split for the layers of ``units`` (resumed from, and saved to, ``work_dir``:
    a second call for the same model and settings reads the finished state instead of the images)."""
    layers = sorted({u.layer for u in units})
    record = ({layer: [channel(u) for u in units if u.layer == layer] for layer in layers}
              if settings.query_percentile > 0 else None)
    return mine(model, data_root, settings.split, layers, settings.k, image_size=settings.image_size,
                batch_size=settings.batch_size, device=device, record=record, progress=progress,
                state_path=_state_path(work_dir, model_id, layers, record, shard), on_corrupt=settings.on_corrupt,
                decode=settings.decode, num_workers=settings.num_workers, precision=settings.mining_precision,
                shard=shard, gather=gather,
                tie_seed=settings.seed, channel_map=channel.for_layers(layers))


def live_units(model, model_id: str, units: list[Unit], data_root, settings: StimuliSettings, *, device=None,
               pruned_model: bool = False, work_dir: Path | None = None, shard: tuple[int, int] = (0, 1),
               gather=None, channel_map: dict[str, list[int]] | None = None) -> set[Unit]:
    """The units of ``units`` that are alive in this model (kept, and not constant over the split)."""
    device = torch.device(device) if device else next(model.parameters()).device
    channel = ChannelMap(channel_map)
    kept = [u for u in units if channel(u) is not None]
    if not kept:
        return set()
    result = _mine_units(model, model_id, kept, data_root, settings, channel, device=device, work_dir=work_dir,
                         progress=False, shard=shard, gather=gather)
    return {u for u in kept if not settings.skip_dead
            or (_dead_reason(result.layers[u.layer], channel(u), pruned_model) is None
                and _forms_tasks(result.layers[u.layer], channel(u), u, settings))}


def _forms_tasks(layer_mining, channel: int, unit: Unit, settings: StimuliSettings) -> bool:
    """Whether the unit's top and bottom images are disjoint enough for its tasks (not ``sparse``)."""
    try:
        select_tasks(layer_mining, channel, n_tasks=settings.n_tasks, n_references=settings.n_references,
                     seed=settings.seed, query_percentile=settings.query_percentile,
                     recorded=layer_mining.recorded.get(channel), identity=unit.unit)
    except OverlappingExemplars:
        return False
    return True


def make_stimuli(model, model_id: str, units: list[Unit], data_root: str | Path, bank: StimulusBank,
                 settings: StimuliSettings, *, synthetic_units: list[Unit] | None = None, device=None,
                 pruned_model: bool = False, work_dir: Path | None = None, progress: bool = False,
                 exemplar_cache: dict | None = None, shard: tuple[int, int] = (0, 1), gather=None,
                 channel_map: dict[str, list[int]] | None = None) -> list[dict]:
    """Fill ``bank`` with the stimuli of ``units`` for one model; return the per-unit status rows.

    ``synthetic_units`` (default: ``units``) are the units that also get feature visualizations; the
    others get natural exemplars only.

    ``channel_map`` (a physically pruned model's: layer → parent unit of each channel) translates the
    study's units, which are the parent's channel indices, to the model's channels; a unit whose
    channel was removed is reported ``pruned``, and the stimuli of a kept one are filed under its
    parent index, so it is compared with itself across models.

    Under ``torchrun`` (``shard=(rank, world_size)`` with the ``gather`` collective) the ranks mine
    shares of the images and combine them, then each rank renders its own units: exemplars of
    every ``world_size``-th unit and every ``world_size``-th feature-visualization batch.  The
    batches are the single-process ones, so the bank ends up the same; the status rows (every
    unit) are the same on every rank.
    """
    device = torch.device(device) if device else next(model.parameters()).device
    channel = ChannelMap(channel_map)
    synthetic = set(units) if synthetic_units is None else set(synthetic_units) & set(units)
    units_of = {kind: [u for u in units if kind != "synthetic" or u in synthetic] for kind in settings.kinds}
    rank, world = shard
    status = _removed_units(model_id, units_of, channel, bank, write=rank == 0)
    units = [u for u in units if channel(u) is not None]
    units_of = {kind: [u for u in us if channel(u) is not None] for kind, us in units_of.items()}
    pending = {kind: {u for u in us if not bank.is_done(model_id, kind, u.layer, u.unit)}
               for kind, us in units_of.items()}
    if not units:
        return status
    result = _mine_units(model, model_id, units, data_root, settings, channel, device=device, work_dir=work_dir,
                         progress=progress, shard=shard, gather=gather)
    if work_dir is not None and rank == 0:
        result.save(work_dir / f"{model_id}.mining.pt")
    split_root = Path(data_root) / settings.split
    cache = exemplar_cache if exemplar_cache is not None else {}
    images = cache.setdefault(("exemplars", str(split_root), settings.image_size),
                              ExemplarImages(result.files, bank, settings.image_size))
    tasks_of, dead_of, rows = _unit_tasks(model_id, result, units, units_of, channel, settings, pruned_model)
    status += rows
    own_units = set(units[rank::world])
    if "natural" in settings.kinds:     # cheap: one part file per layer
        own_pending = [u for u in units_of["natural"] if u in pending["natural"] and u in own_units]
        for layer in progress_bar(sorted({u.layer for u in own_pending}), desc=f"{model_id} exemplars",
                                  enabled=progress, leave=False):
            bank.write_units(model_id, "natural", layer, {
                u.unit: [] if u in dead_of else natural_rows(model_id, u, tasks_of[u], images, split_root)
                for u in own_pending if u.layer == layer})
    if "synthetic" in settings.kinds:
        for u in units_of["synthetic"]:
            if u in dead_of and u in pending["synthetic"] and u in own_units:
                bank.write_unit(model_id, "synthetic", u.layer, u.unit, [])
        todo = [u for u in units_of["synthetic"] if u in pending["synthetic"] and u not in dead_of]
        _render_visualizations(model, model_id, todo, tasks_of, channel, bank, images, split_root, settings,
                               device=device, progress=progress, shard=shard, gather=gather)
        if rank == 0:
            _visualization_validity(model_id, status, tasks_of, bank)
    return status


def _status_row(model_id: str, kind: str, u: Unit, status: str, reason: str) -> dict:
    return {"model_id": model_id, "kind": kind, "layer": u.layer, "unit": u.unit, "status": status,
            "reason": reason, "fv_reach": float("nan"), "fv_valid": None}


def _removed_units(model_id: str, units_of: dict, channel: ChannelMap, bank: StimulusBank, *,
                   write: bool) -> list[dict]:
    """Status rows of the units whose channel physical pruning removed; with ``write`` they are also
    recorded in the bank as done, without rows."""
    status = [_status_row(model_id, kind, u, "pruned", REMOVED_CHANNEL)
              for kind, us in units_of.items() for u in us if channel(u) is None]
    if write:
        for kind, us in units_of.items():
            gone = [u for u in us if channel(u) is None and not bank.is_done(model_id, kind, u.layer, u.unit)]
            for layer in sorted({u.layer for u in gone}):
                bank.write_units(model_id, kind, layer, {u.unit: [] for u in gone if u.layer == layer})
    return status


def _unit_tasks(model_id: str, result, units: list[Unit], units_of: dict, channel: ChannelMap,
                settings: StimuliSettings, pruned_model: bool) -> tuple[dict, dict, list[dict]]:
    """Per unit its tasks, or why it has none (dead, sparse); and its status row per kind."""
    member = {kind: set(us) for kind, us in units_of.items()}
    tasks_of, dead_of, status = {}, {}, []
    for u in units:
        lm, c = result.layers[u.layer], channel(u)
        reason = _dead_reason(lm, c, pruned_model) if settings.skip_dead else None
        why = "" if reason is None else f"constant activation {float(lm.max[c]):.4g}"
        if reason is None:
            try:
                tasks_of[u] = select_tasks(lm, c, n_tasks=settings.n_tasks, n_references=settings.n_references,
                                           seed=settings.seed, query_percentile=settings.query_percentile,
                                           recorded=lm.recorded.get(c), identity=u.unit)
            except OverlappingExemplars as err:     # nearly silent: too few images drive it for its tasks
                reason, why = "sparse", str(err)
        for kind in settings.kinds:
            if u in member[kind]:
                status.append(_status_row(model_id, kind, u, reason or "ok", why))
        if reason is not None:
            dead_of[u] = reason
    return tasks_of, dead_of, status


def _visualization_settings(settings: StimuliSettings) -> FeatureVisSettings:
    return FeatureVisSettings(steps=settings.fv_steps, lr=settings.fv_lr,
                              image_size=settings.fv_image_size or settings.image_size,
                              batch_size=max(1, settings.fv_batch_units) * 2 * settings.n_references,
                              n_diverse=settings.n_references - 1, n_plain=1, diversity=settings.fv_diversity,
                              objective=settings.fv_objective, redirect_steps=settings.fv_redirect_steps,
                              patience=settings.fv_patience, tolerance=settings.fv_tolerance,
                              rescue_steps=settings.fv_rescue_steps, seed=settings.seed)


def _render_visualizations(model, model_id: str, todo: list[Unit], tasks_of: dict, channel: ChannelMap,
                           bank: StimulusBank, images: ExemplarImages, split_root: Path, settings: StimuliSettings,
                           *, device, progress: bool, shard: tuple[int, int], gather) -> None:
    """Feature visualizations of ``todo``, many units of a layer per batch, into the bank.  Under
    ``torchrun`` each rank renders every ``world_size``-th batch of the single-process ones."""
    rank, world = shard
    fv = _visualization_settings(settings)
    chunks = [(layer, [u for u in todo if u.layer == layer]) for layer in sorted({u.layer for u in todo})]
    parts = [(layer, chunk[start:start + settings.fv_batch_units]) for layer, chunk in chunks
             for start in range(0, len(chunk), settings.fv_batch_units)]
    if world > 1:   # equal shares: the ranks cut the same units into the same batches
        parts = parts[rank::world]
    for layer, part in parts:
        rendered = render_units(model, layer, [channel(u) for u in part], fv, device=device, progress=progress,
                                identities=[u.unit for u in part])
        by_unit: dict[int, dict] = {}
        for r in rendered:
            by_unit.setdefault(r.unit, {})[r.direction] = r
        for u in part:
            bank.write_unit(model_id, "synthetic", u.layer, u.unit,
                            synthetic_rows(model_id, u, tasks_of[u], by_unit[channel(u)], images, bank, split_root))
    if world > 1 and gather is not None:
        gather(None)        # every rank's renders are on disk before rank 0 reads them back


def _visualization_validity(model_id: str, status: list[dict], tasks_of: dict, bank: StimulusBank) -> None:
    """Fill ``fv_reach`` and ``fv_valid`` of every rendered unit's synthetic status row."""
    for row in status:
        u = Unit(row["layer"], row["unit"])
        if row["kind"] == "synthetic" and row["status"] == "ok" and bank.is_done(model_id, "synthetic", u.layer, u.unit):
            row["fv_reach"], row["fv_valid"] = visualization_validity(
                bank.read_unit(model_id, "synthetic", u.layer, u.unit), tasks_of[u])


def synthetic_rows(model_id: str, unit: Unit, tasks, rendered: dict, images: ExemplarImages, bank: StimulusBank,
                   root: Path) -> list[dict]:
    """Feature-visualization references (the same for every task) with each task's natural queries."""
    refs = {}
    for direction in ("max", "min"):
        r = rendered[direction]
        steps = r.steps.tolist() if r.steps is not None else [0] * len(r.seeds)
        refs[direction] = [(bank.add_image(img), f"fv:{seed}", float(act), slot + 1, n)
                           for slot, (img, act, seed, n) in enumerate(zip(r.images, r.activations, r.seeds, steps))]
    rows = []
    for t in tasks:
        for role, idx, rank, act in t.items():
            if role.startswith("query"):
                rows.append(_row(model_id, unit, t.task, role, "synthetic", images.name(idx),
                                 _source(images, idx, root), act, rank))
        for direction in ("max", "min"):
            for name, source, act, rank, steps in refs[direction]:
                rows.append(_row(model_id, unit, t.task, f"ref_{direction}", "synthetic", name, source, act, rank,
                                 steps))
    return rows
