"""The Machine Interpretability Score (Zimmermann et al. 2024), computed on the survey's own tasks.

For a task with max/min queries q⁺, q⁻ and references E⁺, E⁻ and an embedding f, with
s(q, E) = mean cosine similarity of f(q) to f(e), e ∈ E:

    Δ = [s(q⁺, E⁺) − s(q⁺, E⁻)] − [s(q⁻, E⁺) − s(q⁻, E⁻)],    P(correct) = σ(α·Δ).

Per unit: ``mis`` = mean P over its tasks, ``mis_hard`` = share of tasks with Δ > 0.  Per model
(and reference kind): the mean over units with a percentile bootstrap CI over units.  Units that
are dead or pruned away have no tasks; they are listed with their status and never averaged in.
α is a stated parameter until human responses exist; :func:`fit_alpha` then estimates it by
maximum likelihood (correct ~ Δ, no intercept) and :func:`calibration` checks it on held-out units.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from PIL import Image

from .embeddings import EmbeddingCache
from .export import human_main_responses
from .material import Material

TASK_KEYS = ["model_id", "kind", "layer", "unit", "task"]
UNIT_KEYS = ["model_id", "kind", "layer", "unit"]
UNIT_COLUMNS = UNIT_KEYS + ["status", "fv_valid", "mis", "mis_hard", "n_tasks", "delta_mean", "alpha", "alpha_source",
                            "embedding"]
MODEL_COLUMNS = ["model_id", "kind", "units", "mis", "mis_ci_low", "mis_ci_high", "mis_hard", "dead", "pruned",
                 "skipped", "fv_invalid", "mis_valid_fv", "alpha", "alpha_source", "embedding"]


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def similarity_deltas(feats: torch.Tensor, q_max, q_min, r_max, r_min) -> torch.Tensor:
    """Δ per task from features ``[N, D]`` and index tensors ``q_* [T]``, ``r_* [T, K]`` (in float32, the
    precision of the embeddings themselves)."""
    t, k = r_max.shape
    used, local = torch.cat([q_max, q_min, r_max.flatten(), r_min.flatten()]).unique(return_inverse=True)
    f = torch.nn.functional.normalize(feats[used].float(), dim=1)
    q_max, q_min = local[:t], local[t:2 * t]
    r_max, r_min = local[2 * t:2 * t + t * k].view(t, k), local[2 * t + t * k:].view(t, k)
    queries = torch.stack([f[q_max], f[q_min]], dim=2)               # [T, D, 2]
    to_max = torch.bmm(f[r_max], queries).mean(dim=1)                # [T, 2]: s(q⁺, E⁺), s(q⁻, E⁺)
    to_min = torch.bmm(f[r_min], queries).mean(dim=1)                # [T, 2]: s(q⁺, E⁻), s(q⁻, E⁻)
    return (to_max[:, 0] - to_min[:, 0]) - (to_max[:, 1] - to_min[:, 1])


def task_deltas(material: Material, cache: EmbeddingCache) -> pd.DataFrame:
    """One row per task of the bank: its keys and Δ (embeddings computed once per image)."""
    rows = [(item, t, task) for item, tasks in material.tasks.items() for t, task in enumerate(tasks)]
    ids = sorted(material.images)
    index = {i: n for n, i in enumerate(ids)}
    feats = cache.features(ids, lambda i: Image.open(material.image_path(i)).convert("RGB"))
    out = []
    by_k: dict[int, list] = {}
    for row in rows:
        by_k.setdefault(len(row[2].ref_max), []).append(row)
    for group in by_k.values():
        deltas = similarity_deltas(
            feats, torch.tensor([index[r[2].query_max] for r in group]),
            torch.tensor([index[r[2].query_min] for r in group]),
            torch.tensor([[index[i] for i in r[2].ref_max] for r in group]),
            torch.tensor([[index[i] for i in r[2].ref_min] for r in group]))
        out += [(r[0].model_id, r[0].kind, r[0].layer, r[0].unit, r[1], float(d)) for r, d in zip(group, deltas)]
    df = pd.DataFrame(out, columns=TASK_KEYS + ["delta"])
    return df.sort_values(TASK_KEYS, ignore_index=True)


def unit_scores(deltas: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """Per unit: mis (mean σ(αΔ)), mis_hard (share Δ > 0), n_tasks and mean Δ."""
    d = deltas.assign(p=sigmoid(alpha * deltas["delta"].to_numpy()), hard=(deltas["delta"] > 0).astype(float))
    g = d.groupby(UNIT_KEYS, sort=True).agg(mis=("p", "mean"), mis_hard=("hard", "mean"), n_tasks=("delta", "size"),
                                             delta_mean=("delta", "mean")).reset_index()
    return g.assign(status="ok")


def with_status(scores: pd.DataFrame, status: pd.DataFrame | None) -> pd.DataFrame:
    """Add the units that have no tasks (dead / pruned / skipped) from the bank's ``units.csv``."""
    if status is None or status.empty:
        return scores
    missing = status[status["status"] != "ok"][UNIT_KEYS + ["status"]]
    missing = missing.merge(scores[UNIT_KEYS], on=UNIT_KEYS, how="left", indicator=True)
    missing = missing[missing["_merge"] == "left_only"].drop(columns="_merge")
    extra = missing.assign(mis=np.nan, mis_hard=np.nan, n_tasks=0, delta_mean=np.nan)
    out = pd.concat([scores, extra], ignore_index=True).sort_values(UNIT_KEYS, ignore_index=True)
    if "fv_valid" in status:     # whether the unit's feature visualizations drive it (synthetic rows only)
        valid = status[UNIT_KEYS + ["fv_valid"]].drop_duplicates(UNIT_KEYS)
        out = out.drop(columns=["fv_valid"], errors="ignore").merge(valid, on=UNIT_KEYS, how="left")
    return out


