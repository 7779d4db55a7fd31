"""The study stage that fills the stimulus bank for every model of the study."""
from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path

from pruning.models import file_sha256, get_spec, load_checkpoint, read_meta

from sparsight.files import atomic_write_frame, json_digest
from sparsight.progress import note, on_terminal, progress_bar

from .bank import StimulusBank
from .pipeline import StimuliSettings, live_units, make_stimuli
from .units import REMOVED_CHANNEL, ChannelMap, Unit, layer_channels, resolve_units, sample_among, sample_units


def _base_model(study):
    base_dir = study.layout.model_dir("base")
    if not study.layout.checkpoint("base").is_file():
        raise ValueError(f"no base model in {base_dir}; train it first (`sparsight train` or `sparsight run`)")
    return load_checkpoint(base_dir).model


def _unit_layers(cfg) -> list[str]:
    return list(cfg.units.layers) or list(get_spec(cfg.model.arch).unit_layers)


def study_units(study, explicit: list[str] | None = None) -> list[Unit]:
    """The study's units (or ``explicit`` ones), resolved on the base model so every model is probed at
    the same units."""
    cfg = study.config
    return resolve_units(_base_model(study), layers=_unit_layers(cfg), explicit=explicit or list(cfg.units.units),
                         sampling=cfg.units.sampling, per_layer=cfg.units.units_per_layer, seed=cfg.study.seed,
                         input_size=cfg.data.image_size)


def stimulus_models(study, ids: list[str] | None = None) -> list[str]:
    """``ids`` (default: the study's ``stimuli.models``, else every model but the observer), checked."""
    return checked_models(study, list(ids or study.config.stimuli.models))


def checked_models(study, ids: list[str] | None = None) -> list[str]:
    """``ids`` (default: every model of the study but the observer), each checked for a checkpoint."""
    layout = study.layout
    ids = list(ids or []) or _study_models(study)
    missing = [m for m in ids if not layout.checkpoint(m).is_file()]
    if missing:
        raise ValueError(f"model {missing[0]!r} has no checkpoint in {layout.models}; "
                         f"models: {layout.model_ids_on_disk()}")
    return ids


def _model_fingerprint(settings: StimuliSettings, checkpoint_sha: str) -> str:
    """What every stored unit of a model depends on (not which units or kinds are asked for now: those
    are per-unit parts, so a run for some of them leaves the others in place)."""
    return json_digest({"settings": {k: v for k, v in asdict(settings).items() if k not in ("kinds", "synthetic_units")},
                        "checkpoint": checkpoint_sha}, 16)


def run_stimuli(study, *, kinds: tuple[str, ...] | None = None, model_ids: list[str] | None = None,
                units: list[str] | None = None, fresh: bool = False) -> list[Path]:
    """Stimuli of ``units`` (unit strings; default: the study's) for ``model_ids`` (default: the study's).

    Without ``kinds``, ``model_ids`` and ``units`` the bank becomes exactly the study's (parts of models,
    units or kinds the study no longer has are dropped).  With any of them only those parts are made
    again and every other model's, unit's and kind's stimuli stay in the bank and the manifest.
    Returns the paths of ``stimuli/manifest.parquet`` and ``stimuli/units.csv`` (none on the other
    ranks under ``torchrun``, where every rank mines a share of the images and renders a share of the
    units; rank 0 keeps the books and assembles the manifest).
    """
    from pruning.training import DistContext

    cfg = study.config
    ctx = study.ctx or DistContext()
    partial = bool(kinds or model_ids or units)
    settings = StimuliSettings.from_config(cfg)
    if kinds:
        settings.kinds = tuple(kinds)
    units = study_units(study, units)
    model_ids = stimulus_models(study, model_ids)
    bank = StimulusBank(study.layout.stimuli)
    if ctx.is_main:
        study.layout.mining.mkdir(parents=True, exist_ok=True)
    ctx.barrier()
    synthetic = (synthetic_units(study, units, settings, ctx) if "synthetic" in settings.kinds else [])
    cache: dict = {}
    log_models = cfg.study.progress and ctx.is_main and not on_terminal()
    for i, mid in enumerate(progress_bar(model_ids, desc="stimuli", enabled=cfg.study.progress and ctx.is_main)):
        if log_models:
            note(f"[stimuli] {i + 1}/{len(model_ids)} {mid}")
        _model_stimuli(study, ctx, bank, mid, settings, units, synthetic, fresh=fresh, partial=partial, cache=cache)
    ctx.barrier()
    if not ctx.is_main:
        return []
    if not partial:
        return list(bank.assemble(model_ids))
    from pruning.stages import study_model_ids

    stored = {p.name for p in bank.parts.iterdir() if p.is_dir()}
    study_order = [m for m in study_model_ids(study) if m in stored]
    return list(bank.assemble(study_order + sorted(stored - set(study_order))))


