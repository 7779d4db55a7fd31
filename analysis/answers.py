"""The study's answers, one per reference kind and observer: an effect, equivalence within the margin, or
inconclusive with what it would take to decide, and what the sensitivity fits say beside each."""
from __future__ import annotations

import math
from typing import NamedTuple

from sparsight.config import StudyConfig

from .entries import PER_STEP, fmt, fmt_p, pct


def _verdict(res: dict, p: float, alpha: float) -> str:
    """An effect (slope test at ``alpha``), equivalence (the fit's TOST) or inconclusive."""
    tost = res.get("tost")
    return "effect" if p < alpha else "equivalent" if tost is not None and tost["equivalent"] else "inconclusive"


def _change_text(res: dict, alpha: float, verdict: str) -> str:
    """E.g. "−0.028 (95 % CI −0.055 to −0.002; p = 0.034, unadjusted)": a sensitivity fit's change over its rate
    span (its p is not adjusted for the other fits beside it); for equivalence the interval its TOST rests on,
    e.g. "−0.007 (90 % CI −0.049 to 0.035; TOST p = 0.046, unadjusted)"."""
    t, span, tost = res["terms"]["rate"], res["rate_span"], res.get("tost")
    if verdict == "equivalent" and tost is not None:
        return (f"{fmt(tost['estimate'])} ({pct(1 - 2 * alpha)} CI {fmt(tost['ci_low'])} to {fmt(tost['ci_high'])}; "
                f"TOST {fmt_p(tost['p'])}, unadjusted)")
    return (f"{fmt(t['coef'] * span)} ({pct(1 - alpha)} CI {fmt(t['ci_low'] * span)} to {fmt(t['ci_high'] * span)}; "
            f"{fmt_p(t['p'])}, unadjusted)")


class Sensitivity(NamedTuple):
    """A sensitivity fit beside an answer: how its sentence begins (``{n}``/``{of}`` its counts, ``{top}`` its
    largest dose, ``{alpha}`` the α it rescored MIS at), what a disagreement means, whether an agreeing one is
    left out of the answer, and its name in the answer's label."""
    opening: str
    meaning: str
    quiet: bool
    name: str


ALPHA_MEANING = ("the answer depends on α, which sets the MIS scale the margin is on (fit it on people's answers: "
                 "mis.alpha_source)")
#: The sensitivity fits beside an answer, by id prefix.
SENSITIVITY = {
    "mis_slope_same_units.": Sensitivity(
        "Same units throughout: on the {n} of {of} units live in every model",
        "the answer depends on which units are counted", False, "same units throughout"),
    "mis_slope_valid_fv.": Sensitivity(
        "Valid visualizations only: on the {n} of {of} unit × model pairs whose visualizations drive their unit",
        "the answer rests on visualizations that do not show what drives their unit", False,
        "valid visualizations only"),
    "mis_slope_effective.": Sensitivity(
        "With effective sparsity as the dose (up to {top:.2f}: what structured methods remove beyond their rate "
        "counted)", "the answer depends on whether the dose is the rate asked for or the weights in effect removed",
        True, "effective sparsity"),
    "mis_slope_alpha_half.": Sensitivity("With MIS rescored at half the study's α (α = {alpha:g})", ALPHA_MEANING,
                                         True, "α halved"),
    "mis_slope_alpha_double.": Sensitivity("With MIS rescored at twice the study's α (α = {alpha:g})", ALPHA_MEANING,
                                           True, "α doubled"),
    "mis_slope_retrained.": Sensitivity(
        "Retrained models only (the retrained control alone at rate 0, the base left out)",
        "the answer depends on whether the reference is the base or a model retrained as the pruned ones were", True,
        "retrained models only")}


def _sensitivity_sentences(kind: str, verdict: str, entries: list, alpha: float) -> tuple[list[str], list[dict]]:
    """What the sensitivity fits say beside ``kind``'s answer (:data:`SENSITIVITY`: whether each agrees), and
    the other kinds' fits on the units ``kind`` has references for (another kind's answer, which neither agrees
    nor disagrees: ``agrees`` is None)."""
    sentences, records = [], []
    matched = f"mis_slope_matched.{kind}."
    for e in entries:
        spec = next((v for prefix, v in SENSITIVITY.items() if e.id == f"{prefix}{kind}"), None)
        if e.status != "ok" or (spec is None and not e.id.startswith(matched)):
            continue
        res, sub = e.result, e.result["subset"]
        own = _verdict(res, res["terms"]["rate"]["p"], alpha)
        records.append({"analysis": e.id, "verdict": own, "agrees": None if spec is None else own == verdict,
                        "name": None if spec is None else spec.name, **sub})
        change = f"MIS changes by {_change_text(res, alpha, own)}"
        if spec is None:
            sentences.append(f"{sub['kind'].capitalize()} references on the same {sub['units']} units: {change}.")
            continue
        if own == verdict and spec.quiet:
            continue
        sentences.append(spec.opening.format(n=sub["units"], of=sub["of"], top=sub.get("dose_max", 0.0),
                                             alpha=sub.get("alpha", 0.0))
                         + f", {change}, " + ("which agrees." if own == verdict else
                                              f"{'an effect' if own == 'effect' else own}, where the answer above is "
                                              f"{verdict}: {spec.meaning}."))
    return sentences, records


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
                        f"({fmt(t['coef'] * PER_STEP)} per 10 % pruning rate, {pct(1 - a.alpha_level)} CI "
                        f"{fmt(t['ci_low'] * PER_STEP)} to {fmt(t['ci_high'] * PER_STEP)}; {fmt_p(p)}"
                        f"{', Holm-adjusted' if e.p_holm is not None else ''}).")
        elif verdict == "equivalent":
            sentence = (f"No, for {kind} references: from rate {res['rate_min']:g} to {res['rate_max']:g} MIS changes "
                        f"by {fmt(change)} "
                        f"({pct(1 - 2 * a.alpha_level)} CI {fmt(tost['ci_low'])} to {fmt(tost['ci_high'])}), "
                        f"inside the equivalence margin ±{a.tost_margin:g} (TOST {fmt_p(tost['p'])}).")
        else:
            what = _what_decides(res, t, change, span, a)
            if what is None:
                what = (f"the estimated change {fmt(change)} is as large as the margin ±{a.tost_margin:g}, so only "
                        f"more units and models can tell whether it is real")
            ci = f"{fmt(t['ci_low'] * span)} to {fmt(t['ci_high'] * span)}"
            if tost is not None:
                ci += (f"; {pct(1 - 2 * a.alpha_level)} CI {fmt(tost['ci_low'])} to {fmt(tost['ci_high'])}, the one "
                       f"equivalence needs inside ±{a.tost_margin:g}")
            sentence = (f"Inconclusive for {kind} references: the MIS change from rate {res['rate_min']:g} to "
                        f"{res['rate_max']:g} is {fmt(change)} "
                        f"({pct(1 - a.alpha_level)} CI {ci}): neither an effect nor equivalence within "
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
    ci = f"{pct(1 - a.alpha_level)} CI {fmt(lo)} to {fmt(hi)}"
    if tost is not None:
        equivalent = tost["equivalent"]
        within = (f"{pct(1 - 2 * a.alpha_level)} CI {fmt(tost['ci_low'])} to {fmt(tost['ci_high'])} inside the "
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
    head = (f"equivalence within ±{a.tost_margin:g} needs its {pct(1 - 2 * a.alpha_level)} interval about "
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
