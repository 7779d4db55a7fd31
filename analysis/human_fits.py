"""The human side of the report: exclusions, the trial-level fits of accuracy on pruning rate (crossed mixed
logistic model, primary; GEE and cluster-robust logistic regression as checks), each model's equivalence to the base,
the reference-kind comparison, and MIS ↔ human calibration per unit."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from sparsight.config import StudyConfig

from .entries import (Outcome, PER_STEP, PRIMARY, Skip, compared_models, equivalent_count, fmt, fmt_p, holm_count,
                      holm_equivalence, need_margin, pct, rate_term, tost_sentence)
from .load import BASE_METHOD, human_main


MIXED_BOOT = 200        # parametric-bootstrap refits of the mixed logistic model (at most analysis.bootstrap)


@dataclass
class Humans:
    """Human main trials: every participant, and the included ones (after exclusions)."""
    all: pd.DataFrame
    included: pd.DataFrame
    reasons: pd.DataFrame


def split_humans(trials: pd.DataFrame) -> Humans:
    from .descriptives import apply_exclusions
    if trials.empty:
        return Humans(trials, trials, pd.DataFrame(columns=["reason", "participants"]))
    people = trials[~trials["is_machine"].astype(bool)]
    if people.empty:
        return Humans(human_main(trials), human_main(trials), pd.DataFrame(columns=["reason", "participants"]))
    kept, reasons = apply_exclusions(people)
    return Humans(human_main(people), human_main(kept), reasons)


def _need_participants(d: pd.DataFrame, n: int = 2):
    have = d["participant"].nunique() if len(d) else 0
    if have < n:
        raise Skip(f"{have} included participant(s); this analysis needs at least {n}")


def _mixed_fit(d: pd.DataFrame, groups: tuple, by_model: bool, nested: bool, why: str, cfg: StudyConfig,
               level: float) -> tuple[dict, str]:
    from .statistics import mixed_logistic
    res = mixed_logistic(d, "correct ~ rate", groups=groups, n_boot=min(MIXED_BOOT, cfg.analysis.bootstrap),
                         seed=cfg.study.seed, level=level)
    return res, f"conditional (crossed random intercepts, parametric-bootstrap CI, p on the bootstrap SE; {why})"


def _gee_fit(d: pd.DataFrame, groups: tuple, by_model: bool, nested: bool, why: str, cfg: StudyConfig,
             level: float) -> tuple[dict, str]:
    from .statistics import gee_logistic
    group = "model_id" if by_model and nested else "participant"
    res = gee_logistic(d, "correct ~ rate", group=group, level=level)
    note = why if group == "model_id" or not by_model else (
        "participants are crossed with models, which one GEE cluster cannot follow, so model-level variation "
        "is not in the interval")
    return res, (f"marginal (GEE, exchangeable within {group.removesuffix('_id')}, {res['covariance']} SEs, t with "
                 f"{res['df']} df; {note})")


def _clustered_fit(d: pd.DataFrame, groups: tuple, by_model: bool, nested: bool, why: str, cfg: StudyConfig,
                   level: float) -> tuple[dict, str]:
    from .statistics import clustered_logistic
    res = clustered_logistic(d, "correct ~ rate", clusters=groups, level=level)
    return res, f"marginal (logistic, {len(groups)}-way cluster-robust SEs, t with {res['df']} df; {why})"


#: The trial-level fits of human accuracy on pruning rate: name → (title, in the Holm family, fit).  The mixed
#: model is the primary one; the marginal fits check it.
TRIAL_FITS = {"mixed": ("mixed logistic, primary", PRIMARY, _mixed_fit), "gee": ("GEE", "", _gee_fit),
              "clustered": ("cluster-robust logistic", "", _clustered_fit)}


def human_slope(humans: pd.DataFrame, kind: str, model: str, cfg: StudyConfig) -> Outcome:
    """Human accuracy of ``kind`` on pruning rate by the trial-level fit ``model`` (:data:`TRIAL_FITS`)."""
    from .statistics import model_intercept
    if model not in TRIAL_FITS:
        raise ValueError(f"unknown trial-level fit {model!r}; choose from {sorted(TRIAL_FITS)}")
    level, alpha = 1 - cfg.analysis.alpha_level, cfg.analysis.alpha_level
    d = humans[humans["kind"] == kind]
    if d["rate"].isna().all():
        raise Skip("the trials carry no pruning rate (import a 'rate' column, or use model ids of the study)")
    d = d[d["rate"].notna()]
    _need_participants(d, 3)
    if d["rate"].nunique() < 2:
        raise Skip(f"human {kind} trials cover {d['rate'].nunique()} pruning rate(s); a slope needs two or more")
    by_model, nested, why = model_intercept(d)
    groups = ("participant", "unit_id", "model_id") if by_model else ("participant", "unit_id")
    res, what = TRIAL_FITS[model][2](d, groups, by_model, nested, why, cfg, level)
    t, b0 = rate_term(res), res["terms"]["Intercept"]["coef"]
    odds = {k: math.exp(t[k] * PER_STEP) for k in ("coef", "ci_low", "ci_high")}
    lo_rate, hi_rate = float(d["rate"].min()), float(d["rate"].max())
    if model == "mixed":        # averaged over the participants' and units' random intercepts, as the data are
        from .statistics import averaged_accuracy, random_intercept_sd
        sd = random_intercept_sd(res)
        p_lo, p_hi = (float(averaged_accuracy(b0 + t["coef"] * r, sd)) for r in (lo_rate, hi_rate))
    else:
        p_lo, p_hi = (1 / (1 + math.exp(-(b0 + t["coef"] * r))) for r in (lo_rate, hi_rate))
    change = "fell" if t["coef"] < 0 else "rose"
    sig = "" if t["p"] < alpha else f" — not significant at α = {alpha:g}"
    sentence = (f"Human accuracy ({kind}) {change}: odds ratio {fmt(odds['coef'])} per 10 % pruning rate "
                f"({pct(level)} CI {fmt(odds['ci_low'])} to {fmt(odds['ci_high'])}; {fmt_p(t['p'])}){sig}; "
                f"predicted accuracy {fmt(p_lo)} at rate {lo_rate:g} and {fmt(p_hi)} at rate {hi_rate:g} — {what}.")
    result = {k: v for k, v in res.items() if k not in ("table", "boot_draws", "boot_sd_draws")}
    result.update(kind=kind, odds_ratio_per_10pct=odds, rate_min=lo_rate, rate_max=hi_rate,
                  participants=int(d["participant"].nunique()), accuracy_at_rate_min=p_lo, accuracy_at_rate_max=p_hi)
    if model == "mixed":
        from .statistics import predicted_change
        shift = predicted_change(res, lo_rate, hi_rate, level=level, margin=cfg.analysis.tost_margin, alpha=alpha)
        if shift is not None:
            result["change"] = shift
            over = "participants, units and models" if by_model else "participants and units"
            sentence += (f" The accuracy change from rate {lo_rate:g} to {hi_rate:g}, averaged over {over}, is "
                         f"{fmt(shift['estimate'])} "
                         f"({pct(level)} bootstrap CI {fmt(shift['ci_low'])} to {fmt(shift['ci_high'])}).")
            if "tost" in shift:
                sentence += " " + tost_sentence("Its equivalence test", shift["tost"])
    return Outcome(sentence, result, p=t["p"], table=res["table"].reset_index())


def human_equivalence(by_model: pd.DataFrame, kind: str, cfg: StudyConfig) -> Outcome:
    """Per pruned model: TOST of (accuracy − base accuracy), SE from the participant-level SEMs."""
    from .statistics import tost_estimate
    need_margin(cfg)
    if by_model.empty or "method" not in by_model or by_model["method"].isna().all():
        raise Skip("the trials name no base and pruned models (import a model_id of the study's models, or "
                   "'method' and 'rate' columns)")
    d = by_model[by_model["kind"] == kind]
    base = d[d["method"] == BASE_METHOD]
    if base.empty or not np.isfinite(base["sem"].iloc[0]):
        raise Skip(f"no human {kind} accuracy on the base model from two or more participants")
    b = base.iloc[0]
    rows = []
    for _, m in d[d["method"] != BASE_METHOD].iterrows():
        se = math.hypot(m["sem"], b["sem"]) if np.isfinite(m["sem"]) else float("nan")
        row = {"model_id": m["model_id"], "rate": m["rate"], "participants": m["participants"],
               "difference": m["accuracy"] - b["accuracy"], "se": se}
        if np.isfinite(se) and se > 0:
            t = tost_estimate(row["difference"], se, cfg.analysis.tost_margin, alpha=cfg.analysis.alpha_level)
            row.update(ci_low=t["ci_low"], ci_high=t["ci_high"], p_tost=t["p"], equivalent=t["equivalent"])
        rows.append(row)
    if not rows:
        raise Skip(f"no pruned model has human {kind} responses")
    table = holm_equivalence(pd.DataFrame(rows), cfg)
    sentence = (f"{equivalent_count(table)} of {compared_models(table)} have human {kind} accuracy equivalent to "
                f"the base model's within ±{cfg.analysis.tost_margin:g} (TOST on the difference of participant "
                f"means){holm_count(table)}.")
    return Outcome(sentence, {"models": table}, table=table)


def condition_pairs(kinds) -> list[tuple[str, str]]:
    """The condition contrasts to test: natural vs synthetic when both exist, else every pair (sorted)."""
    kinds = sorted(set(kinds))
    if {"natural", "synthetic"} <= set(kinds):
        return [("natural", "synthetic")]
    return list(itertools.combinations(kinds, 2))


def kind_comparison(humans: pd.DataFrame, a: str, b: str, cfg: StudyConfig) -> Outcome:
    """Paired comparison of accuracy in conditions ``a`` and ``b`` (by participant; by unit when the
    condition varied between participants)."""
    from .descriptives import paired_comparison
    level = 1 - cfg.analysis.alpha_level
    res = paired_comparison(humans, pair="participant", condition="kind", a=a, b=b, level=level)
    pair_by = "participant"
    if res["n_pairs"] < 2 and humans["unit_id"].nunique() > 1:   # between-participant conditions
        res = paired_comparison(humans, pair="unit_id", condition="kind", a=a, b=b, level=level)
        pair_by = "unit"
    if res["n_pairs"] < 2:
        raise Skip(f"fewer than two participants or units have trials in both {a!r} and {b!r}")
    sentence = (f"Condition {a} gave {fmt(res['mean_a'])} and {b} {fmt(res['mean_b'])} accuracy "
                f"(paired by {pair_by}, n = {res['n_pairs']}): difference {fmt(res['mean_diff'])} "
                f"({pct(1 - cfg.analysis.alpha_level)} CI {fmt(res['ci_low'])} to {fmt(res['ci_high'])}; "
                f"t({res['df']}) = {fmt(res['t'], 2)}, {fmt_p(res['p_t'])}).")
    table = res.pop("per_pair")
    return Outcome(sentence, {**res, "paired_by": pair_by}, p=res["p_t"], table=table)


def pearson_ci(x: np.ndarray, y: np.ndarray, level: float) -> tuple[float, float, tuple[float, float]]:
    """Pearson r, its p-value and a Fisher-z interval (NaN when either variable is constant)."""
    from scipy import stats
    if len(x) < 4 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan"), float("nan"), (float("nan"), float("nan"))
    r, p = stats.pearsonr(x, y)
    z, half = np.arctanh(np.clip(r, -0.999999, 0.999999)), stats.norm.ppf(0.5 + level / 2) / math.sqrt(len(x) - 3)
    return float(r), float(p), (float(np.tanh(z - half)), float(np.tanh(z + half)))


def calibration_check(per_unit: pd.DataFrame, calibration: dict | None, cfg: StudyConfig) -> Outcome:
    """MIS against human accuracy: the correlation over (model, kind, unit) cells describes them, and the
    inference is on the units' means, since a unit's cells in every model and kind are not independent
    (counting each cell once rejected a true null in most simulated studies of ten units)."""
    d = per_unit.dropna(subset=["mis", "accuracy"])
    if len(d) < 3:
        raise Skip(f"{len(d)} unit(s) have both MIS and human responses; a calibration needs at least 3")
    level = 1 - cfg.analysis.alpha_level
    cell_r, _, _ = pearson_ci(d["mis"].to_numpy(float), d["accuracy"].to_numpy(float), level)
    means = d.groupby("unit_id")[["mis", "accuracy"]].mean()
    r, p, (lo, hi) = pearson_ci(means["mis"].to_numpy(float), means["accuracy"].to_numpy(float), level)
    diff = float((d["accuracy"] - d["mis"]).mean())
    result = {"cells": len(d), "units": len(means), "cell_r": cell_r, "pearson_r": r, "r_ci": (lo, hi), "p": p,
              "mean_human_minus_mis": diff, "mean_abs_difference": float((d["accuracy"] - d["mis"]).abs().mean())}
    sentence = (f"Across {len(d)} unit × model × kind cells, MIS and human accuracy correlate with r = "
                f"{fmt(cell_r, 2)}; across the {len(means)} units' means r = {fmt(r, 2)} ({pct(level)} CI "
                f"{fmt(lo, 2)} to {fmt(hi, 2)}; {fmt_p(p)}). Humans score {fmt(abs(diff))} "
                f"{'above' if diff >= 0 else 'below'} the MIS on average.")
    if calibration:
        result["fitted_alpha"] = calibration
        sentence += (f" The MIS slope α was fitted on {calibration.get('responses', '?')} human responses: "
                     f"α = {fmt(calibration.get('alpha'), 2)}.")
    return Outcome(sentence, result, table=d)