def _model_stimuli(study, ctx, bank: StimulusBank, mid: str, settings: StimuliSettings, units: list[Unit],
                   synthetic: list[Unit], *, fresh: bool, partial: bool, cache: dict) -> None:
    """One model's stimuli into the bank (natural ones of ``units``, visualizations of ``synthetic``):
    its parts are cleared when its checkpoint or settings changed (or ``fresh``), then every missing
    unit is made."""
    layout = study.layout
    units_of = {kind: (synthetic if kind == "synthetic" else units) for kind in settings.kinds}
    ckpt = load_checkpoint(layout.model_dir(mid), map_location=ctx.device)
    meta = read_meta(layout.model_dir(mid))
    if ctx.is_main:
        _refresh_model_parts(bank, layout.mining, mid, _model_fingerprint(settings, ckpt.sha256), units_of,
                             fresh=fresh, partial=partial)
    ctx.barrier()
    if _needs_channel_map(meta) and not ckpt.channel_map:
        if ctx.is_main:     # a checkpoint from before channel maps were stored: its units cannot be named
            bank.write_status(mid, [{"model_id": mid, "kind": k, "layer": u.layer, "unit": u.unit,
                                     "status": "skipped", "reason": PHYSICAL_REASON}
                                    for k, kind_units in units_of.items() for u in kind_units], merge=partial)
        return
    progress = study.config.study.progress and ctx.is_main
    status = make_stimuli(ckpt.model, mid, units, study.data_root, bank, settings, synthetic_units=synthetic,
                          device=ckpt.model.parameters().__next__().device, pruned_model=bool(meta.get("method")),
                          work_dir=layout.mining, progress=progress, exemplar_cache=cache,
                          shard=(ctx.rank, ctx.world_size), gather=ctx.all_gather_object, channel_map=ckpt.channel_map)
    if ctx.is_main:
        bank.write_status(mid, status, merge=partial)


def _refresh_model_parts(bank: StimulusBank, work: Path, mid: str, fingerprint: str, units_of: dict, *,
                         fresh: bool, partial: bool) -> None:
    """Drop a model's stored parts that no longer hold (another checkpoint or settings, ``fresh``, units
    or kinds the study no longer has) and stamp the parts with the current fingerprint."""
    stamp = bank.parts / mid / "fingerprint.txt"
    if fresh or not stamp.is_file() or stamp.read_text() != fingerprint:
        if fresh and partial:
            for kind, kind_units in units_of.items():
                bank.drop_units(mid, kind_units, (kind,))
        else:
            shutil.rmtree(bank.parts / mid, ignore_errors=True)
        for stale in work.glob(f"{mid}.*"):
            stale.unlink()
    if not partial:
        bank.keep_only(mid, units_of)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fingerprint)
    work.mkdir(parents=True, exist_ok=True)


