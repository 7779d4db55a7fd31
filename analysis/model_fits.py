"""The model side of the report: unit MIS against pruning rate within units (the primary total effect, the
top-1-adjusted secondary fit, per method, and the sensitivity fits on other unit sets or doses), the dose–response
shape, each model's equivalence to the base, top-1 and Network Dissection per model."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from sparsight.config import CONTROL_METHOD, StudyConfig

from .entries import (Outcome, PER_STEP, Skip, compared_models, equivalent_count, fmt, holm_count, holm_equivalence,
                      need_margin, pct, rate_term, slope_sentence, tost_sentence)
from .load import BASE_METHOD


#: a within-unit slope whose error has fewer degrees of freedom (models less coefficients) says it is uncertain itself
FEW_DF = 5
DOSE_BOOT = 1000        # bootstrap resamples of the dose–response breakpoint (at most analysis.bootstrap)


def ok_units(units: pd.DataFrame) -> pd.DataFrame:
    """The unit × model rows the MIS fits use: live units (status ``ok``) with an MIS and a pruning rate."""
    if units.empty or "mis" not in units:
        return units
    ok = units["mis"].notna() & units["rate"].notna()
    if "status" in units:
        ok &= units["status"] == "ok"
    return units[ok]


def _mis_formula(d: pd.DataFrame) -> str:
    """``mis ~ rate + top1`` when top-1 is known and not collinear with rate across models, else ``mis ~ rate``."""
    per_model = d.drop_duplicates("model_id")[["rate", "top1"]]
    if per_model["top1"].isna().any() or len(per_model) < 3:
        return "mis ~ rate"
    design = np.column_stack([np.ones(len(per_model)), per_model["rate"], per_model["top1"]]).astype(float)
    return "mis ~ rate + top1" if np.linalg.matrix_rank(design, tol=1e-9) == 3 else "mis ~ rate"


def _scope(units: pd.DataFrame, kind: str, series: str | None) -> pd.DataFrame:
    """The rows of one kind's fit: every model, or one series with the rate-0 models the pooled fit has too (the
    base and the retrained control, so a method's slope is not retraining's effect alone)."""
    d = units[units["kind"] == kind]
    if series is not None:
        d = d[d["series"].isin([series, BASE_METHOD, CONTROL_METHOD])]
    if d["rate"].nunique() < 2:
        raise Skip(f"MIS exists at {d['rate'].nunique()} pruning rate(s) only; a slope needs two or more")
    return d


def mis_slope(units, kind, series, cfg: StudyConfig, adjusted: bool = False,
              every_unit: pd.DataFrame | None = None, compare_mixed: bool = True) -> Outcome:
    """The total effect of pruning rate on MIS (primary), or with top-1 as a covariate (``adjusted``: a
    secondary analysis, since accuracy is itself an effect of pruning and adjusting for it removes part of
    the effect asked about).  ``every_unit``: the unit table with the units a model removed or silenced too,
    to count the unit × model pairs the live ones are of (default ``units``).  ``compare_mixed``: fit the unit
    mixed model beside it and say how much narrower its error is."""
    from .statistics import tost_estimate, within_unit_slope
    a = cfg.analysis
    level = 1 - a.alpha_level
    d = _scope(units, kind, series)
    formula = _mis_formula(d) if adjusted else "mis ~ rate"
    if adjusted and "top1" not in formula:
        raise Skip("top-1 is unknown or collinear with the rate across models: there is nothing to adjust for")
    res = within_unit_slope(d, formula=formula, unit="unit_id", model="model_id", level=level)
    t = rate_term(res)
    span = float(d["rate"].max() - d["rate"].min())
    scope = "all methods" if series is None else series
    adjusted = "; adjusted for top-1" if "top1" in formula else ""
    sentence = slope_sentence(f"MIS ({kind}, {scope}{adjusted})", t, level, a.alpha_level)
    sentence += f" Rate 0: {_rate_zero(d)}. Fit: {res['fit']}."
    few = res.get("two_way", True) and res.get("df") is not None and res["df"] < FEW_DF
    if few:
        sentence += (f" Its error comes from how {res.get('n_models')} models scatter about the line (t with "
                     f"{res['df']} df): with so few it is itself uncertain and may be too small by chance.")
    result = {k: v for k, v in res.items() if k != "table"}
    if compare_mixed:
        result["unit_mixed_model"], text = _mixed_comparison(d, formula, level, t, few)
        sentence += text
    live = int((d["status"] == "ok").sum()) if "status" in d else len(d)
    pairs = len(_scope(every_unit[every_unit["rate"].notna()], kind, series)) if every_unit is not None else len(d)
    result.update(kind=kind, scope=scope, rate_span=span, slope_per_10pct=t["coef"] * PER_STEP,
                  live_pairs=live, unit_model_pairs=pairs,
                  rate_min=float(d["rate"].min()), rate_max=float(d["rate"].max()), adjusted=adjusted,
                  unit_pool=_unit_pool(units, kind, cfg))
    if a.tost_margin > 0 and t["se"] > 0:
        tost = tost_estimate(t["coef"] * span, t["se"] * span, a.tost_margin, df=res["df"], alpha=a.alpha_level)
        result["tost"] = tost
        sentence += " " + tost_sentence(f"The predicted MIS change from rate {d['rate'].min():.3g} to "
                                        f"{d['rate'].max():.3g}", tost)
    return Outcome(sentence, result, p=t["p"], table=res["table"].reset_index())


def _mixed_comparison(d: pd.DataFrame, formula: str, level: float, t: dict, few: bool = False) -> tuple[dict, str]:
    """The unit mixed model's slope beside the within-unit one ``t``, and a sentence on how much narrower its
    error is (it takes a model's units as independent), or, where it is wider, that ``t``'s error rests on few
    models (``few``)."""
    from .statistics import unit_mixed_model
    lmm = unit_mixed_model(d, formula=formula, group="unit_id", level=level)
    naive = lmm["terms"]["rate"]
    record = {"coef": naive["coef"], "se": naive["se"], "method": lmm["method"], "fit": lmm["fit"]}
    if not (naive["se"] > 0 and t["se"] > 0):
        return record, ""
    narrower = naive["se"] < t["se"]
    ratio = t["se"] / naive["se"] if narrower else naive["se"] / t["se"]
    return record, (f" The unit mixed model, which takes a model's units as independent, gives "
                    f"{fmt(naive['coef'] * PER_STEP)} per 10 % with a standard error {fmt(ratio, 2)}× "
                    + ("smaller: it leaves out the noise a model's units share." if narrower else
                       "larger: the error above, from few models, is likely too small." if few else "larger."))


def _rate_zero(d: pd.DataFrame) -> str:
    zero = d[d["rate"] == 0].drop_duplicates("model_id")
    names = [{BASE_METHOD: "the base model", CONTROL_METHOD: "the retrained control"}.get(m, m)
             for m in dict.fromkeys(zero.get("method", zero["series"]))]
    copies = f" ({len(zero)} models)" if len(zero) > len(names) else ""
    return (" and ".join(names) or "no model") + copies


def _live_everywhere(d: pd.DataFrame) -> pd.Index:
    """The units live in every model of ``d`` (live rows only)."""
    models = d.groupby("unit_id")["model_id"].nunique()
    return models.index[models == d["model_id"].nunique()]


def _sensitivity_fit(fit_units: pd.DataFrame, kind: str, cfg: StudyConfig, subset: dict, opening: str) -> Outcome:
    """The pooled slope of ``kind`` on ``fit_units`` (a subset or a changed dose), its ``subset`` recorded and its
    sentence opened with what it is fitted on."""
    out = mis_slope(fit_units, kind, None, cfg, compare_mixed=False)
    out.result["subset"] = {"kind": kind, **subset}
    out.sentence = opening + out.sentence
    return out


def mis_slope_same_units(units, kind, cfg: StudyConfig) -> Outcome:
    """The pooled slope on the units live in every model (a sensitivity analysis).  The primary fit compares
    each unit with itself, but only in the models that keep it live, so which units a rate contributes depends
    on the pruning; here every rate has the same units, at the cost of the units pruning removes."""
    d = _scope(units, kind, None)
    keep, total = _live_everywhere(d), d["unit_id"].nunique()
    if len(keep) == total:
        raise Skip(f"every {kind} unit is live in every model: the primary fit already has the same units throughout")
    if len(keep) < 2:
        raise Skip(f"{len(keep)} of {total} {kind} units are live in every model: too few to fit")
    return _sensitivity_fit(units[(units["kind"] != kind) | units["unit_id"].isin(keep)], kind, cfg,
                            {"what": "live in every model", "units": len(keep), "of": total},
                            f"On the {len(keep)} of {total} {kind} units live in every model: ")


def mis_slope_matched(units, kind: str, other: str, cfg: StudyConfig) -> Outcome:
    """The pooled slope of ``kind`` on the units ``other`` has references for, so two reference kinds are
    compared on the same units (their primary fits may cover different ones)."""
    d = _scope(units, kind, None)
    keep = pd.Index(units.loc[units["kind"] == other, "unit_id"].unique()).intersection(d["unit_id"].unique())
    if len(keep) == d["unit_id"].nunique():
        raise Skip(f"{kind} and {other} references already cover the same units")
    if len(keep) < 2:
        raise Skip(f"{len(keep)} unit(s) have both {kind} and {other} references: too few to fit")
    return _sensitivity_fit(units[(units["kind"] != kind) | units["unit_id"].isin(keep)], kind, cfg,
                            {"what": f"with {other} references", "units": len(keep), "of": int(d["unit_id"].nunique())},
                            f"On the {len(keep)} units with {other} references: ")


def mis_slope_valid_fv(units, kind: str, cfg: StudyConfig) -> Outcome:
    """The pooled slope of ``kind`` without the unit × model pairs whose feature visualizations are not valid
    (they do not drive their unit as its natural max references do, so the task asks about something else)."""
    d = _scope(units, kind, None)
    if "fv_valid" not in d:
        raise Skip(f"{kind} references record no visualization validity")
    invalid = d["fv_valid"].astype(str).str.lower() == "false"
    if not invalid.any():
        raise Skip(f"every {kind} visualization is valid: the primary fit already has valid ones only")
    valid = int((~invalid).sum())
    return _sensitivity_fit(units.drop(index=d.index[invalid]), kind, cfg,
                            {"what": "with valid visualizations", "units": valid, "of": len(d)},
                            f"On the {valid} of {len(d)} unit × model pairs with valid visualizations: ")


def mis_slope_retrained(units, kind: str, cfg: StudyConfig) -> Outcome:
    """The pooled slope of ``kind`` without the base model, so rate 0 is the retrained control alone: every model
    then went through the same retraining, and retraining's own effect is not read as pruning's."""
    d = _scope(units, kind, None)
    if not (d["series"] == CONTROL_METHOD).any():
        raise Skip("no retrained control (prune.control): the base is the only model at rate 0")
    if not (d["series"] == BASE_METHOD).any():
        raise Skip(f"the {kind} fit has no base model to leave out")
    kept = units.drop(index=d.index[d["series"] == BASE_METHOD])
    return _sensitivity_fit(kept, kind, cfg, {"what": "retrained models only", "units": int(d["unit_id"].nunique()),
                                              "of": int(d["unit_id"].nunique())},
                            "Without the base model (rate 0: the retrained control): ")


#: the factors of α the MIS is rescored at beside each answer: α sets the MIS scale the margin is on, and a study
#: without people's answers states it rather than fits it
ALPHA_FACTORS = {"half": 0.5, "double": 2.0}


def mis_slope_alpha(units, tasks: pd.DataFrame, kind: str, factor: float, cfg: StudyConfig) -> Outcome:
    """The pooled slope of ``kind`` with every unit's MIS rescored from its tasks' Δ at ``factor`` × the study's
    α (mean σ(α·Δ), as the MIS stage scores them), so an answer that rests on the chosen α shows it."""
    from survey_app.mis import UNIT_KEYS, unit_scores
    d = _scope(units, kind, None)
    if tasks is None or tasks.empty or "delta" not in tasks:
        raise Skip("no task Δ (mis/tasks.csv) to rescore MIS from")
    alpha = d["alpha"].dropna() if "alpha" in d else pd.Series(dtype=float)
    if alpha.empty:
        raise Skip(f"the {kind} MIS records no α")
    rescored_alpha = float(alpha.iloc[0]) * factor
    scores = unit_scores(tasks[tasks["kind"] == kind], rescored_alpha)[UNIT_KEYS + ["mis"]]
    rescored = d.drop(columns="mis").merge(scores, on=UNIT_KEYS, how="inner")
    if len(rescored) < len(d):
        raise Skip(f"{len(d) - len(rescored)} {kind} unit × model pairs have no task Δ to rescore")
    fit_units = pd.concat([units[units["kind"] != kind], rescored], ignore_index=True)
    return _sensitivity_fit(fit_units, kind, cfg, {"what": f"α × {factor:g}", "units": int(d["unit_id"].nunique()),
                                                   "of": int(d["unit_id"].nunique()), "alpha": rescored_alpha},
                            f"With MIS rescored at α = {rescored_alpha:g} (the study's {float(alpha.iloc[0]):g} × "
                            f"{factor:g}): ")


def mis_slope_effective(units, kind: str, cfg: StudyConfig) -> Outcome:
    """The pooled slope of ``kind`` on effective sparsity instead of the requested rate: the share of a model's
    weights removed or left without effect (a structured method's removed channels silence the next layer's
    inputs too), so methods that remove more than they were asked are placed where they are."""
    d = _scope(units, kind, None)
    if "sparsity_effective" not in d or d["sparsity_effective"].isna().any():
        raise Skip(f"the effective sparsity of some {kind} model is not recorded")
    if np.allclose(d["sparsity_effective"].to_numpy(float), d["rate"].to_numpy(float), atol=0.01):
        raise Skip("every model's effective sparsity is its rate: the primary fit already has it")
    as_rate = units.assign(rate=units["sparsity_effective"].where(units["kind"] == kind, units["rate"]))
    top = float(d["sparsity_effective"].max())
    out = _sensitivity_fit(as_rate, kind, cfg, {"what": "effective sparsity as the dose", "units": len(d),
                                                "of": len(d), "dose": "sparsity_effective", "dose_max": top},
                           f"With effective sparsity (up to {top:.2f}) in place of the pruning rate: ")
    out.sentence = out.sentence.replace("per 10 % pruning rate", "per 10 % effective sparsity").replace(
        "from rate", "from sparsity")
    return out


def _unit_pool(units: pd.DataFrame, kind: str, cfg: StudyConfig) -> dict | None:
    """The most units ``kind`` could have in this study, where the study says: visualized units are drawn
    among the units alive in every model (``stimuli.synthetic_units``), and ``units.sampling = "all"``
    already takes every unit of the unit layers; ``None`` where more could be sampled."""
    natural = units[units["kind"] == "natural"] if len(units) else units
    if kind != "natural" and cfg.stimuli.synthetic_units > 0 and len(natural):
        alive = natural[natural["status"] == "ok"].groupby("unit_id")["model_id"].nunique()
        return {"units": int((alive == natural["model_id"].nunique()).sum()),
                "what": "units alive in every model, among which the visualized units are drawn"}
    if cfg.units.sampling == "all" and len(units):
        return {"units": int(units.loc[units["kind"] == kind, "unit_id"].nunique()),
                "what": "units of the unit layers, all of them already in the study"}
    return None


def mis_dose(units, kind, cfg: StudyConfig) -> Outcome:
    """Line vs hinge on the models' within-unit MIS (one point per model; the breakpoint bootstrap resamples
    models), since rate varies only between models."""
    from .statistics import dose_response, model_level_mis
    d = model_level_mis(units[units["kind"] == kind])
    if d["rate"].nunique() < 4:
        raise Skip(f"a dose–response shape needs MIS at 4 or more rates; {kind} has {d['rate'].nunique()}")
    res = dose_response(d["rate"].to_numpy(), d["mis"].to_numpy(), n_boot=min(DOSE_BOOT, cfg.analysis.bootstrap),
                        seed=cfg.study.seed, level=1 - cfg.analysis.alpha_level)
    lin, hin = res["linear"], res["hinge"]
    if res["preferred"] == "hinge":
        lo, hi = res["breakpoint_ci"]
        sentence = (f"MIS ({kind}) follows a hinge better than a line (ΔAIC = {fmt(res['delta_aic'], 1)}): slope "
                    f"{fmt(hin['slope'] * PER_STEP)} per 10 % before rate {hin['breakpoint']:.2f} (bootstrap "
                    f"{pct(1 - cfg.analysis.alpha_level)} CI {fmt(lo, 2)} to {fmt(hi, 2)}) and "
                    f"{fmt(hin['slope_after'] * PER_STEP)} per 10 % after it.")
        grid = np.asarray(res.get("grid", []), dtype=float)
        if len(grid) and lo <= grid.min() + 1e-9 and hi >= grid.max() - 1e-9:
            sentence += (f" The interval spans every candidate breakpoint ({fmt(grid.min(), 2)} to "
                         f"{fmt(grid.max(), 2)}): where the bend lies is not determined.")
    else:
        sentence = (f"MIS ({kind}) is described by a straight line at least as well as by a hinge "
                    f"(ΔAIC = {fmt(res['delta_aic'], 1)}): {fmt(lin['slope'] * PER_STEP)} per 10 % pruning rate.")
    sentence += (f" Fitted to the {len(d)} models' levels of MIS with each unit compared with itself (the "
                 f"breakpoint bootstrap resamples models). Each model counts once here and every live unit in the "
                 f"primary slope, so the two slopes differ where models keep different numbers of live units.")
    result = {k: v for k, v in res.items() if k not in ("breakpoint_boot", "profile_rss", "grid")}
    return Outcome(sentence, result)


def mis_equivalence(units, kind, cfg: StudyConfig) -> Outcome:
    """Per pruned model: paired TOST of its units' MIS against the same units in the base model."""
    from .statistics import tost_paired
    need_margin(cfg)
    d = units[units["kind"] == kind]
    base = d[d["method"] == BASE_METHOD].set_index("unit_id")["mis"]
    if base.empty:
        raise Skip("no base-model MIS to compare the pruned models with")
    rows = []
    for model_id, g in d[d["method"] != BASE_METHOD].groupby("model_id", sort=False):
        g = g.set_index("unit_id")["mis"]
        common = g.index.intersection(base.index)
        row = {"model_id": model_id, "rate": float(d.loc[d["model_id"] == model_id, "rate"].iloc[0]),
               "units": len(common)}
        try:
            t = tost_paired(g[common].to_numpy(), base[common].to_numpy(), cfg.analysis.tost_margin,
                            alpha=cfg.analysis.alpha_level)
            row.update(difference=t["estimate"], ci_low=t["ci_low"], ci_high=t["ci_high"], p_tost=t["p"],
                       equivalent=t["equivalent"])
        except ValueError as err:
            row.update(difference=np.nan, ci_low=np.nan, ci_high=np.nan, p_tost=np.nan, equivalent=None,
                       note=str(err))
        rows.append(row)
    if not rows:
        raise Skip("no pruned model has MIS")
    table = holm_equivalence(pd.DataFrame(rows).sort_values(["rate", "model_id"], ignore_index=True), cfg)
    sentence = (f"{equivalent_count(table)} of {compared_models(table)} have {kind} MIS equivalent to the base "
                f"model's within ±{cfg.analysis.tost_margin:g} (paired TOST over units, α = "
                f"{cfg.analysis.alpha_level:g}){holm_count(table)}." + _retraining_note(table))
    return Outcome(sentence, {"models": table}, table=table)


