"""Study stages owned by the pruning package: data → base model → observer → evaluation."""
from __future__ import annotations

import csv
import json
import shutil
from dataclasses import asdict
from pathlib import Path

from .data import concept_shapes
from .data.folders import split_dir
from .models import read_meta
from .training import TrainSettings


def data_root(study) -> Path:
    """Where the study's images live: the generated folder, or the configured ImageFolder tree."""
    d = study.config.data
    return study.path("data") if d.source == "concept-shapes" else Path(d.path).expanduser()


def _upstream(study, name: str) -> dict:
    rec = study.records.get(name) or {}
    return {"fingerprint": rec.get("fingerprint"), "outputs": rec.get("outputs")}


class DataStage:
    name = "data"
    description = "generate the concept-shapes dataset (or check the configured image folder)"

    def inputs(self, study) -> dict:
        d = study.config.data
        if d.source == "folder":
            return {"source": "folder", "path": str(Path(d.path).expanduser().resolve())}
        return {"source": d.source, "image_size": d.image_size, "train_per_class": d.train_per_class,
                "val_per_class": d.val_per_class, "seed": study.config.study.seed,
                "generator_version": concept_shapes.GENERATOR_VERSION}

    def run(self, study) -> list[Path]:
        d = study.config.data
        root = data_root(study)
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


class ModelStage:
    """Train (or load and evaluate) one network of the study into ``models/<model_id>/``."""

    def __init__(self, name: str, model_id: str, description: str):
        self.name, self.model_id, self.description = name, model_id, description

    def _spec(self, study) -> tuple[str, str, TrainSettings]:
        cfg = study.config
        seed = cfg.study.seed
        if self.model_id == "observer":
            o = cfg.observer
            return o.arch, o.weights, TrainSettings.from_section(cfg.train, epochs=o.epochs, lr=o.lr, seed=seed + 1)
        return cfg.model.arch, cfg.model.weights, TrainSettings.from_section(cfg.train, seed=seed)

    def inputs(self, study) -> dict:
        arch, weights, settings = self._spec(study)
        d = study.config.data
        return {"data": _upstream(study, "data"), "arch": arch, "weights": weights,
                "num_classes": study.config.model.num_classes, "settings": asdict(settings),
                "loader": {"image_size": d.image_size, "batch_size": d.batch_size, "augment": d.augment}}

    def run(self, study) -> list[Path]:
        from .workflows import train_and_save

        arch, weights, settings = self._spec(study)
        out = study.path("models", self.model_id)
        train_and_save(study.config, data_root(study), out, study.ctx, model_id=self.model_id, arch=arch,
                       weights=weights, settings=settings)
        return [out / "model.pt", out / "meta.json"]


class EvaluateStage:
    name = "evaluate"
    description = "summarize every model of the study (evaluation.csv)"
    columns = ("model_id", "arch", "method", "rate_requested", "sparsity", "params_total", "params_nonzero",
               "flops", "top1", "top5")

    def inputs(self, study) -> dict:
        return {"models": {k: _upstream(study, k) for k in ("base", "observer")}}

    def run(self, study) -> list[Path]:
        rows = []
        for model_dir in sorted(p for p in study.path("models").iterdir() if (p / "meta.json").is_file()):
            meta = read_meta(model_dir)
            rows.append({"model_id": meta["model_id"], "arch": meta["arch"], "method": meta.get("method") or "",
                         "rate_requested": meta.get("rate_requested", 0.0), "sparsity": meta["sparsity"]["total"],
                         "params_total": meta["params_total"], "params_nonzero": meta["params_nonzero"],
                         "flops": meta["flops"], "top1": meta["top1"].get("after"), "top5": meta["top5"].get("after")})
        out = study.path("evaluation.csv")
        if study.is_main:
            with open(out, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(self.columns))
                writer.writeheader()
                writer.writerows(rows)
        return [out]


STAGES = [
    DataStage(),
    ModelStage("base", "base", "train the base model"),
    ModelStage("observer", "observer", "train the observer network (MIS embedding)"),
    EvaluateStage(),
]
