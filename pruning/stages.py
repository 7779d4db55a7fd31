"""Study stages owned by the pruning package: data → base → observer → prune → robustness → evaluation."""
from __future__ import annotations

import csv
import json
import shutil
from dataclasses import asdict
from pathlib import Path

from sparsight.config import CONTROL_METHOD
from sparsight.layout import CHECKPOINT_FILE, META_FILE

from .data import concept_shapes
from .data.folders import DataLayoutError, check_num_classes, class_folders, folder_digest, split_dir
from .method_base import PruningError, method_class, prunable_layers
from .models import create_model, read_meta
from .models.factory import check_weights_fit
from .models.weights import WeightsError, resolve_weights, weights_digest
from .schedule import PruneJob
from .training import TrainSettings
from .workflows import build_loaders, default_exclude, prune_and_save, retrain_settings, train_and_save

#: Columns of ``evaluation.csv``, one row per model.
EVALUATION_COLUMNS = ("model_id", "arch", "method", "schedule", "rate_requested", "sparsity", "sparsity_effective",
                      "params_total", "params_nonzero", "flops", "top1_before", "top1", "top5", "corruption_top1")


class DataStage:
    name = "data"
    description = "generate the concept-shapes dataset (or check the configured image folder)"

    def check(self, study) -> list[str]:
        """An image folder's layout (train/ and val/ with the same class folders), before anything runs."""
        d = study.config.data
        if d.source != "folder" or not study.data_root.is_dir():      # a missing folder is named already
            return []
        try:
            split_dir(study.data_root, "train"), split_dir(study.data_root, "val")
        except (OSError, ValueError) as err:
            return [f"data.path: {err}"]
        try:
            check_num_classes(study.config.model.num_classes, class_folders(study.data_root / "train"))
        except DataLayoutError as err:
            return [str(err)]
        return []

    def inputs(self, study) -> dict:
        d = study.config.data
        if d.source == "folder":
            path = Path(d.path).expanduser().resolve()
            try:
                digest = folder_digest(path)
            except OSError as err:
                digest = f"unavailable: {err}"
            return {"source": "folder", "path": str(path), "files": digest}
        return {"source": d.source, "image_size": d.image_size, "train_per_class": d.train_per_class,
                "val_per_class": d.val_per_class, "seed": study.config.study.seed,
                "generator_version": concept_shapes.GENERATOR_VERSION}

    def run(self, study) -> list[Path]:
        return run_data(study)


class ModelStage:
    """Train (or load and evaluate) one network of the study into ``models/<model_id>/``."""

    def __init__(self, name: str, model_id: str, description: str):
        self.name, self.model_id, self.description = name, model_id, description

    @property
    def is_base(self) -> bool:
        return self.model_id == "base"

    def _spec(self, study) -> tuple[str, str, TrainSettings]:
        cfg = study.config
        seed = cfg.study.seed
        if self.model_id == "observer":
            o = cfg.observer
            return o.arch, o.weights, TrainSettings.from_section(cfg.train, epochs=o.epochs, lr=o.lr, seed=seed + 1)
        return cfg.model.arch, cfg.model.weights, TrainSettings.from_section(cfg.train, seed=seed)

    def skip_reason(self, study) -> str | None:
        """Why the stage would train nothing anything uses (the observer network when the MIS embeds with
        something else), else None."""
        embedding = study.config.mis.embedding
        if self.model_id != "observer" or embedding == "observer":
            return None
        return f"mis.embedding is {embedding!r}, so nothing uses the observer network"

    def check(self, study) -> list[str]:
        """The weights the network starts from can be found (a local file, or a torchvision name in the cache)
        and, where the data's classes are known, fit the network with its classifier for them."""
        arch, weights, _ = self._spec(study)
        if not weights or self.skip_reason(study):
            return []
        key = f"{'observer' if self.model_id == 'observer' else 'model'}.weights"
        try:
            resolve_weights(arch, weights)
        except (WeightsError, ValueError) as err:
            return [f"{key}: {err}"]
        classes = planned_class_count(study)
        if classes:
            try:
                check_weights_fit(arch, weights, study.config.model.num_classes or classes,
                                  new_classifier=self.model_id != "observer" and study.config.model.new_classifier)
            except WeightsError as err:
                return [f"{key}: {err}"]
        return []

    def inputs(self, study) -> dict:
        reason = self.skip_reason(study)
        if reason:
            return {"skipped": reason}
        arch, weights, settings = self._spec(study)
        d = study.config.data
        extra = {"rewind_epoch": study.config.prune.imp_rewind_epoch,
                 "evaluate": asdict(study.config.evaluate)} if self.is_base else {}
        if self.is_base and study.config.model.new_classifier:
            extra["new_classifier"] = True
        return {"data": study.upstream("data"), "arch": arch, "weights": weights,
                "weights_digest": weights_digest(arch, weights),
                "num_classes": study.config.model.num_classes, "settings": asdict(settings),
                "loader": {"image_size": d.image_size, "batch_size": d.batch_size, "augment": d.augment}, **extra}

    def run(self, study) -> list[Path]:
        if self.skip_reason(study):
            return []
        arch, weights, settings = self._spec(study)
        rewind = study.config.prune.imp_rewind_epoch if self.is_base and settings.epochs > 0 else None
        return run_training(study, self.model_id, arch=arch, weights=weights, settings=settings, rewind_epoch=rewind,
                            robustness=self.is_base, reuse=not study.forced)


