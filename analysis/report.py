"""The study report: every analysis that its data allow, as ``report/index.html`` and ``report/results.json``.

:func:`analyze` reads a study directory (:mod:`analysis.load`), runs

* **model side** (needs ``mis/units.csv``): per reference kind, the slope of unit MIS on pruning rate
  within units (``mis ~ rate``, and ``+ top1`` as the secondary analysis; errors clustered by unit and
  model, with the unit mixed model beside it) pooled over methods and per method,
  the dose–response shape (line vs hinge), equivalence of the MIS change over the studied rates
  within ``analysis.tost_margin`` (TOST), and per pruned model a paired TOST of its units' MIS
  against the same units in the base model (also Holm-adjusted over the models); top-1 and Network Dissection counts per model;
* **human side** (needs human main trials): exclusions, accuracy per condition (± 2 SEM over
  participants, Wilson intervals, d′), per-unit bootstrap CIs, RTs, accuracy by confidence, the
  natural-vs-synthetic paired comparison, the rate slope by a crossed mixed logistic model (primary)
  with GEE and two-way cluster-robust logistic regression as checks, per-model equivalence to the
  base, and MIS ↔ human calibration per unit;

and writes the figures (:mod:`analysis.figures`), a self-contained HTML page (figures embedded as
base64 PNG) with a plain-language sentence generated from the numbers of every test, and a
machine-readable JSON file.  Slope tests form two Holm families: the primary ones (the pooled MIS
slope and the primary human slope, per kind), which the answers rest on, and the exploratory per-method
MIS slopes, adjusted among themselves.  Each analysis runs only when its data exist; one that cannot run (too few
participants, no variation in rate, a fit that fails) becomes an entry saying why — never a crash.
"""
from __future__ import annotations

import base64
import datetime as _dt
import functools
import itertools
import json
import math
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from sparsight.config import CONTROL_METHOD, StudyConfig
from sparsight.files import atomic_write_text
from sparsight.layout import REPORT_HTML, REPORT_JSON, Layout

from . import figures as fig
from .gallery import make_gallery
from .methods import methods
from .power import smallest_display, study_power
from .validity import study_checks
from .load import (BASE_METHOD, StudyData, base_at_chance, human_main, load_study_data, model_table, study_config,
                   unreadable_images)

PER_STEP = 0.1          # slopes are reported per 10 percentage points of pruning rate
MIXED_BOOT = 200        # parametric-bootstrap refits of the mixed logistic model (at most analysis.bootstrap)
DOSE_BOOT = 1000        # bootstrap resamples of the dose–response breakpoint (at most analysis.bootstrap)
NO_RESPONSES = "No responses exist yet"
FIGURE_CAPTIONS = {
    "interpretability": "MIS (circles, bootstrap 95 % CI over units) and human accuracy (squares, Wilson 95 % CI) "
                        "vs measured sparsity, per pruning method (points of one sparsity set slightly apart); "
                        "dotted line: chance (0.5). Each point averages the model's live units, a set that shrinks "
                        "where pruning silences units; the primary slope compares each unit with itself instead.",
    "top1": "Top-1 validation accuracy vs sparsity after retraining (dotted: just after the last pruning step, "
            "before its retraining; an iterative model was retrained after each earlier step, so its dotted point "
            "is not the one-shot drop; dashed grey: chance, one class for every image).",
    "layers": "MIS per layer (mean ± SEM over the layer's units, not the bootstrap CIs of the other figures) vs "
              "sparsity, one row of layers per reference kind (synthetic: the visualized units of the layer only; "
              "points of one sparsity set slightly apart).",
    "mis_vs_human": "Per unit: MIS against human accuracy, with the identity line.",
    "dissection": "Network Dissection: interpretable units, their share of the live (not removed, not dead) "
                  "units, and unique concepts vs sparsity (axes from zero).",
    "robustness": "Robustness: top-1 under corruption vs severity, and noise similarity to the parent (top-1 "
                  "agreement) vs ε, the half-width of uniform noise added to the normalized input (units of a "
                  "channel's standard deviation), one line per pruning rate (base in black); shaded: 95 % Wilson "
                  "interval over the images.",
}


#: The Holm families: the tests the answers rest on, and the exploratory per-method slopes.
PRIMARY, PER_METHOD = "primary", "per-method"


class Skip(Exception):
    """An analysis whose data do not exist: reported with the reason, not run."""


@dataclass
class Outcome:
    sentence: str
    result: dict = field(default_factory=dict)
    p: float | None = None
    table: pd.DataFrame | None = None


@dataclass
class Entry:
    id: str
    title: str
    group: str
    family: str = ""                # the Holm family it is adjusted in (PRIMARY, PER_METHOD), "" for none
    status: str = "ok"
    reason: str = ""
    sentence: str = ""
    result: dict = field(default_factory=dict)
    p: float | None = None
    p_holm: float | None = None
    table: pd.DataFrame | None = None
    warnings: list = field(default_factory=list)

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in ("id", "title", "group", "status", "reason", "sentence", "p", "p_holm")}
        out["holm_family"] = self.family
        out["result"] = self.result
        if self.table is not None:
            out["table"] = self.table
        out["warnings"] = self.warnings
        return out


def skipped(reason: str):
    """An analysis function that only reports why it cannot run."""
    def fn():
        raise Skip(reason)
    return fn


def run_analysis(entries: list, id: str, title: str, group: str, fn, *, family: str = "") -> Entry:
    """Run ``fn() -> Outcome`` into an :class:`Entry`; Skip and any error become an explained entry."""
    entry = Entry(id, title, group, family=family)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = fn()
            entry.sentence, entry.result, entry.p, entry.table = out.sentence, out.result, out.p, out.table
        except Skip as why:
            entry.status, entry.reason = "skipped", str(why)
        except Exception as err:  # noqa: BLE001 - a failed analysis is reported, never fatal
            entry.status, entry.reason = "failed", f"{type(err).__name__}: {err}"
            entry.result = {"traceback": traceback.format_exc(limit=4)}
    entry.warnings = sorted({f"{w.category.__name__}: {w.message}" for w in caught}
                            | set(entry.result.get("warnings", []) if isinstance(entry.result, dict) else []))
    entries.append(entry)
    return entry


# ---- number formatting -----------------------------------------------------------------------------
def fmt_p(p) -> str:
    if p is None or not np.isfinite(p):
        return "p = n/a"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def fmt(x, digits: int = 3) -> str:
    """``x`` at ``digits`` decimals with a true minus sign; a nonzero value that would round to zero gets the
    decimals it needs (up to 6), so "−0.000" never hides a sign or a size; a smaller one shows as zero."""
    if x is None or not np.isfinite(x):
        return "n/a"
    wider = next((d for d in range(digits, 7) if round(x, d) != 0), digits)
    text = f"{x:.{wider}f}"
    if float(text) == 0:
        text = text.lstrip("-")
    return text.replace("-", "−")


def _pct(level: float) -> str:
    return f"{100 * level:g} %"


def _rate_term(res: dict, term: str = "rate") -> dict:
    if term not in res.get("terms", {}):
        raise ValueError(f"the fit has no {term!r} term; terms: {sorted(res.get('terms', {}))}")
    return res["terms"][term]


def slope_sentence(subject: str, t: dict, level: float, alpha: float, unit: str = "") -> str:
    """E.g. "MIS decreased by 0.040 per 10 % pruning rate (95 % CI −0.052 to −0.028; p < 0.001)"."""
    b, lo, hi = (t[k] * PER_STEP for k in ("coef", "ci_low", "ci_high"))
    change = f"{'decreased' if b < 0 else 'increased'} by {fmt(abs(b))}{unit}"
    sig = t["p"] < alpha
    tail = "" if sig else f" — not significant at α = {alpha:g}"
    return (f"{subject} {change} per 10 % pruning rate ({_pct(level)} CI {fmt(lo)} to "
            f"{fmt(hi)}; {fmt_p(t['p'])}){tail}.")