def synthetic_units(study, units: list[Unit], settings: StimuliSettings, ctx) -> list[Unit]:
    """The units that get feature visualizations: all of ``units``, or (``stimuli.synthetic_units``) a
    seeded sample spread over the layers among the study units alive in every stimulus model of the
    study, so each one is seen at every rate.  The sample is drawn from the whole study's units and models, also when
    a command makes stimuli for some of them, and then cut to ``units``."""

    n = settings.synthetic_units
    if n == 0:
        return list(units)
    every = study_units(study)
    alive = set(every)
    planned = list(study.config.stimuli.models) or _study_models(study)
    for mid in [m for m in planned if study.layout.checkpoint(m).is_file()]:    # those made so far
        if not alive:
            break
        ckpt = load_checkpoint(study.layout.model_dir(mid), map_location=ctx.device)
        meta = read_meta(study.layout.model_dir(mid))
        if _needs_channel_map(meta) and not ckpt.channel_map:
            continue        # its units cannot be named; it is reported skipped
        alive &= live_units(ckpt.model, mid, every, study.data_root, settings,   # as make_stimuli mines
                            pruned_model=bool(meta.get("method")), work_dir=study.layout.mining,
                            shard=(ctx.rank, ctx.world_size), gather=ctx.all_gather_object,
                            channel_map=ckpt.channel_map)
    chosen = set(sample_among(sorted(alive), n, seed=study.config.study.seed))
    return [u for u in units if u in chosen]


class StimuliStage:
    name = "stimuli"
    description = "natural exemplars and feature visualizations for the study's units (stimulus bank)"

    def check(self, study) -> list[str]:
        """What the unit and model settings get wrong, found before anything is trained: unit layers and
        explicit units against a freshly built ``model.arch``, ``stimuli.models`` against the study's models."""
        from pruning.models import create_model

        cfg = study.config
        problems = []
        try:
            resolve_units(create_model(cfg.model.arch, num_classes=10), layers=_unit_layers(cfg),
                          explicit=list(cfg.units.units), sampling=cfg.units.sampling,
                          per_layer=cfg.units.units_per_layer, seed=cfg.study.seed, input_size=cfg.data.image_size)
        except ValueError as err:
            problems.append(f"units ({cfg.model.arch}): {err}")
        models = _study_models(study)
        unknown = [m for m in cfg.stimuli.models if m not in models]
        if unknown:
            problems.append(f"stimuli.models: {unknown[0]!r} is not a model of this study; its models: {models}")
        return problems

    def inputs(self, study) -> dict:

        cfg = study.config
        return {"models": {k: study.upstream(k) for k in ("data", "base", "prune")},
                "units": asdict(cfg.units), "stimuli": asdict(cfg.stimuli), "seed": cfg.study.seed,
                "image_size": cfg.data.image_size}

    def run(self, study) -> list[Path]:
        return run_stimuli(study, fresh=study.forced)


# ---- Network Dissection -------------------------------------------------------------------------
PHYSICAL_REASON = "physically pruned without a stored channel map: prune it again (--force prune)"


def dissection_units(study) -> list[Unit]:
    """``dissection.units = "all"``: every channel of the unit layers (counted on the base model, so a
    physically pruned child is probed at its parent's units); ``"study"``: the study's sampled units."""
    cfg = study.config
    if cfg.dissection.units == "study":
        return study_units(study)
    channels = layer_channels(_base_model(study), _unit_layers(cfg), cfg.data.image_size)
    return sample_units(channels, sampling="all")


def study_probe(study, probe: str | os.PathLike | None = None):
    """The probe set: ``probe`` (a Broden release or a folder probe; default ``dissection.probe``), else the
    concept masks of the study data's ``dissection.split``."""

    from .probes import open_probe

    cfg = study.config.dissection
    return open_probe(probe or cfg.probe, study.data_root, cfg.split)