def _retraining_note(table: pd.DataFrame) -> str:
    """The mean difference from the base at each rate and, without a model pruned at rate 0, that the base was not
    retrained as every pruned model was: a difference already at the lowest rate may be retraining's, not
    pruning's, and neither a line nor a hinge over rates separates the two."""
    by_rate = table.groupby("rate")["difference"].mean().dropna()
    if by_rate.empty:
        return ""
    lower = int((table["difference"] < 0).sum())
    text = (f" Mean difference from the base by rate: "
            f"{', '.join(f'{fmt(v)} at {r:g}' for r, v in by_rate.items())}; {lower} of "
            f"{int(table['difference'].notna().sum())} models below it.")
    if (table["rate"] == 0).any():
        return text + (" At rate 0 nothing was pruned (the retrained control): that difference is what retraining "
                       "alone does.")
    return (text + " The base model was not retrained as the pruned models were, so a difference already at the "
            "lowest rate may come from retraining, not pruning; the retrained control (prune.control) tells them "
            "apart.")


def _at_top_rate(g: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """A series' models at its highest rate (several where the study retrains copies) and how to say so."""
    at = g[g["rate"] == g["rate"].max()]
    return at, (f", mean of {len(at)} retrained copies" if len(at) > 1 else "")


def top1_summary(models: pd.DataFrame) -> Outcome:
    d = models[np.isfinite(models["top1"].astype(float))]
    if d.empty:
        raise Skip("no model has a top-1 accuracy")
    base = d[d["method"] == BASE_METHOD]
    pruned = d[d["method"] != BASE_METHOD]
    parts = [f"base top-1 {fmt(float(base['top1'].iloc[0]))}" if len(base) else "no base model"]
    for s, g in pruned.groupby("series"):
        at, copies = _at_top_rate(g)
        parts.append(f"{s}: {fmt(float(at['top1'].mean()))} at rate {at['rate'].iloc[0]:g} (sparsity "
                     f"{fmt(float(at['sparsity'].mean()))}{copies})")
    table = d[["model_id", "series", "rate", "sparsity", "top1", "top1_before"]]
    return Outcome("Top-1 after retraining — " + "; ".join(parts) + ".", {"models": table}, table=table)


def dissection_summary(table: pd.DataFrame, why_none: str | None = None) -> Outcome:
    if "interpretable" not in table or table["interpretable"].isna().all():
        raise Skip(f"no Network Dissection results (dissection/models.csv) exist{': ' + why_none if why_none else ''}")
    d = table[table["interpretable"].notna()]
    base = d[d["method"] == BASE_METHOD]

    def share(row) -> str:      # pruning removes units: the count alone mixes fewer units with fewer interpretable ones
        frac = row.get("interpretable_fraction_alive", math.nan)
        alive = row.get("dissection_alive", math.nan)
        return (f" ({fmt(100 * frac, 1)} % of {int(alive)} live)" if pd.notna(frac) and pd.notna(alive) else "")

    parts = [f"base {int(base['interpretable'].iloc[0])} interpretable units{share(base.iloc[0])}, "
             f"{int(base['unique_concepts'].iloc[0])} unique concepts" if len(base) else "no base model"]
    thinned = []        # share up, count down: fewer units, not more interpretable ones
    for s, g in d[d["method"] != BASE_METHOD].groupby("series"):
        at, copies = _at_top_rate(g)
        if len(base) and "interpretable_fraction_alive" in at and (
                at["interpretable_fraction_alive"].mean() > base["interpretable_fraction_alive"].iloc[0]
                and at["interpretable"].mean() < base["interpretable"].iloc[0]):
            thinned.append(s)
        if len(at) == 1:
            top = at.iloc[0]
            parts.append(f"{s} at rate {top['rate']:g}: {int(top['interpretable'])}{share(top)} and "
                         f"{int(top['unique_concepts'])}")
        else:
            parts.append(f"{s} at rate {at['rate'].iloc[0]:g}: {fmt(float(at['interpretable'].mean()), 1)} and "
                         f"{fmt(float(at['unique_concepts'].mean()), 1)}{copies}")
    cols = [c for c in ("model_id", "series", "rate", "sparsity", "interpretable", "interpretable_fraction_alive",
                        "unique_concepts", "dissection_units", "dissection_alive") if c in d]
    sentence = "Network Dissection — " + "; ".join(parts) + "."
    if thinned:
        sentence += (f" For {', '.join(thinned)} the interpretable share of live units rises while their number "
                     f"falls: pruning removed units faster than it removed interpretable ones, which is no gain in "
                     f"interpretable units.")
    return Outcome(sentence, {"models": d[cols]}, table=d[cols])