def tost_sentence(subject: str, tost: dict) -> str:
    verdict = (f"equivalent within ±{tost['margin']:g}" if tost["equivalent"]
               else f"not shown to be equivalent within ±{tost['margin']:g}")
    level = 1 - 2 * tost["alpha"]
    return (f"{subject}: {fmt(tost['estimate'])} ({_pct(level)} CI {fmt(tost['ci_low'])} to {fmt(tost['ci_high'])}), "
            f"{verdict} (TOST {fmt_p(tost['p'])}).")


# ---- model side ------------------------------------------------------------------------------------
def _ok_units(units: pd.DataFrame) -> pd.DataFrame:
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
    t = _rate_term(res)
    span = float(d["rate"].max() - d["rate"].min())
    scope = "all methods" if series is None else series
    adjusted = "; adjusted for top-1" if "top1" in formula else ""
    sentence = slope_sentence(f"MIS ({kind}, {scope}{adjusted})", t, level, a.alpha_level)
    sentence += f" Rate 0: {_rate_zero(d)}. Fit: {res['fit']}."
    result = {k: v for k, v in res.items() if k != "table"}
    if compare_mixed:
        result["unit_mixed_model"], text = _mixed_comparison(d, formula, level, t)
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


def _mixed_comparison(d: pd.DataFrame, formula: str, level: float, t: dict) -> tuple[dict, str]:
    """The unit mixed model's slope beside the within-unit one ``t``, and a sentence on how much narrower its
    error is (it takes a model's units as independent)."""
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
                    + ("smaller: it leaves out the noise a model's units share." if narrower else "larger."))


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


def _verdict(res: dict, p: float, alpha: float) -> str:
    """An effect (slope test at ``alpha``), equivalence (the fit's TOST) or inconclusive."""
    tost = res.get("tost")
    return "effect" if p < alpha else "equivalent" if tost is not None and tost["equivalent"] else "inconclusive"


def _change_text(res: dict, alpha: float) -> str:
    """E.g. "−0.028 (95 % CI −0.055 to −0.002; p = 0.034)": a fit's change over its rate span."""
    t, span = res["terms"]["rate"], res["rate_span"]
    return (f"{fmt(t['coef'] * span)} ({_pct(1 - alpha)} CI {fmt(t['ci_low'] * span)} to {fmt(t['ci_high'] * span)}; "
            f"{fmt_p(t['p'])})")


#: The sensitivity fits beside an answer: id prefix → (how their sentence begins, with ``{n}``/``{of}`` their
#: counts; what a disagreement means; whether an agreeing one is left out of the answer).
SENSITIVITY = {
    "mis_slope_same_units.": ("Same units throughout: on the {n} of {of} units live in every model",
                              "the answer depends on which units are counted (the units live in every model change "
                              "differently from those pruning removes somewhere)", False),
    "mis_slope_valid_fv.": ("Valid visualizations only: on the {n} of {of} unit × model pairs whose visualizations "
                            "drive their unit", "the answer rests on visualizations that do not show what drives "
                            "their unit", False),
    "mis_slope_effective.": ("With effective sparsity as the dose (up to {top:.2f}: what structured methods remove "
                             "beyond their rate counted)", "the answer depends on whether the dose is the rate asked "
                             "for or the weights in effect removed", True)}


def _sensitivity_sentences(kind: str, verdict: str, entries: list, alpha: float) -> tuple[list[str], list[dict]]:
    """What the sensitivity fits say beside ``kind``'s answer (:data:`SENSITIVITY`: whether each agrees), and
    the other kinds' fits on the units ``kind`` has references for."""
    sentences, records = [], []
    matched = f"mis_slope_matched.{kind}."
    for e in entries:
        spec = next((v for prefix, v in SENSITIVITY.items() if e.id == f"{prefix}{kind}"), None)
        if e.status != "ok" or (spec is None and not e.id.startswith(matched)):
            continue
        res, sub = e.result, e.result["subset"]
        own = _verdict(res, res["terms"]["rate"]["p"], alpha)
        records.append({"analysis": e.id, "verdict": own, "agrees": own == verdict, **sub})
        change = f"MIS changes by {_change_text(res, alpha)}"
        if spec is None:
            sentences.append(f"{sub['kind'].capitalize()} references on the same {sub['units']} units: {change}.")
            continue
        opening, meaning, quiet = spec
        if own == verdict and quiet:
            continue
        sentences.append(opening.format(n=sub["units"], of=sub["of"], top=sub.get("dose_max", 0.0)) + f", {change}, "
                         + ("which agrees." if own == verdict else
                            f"{'an effect' if own == 'effect' else own}, where the answer above is {verdict}: "
                            f"{meaning}."))
    return sentences, records


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


def answers(entries: list, cfg: StudyConfig) -> list[dict]:
    """One answer to the study's question per reference kind, from its primary slope (total effect, all
    methods): an effect, equivalence within the margin, or inconclusive with what it would take to decide."""
    a = cfg.analysis
    out = []
    for e in entries:
        if not e.id.startswith("mis_slope.") or not e.id.endswith(".all") or e.status != "ok":
            continue
        kind, res = e.result["kind"], e.result
        t = res["terms"]["rate"]
        span, tost = res["rate_span"], res.get("tost")
        change = t["coef"] * span
        p = e.p_holm if e.p_holm is not None else t["p"]
        verdict = _verdict(res, p, a.alpha_level)
        if verdict == "effect":
            sentence = (f"Yes, for {kind} references: MIS {'falls' if change < 0 else 'rises'} by {fmt(abs(change))} "
                        f"from rate {res['rate_min']:g} to {res['rate_max']:g} "
                        f"({fmt(t['coef'] * PER_STEP)} per 10 % pruning rate, {_pct(1 - a.alpha_level)} CI "
                        f"{fmt(t['ci_low'] * PER_STEP)} to {fmt(t['ci_high'] * PER_STEP)}; {fmt_p(p)}"
                        f"{', Holm-adjusted' if e.p_holm is not None else ''}).")
        elif verdict == "equivalent":
            sentence = (f"No, for {kind} references: from rate {res['rate_min']:g} to {res['rate_max']:g} MIS changes "
                        f"by {fmt(change)} "
                        f"({_pct(1 - 2 * a.alpha_level)} CI {fmt(tost['ci_low'])} to {fmt(tost['ci_high'])}), "
                        f"inside the equivalence margin ±{a.tost_margin:g} (TOST {fmt_p(tost['p'])}).")
        else:
            what = _what_decides(res, t, change, span, a)
            if what is None:
                what = (f"the estimated change {fmt(change)} is as large as the margin ±{a.tost_margin:g}, so only "
                        f"more units and models can tell whether it is real")
            ci = f"{fmt(t['ci_low'] * span)} to {fmt(t['ci_high'] * span)}"
            if tost is not None:
                ci += (f"; {_pct(1 - 2 * a.alpha_level)} CI {fmt(tost['ci_low'])} to {fmt(tost['ci_high'])}, the one "
                       f"equivalence needs inside ±{a.tost_margin:g}")
            sentence = (f"Inconclusive for {kind} references: the MIS change from rate {res['rate_min']:g} to "
                        f"{res['rate_max']:g} is {fmt(change)} "
                        f"({_pct(1 - a.alpha_level)} CI {ci}): neither an effect nor equivalence within "
                        f"±{a.tost_margin:g}; {what}.")
        extra, sensitivity = _sensitivity_sentences(kind, verdict, entries, a.alpha_level)
        sentence = " ".join([sentence, *extra])
        out.append({"kind": kind, "observer": "MIS", "verdict": verdict, "sentence": sentence, "analysis": e.id,
                    "sensitivity": sensitivity,
                    "model_noise": bool(res.get("two_way", True)), "models": res.get("n_models"),
                    "live_pairs": res.get("live_pairs"), "unit_model_pairs": res.get("unit_model_pairs"),
                    "pool": (res.get("unit_pool") or {}).get("what")})
    return out + [human_answer(e, cfg) for e in entries
                  if e.id.startswith("human_slope.") and e.id.endswith(".mixed") and e.status == "ok"]