def run_dissection(study, *, model_ids: list[str] | None = None, probe: str | os.PathLike | None = None,
                     fresh: bool = False) -> list[Path]:
    """Network Dissection of the study's dissection units for ``model_ids`` (default: every model but the
    observer) on the study's probe set (``probe``: a probe folder instead of ``dissection.probe``).

    Each model's tables are kept under ``dissection/parts/<model_id>/`` with a fingerprint of the
    checkpoint, settings, units and probe files, so a rerun redoes only models that changed (all with
    ``fresh``).  The study's tables hold ``model_ids`` and every other model of the study whose part is
    current.  Physically pruned models without a channel map are recorded as ``skipped``.  Returns the paths of
    ``dissection/units.csv``, ``dissection/models.csv`` and ``dissection/iou.parquet``.
    """
    import pandas as pd

    from pruning.data.folders import default_workers

    from .dissection import IOU_COLUMNS, ProbeLoader, summarize

    cfg = study.config
    d = cfg.dissection
    probe_set = study_probe(study, probe).sample(d.max_images, cfg.study.seed)
    units = dissection_units(study)
    model_ids = checked_models(study, model_ids)
    loader = ProbeLoader(probe_set, cfg.data.image_size, cfg.data.eval_batch_size, progress=cfg.study.progress,
                         num_workers=default_workers(cfg.data.num_workers))
    settings = {"quantile": d.quantile, "iou_threshold": d.iou_threshold, "image_size": cfg.data.image_size,
                "probe": probe_set.fingerprint(), "units": [str(u) for u in units]}
    out = study.layout.dissection
    log_models = cfg.study.progress and not on_terminal()
    parts = []
    for i, mid in enumerate(progress_bar(model_ids, desc="dissect", enabled=cfg.study.progress)):
        if log_models:
            note(f"[dissection] {i + 1}/{len(model_ids)} {mid}")
        parts.append(_dissect_model(study, mid, loader, units, settings, out / "parts" / mid, fresh))
    parts += _current_parts(study, [m for m in _study_models(study) if m not in model_ids], settings, out / "parts")
    units_all = pd.concat([pd.read_parquet(p / "units.parquet") for p in parts], ignore_index=True)
    iou_parts = [t for t in (pd.read_parquet(p / "iou.parquet") for p in parts) if len(t)]
    iou_all = pd.concat(iou_parts, ignore_index=True) if iou_parts else pd.DataFrame(columns=IOU_COLUMNS)
    models = summarize(units_all, n_images=len(probe_set), quantile=d.quantile, iou_threshold=d.iou_threshold)
    return [atomic_write_frame(units_all, study.layout.dissection_units),
            atomic_write_frame(models, study.layout.dissection_models),
            atomic_write_frame(iou_all, out / "iou.parquet")]


def _study_models(study) -> list[str]:
    """Every model of the study but the observer."""
    from pruning.stages import study_model_ids

    return study_model_ids(study, observer=False)


def _current_parts(study, model_ids: list[str], settings: dict, parts: Path) -> list[Path]:
    """The stored parts of ``model_ids`` that are current (same checkpoint, settings, units and probe):
    a run for some models keeps the study's other models in the tables, never a stale part."""
    current = []
    for mid in model_ids:
        part = parts / mid
        if study.layout.checkpoint(mid).is_file() and _part_is_current(part, _part_fingerprint(study, mid, settings)):
            current.append(part)
    return current


def _part_fingerprint(study, model_id: str, settings: dict) -> str:
    meta = read_meta(study.layout.model_dir(model_id))
    return json_digest({**settings, "checkpoint": file_sha256(study.layout.checkpoint(model_id)),
                        "method": meta.get("method"), "physical": bool(meta.get("physical"))})


def _part_is_current(part: Path, fp: str) -> bool:
    stamp = part / "fingerprint.txt"
    return stamp.is_file() and stamp.read_text() == fp and (part / "iou.parquet").is_file()