def shared_units(units: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(kept, left_out)``: the rows of units that every model with rows of that kind has, and the others.

    The study compares the same units across models; a unit made for some models only (``sparsight stimuli
    --model M --unit L:U``) would enter those models' means and not the others'."""
    keys = units[["kind", "layer", "unit"]].astype(str).agg(":".join, axis=1)
    present = units.groupby(keys)["model_id"].transform("nunique")
    every = units.groupby("kind")["model_id"].transform("nunique")
    shared = present == every
    return units[shared].reset_index(drop=True), units[~shared].reset_index(drop=True)


def bootstrap_ci(values: np.ndarray, n_boot: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean (NaN when there are fewer than two values or no resamples)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2 or n_boot <= 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def model_scores(units: pd.DataFrame, n_boot: int, seed: int = 0) -> pd.DataFrame:
    """Per model and reference kind: mean MIS over live units with a bootstrap CI, and the units left out."""
    rows = []
    for (model_id, kind), g in units.groupby(["model_id", "kind"], sort=True):
        ok = g[g["status"] == "ok"]
        lo, hi = bootstrap_ci(ok["mis"].to_numpy(), n_boot, seed)
        invalid = _fv_invalid(ok) if kind == "synthetic" else pd.Series(False, index=ok.index)
        rows.append({"model_id": model_id, "kind": kind, "units": len(ok), "mis": ok["mis"].mean(),
                     "mis_ci_low": lo, "mis_ci_high": hi, "mis_hard": ok["mis_hard"].mean(),
                     "dead": int((g["status"] == "dead").sum()), "pruned": int((g["status"] == "pruned").sum()),
                     "skipped": int((~g["status"].isin(["ok", "dead", "pruned"])).sum()),
                     "fv_invalid": int(invalid.sum()) if kind == "synthetic" else 0,
                     "mis_valid_fv": ok.loc[~invalid, "mis"].mean()})
    return pd.DataFrame(rows, columns=MODEL_COLUMNS[:12])


def _fv_invalid(units: pd.DataFrame) -> pd.Series:
    """Units whose feature visualizations do not reach their natural max references (unknown counts as valid)."""
    if "fv_valid" not in units:
        return pd.Series(False, index=units.index)
    return units["fv_valid"].map(lambda v: v is False or v == 0 or str(v).lower() == "false")


# ---- α from human responses ---------------------------------------------------------------
@dataclass
class AlphaFit:
    alpha: float
    se: float
    ci_low: float
    ci_high: float
    n: int
    log_likelihood: float


def fit_alpha(delta: np.ndarray, correct: np.ndarray) -> AlphaFit:
    """Maximum-likelihood α of P(correct) = σ(α·Δ) (logistic regression without intercept), Wald 95 % CI."""
    import statsmodels.api as sm
    delta, correct = np.asarray(delta, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    if len(delta) < 2 or np.allclose(delta, 0):
        raise ValueError(f"cannot fit α from {len(delta)} responses with Δ all zero or too few responses")
    res = sm.Logit(correct, delta[:, None]).fit(disp=0, method="newton", maxiter=100)
    alpha, se = float(res.params[0]), float(res.bse[0])
    return AlphaFit(alpha, se, alpha - 1.959964 * se, alpha + 1.959964 * se, len(delta), float(res.llf))


def human_trials(responses: pd.DataFrame, deltas: pd.DataFrame) -> pd.DataFrame:
    """Main (non-catch) trials of included human participants, with the Δ of their task."""
    return human_main_responses(responses, included_only=True).merge(deltas, on=TASK_KEYS, how="inner")


def calibration(trials: pd.DataFrame, folds: int = 5, seed: int = 0) -> dict:
    """α fitted on all trials, and how well α from other units predicts each held-out unit's human accuracy:
    Pearson r, and the slope/intercept of observed on predicted accuracy (1 and 0 when calibrated)."""
    fit = fit_alpha(trials["delta"].to_numpy(), trials["correct"].to_numpy())
    units = trials[UNIT_KEYS].drop_duplicates().reset_index(drop=True)
    k = min(folds, len(units))
    out = {"alpha": fit.alpha, "alpha_se": fit.se, "alpha_ci": [fit.ci_low, fit.ci_high], "responses": fit.n,
           "units": len(units), "folds": k}
    if k < 2:
        return out
    fold_of = np.random.default_rng(seed).permutation(len(units)) % k
    units = units.assign(fold=fold_of)
    t = trials.merge(units, on=UNIT_KEYS)
    predicted, observed = [], []
    for f in range(k):
        train, test = t[t["fold"] != f], t[t["fold"] == f]
        a = fit_alpha(train["delta"].to_numpy(), train["correct"].to_numpy()).alpha
        per_unit = test.assign(p=sigmoid(a * test["delta"].to_numpy())).groupby(UNIT_KEYS)
        predicted += list(per_unit["p"].mean())
        observed += list(per_unit["correct"].mean())
    predicted, observed = np.array(predicted), np.array(observed, dtype=np.float64)
    if len(predicted) > 2 and predicted.std() > 0 and observed.std() > 0:
        slope, intercept = np.polyfit(predicted, observed, 1)
        out.update(heldout_r=float(np.corrcoef(predicted, observed)[0, 1]), calibration_slope=float(slope),
                   calibration_intercept=float(intercept))
    out.update(heldout_mae=float(np.abs(predicted - observed).mean()))
    return out