def human_answer(e, cfg: StudyConfig) -> dict:
    """The answer from people for one reference kind, from the primary human fit (mixed logistic, its
    accuracies averaged over the participants' and units' random intercepts): an effect (Holm-adjusted slope
    test), equivalence (TOST of the accuracy change over the rate span on its bootstrap SE, as for MIS), or
    inconclusive.  The change and its interval come from
    the bootstrap refits (intercept and slope together); with too few refits the slope's interval is mapped
    through the fitted intercept, and equivalence needs that whole interval inside ±margin."""
    from scipy.special import expit
    a, res = cfg.analysis, e.result
    kind, t, b0 = res["kind"], res["terms"]["rate"], res["terms"]["Intercept"]["coef"]
    lo_rate, hi_rate = res["rate_min"], res["rate_max"]

    def change(slope: float) -> float:
        return float(expit(b0 + slope * hi_rate) - expit(b0 + slope * lo_rate))

    shift = res.get("change")
    if shift is not None:
        est, lo, hi, tost = shift["estimate"], shift["ci_low"], shift["ci_high"], shift.get("tost")
    else:            # too few bootstrap refits: map the slope's interval through the fitted intercept
        est, lo, hi, tost = change(t["coef"]), change(t["ci_low"]), change(t["ci_high"]), None
        lo, hi = min(lo, hi), max(lo, hi)
    p = e.p_holm if e.p_holm is not None else t["p"]
    who = f"people ({res['participants']} included participants)"
    span = (f"from {fmt(res['accuracy_at_rate_min'])} at rate {lo_rate:g} to {fmt(res['accuracy_at_rate_max'])} "
            f"at rate {hi_rate:g}")
    ci = f"{_pct(1 - a.alpha_level)} CI {fmt(lo)} to {fmt(hi)}"
    if tost is not None:
        equivalent = tost["equivalent"]
        within = (f"{_pct(1 - 2 * a.alpha_level)} CI {fmt(tost['ci_low'])} to {fmt(tost['ci_high'])} inside the "
                  f"equivalence margin ±{a.tost_margin:g} (TOST {fmt_p(tost['p'])})")
    else:
        equivalent = bool(a.tost_margin) and -a.tost_margin < lo and hi < a.tost_margin
        within = f"inside the equivalence margin ±{a.tost_margin:g}"
    if p < a.alpha_level:
        verdict = "effect"
        sentence = (f"Yes, for {kind} references, by {who}: accuracy {'falls' if est < 0 else 'rises'} {span}, a "
                    f"change of {fmt(est)} ({ci}; odds ratio {fmt(res['odds_ratio_per_10pct']['coef'])} per 10 % "
                    f"pruning rate; {fmt_p(p)}{', Holm-adjusted' if e.p_holm is not None else ''}).")
    elif equivalent:
        verdict = "equivalent"
        sentence = f"No, for {kind} references, by {who}: accuracy goes {span}, a change of {fmt(est)} ({ci}), {within}."
    else:
        verdict = "inconclusive"
        sentence = (f"Inconclusive for {kind} references, by {who}: accuracy goes {span}, a change of {fmt(est)} "
                    f"({ci}): neither an effect nor equivalence within ±{a.tost_margin:g}; the power tables below "
                    f"give the participants a decision needs.")
    return {"kind": kind, "observer": "people", "verdict": verdict, "sentence": sentence, "analysis": e.id}


def _environments(run_dir: Path) -> list[dict]:
    """Each distinct machine and software set the study's stages ran on (from their records), with the
    stages that ran there, in stage order; the analysis itself is the one running now."""
    from sparsight.environment import describe, summary
    groups: dict[str, dict] = {}
    records = sorted(Layout(run_dir).stage_records.glob("*.json"), key=lambda p: p.stat().st_mtime)
    found = []
    for path in records:
        try:
            env = json.loads(path.read_text(encoding="utf-8")).get("environment")
        except (OSError, ValueError):
            continue
        if isinstance(env, dict) and path.stem != "analysis":
            found.append((path.stem, env))
    found.append(("analysis", describe()))
    for stage, env in found:
        key = json.dumps(env, sort_keys=True, default=str)
        group = groups.setdefault(key, {"stages": [], "summary": summary(env), **env})
        group["stages"].append(stage)
    return list(groups.values())


def _what_decides(res: dict, t: dict, change: float, span: float, a) -> str | None:
    """What an inconclusive primary slope needs for equivalence: more units per model, or more models when
    the models' own noise alone keeps the interval too wide; ``None`` when the change is as large as the margin.

    The slope's variance splits into the units' part (shrinking as 1/units) and the model level's
    (``model_variance_share`` of it, which more units do not shrink).
    """
    from scipy import stats as _stats
    df = res.get("df")
    z = float(_stats.norm.ppf(1 - a.alpha_level) if df is None else _stats.t.ppf(1 - a.alpha_level, df))
    se = t["se"] * span
    room = a.tost_margin - abs(change)
    units = res.get("n_groups") or 0
    if not (room > 0 and se > 0):
        return None
    target = (room / z) ** 2
    model_var = float(res.get("model_variance_share") or 0.0) * se ** 2
    unit_var = se ** 2 - model_var
    head = (f"equivalence within ±{a.tost_margin:g} needs its {_pct(1 - 2 * a.alpha_level)} interval about "
            f"{fmt(se * z / room, 1)}× narrower, "
            f"if the change stays at {fmt(change)}")
    if model_var >= target:
        more = _models_needed(res, model_var, unit_var, target)
        return (f"{head}; more units cannot do it, since the noise between models alone leaves it "
                f"{fmt(math.sqrt(model_var) * z / room, 1)}× too wide: it needs more models (rates, methods or "
                f"retrained copies; the model-level variance shrinks as 1/models){more}")
    need = max(units, math.ceil(units * unit_var / (target - model_var))) if units else None
    pool = res.get("unit_pool") or {}
    share = round(100 * model_var / se ** 2)
    if need is not None and pool.get("units") is not None and need > pool["units"]:
        return (f"{head}: roughly {need} units per model instead of {units}, more than the study has "
                f"({pool['units']} {pool['what']}), so it needs more models (rates, methods or retrained copies; "
                f"the models' share of the variance, {share} %, shrinks as 1/models)")
    return (f"{head}: roughly {need} units per model instead of {units} (the units' share of the variance "
            f"shrinks as 1/units, the models' share of {share} % does not)")


def _models_needed(res: dict, model_var: float, unit_var: float, target: float) -> str:
    """The clause "roughly N models instead of M (prune.copies = k)": how many models would bring the slope's
    variance to ``target`` with the units as they are (the model share shrinking as 1/models), where some number
    can; empty where none can."""
    models = int(res.get("n_models") or 0)
    if models < 2 or target <= unit_var:
        return ""
    needed = math.ceil(models * model_var / (target - unit_var))
    return (f": roughly {needed} models instead of {models} with the units as they are "
            f"(prune.copies = {math.ceil(needed / models)} retrains every model that many times)")


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
                    f"{_pct(1 - cfg.analysis.alpha_level)} CI {fmt(lo, 2)} to {fmt(hi, 2)}) and "
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