def _dissect_model(study, model_id: str, loader, units: list[Unit], settings: dict, part: Path, fresh: bool) -> Path:
    """Dissect one model into ``part`` (units.parquet, iou.parquet) unless its fingerprint is current."""
    import pandas as pd

    from .dissection import IOU_COLUMNS, dissect, skipped_units

    model_dir = study.layout.model_dir(model_id)
    meta = read_meta(model_dir)
    fp = _part_fingerprint(study, model_id, settings)
    stamp = part / "fingerprint.txt"
    if not fresh and _part_is_current(part, fp):
        return part
    device = study.ctx.device if study.ctx else "cpu"
    ckpt = load_checkpoint(model_dir, map_location=device)
    if _needs_channel_map(meta) and not ckpt.channel_map:
        units_df, iou_df = skipped_units(model_id, units, PHYSICAL_REASON), pd.DataFrame(columns=IOU_COLUMNS)
    else:
        d = study.config.dissection
        channel = ChannelMap(ckpt.channel_map)
        child = {u: channel(u) for u in units}
        kept = [u for u in units if child[u] is not None]
        result = dissect(ckpt.model, loader, [Unit(u.layer, child[u]) for u in kept], quantile=d.quantile,
                         iou_threshold=d.iou_threshold, device=device, pruned_model=bool(meta.get("method")),
                         progress=study.config.study.progress)
        parent = {(u.layer, child[u]): u.unit for u in kept}     # tables name units by their parent index
        units_df, iou_df = (_rename_units(t, parent) for t in (result.unit_table(model_id), result.iou_table(model_id)))
        removed = [u for u in units if child[u] is None]
        if removed:
            gone = skipped_units(model_id, removed, REMOVED_CHANNEL).assign(status="pruned")
            units_df = pd.concat([units_df, gone], ignore_index=True)
    shutil.rmtree(part, ignore_errors=True)
    atomic_write_frame(units_df, part / "units.parquet")
    atomic_write_frame(iou_df, part / "iou.parquet")
    stamp.write_text(fp)
    return part


def _needs_channel_map(meta: dict) -> bool:
    """A physically pruned model whose channels were renumbered (some were removed)."""
    return bool(meta.get("physical")) and (meta.get("physical_removal") or {}).get("removed_total", 1) > 0


def _rename_units(table, parent: dict):
    """Unit indices of a renumbered model's table back to its parent's."""
    if not len(table):
        return table
    table = table.copy()
    table["unit"] = [parent.get((layer, int(unit)), int(unit)) for layer, unit in zip(table["layer"], table["unit"])]
    return table


class DissectionStage:
    name = "dissection"
    description = "Network Dissection: each unit's best concept, IoU and interpretability (dissection/)"

    def inputs(self, study) -> dict:

        from .probes import ProbeError

        cfg = study.config
        try:
            probe = study_probe(study).fingerprint()
        except (ProbeError, OSError) as err:
            probe = f"unavailable: {err}"
        return {"models": {k: study.upstream(k) for k in ("data", "base", "prune")},
                "dissection": asdict(cfg.dissection), "probe": probe, "seed": cfg.study.seed,
                "units": asdict(cfg.units) if cfg.dissection.units == "study" else {"layers": _unit_layers(cfg)},
                "image_size": cfg.data.image_size}

    def skip_reason(self, study) -> str | None:
        """Why the stage would dissect nothing (no probe, and study data without concept masks), else None;
        generated concept-shapes data always comes with its masks."""
        if study.config.data.source == "concept-shapes":
            return None
        return no_probe_reason(study.config, study.data_root)

    def run(self, study) -> list[Path]:

        if not study.is_main:
            return []
        reason = self.skip_reason(study)
        if reason:
            warnings.warn(f"skipping Network Dissection: {reason}", stacklevel=2)
            return []
        return run_dissection(study, fresh=study.forced)


def no_probe_reason(cfg, data_root: Path) -> str | None:
    """Why a study has nothing to dissect on (no ``dissection.probe`` and no concept masks), else None."""
    if cfg.dissection.probe or (Path(data_root) / "masks").is_dir():
        return None
    return (f"the study data {data_root} has no concept masks and dissection.probe is empty; set "
            f"dissection.probe to a Broden release or a probe folder")


STAGES = [StimuliStage(), DissectionStage()]