def planned_class_count(study) -> int | None:
    """How many classes the study's data will have, as far as is known before the data stage runs: the
    generated dataset's, or the class folders of an image folder's train/ (None where it is not there)."""
    d = study.config.data
    if d.source != "folder":
        return len(concept_shapes.SHAPES)
    train = study.data_root / "train"
    return len(class_folders(train)) if train.is_dir() else None


def prune_jobs(cfg) -> list[PruneJob]:
    """Every (method, schedule, rate) of the study, in a stable order, each in ``prune.copies`` retrained copies;
    first the retrained control (``prune.control``: nothing pruned, retrained as a one-shot model is)."""
    p = cfg.prune
    exclude = default_exclude(cfg, cfg.model.arch)
    copies = range(1, p.copies + 1)
    control = [PruneJob(method=CONTROL_METHOD, rate=0.0, exclude=exclude, seed=cfg.study.seed, copy=c)
               for c in copies] if p.control else []
    return control + [PruneJob(method=m, rate=float(r), schedule=s, steps=p.iterative_steps if s == "iterative" else 1,
                               exclude=exclude, physical=p.physical, norm=p.norm, seed=cfg.study.seed, copy=c)
                      for m in p.methods for s in p.schedules for r in sorted(p.rates) for c in copies]


def study_model_ids(study, *, observer: bool = True) -> list[str]:
    """The study's models: the base, the observer network (unless ``observer=False``: it is not studied, only
    the MIS embeds with it) and every pruned model."""
    return ["base"] + (["observer"] if observer else []) + [job.model_id for job in prune_jobs(study.config)]


class PruneStage:
    name = "prune"
    description = "prune the base model by every method × schedule × rate, retrain, evaluate robustness"

    def check(self, study) -> list[str]:
        """``prune.exclude`` names layers of ``model.arch`` and leaves something to prune (checked on a freshly
        built network, before the base model is trained)."""
        cfg = study.config
        if not cfg.prune.exclude:
            return []
        model = create_model(cfg.model.arch, num_classes=10)
        for method in cfg.prune.methods:        # each prunes its own kinds of layer (structured: convolutions)
            try:
                prunable_layers(model, cfg.prune.exclude, method_class(method).kinds)
            except PruningError as err:
                return [f"prune.exclude ({method}): {err}"]
        return []

    def inputs(self, study) -> dict:
        cfg = study.config
        d = cfg.data
        return {"base": study.upstream("base"), "jobs": [asdict(j) for j in prune_jobs(cfg)],
                "retrain": asdict(retrain_settings(cfg)), "iterative_epochs": cfg.prune.iterative_epochs,
                "evaluate": asdict(cfg.evaluate),
                "reference_per_class": cfg.prune.lrp_images_per_class,
                **({"bn_recalibration": cfg.prune.bn_recalibration_batches}
                   if cfg.prune.bn_recalibration_batches else {}),
                "loader": {"image_size": d.image_size, "batch_size": d.batch_size, "augment": d.augment}}

    def run(self, study) -> list[Path]:
        return run_prune(study, on_model=_note_model if study.config.study.progress else None)


def _note_model(index: int, count: int, job: PruneJob, meta: dict | None) -> None:
    """Progress of the prune stage: the model about to be made (``meta`` None), then its result."""
    from sparsight.progress import note
    if meta is None:
        note(f"[{index + 1}/{count}] {job.model_id}")
    else:
        note(f"    sparsity {meta['sparsity']['total']:.3f} · top-1 {meta['top1']['before']:.3f} "
             f"→ {meta['top1']['after']:.3f} (parent {meta['top1']['parent']:.3f})")


def _study_metas(study) -> list[dict]:
    layout = study.layout
    return [read_meta(layout.model_dir(mid)) for mid in study_model_ids(study) if layout.meta(mid).is_file()]


class RobustnessStage:
    name = "robustness"
    description = "study tables: corruption accuracy, noise similarity, prune potential, excess error"

    def inputs(self, study) -> dict:
        e = study.config.evaluate
        return {"models": {k: study.upstream(k) for k in ("base", "prune")}, "delta": e.prune_potential_delta,
                "bootstrap": e.prune_potential_bootstrap, "seed": study.config.study.seed}

    def run(self, study) -> list[Path]:
        return run_robustness(study)


def _mean_corruption_top1(meta: dict) -> float | None:
    """Top-1 averaged over every corruption and severity (None without robustness results)."""
    per = meta.get("robustness", {}).get("corruptions") or {}
    values = [v for sev in per.values() for v in sev.values()]
    return round(sum(values) / len(values), 4) if values else None


class EvaluateStage:
    name = "evaluate"
    description = "summarize every model of the study (evaluation.csv)"
    columns = EVALUATION_COLUMNS

    def inputs(self, study) -> dict:
        return {"models": {k: study.upstream(k) for k in ("base", "observer", "prune")}}

    def run(self, study) -> list[Path]:
        return run_evaluate(study)