def _need_margin(cfg: StudyConfig):
    if not cfg.analysis.tost_margin > 0:
        raise Skip("analysis.tost_margin is 0: without an equivalence margin no equivalence is tested")


def mis_equivalence(units, kind, cfg: StudyConfig) -> Outcome:
    """Per pruned model: paired TOST of its units' MIS against the same units in the base model."""
    from .statistics import tost_paired
    _need_margin(cfg)
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
    table = _holm_equivalence(pd.DataFrame(rows).sort_values(["rate", "model_id"], ignore_index=True), cfg)
    sentence = (f"{_equivalent_count(table)} of {_compared_models(table)} have {kind} MIS equivalent to the base "
                f"model's within ±{cfg.analysis.tost_margin:g} (paired TOST over units, α = "
                f"{cfg.analysis.alpha_level:g}){_holm_count(table)}." + _retraining_note(table))
    return Outcome(sentence, {"models": table}, table=table)


def _holm_equivalence(table: pd.DataFrame, cfg: StudyConfig) -> pd.DataFrame:
    """The per-model TOSTs Holm-adjusted among themselves (``p_tost_holm``, ``equivalent_holm``): each model's
    equivalence is a claim of its own, and with many models some pass by chance."""
    from .statistics import holm
    p = table["p_tost"] if "p_tost" in table else pd.Series(np.nan, index=table.index)
    adjusted = holm(p.to_numpy(dtype=float))
    table = table.assign(p_tost_holm=adjusted)
    table["equivalent_holm"] = [None if not np.isfinite(a) else bool(a < cfg.analysis.alpha_level) for a in adjusted]
    return table


def _equivalent_count(table: pd.DataFrame, column: str = "equivalent") -> int:
    return int((table[column] == True).sum()) if column in table else 0  # noqa: E712 - None stays out


def _holm_count(table: pd.DataFrame) -> str:
    """How many stay equivalent once the models' tests are Holm-adjusted among themselves."""
    tested = int(table["p_tost_holm"].notna().sum())
    if tested < 2:
        return ""
    return f"; {_equivalent_count(table, 'equivalent_holm')} after Holm adjustment over the {tested} models"


def _compared_models(table: pd.DataFrame) -> str:
    """The models compared with the base, counted: "N pruned models", or, with retrained controls (rate 0), "N
    retrained models (k pruned, c retrained control(s))"."""
    controls = int((table["rate"] == 0).sum())
    if not controls:
        return f"{len(table)} pruned models"
    return (f"{len(table)} retrained models ({len(table) - controls} pruned, {controls} retrained control"
            f"{'s' if controls > 1 else ''})")


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
    for s, g in d[d["method"] != BASE_METHOD].groupby("series"):
        at, copies = _at_top_rate(g)
        if len(at) == 1:
            top = at.iloc[0]
            parts.append(f"{s} at rate {top['rate']:g}: {int(top['interpretable'])}{share(top)} and "
                         f"{int(top['unique_concepts'])}")
        else:
            parts.append(f"{s} at rate {at['rate'].iloc[0]:g}: {fmt(float(at['interpretable'].mean()), 1)} and "
                         f"{fmt(float(at['unique_concepts'].mean()), 1)}{copies}")
    cols = [c for c in ("model_id", "series", "rate", "sparsity", "interpretable", "interpretable_fraction_alive",
                        "unique_concepts", "dissection_units", "dissection_alive") if c in d]
    return Outcome("Network Dissection — " + "; ".join(parts) + ".", {"models": d[cols]}, table=d[cols])


# ---- human side ------------------------------------------------------------------------------------
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
    t, b0 = _rate_term(res), res["terms"]["Intercept"]["coef"]
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
                f"({_pct(level)} CI {fmt(odds['ci_low'])} to {fmt(odds['ci_high'])}; {fmt_p(t['p'])}){sig}; "
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
                         f"({_pct(level)} bootstrap CI {fmt(shift['ci_low'])} to {fmt(shift['ci_high'])}).")
            if "tost" in shift:
                sentence += " " + tost_sentence("Its equivalence test", shift["tost"])
    return Outcome(sentence, result, p=t["p"], table=res["table"].reset_index())


def human_equivalence(by_model: pd.DataFrame, kind: str, cfg: StudyConfig) -> Outcome:
    """Per pruned model: TOST of (accuracy − base accuracy), SE from the participant-level SEMs."""
    from .statistics import tost_estimate
    _need_margin(cfg)
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
    table = _holm_equivalence(pd.DataFrame(rows), cfg)
    sentence = (f"{_equivalent_count(table)} of {_compared_models(table)} have human {kind} accuracy equivalent to "
                f"the base model's within ±{cfg.analysis.tost_margin:g} (TOST on the difference of participant "
                f"means){_holm_count(table)}.")
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
                f"({_pct(1 - cfg.analysis.alpha_level)} CI {fmt(res['ci_low'])} to {fmt(res['ci_high'])}; "
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
                f"{fmt(cell_r, 2)}; across the {len(means)} units' means r = {fmt(r, 2)} ({_pct(level)} CI "
                f"{fmt(lo, 2)} to {fmt(hi, 2)}; {fmt_p(p)}). Humans score {fmt(abs(diff))} "
                f"{'above' if diff >= 0 else 'below'} the MIS on average.")
    if calibration:
        result["fitted_alpha"] = calibration
        sentence += (f" The MIS slope α was fitted on {calibration.get('responses', '?')} human responses: "
                     f"α = {fmt(calibration.get('alpha'), 2)}.")
    return Outcome(sentence, result, table=d)


# ---- assembling --------------------------------------------------------------------------------------
def _kinds(*frames) -> list[str]:
    return sorted({k for f in frames if len(f) and "kind" in f for k in f["kind"].dropna().unique()})


def model_side(data: StudyData, entries: list) -> None:
    cfg = data.config
    units = _ok_units(data.units)
    if units.empty:
        run_analysis(entries, "mis", "MIS vs pruning rate", "model",
                     skipped("no MIS results (mis/units.csv) exist yet"))
    for kind in _kinds(units):
        run_analysis(entries, f"mis_slope.{kind}.all", f"MIS vs pruning rate ({kind}, all methods; primary: total "
                     f"effect)", "model", lambda kind=kind: mis_slope(units, kind, None, cfg, every_unit=data.units),
                     family=PRIMARY)
        run_analysis(entries, f"mis_slope_adjusted.{kind}.all", f"MIS vs pruning rate adjusted for top-1 ({kind}, "
                     f"all methods; secondary: top-1 is a mediator)", "model",
                     lambda kind=kind: mis_slope(units, kind, None, cfg, adjusted=True))
        run_analysis(entries, f"mis_slope_same_units.{kind}", f"MIS vs pruning rate on the units live in every model "
                     f"({kind}; sensitivity: the same units at every rate)", "model",
                     lambda kind=kind: mis_slope_same_units(units, kind, cfg))
        run_analysis(entries, f"mis_slope_effective.{kind}", f"MIS vs effective sparsity ({kind}; sensitivity: the "
                     f"dose each model received)", "model", lambda kind=kind: mis_slope_effective(units, kind, cfg))
        if kind != "natural":
            run_analysis(entries, f"mis_slope_valid_fv.{kind}", f"MIS vs pruning rate with valid visualizations only "
                         f"({kind}; sensitivity)", "model", lambda kind=kind: mis_slope_valid_fv(units, kind, cfg))
        for other in (o for o in _kinds(units) if kind == "natural" and o != kind):
            run_analysis(entries, f"mis_slope_matched.{other}.{kind}", f"MIS vs pruning rate ({kind}) on the units "
                         f"with {other} references (the kinds compared on the same units)", "model",
                         lambda kind=kind, other=other: mis_slope_matched(units, kind, other, cfg))
        of_kind = units[units["kind"] == kind]
        # a series pruned at one rate only (the retrained control, at 0) has no slope of its own
        series = sorted(s for s, g in of_kind.groupby("series") if s != BASE_METHOD and g["rate"].nunique() > 1)
        if len(series) > 1:
            for s in series:
                run_analysis(entries, f"mis_slope.{kind}.{s}", f"MIS vs pruning rate ({kind}, {s})", "model",
                             lambda kind=kind, s=s: mis_slope(units, kind, s, cfg), family=PER_METHOD)
        run_analysis(entries, f"mis_dose.{kind}", f"Dose–response shape of MIS ({kind})", "model",
                     lambda kind=kind: mis_dose(units, kind, cfg))
        run_analysis(entries, f"mis_equivalence.{kind}", f"MIS of each pruned model vs the base ({kind})", "model",
                     lambda kind=kind: mis_equivalence(units, kind, cfg))
    run_analysis(entries, "top1", "Top-1 accuracy", "model", lambda: top1_summary(data.models))
    table = model_table(data.models, None, data.dissection_models)
    from stimuli.stages import no_probe_reason
    why_none = no_probe_reason(cfg, Path(cfg.data.path) if cfg.data.source == "folder" else Layout(data.run_dir).data)
    run_analysis(entries, "dissection", "Network Dissection", "model", lambda: dissection_summary(table, why_none))


