"""The study stage that fills the stimulus bank for every model of the study."""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from pruning.models import get_spec, load_checkpoint, read_meta

from .bank import StimulusBank
from .pipeline import StimuliSettings, make_stimuli
from .units import Unit, resolve_units


def study_units(study, explicit: list[str] | None = None) -> list[Unit]:
    """The study's units (or ``explicit`` ones), resolved on the base model so every model is probed at
    the same units."""
    cfg = study.config
    base_dir = study.path("models", "base")
    if not (base_dir / "model.pt").is_file():
        raise ValueError(f"no base model in {base_dir}; train it first (`sparsight train` or `sparsight run`)")
    base = load_checkpoint(base_dir).model
    layers = list(cfg.units.layers) or list(get_spec(cfg.model.arch).unit_layers)
    return resolve_units(base, layers=layers, explicit=explicit or list(cfg.units.units), sampling=cfg.units.sampling,
                         per_layer=cfg.units.units_per_layer, seed=cfg.study.seed, input_size=cfg.data.image_size)


def stimulus_models(study, ids: list[str] | None = None) -> list[str]:
    """``ids`` (default: the study's ``stimuli.models``, else every model but the observer), checked."""
    from pruning.stages import study_model_ids

    cfg = study.config
    ids = list(ids or cfg.stimuli.models) or [m for m in study_model_ids(study) if m != "observer"]
    missing = [m for m in ids if not (study.path("models", m) / "model.pt").is_file()]
    if missing:
        have = sorted(p.name for p in study.path("models").iterdir()) if study.path("models").is_dir() else []
        raise ValueError(f"model {missing[0]!r} has no checkpoint in {study.path('models')}; models: {have}")
    return ids


def _model_fingerprint(settings: StimuliSettings, checkpoint_sha: str, units: list[Unit]) -> str:
    blob = json.dumps({"settings": asdict(settings), "checkpoint": checkpoint_sha, "units": [str(u) for u in units]},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_stimuli(study, *, kinds: tuple[str, ...] | None = None, model_ids: list[str] | None = None,
                  units: list[str] | None = None, fresh: bool = False) -> tuple[Path, Path]:
    """Stimuli of ``units`` (unit strings; default: the study's) for ``model_ids`` (default: the study's).

    Returns the paths of ``stimuli/manifest.parquet`` and ``stimuli/units.csv``.
    """
    from pruning.stages import data_root

    cfg = study.config
    settings = StimuliSettings.from_config(cfg)
    if kinds:
        settings.kinds = tuple(kinds)
    units = study_units(study, units)
    model_ids = stimulus_models(study, model_ids)
    bank = StimulusBank(study.path("stimuli"))
    work = study.path("stimuli", "mining")
    cache: dict = {}
    for mid in tqdm(model_ids, desc="stimuli", disable=None if cfg.study.progress else True):
        ckpt = load_checkpoint(study.path("models", mid), map_location=study.ctx.device if study.ctx else "cpu")
        meta = read_meta(study.path("models", mid))
        fp = _model_fingerprint(settings, ckpt.sha256, units)
        stamp = bank.parts / mid / "fingerprint.txt"
        if fresh or not stamp.is_file() or stamp.read_text() != fp:
            shutil.rmtree(bank.parts / mid, ignore_errors=True)
            for stale in work.glob(f"{mid}.*"):
                stale.unlink()
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(fp)
        if meta.get("physical"):
            bank.write_status(mid, [{"model_id": mid, "kind": k, "layer": u.layer, "unit": u.unit,
                                     "status": "skipped", "reason": "physically pruned: channels renumbered"}
                                    for k in settings.kinds for u in units])
            continue
        work.mkdir(parents=True, exist_ok=True)
        status = make_stimuli(ckpt.model, mid, units, data_root(study), bank, settings,
                              device=ckpt.model.parameters().__next__().device, pruned_model=bool(meta.get("method")),
                              work_dir=work, progress=cfg.study.progress, exemplar_cache=cache)
        bank.write_status(mid, status)
    return bank.assemble(model_ids)


class StimuliStage:
    name = "stimuli"
    description = "natural exemplars and feature visualizations for the study's units (stimulus bank)"

    def inputs(self, study) -> dict:
        from pruning.stages import _upstream

        cfg = study.config
        return {"models": {k: _upstream(study, k) for k in ("data", "base", "prune")},
                "units": asdict(cfg.units), "stimuli": asdict(cfg.stimuli), "seed": cfg.study.seed,
                "image_size": cfg.data.image_size}

    def run(self, study) -> list[Path]:
        if not study.is_main:
            return []
        return list(build_stimuli(study, fresh=study.forced))


STAGES = [StimuliStage()]