# --- Drivers: one per step, called by its stage and by its command --------------------------------


def run_data(study) -> list[Path]:
    """Generate the concept-shapes data into the study, or check the configured ImageFolder tree."""
    d = study.config.data
    root = study.data_root
    if d.source == "folder":
        split_dir(root, "train"), split_dir(root, "val")  # clear error when the layout is wrong
        marker = study.path("data_source.json")
        if study.is_main:
            marker.write_text(json.dumps({"path": str(root.resolve())}))
        return [marker]
    if study.is_main:
        if root.exists():
            shutil.rmtree(root)
        concept_shapes.generate(root, seed=study.config.study.seed, train_per_class=d.train_per_class,
                                val_per_class=d.val_per_class, image_size=d.image_size)
    return [root / "concepts.json", root / "train.csv", root / "val.csv"]


def run_training(study, model_id: str = "base", *, arch: str, weights: str, settings: TrainSettings,
                 data: Path | None = None, out: Path | None = None, rewind_epoch: int | None = None,
                 robustness: bool = False, reuse: bool = True) -> list[Path]:
    """Train (or load and evaluate) one network into ``out`` (default ``models/<model_id>/``); the studied network
    (every id but the observer) takes ``model.new_classifier``."""
    out = out or study.layout.model_dir(model_id)
    train_and_save(study.config, data or study.data_root, out, study.ctx, model_id=model_id, arch=arch,
                   weights=weights, settings=settings, rewind_epoch=rewind_epoch, robustness=robustness, reuse=reuse,
                   new_classifier=model_id != "observer" and study.config.model.new_classifier)
    return [out / CHECKPOINT_FILE, out / META_FILE]


def run_prune(study, *, parent: Path | None = None, data: Path | None = None, out_root: Path | None = None,
              robustness: bool = True, on_model=None) -> list[Path]:
    """Prune ``parent`` (default the base model) by every job of the study, retrain, and write each model
    under ``out_root`` (default ``models/``); ``on_model(i, n, job, meta)`` hears before (meta None)
    and after each one, on rank 0."""
    cfg, layout = study.config, study.layout
    parent, data = parent or layout.model_dir("base"), data or study.data_root
    out_root = out_root or layout.models
    jobs = prune_jobs(cfg)
    tell = on_model if (on_model and study.is_main) else (lambda *_: None)
    outputs, cache, loaders = [], {}, None
    for i, job in enumerate(jobs):
        out = out_root / job.model_id
        tell(i, len(jobs), job, None)
        finished = (out / CHECKPOINT_FILE).is_file() and (out / META_FILE).is_file()
        if loaders is None and (study.forced or not finished):
            loaders = build_loaders(cfg, data, study.ctx)
        meta = prune_and_save(cfg, data, parent, out, study.ctx, job, loaders=loaders, cache=cache,
                              robustness=robustness, reuse=not study.forced)
        if meta:
            tell(i, len(jobs), job, meta)
        outputs += [out / CHECKPOINT_FILE, out / META_FILE]
    return outputs


def run_robustness(study) -> list[Path]:
    """The study's robustness tables over the base and pruned models."""
    from .robustness import write_study_tables

    metas = [m for m in _study_metas(study) if m["model_id"] != "observer"]
    if not study.is_main:
        return []
    e = study.config.evaluate
    return list(write_study_tables(study.run_dir, metas, e.prune_potential_delta, e.prune_potential_bootstrap,
                                   study.config.study.seed))


def _effective_sparsity(meta: dict) -> float | None:
    """``sparsity.effective`` of a model's meta.json; an unpruned model's is its total, and a pruned model
    whose meta.json predates the measure has none (empty, never its total, which understates it)."""
    sparsity = meta["sparsity"]
    return sparsity.get("effective", None if meta.get("method") else sparsity["total"])


def run_evaluate(study) -> list[Path]:
    """``evaluation.csv``: one row per model of the study."""
    rows = [{"model_id": meta["model_id"], "arch": meta["arch"], "method": meta.get("method") or "",
             "schedule": meta.get("schedule") or "", "rate_requested": meta.get("rate_requested", 0.0),
             "sparsity": meta["sparsity"]["total"],
             "sparsity_effective": _effective_sparsity(meta),
             "params_total": meta["params_total"],
             "params_nonzero": meta["params_nonzero"], "flops": meta["flops"],
             "top1_before": meta["top1"].get("before"), "top1": meta["top1"].get("after"),
             "top5": meta["top5"].get("after"), "corruption_top1": _mean_corruption_top1(meta)}
            for meta in _study_metas(study)]
    out = study.layout.evaluation
    if study.is_main:
        with open(out, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(EVALUATION_COLUMNS))
            writer.writeheader()
            writer.writerows(rows)
    return [out]


STAGES = [
    DataStage(),
    ModelStage("base", "base", "train the base model"),
    ModelStage("observer", "observer", "train the observer network (MIS embedding)"),
    PruneStage(),
    RobustnessStage(),
    EvaluateStage(),
]