def primary_slopes(data: StudyData) -> list:
    """The pooled primary MIS slope of each kind, as entries (what the power tables need)."""
    cfg = data.config
    units = _ok_units(data.units)
    entries: list[Entry] = []
    for kind in _kinds(units):
        run_analysis(entries, f"mis_slope.{kind}.all", f"MIS vs pruning rate ({kind}, all methods)", "model",
                     lambda kind=kind: mis_slope(units, kind, None, cfg))
    return entries


def human_side(data: StudyData, humans: Humans, by_model: pd.DataFrame, per_unit: pd.DataFrame,
               entries: list) -> None:
    cfg = data.config
    d = humans.included
    if not data.has_responses:
        run_analysis(entries, "humans", "Human 2-AFC trials", "human",
                     skipped(f"{NO_RESPONSES}: the survey has stored no human responses, so every human "
                             f"analysis waits for data"))
        return
    for a, b in condition_pairs(d["kind"]):
        run_analysis(entries, f"conditions.{a}-vs-{b}", f"Accuracy: {a} vs {b}", "human",
                     lambda a=a, b=b: kind_comparison(d, a, b, cfg))
    for kind in _kinds(d):
        for model, (title, family, _) in TRIAL_FITS.items():
            run_analysis(entries, f"human_slope.{kind}.{model}", f"Human accuracy vs pruning rate ({kind}; {title})",
                         "human", lambda kind=kind, model=model: human_slope(d, kind, model, cfg), family=family)
        run_analysis(entries, f"human_equivalence.{kind}", f"Human accuracy of each pruned model vs the base "
                     f"({kind})", "human", lambda kind=kind: human_equivalence(by_model, kind, cfg))
    run_analysis(entries, "calibration", "MIS ↔ human accuracy per unit", "human",
                 lambda: calibration_check(per_unit, data.calibration, cfg))


def apply_holm(entries: list[Entry]) -> dict:
    """Holm-adjust each family's slope tests among themselves; return the primary family (``tests``, ``p``,
    ``p_holm``) with every family under ``families``."""
    from .statistics import holm
    families = {}
    for name in (PRIMARY, PER_METHOD):
        family = [e for e in entries if e.family == name and e.status == "ok" and e.p is not None and np.isfinite(e.p)]
        adjusted = holm([e.p for e in family]) if family else []
        for e, p in zip(family, adjusted):
            e.p_holm = float(p)
            e.sentence += f" Holm-adjusted over {len(family)} {name} slope tests: {fmt_p(float(p))}."
        families[name] = {"tests": [e.id for e in family], "p": [e.p for e in family],
                          "p_holm": [e.p_holm for e in family]}
    return {**families[PRIMARY], "families": families}


def descriptives(data: StudyData, humans: Humans) -> dict:
    """Human and machine descriptive tables (empty dict without human responses)."""
    from .descriptives import accuracy_by_confidence, catch_summary, condition_summary, rt_summary, unit_accuracy
    cfg = data.config
    level = 1 - cfg.analysis.alpha_level
    out: dict = {}
    machines = data.trials[data.trials["is_machine"].astype(bool)] if len(data.trials) else data.trials
    if len(machines) and (machines["trial_type"] == "main").any():
        out["machine_by_model"] = condition_summary(machines, by=("observer", "model_id", "kind"), level=level)
    people = data.trials[~data.trials["is_machine"].astype(bool)] if len(data.trials) else data.trials
    if len(people) and (people["trial_type"] == "catch").any():
        out["catch"] = catch_summary(people, threshold=cfg.survey.catch_min_accuracy, level=level)
    d = humans.included
    if d.empty:
        return out
    out["by_kind"] = condition_summary(d, by=("kind",), level=level)
    out["by_model"] = _with_meta(condition_summary(d, by=("model_id", "kind"), level=level), data.models)
    out["per_unit"] = unit_accuracy(d, n_boot=cfg.analysis.bootstrap, seed=cfg.study.seed,
                                    by=("model_id", "kind", "unit_id"), level=level)
    out["rt"] = rt_summary(d, by=("kind",))
    if d["confidence"].notna().any():
        out["confidence"] = accuracy_by_confidence(d, by=("kind",), level=level)
    return out


def _with_meta(frame: pd.DataFrame, models: pd.DataFrame) -> pd.DataFrame:
    if frame.empty or models.empty:
        return frame
    meta = models.set_index("model_id")
    frame = frame.copy()
    for col in ("method", "series", "rate", "sparsity"):
        frame[col] = frame["model_id"].astype(str).map(meta[col])
    return frame


def per_unit_scores(data: StudyData, desc: dict) -> pd.DataFrame:
    """Human accuracy per (model, kind, unit) next to the unit's MIS."""
    if "per_unit" not in desc or data.units.empty:
        return pd.DataFrame(columns=["model_id", "kind", "unit_id", "mis", "accuracy", "series"])
    units = data.units[["model_id", "kind", "unit_id", "mis", "series"]]
    return desc["per_unit"].merge(units, on=["model_id", "kind", "unit_id"], how="inner")


def _chance_accuracy(robustness: dict) -> float | None:
    """1 / classes, as the robustness tables record it (``None`` without them)."""
    table = robustness.get("accuracy") if robustness else None
    if table is None or "chance" not in table or table["chance"].dropna().empty:
        return None
    return float(table["chance"].dropna().iloc[0])


def make_figures(data: StudyData, table: pd.DataFrame, desc: dict, per_unit: pd.DataFrame, out: Path) -> dict:
    """Every figure whose data exist, as ``{name: path}``; stale PNGs of figures not drawn are removed."""
    folder = out / "figures"
    jobs = {
        "interpretability": lambda p: fig.interpretability_vs_sparsity(data.mis_models, desc.get("by_model"), p),
        "top1": lambda p: fig.top1_vs_sparsity(data.models, p, _chance_accuracy(data.robustness)),
        "layers": lambda p: fig.layer_mis_vs_sparsity(_ok_units(data.units), p),
        "mis_vs_human": lambda p: fig.mis_vs_human(per_unit, p),
        "dissection": lambda p: fig.interpretable_vs_sparsity(table, p),
        "robustness": lambda p: fig.robustness_curves(data.robustness, data.models, p),
    }
    made = {}
    for name, draw in jobs.items():
        path = folder / f"{name}.png"
        try:
            result = draw(path)
        except Exception as err:  # noqa: BLE001 - a figure that fails is reported, the report goes on
            warnings.warn(f"figure {name!r} failed: {type(err).__name__}: {err}", stacklevel=2)
            result = None
        if result is None:
            path.unlink(missing_ok=True)
        else:
            made[name] = Path(result)
    return made


