"""The study's model table from its files: ``models/<id>/meta.json`` (``evaluation.csv`` for models without one).

One row per model with ``method`` (``"base"`` for the unpruned parent), ``schedule``, ``rate`` (the requested
rate), ``sparsity`` (measured, after retraining) and ``top1`` (after retraining); the analysis joins it onto its
tables and the survey's responses export onto its answers.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .layout import Layout

MODEL_COLUMNS = ["model_id", "arch", "method", "schedule", "series", "rate", "sparsity", "sparsity_effective", "top1",
                 "top1_before", "top1_parent", "top5", "params_total", "params_nonzero", "flops", "corruption_top1",
                 "physical"]
BASE_METHOD = "base"


def read_table(path: Path) -> pd.DataFrame | None:
    """A CSV or parquet table, ``None`` when the file is missing, an empty frame when it has no rows."""
    if not path.is_file():
        return None
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def _sparsity(value, key: str = "total", fallback: bool = True) -> float:
    """``value[key]`` of a meta.json sparsity dict (with ``fallback``, a missing ``effective`` is the
    ``total``), or a number."""
    if isinstance(value, dict):
        value = value.get(key, value.get("total") if fallback else None)
    return float("nan") if value is None else float(value)


def _number(value) -> float:
    try:
        return float("nan") if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return float("nan")


def _mean_corruption(meta: dict) -> float:
    per = (meta.get("robustness") or {}).get("corruptions") or {}
    values = [v for sev in per.values() for v in sev.values() if v is not None]
    return float(np.mean(values)) if values else float("nan")


def meta_row(meta: dict) -> dict:
    """One model-table row from a ``meta.json`` dict (sparsity a dict with ``total`` or a number)."""
    top1, top5 = meta.get("top1") or {}, meta.get("top5") or {}
    if not isinstance(top1, dict):
        top1 = {"after": top1}
    if not isinstance(top5, dict):
        top5 = {"after": top5}
    return {"model_id": str(meta.get("model_id")), "arch": meta.get("arch") or "",
            "method": meta.get("method") or BASE_METHOD, "schedule": meta.get("schedule") or "",
            "rate": _number(meta.get("rate_requested", meta.get("rate", 0.0))) if meta.get("method") else 0.0,
            "sparsity": _sparsity(meta.get("sparsity")),
            # a pruned model whose meta.json predates the effective sparsity has none (its total understates it)
            "sparsity_effective": _sparsity(meta.get("sparsity"), "effective", fallback=not meta.get("method")),
            "top1": _number(top1.get("after")),
            "top1_before": _number(top1.get("before")), "top1_parent": _number(top1.get("parent")),
            "top5": _number(top5.get("after")), "params_total": _number(meta.get("params_total")),
            "params_nonzero": _number(meta.get("params_nonzero")), "flops": _number(meta.get("flops")),
            "corruption_top1": _mean_corruption(meta), "physical": bool(meta.get("physical"))}


def _with_series(models: pd.DataFrame) -> pd.DataFrame:
    """``series`` names a curve: the method, with the schedule when a method has several."""
    models = models.copy()
    pruned = models["method"] != BASE_METHOD
    several = models[pruned].groupby("method")["schedule"].nunique()
    models["series"] = [m if m == BASE_METHOD or several.get(m, 1) <= 1 else f"{m} ({s})"
                        for m, s in zip(models["method"], models["schedule"])]
    return models


def load_models(run_dir: str | Path) -> pd.DataFrame:
    """One row per model of the study (:data:`MODEL_COLUMNS`), the observer network left out.

    ``models/<id>/meta.json`` is read first; ``evaluation.csv`` adds models without a meta file.  Where the
    study wrote ``evaluation.csv`` (its evaluate stage: one row per model of the study), a model folder it does not
    list is left out: a model the study's settings no longer name (a rate dropped since) stays on disk, for a
    later run to reuse, but is not the study's."""
    run_dir = Path(run_dir)
    evaluation = read_table(Layout(run_dir).evaluation)
    listed = {str(m) for m in evaluation["model_id"]} if evaluation is not None and len(evaluation) else None
    rows = []
    for meta_file in sorted(run_dir.glob("models/*/meta.json")):
        if listed is not None and meta_file.parent.name not in listed:
            continue
        try:
            meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{meta_file} is not valid JSON: {err}") from None
        meta.setdefault("model_id", meta_file.parent.name)
        rows.append(meta_row(meta))
    have = {r["model_id"] for r in rows}
    if listed is not None:
        for r in evaluation.to_dict("records"):
            if str(r["model_id"]) in have:
                continue
            method = r.get("method")
            method = method if isinstance(method, str) and method else None
            rows.append(meta_row({"model_id": r["model_id"], "arch": r.get("arch"), "method": method,
                                  "schedule": r.get("schedule") if isinstance(r.get("schedule"), str) else "",
                                  "rate_requested": r.get("rate_requested"),
                                  "sparsity": {"total": r.get("sparsity"),
                                               "effective": r.get("sparsity_effective", r.get("sparsity"))},
                                  "top1": {"after": r.get("top1"), "before": r.get("top1_before")},
                                  "top5": {"after": r.get("top5")}, "params_total": r.get("params_total"),
                                  "params_nonzero": r.get("params_nonzero"), "flops": r.get("flops")}))
            rows[-1]["corruption_top1"] = _number(r.get("corruption_top1"))
    models = pd.DataFrame(rows, columns=[c for c in MODEL_COLUMNS if c != "series"])
    models = models[models["model_id"] != "observer"].reset_index(drop=True)
    models = _with_series(models) if len(models) else models.assign(series=pd.Series(dtype=str))
    return models[MODEL_COLUMNS].sort_values(["method", "schedule", "rate"], key=_base_first,
                                             ignore_index=True)


def _base_first(col: pd.Series) -> pd.Series:
    return col.map(lambda v: "" if v == BASE_METHOD else v) if col.name == "method" else col