def analyze(run_dir: str | Path, cfg: StudyConfig | None = None, out: str | Path | None = None, *,
            trials: pd.DataFrame | None = None, source: str | None = None) -> dict:
    """Analyse the study in ``run_dir``; write ``<out>/index.html``, ``<out>/results.json`` and the figures
    under ``<out>/figures/`` (``out`` defaults to ``run_dir/report``).  ``trials`` (e.g. from
    :func:`analysis.load.import_trials`) replaces the study's own responses.  Returns the results dict
    (what results.json holds) with ``files``: the paths written."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"study directory {run_dir} does not exist")
    cfg = cfg or study_config(run_dir)
    out = Path(out) if out is not None else Layout(run_dir).report
    data = load_study_data(run_dir, cfg, trials=trials, source=source)
    humans = split_humans(data.trials)
    entries: list[Entry] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        desc = _safe_descriptives(data, humans, entries)
    by_model = desc.get("by_model", pd.DataFrame())
    table = model_table(data.models, data.mis_models, data.dissection_models, by_model)
    per_unit = per_unit_scores(data, desc)
    model_side(data, entries)
    human_side(data, humans, by_model, per_unit, entries)
    holm_family = apply_holm(entries)
    figures = make_figures(data, table, desc, per_unit, out)
    results = assemble(data, humans, table, desc, entries, holm_family, figures, out)
    results["validity"] = study_checks(data, entries)
    results["answers"] = answers(entries, cfg)
    results["power"] = study_power(data, entries)
    gallery = make_gallery(data.run_dir, data.models, out / "figures", seed=cfg.study.seed)
    results["gallery"] = {k: str(Path(v).relative_to(out)) for k, v in gallery.items()}
    results["warnings"] = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    files = {"html": out / REPORT_HTML, "json": out / REPORT_JSON}
    payload = plain(results)
    atomic_write_text(files["json"], json.dumps(payload, indent=2, allow_nan=False))
    atomic_write_text(files["html"], render(results, {**figures, **gallery}, cfg))
    payload["files"] = {**{k: str(v) for k, v in files.items()},
                        **{f"figure:{k}": str(v) for k, v in {**figures, **gallery}.items()}}
    return payload


def _safe_descriptives(data: StudyData, humans: Humans, entries: list) -> dict:
    holder: dict = {}

    def run():
        holder.update(descriptives(data, humans))
        if humans.included.empty:
            raise Skip(f"{NO_RESPONSES}." if not data.has_responses else "every participant was excluded")
        return Outcome(f"{humans.included['participant'].nunique()} included participants, "
                       f"{len(humans.included)} main trials.", {})
    run_analysis(entries, "descriptives", "Descriptive statistics", "human", run)
    return holder


def assemble(data: StudyData, humans: Humans, table: pd.DataFrame, desc: dict, entries: list, holm_family: dict,
             figures: dict, out: Path) -> dict:
    """The results dict behind results.json and index.html."""
    cfg = data.config
    people = data.trials[~data.trials["is_machine"].astype(bool)] if len(data.trials) else data.trials
    n_all = people["participant"].nunique() if len(people) else 0
    n_kept = humans.included["participant"].nunique() if len(humans.included) else 0
    from sparsight import __version__ as version
    notes = []
    if not data.has_responses:
        shown = "MIS, top-1, dissection" if len(data.dissection_models) else "MIS, top-1"
        notes.append(f"{NO_RESPONSES} from human participants: the report shows the model-side results only "
                     f"({shown}).")
    skipped = unreadable_images(data.run_dir)
    if skipped:
        notes.append(f"Unreadable images were left out: {skipped['train']} training images in the base model's last "
                     f"epoch (of {skipped['images']} it read) and {skipped['val']} validation images (the run's "
                     f"warnings name them; data.on_corrupt = \"error\" stops at the first instead).")
    return {
        "study": {"name": cfg.study.name, "profile": cfg.study.profile, "run_dir": str(data.run_dir),
                  "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  "software_version": version, "responses_source": data.responses_source,
                  "environments": _environments(Path(data.run_dir))},
        "notes": notes,
        "settings": cfg.to_dict(),
        "settings_toml": cfg.to_toml(),
        "models": table,
        "responses": {"trials": len(data.trials), "human_main_trials": len(humans.all),
                      "participants": int(n_all), "included_participants": int(n_kept),
                      "machine_trials": int(data.trials["is_machine"].astype(bool).sum()) if len(data.trials) else 0},
        "exclusions": {"participants": int(n_all), "excluded": int(n_all - n_kept), "reasons": humans.reasons},
        "descriptives": desc,
        "statistics": [e.to_json() for e in entries],
        "holm": holm_family,
        "robustness": {k: v for k, v in data.robustness.items() if k == "prune_potential"},
        "robustness_subset": None if data.robustness_subset is None else {
            **data.robustness_subset, "base_at_chance": base_at_chance(data.robustness.get("accuracy"))},
        "figures": {k: str(Path(v).relative_to(out)) for k, v in figures.items()},
        "mis": mis_settings(data),
        "methods": methods(data),
    }


def mis_settings(data: StudyData) -> dict | None:
    """What the MIS numbers rest on: α and where it came from, the embedding, and (for the study's own observer
    network) that network's validation top-1; None before the MIS stage ran."""
    units = data.units
    if not len(units) or "alpha" not in units or units["alpha"].isna().all():
        return None
    row = units[units["alpha"].notna()].iloc[0]
    out = {"alpha": float(row["alpha"]), "alpha_source": str(row.get("alpha_source") or ""),
           "embedding": str(row.get("embedding") or "")}
    meta = Layout(data.run_dir).meta("observer")
    if out["embedding"].startswith("observer") and meta.is_file():
        top1 = (json.loads(meta.read_text()).get("top1") or {}).get("after")
        out["observer_top1"] = float(top1) if top1 is not None else None
    return out


def plain(obj):
    """JSON-ready copy: DataFrames → lists of records, numpy scalars → Python, NaN/inf → None."""
    if isinstance(obj, pd.DataFrame):
        return [plain(r) for r in obj.to_dict("records")]
    if isinstance(obj, pd.Series):
        return [plain(v) for v in obj.tolist()]
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [plain(v) for v in obj.tolist()]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if obj is None or isinstance(obj, str):
        return obj
    if obj is pd.NA or obj is pd.NaT:
        return None
    return str(obj)


def figure_data_uri(path: str | Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


# ---- HTML ----------------------------------------------------------------------------------------------
GALLERY_CAPTION = ("{unit}: max references of task 0 for one schedule (named in the title), natural exemplars and "
                   "feature visualizations, two rows per method (natural, then synthetic), one column per pruning "
                   "rate (grey: the unit is dead or removed there). Under the feature "
                   "visualizations, their reach: their mean activation over that of the unit's natural max "
                   "references; red where they are not valid (reach below 1, or not above the min visualizations), "
                   "i.e. they do not show what drives the unit.")
STATISTICS_GROUPS = (("model", "Model side (MIS, accuracy, dissection)"), ("human", "Human side"))
HUMAN_TABLES = (("by_kind", "Accuracy per reference kind (mean of participants ± 2 SEM; Wilson CI on pooled "
                            "trials; d′)"),
                ("catch", "Catch trials (every participant, before exclusions)"),
                ("by_model", "Accuracy per model and kind"), ("rt", "Response times (ms)"),
                ("confidence", "Accuracy by confidence"), ("per_unit", "Accuracy per unit (bootstrap CI over trials)"))
CHECK_VERDICTS = {True: ("passed", "passed"), False: ("FAILED", "failed"), None: ("not checked", "not")}


@functools.cache
def _templates():
    """The report's Jinja environment (templates in ``analysis/templates``; every value escaped)."""
    from jinja2 import Environment, PackageLoader, StrictUndefined
    return Environment(loader=PackageLoader("analysis", "templates"), autoescape=True, trim_blocks=True,
                       lstrip_blocks=True, undefined=StrictUndefined, keep_trailing_newline=True)


def is_p_column(name: str) -> bool:
    """Whether a table column holds p-values (``p``, ``p_tost``, ``p_holm``, ``…_p``)."""
    return name == "p" or name.startswith("p_") or name.endswith("_p")


def _cell(v, p_value: bool = False) -> tuple[str, bool]:
    """Formatted cell text and whether it is text (left-aligned); a p-value below 0.001 reads "< 0.001"."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "", False
    if p_value and isinstance(v, (float, np.floating, int, np.integer)) and not isinstance(v, (bool, np.bool_)):
        return ("< 0.001" if v < 0.001 else f"{v:.3f}"), False
    if isinstance(v, (bool, np.bool_)):
        return ("yes" if v else "no"), True
    if isinstance(v, (int, np.integer)):
        return str(int(v)), False
    if isinstance(v, (float, np.floating)):
        return (fmt(v) if abs(v) < 1e4 else f"{v:.3g}".replace("-", "−")), False
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(plain(v))[:120], True
    return str(v), True


def table_data(frame: pd.DataFrame | None, max_rows: int = 300) -> dict:
    """Header and formatted cells (``(text, is_text)``) of the first ``max_rows`` rows, for the ``table`` macro."""
    if frame is None or len(frame) == 0:
        return {"columns": [], "rows": []}
    frame = frame.head(max_rows)
    columns = [str(c) for c in frame.columns]
    p_columns = [is_p_column(c) for c in columns]
    return {"columns": columns,
            "rows": [[_cell(v, p) for v, p in zip(rec, p_columns)] for rec in frame.itertuples(index=False)]}


#: What the models table's MIS means can and cannot be compared for.
MODELS_NOTE = ("Each model's MIS is the mean over its own live units (their number beside it), with an interval "
               "that resamples those units: a model that removes or silences units averages over fewer, different "
               "ones, and the interval leaves out the noise of retraining. Two models' means therefore differ by "
               "which units they keep as well as by how the units changed; the slopes under Statistics compare each "
               "unit with itself and include the noise a model's units share.")


def _models_display(table: pd.DataFrame) -> pd.DataFrame:
    cols = {"model_id": "model", "method": "method", "schedule": "schedule", "rate": "rate", "sparsity": "sparsity",
            "sparsity_effective": "effective sparsity", "top1": "top-1"}
    show = table[[c for c in cols if c in table]].rename(columns=cols)
    for col in table.columns:
        for prefix, label, low, high in (("mis_", "MIS", "_ci_low", "_ci_high"), ("human_", "humans", "_low", "_high")):
            kind = col[len(prefix):]
            if not col.startswith(prefix) or f"{col}{low}" not in table or "_" in kind:
                continue
            show[f"{label} {kind}"] = [
                "" if not np.isfinite(v) else f"{v:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else "")
                for v, lo, hi in zip(table[col].astype(float), table[f"{col}{low}"].astype(float),
                                     table[f"{col}{high}"].astype(float))]
            if prefix == "mis_" and f"{col}_units" in table:      # what each mean is over: its own live units
                show[f"live units {kind}"] = ["" if not np.isfinite(n) else str(int(n))
                                              for n in table[f"{col}_units"].astype(float)]
    if "mis_synthetic_fv_invalid" in table:     # leaving units out silently would bias the comparison
        show["units with invalid FV"] = [
            "" if not np.isfinite(n) else f"{int(n)}/{int(u)}" for n, u in
            zip(table["mis_synthetic_fv_invalid"].astype(float), table["mis_synthetic_units"].astype(float))]
        show["MIS synthetic, valid FV only"] = [
            "" if not np.isfinite(v) else f"{v:.3f}" for v in table["mis_synthetic_valid_fv"].astype(float)]
    for col, label in (("interpretable", "interpretable units"),
                       ("interpretable_fraction_alive", "interpretable share of live units"),
                       ("unique_concepts", "unique concepts")):
        if col in table:
            show[label] = table[col]
    return show


def _entry_data(e: dict, tost_level: str) -> dict:
    """One statistics entry: its sentence or why it did not run, its numbers (with what their columns mean where
    it differs from the rest of the report) and warnings."""
    numbers = e.get("table") if e["status"] == "ok" else None
    is_table = isinstance(numbers, pd.DataFrame)
    per_rate = (is_table and "term" in numbers and (numbers["term"] == "rate").any()
                and "per 10 %" in (e["sentence"] or ""))
    note = None
    if per_rate:
        note = "rate per unit of pruning rate (0 to 1): ten times the per-10 % figures above"
    elif is_table and "top1_before" in numbers:
        note = "top1_before: just after the last pruning step, before its retraining"
    elif is_table and "p_tost" in numbers and "ci_low" in numbers:
        note = (f"ci_low, ci_high: the {tost_level} interval of the equivalence test (TOST), which is equivalence "
                f"where it lies inside the margin; p_tost_holm, equivalent_holm: the same tests Holm-adjusted over "
                f"the models in this table")
    return {"id": e["id"], "title": e["title"], "status": e["status"], "sentence": e["sentence"],
            "reason": e["reason"], "warnings": (e.get("warnings") or [])[:20],
            "numbers": table_data(numbers) if is_table else None, "numbers_note": note}


def _human_data(results: dict) -> dict:
    """Participants, exclusions and the descriptive tables (none when no human responses exist)."""
    desc, excl = results["descriptives"], results["exclusions"]
    out = {"no_responses": not results["responses"]["human_main_trials"],
           "source": results["study"]["responses_source"],
           "machine": table_data(desc["machine_by_model"]) if "machine_by_model" in desc else None}
    if not out["no_responses"]:
        out.update(participants=excl["participants"], excluded=excl["excluded"],
                   included=results["responses"]["included_participants"], reasons=table_data(excl["reasons"]),
                   tables=[{"title": title, "table": table_data(desc[key])} for key, title in HUMAN_TABLES
                           if key in desc])
    return out


def _check_value(v) -> str:
    return "" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))


def _validity_data(checks: list[dict]) -> dict | None:
    """The study's own validity checks (DESIGN §11), first in the report."""
    if not checks:
        return None
    rows = []
    for c in checks:
        verdict, row_class = CHECK_VERDICTS[c["passed"]]
        rows.append({"name": c["name"], "value": _check_value(c["value"]), "threshold": c["threshold"],
                     "verdict": verdict, "row_class": row_class, "detail": c["detail"]})
    failed = sum(c["passed"] is False for c in checks)
    headline = (f"{failed} of {len(checks)} checks failed: read the results below with that in mind." if failed
                else "Every check that has data passed.")
    return {"headline": headline, "checks": rows}


def _figure(name: str, path, caption: str) -> dict:
    return {"name": name, "src": figure_data_uri(path), "caption": caption}


def robustness_subset_note(subset: dict | None) -> str:
    """E.g. " Measured on 100 validation images (10 per class, 10 classes); corruptions gaussian_noise,
    contrast at severities 2, 4." — what the robustness curves rest on; empty when not recorded."""
    if not subset:
        return ""
    counts = list((subset.get("images_per_class") or {}).values())
    if counts and min(counts) == max(counts):
        per = f" ({counts[0]} per class, {len(counts)} classes)"
    elif counts:
        per = f" ({min(counts)}–{max(counts)} per class, {len(counts)} classes)"
    else:
        per = ""
    settings = subset.get("settings") or {}
    what = ""
    if settings.get("corruptions"):
        what = f"; corruptions {', '.join(settings['corruptions'])}"
        if settings.get("severities"):
            what += f" at severities {', '.join(str(s) for s in settings['severities'])}"
    left_out = ""
    if subset.get("base_at_chance"):
        left_out = (f" Left out of the means: {', '.join(subset['base_at_chance'])}, on which the base model is not "
                    "above chance at every severity.")
    return f" Measured on {subset['n']} validation images{per}{what}.{left_out}"


def prune_potential_note(subset: dict | None, delta: float) -> str:
    """What the prune potentials rest on: the images per error, against δ, and the distributions left empty."""
    if not subset:
        return ""
    n = int(subset["n"])
    text = (f"The largest rate whose error stays within δ = {delta:g} of the base's, per distribution "
            f"(corruptions averaged over their severities), with its 95 % bootstrap interval over the images "
            f"(resampled alike for the base and every pruned model). Each error rests on {n} images a severity: "
            f"one image moves the clean error by {1 / n:.2g}")
    text += (", more than δ, so a potential here reads single images." if 1 / n > delta else ".")
    if subset.get("base_at_chance"):
        text += (f" Empty for {', '.join(subset['base_at_chance'])}: the base model is not above chance there at "
                 "every severity (a one-sided binomial test at each, α = 0.05), so the mean over its severities "
                 "would partly read chance rather than a loss.")
    return text


def _figures_data(figures: dict, subset: dict | None = None, humans: bool = True,
                  iou_threshold: float | None = None) -> tuple[list[dict], list[dict]]:
    """The figures and, apart, the gallery's contact sheets (the same unit across the rates of each method)."""
    captions = {**FIGURE_CAPTIONS, "robustness": FIGURE_CAPTIONS["robustness"] + robustness_subset_note(subset)}
    if not humans:
        captions["interpretability"] = captions["interpretability"].replace(
            " and human accuracy (squares, Wilson 95 % CI)", "") + (" Human accuracy (squares) and the per-unit MIS "
                                                                   "vs human figure appear once people have answered.")
    if iou_threshold is not None:
        captions["dissection"] += f" A unit is interpretable when its best IoU exceeds {iou_threshold:g}."
    plots = [_figure(name, path, captions.get(name, name)) for name, path in figures.items()
             if not name.startswith("gallery:")]
    sheets = [_figure(name, path, GALLERY_CAPTION.format(unit=name.split(":", 1)[1]))
              for name, path in figures.items() if name.startswith("gallery:")]
    return plots, sheets


def _power_data(power: dict | None) -> dict | None:
    """Power and sample size: the model side's detectable slopes, the simulated human designs."""
    if not power:
        return None
    model = pd.DataFrame(power.get("model", []))
    for column in [c for c in model.columns if model[c].dtype.kind == "f"]:     # slopes need four decimals
        model[column] = model[column].map(lambda v: f"{v:.4f}")
    designs = pd.DataFrame(power.get("human", []))
    sources = [{"kind": m["kind"], "accuracy": fmt(m["accuracy_at_rate_0"]), "participant_sd": fmt(m["participant_sd"]),
                "unit_sd": fmt(m["unit_sd"]), "model_sd": fmt(m.get("model_sd", 0.0)), "source": m["source"]}
               for m in power.get("trial_models", [])]
    return {"target": _pct(power["target_power"]), "alpha": f"{power['alpha']:g}", "model": table_data(model),
            "simulations": str(designs["simulations"].iloc[0]) if len(designs) else "0", "trial_models": sources,
            "smallest": table_data(smallest_display(power.get("smallest", []))), "designs": table_data(designs),
            "notes": power.get("notes", [])}


def _key_results(stats: list[dict]) -> list[str]:
    """The summary's sentences: model-side slopes over all methods, top-1, dissection; the human Holm family."""
    key = [e["sentence"] for e in stats if e["status"] == "ok" and e["group"] == "model" and e["sentence"]
           and (e["id"].endswith(".all") or e["id"].startswith(("top1", "dissection")))]
    return key + [e["sentence"] for e in stats if e["status"] == "ok" and e["group"] == "human" and e["holm_family"]]


def report_context(results: dict, figures: dict, cfg: StudyConfig) -> dict:
    """Everything ``report.html.j2`` shows, as text, numbers already formatted."""
    a = cfg.analysis
    plots, sheets = _figures_data(figures, results.get("robustness_subset"),
                                  humans=bool(results["responses"]["human_main_trials"]),
                                  iou_threshold=(results.get("settings") or {}).get("dissection", {}).get(
                                      "iou_threshold"))
    robust = results["robustness"].get("prune_potential")
    stats = results["statistics"]
    return {
        "study": results["study"], "notes": results["notes"], "key_results": _key_results(stats),
        "answers": results.get("answers", []), "validity": _validity_data(results.get("validity", [])),
        "models": table_data(_models_display(results["models"])), "models_note": MODELS_NOTE,
        "figures": plots, "gallery": sheets,
        "analysis": {"level": _pct(1 - a.alpha_level), "alpha": f"{a.alpha_level:g}", "margin": f"{a.tost_margin:g}",
                     "bootstrap": a.bootstrap, "holm_tests": len(results["holm"]["tests"]),
                     "holm_per_method": len(results["holm"].get("families", {}).get(PER_METHOD, {}).get("tests", [])),
                     "tost_level": _pct(1 - 2 * a.alpha_level), "mis_bootstrap": cfg.mis.bootstrap},
        "groups": [{"title": title, "entries": [_entry_data(e, _pct(1 - 2 * a.alpha_level)) for e in stats
                                                if e["group"] == group]}
                   for group, title in STATISTICS_GROUPS],
        "power": _power_data(results.get("power")), "humans": _human_data(results), "no_responses": NO_RESPONSES,
        "prune_potential": None if robust is None else table_data(robust),
        "prune_potential_note": prune_potential_note(results.get("robustness_subset"),
                                                     cfg.evaluate.prune_potential_delta),
        "settings_toml": results["settings_toml"],
        "mis": _mis_sentence(results.get("mis"), cfg),
        "methods": results.get("methods") or [],
    }


def _mis_sentence(mis: dict | None, cfg: StudyConfig) -> str | None:
    """The MIS definition with this study's α, its source and the embedding, in words."""
    if not mis:
        return None
    source = {"configured": "mis.alpha, stated: too few human responses to fit it" if cfg.mis.alpha_source == "auto"
              else "mis.alpha, stated", "fitted": "fitted on the human responses"}.get(mis["alpha_source"],
                                                                                           mis["alpha_source"])
    observer = (f", the penultimate features of the study's observer network (validation top-1 "
                f"{fmt(mis['observer_top1'])})" if mis.get("observer_top1") is not None else "")
    return (f"MIS: per task P(correct) = σ(α·Δ) with Δ = [s(q⁺, E⁺) − s(q⁺, E⁻)] − [s(q⁻, E⁺) − s(q⁻, E⁻)], "
            f"s(q, E) the mean cosine similarity of query q to references E in the {mis['embedding']} "
            f"embedding{observer}; α = {mis['alpha']:g} ({source}); a unit's MIS is the mean over its tasks. The "
            f"equivalence margin is on this scale.")


def render(results: dict, figures: dict, cfg: StudyConfig) -> str:
    """The self-contained HTML page (figures embedded as base64 PNG), from ``templates/report.html.j2``."""
    return _templates().get_template("report.html.j2").render(report_context(results, figures, cfg))
