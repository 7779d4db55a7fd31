"""Power and sample size: what the study's units can detect, and what a human study would need.

Model side: the primary MIS slope's standard error (within units, clustered by unit and model) gives
the smallest slope detectable at 80 % power with a two-sided test (about ``(t₁₋α/₂ + t₀.₈)·SE``; solved
exactly on the non-central t with the fit's degrees of freedom, which matters with few models), and the
smallest equivalence margin TOST would establish at 80 % power when the true change is zero (about
``(t₁₋α + t₀.₉)·SE``; solved with the standard error's own sampling noise).

Human side: a simulation from a trial-level model of the survey,

    logit P(correct) = β₀ + b_participant + c_unit + m_model + β₁·rate,
    b ~ N(0, σ_p²), c ~ N(0, σ_u²), m ~ N(0, σ_m²),

with each participant assigned to one model of the study and one reference kind (condition_by
"model-kind", as in IMI), the models taken in turn as the survey balances them, and shown ``trials``
main trials on that model's units.  Participant counts are per reference kind: a survey serving two
kinds needs twice as many in all.  σ_m is what a model shares across all its participants (its
training run, the state its units are left in): rate varies only between models, so that part of the
error is replicated by models, not by participants, and no number of participants removes it.  β₀,
σ_p, σ_u and σ_m come from the human main trials of the included participants when there are enough of them (moment
estimates on the probability scale, carried to the logit scale by matching Gauss–Hermite integrals:
:func:`logit_scale`), else β₀ and
σ_u from the base model's unit MIS (the machine observer's P(correct)), σ_m from the models' shared
MIS deviation (the primary MIS slope's ``model_sd``) and σ_p from ``analysis.power_participant_sd``;
the table says which.  β₁ is set so that the population-averaged accuracy changes by the stated
amount over the study's rate span.  Each simulated study is analysed as the report's fits analyse
the survey: with three or more models, the model means of participant accuracy regressed on rate (t
with models − 2 df; for a balanced nested design this is the test the mixed model with a model
intercept makes, and with one participant per model it is the participant-level test), else
participant accuracies regressed on rate (OLS); a two-sided t-test for the slope and TOST on the
predicted change over the span for equivalence.  Participants fill the models one rate at a time
(:func:`_interleaved`), so a study with fewer participants than models still spans the rates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats
from scipy.integrate import quad
from scipy.optimize import brentq

from sparsight.modeltable import BASE_METHOD

from .statistics import FEWEST_MODELS, GH_NODES, GH_WEIGHTS, averaged_accuracy

#: Target power of the tables.
POWER = 0.8
#: Human participants (or main trials) needed before the simulation takes its parameters from them.
MIN_HUMAN_PARTICIPANTS = 10


#: Accuracies are taken into this range before a logit (an MIS of 1 has none).
CLIP = (0.02, 0.98)


def _logit(p):
    p = np.clip(np.asarray(p, dtype=float), *CLIP)
    return np.log(p / (1 - p))


def _expit(x):
    return 1.0 / (1.0 + np.exp(-x))


# ---- model side -----------------------------------------------------------------------------------
def slope_test_power(ncp: float, alpha: float = 0.05, df: float | None = None) -> float:
    """Power of a two-sided test at ``alpha`` of an estimate whose true value is ``ncp`` standard errors
    from zero: normal, or non-central t with ``df`` (the standard error itself estimated)."""
    if df is None:
        z = stats.norm.ppf(1 - alpha / 2)
        return float(stats.norm.sf(z - ncp) + stats.norm.cdf(-z - ncp))
    t = stats.t.ppf(1 - alpha / 2, df)
    far = stats.nct.sf(t, df, -ncp)     # P(T < −t), by symmetry (scipy's cdf can give NaN far in the tail)
    return float(stats.nct.sf(t, df, ncp) + (0.0 if math.isnan(far) else far))


def tost_power(margin_in_se: float, alpha: float = 0.05, df: float | None = None) -> float:
    """Power of TOST at ``alpha`` when the true effect is 0 and the margin is ``margin_in_se`` standard
    errors: P(|β̂| + q·SE-hat < m).  With ``df`` the standard error is estimated (SE-hat² ~ SE²·χ²_df/df),
    and the normal probability is integrated over it."""
    if df is None:
        return float(max(0.0, 2 * stats.norm.cdf(margin_in_se - stats.norm.ppf(1 - alpha)) - 1))
    q = stats.t.ppf(1 - alpha, df)

    def given(v):
        room = margin_in_se - q * math.sqrt(v / df)
        return (2 * stats.norm.cdf(room) - 1) * stats.chi2.pdf(v, df) if room > 0 else 0.0
    upper = df * (margin_in_se / q) ** 2      # beyond it the interval is wider than the margin
    return float(quad(given, 0.0, upper, limit=200)[0])


def _solve(power_of, power: float, guess: float) -> float:
    """The noncentrality (or margin, in SEs) at which ``power_of`` reaches ``power``."""
    hi = max(guess, 1.0)
    while power_of(hi) < power:
        hi *= 2
    return float(brentq(lambda x: power_of(x) - power, 0.0, hi, xtol=1e-10))


def detectable_slope(se: float, alpha: float = 0.05, power: float = POWER, df: float | None = None) -> float:
    """Smallest true slope a two-sided test at ``alpha`` detects with ``power``, for an estimate with ``se``
    (normal reference, or t with ``df``: solved on the non-central t, not its normal approximation)."""
    dist = stats.norm if df is None else stats.t(df)
    guess = dist.ppf(1 - alpha / 2) + dist.ppf(power)
    return _solve(lambda ncp: slope_test_power(ncp, alpha, df), power, guess) * se


def provable_margin(se: float, alpha: float = 0.05, power: float = POWER, df: float | None = None) -> float:
    """Smallest equivalence margin TOST at ``alpha`` establishes with ``power`` when the true effect is 0
    (with ``df``: the standard error estimated on ``df`` degrees of freedom, :func:`tost_power`)."""
    dist = stats.norm if df is None else stats.t(df)
    guess = dist.ppf(1 - alpha) + dist.ppf(1 - (1 - power) / 2)
    return _solve(lambda m: tost_power(m, alpha, df), power, guess) * se


def model_power(entries, alpha: float = 0.05) -> list[dict]:
    """Per primary MIS slope (``mis_slope.<kind>.<scope>``): units, models, SE and the detectable slope per 10 %
    (t with the fit's df where it has one)."""
    rows = []
    for e in entries:
        if not e.id.startswith("mis_slope.") or e.status != "ok":
            continue
        r = e.result
        se = float(r["terms"]["rate"]["se"])
        span = float(r["rate_span"])
        df = r.get("df")
        q = float((stats.norm if df is None else stats.t(df)).ppf(1 - alpha / 2))
        rows.append({"kind": r["kind"], "scope": r["scope"], "units": int(r.get("n_groups") or 0),
                     "models": int(r.get("n_models") or 0), "df": df,
                     "se_per_10pct": se * 0.1, "ci_half_width_per_10pct": q * se * 0.1,
                     "detectable_slope_per_10pct": detectable_slope(se, alpha, df=df) * 0.1,
                     "detectable_change_over_span": detectable_slope(se, alpha, df=df) * span,
                     "provable_margin_over_span": provable_margin(se * span, alpha, df=df), "rate_span": span})
    return rows


# ---- human side -----------------------------------------------------------------------------------
@dataclass
class TrialModel:
    """The generative trial-level model of a human study (one reference kind)."""
    kind: str
    intercept: float            # β₀, logit of accuracy at rate 0
    participant_sd: float       # σ_p (logit)
    unit_sd: float              # σ_u (logit)
    rates: tuple[float, ...]    # one rate per model of the survey (participants are spread over the models)
    source: str
    model_sd: float = 0.0       # σ_m (logit), shared by all participants of one model

    @property
    def span(self) -> float:
        return max(self.rates) - min(self.rates)

    @property
    def random_sd(self) -> float:
        """SD of the summed random intercepts b + c + m."""
        return math.sqrt(self.participant_sd ** 2 + self.unit_sd ** 2 + self.model_sd ** 2)

    def mean_accuracy(self, slope: float, rate: float) -> float:
        """Population-averaged accuracy at ``rate`` for logit slope ``slope`` (Gauss–Hermite over b + c + m)."""
        return float(averaged_accuracy(self.intercept + slope * rate, self.random_sd))

    def slope_for_change(self, change: float) -> float:
        """The logit slope whose population-averaged accuracy changes by ``change`` over the rate span."""
        lo, hi = min(self.rates), max(self.rates)
        start = self.mean_accuracy(0.0, lo)
        target = start + change
        if not 0.0 < target < 1.0:
            raise ValueError(f"an accuracy change of {change:+g} from {start:.3f} leaves [0, 1]")
        a, b = -60.0, 60.0
        for _ in range(80):     # the averaged accuracy is monotone in the slope
            mid = (a + b) / 2
            if self.mean_accuracy(mid, hi) < target:
                a = mid
            else:
                b = mid
        return (a + b) / 2


def _base_units(mis_units: pd.DataFrame, kind: str) -> pd.DataFrame:
    """The live units of the base model under ``kind``: the rows of method ``base`` (a retrained control also
    has rate 0, but it is another model: its units would count twice), else those at rate 0."""
    if not len(mis_units):
        return mis_units
    parent = (mis_units["method"] == BASE_METHOD) if "method" in mis_units else (mis_units["rate"] == 0)
    return mis_units[parent & (mis_units["kind"] == kind) & (mis_units["status"] == "ok")]


def fit_trial_model(kind: str, mis_units: pd.DataFrame, trials: pd.DataFrame, rates, assumed_participant_sd: float,
                    mis_model_sd: float = 0.0) -> TrialModel:
    """β₀, σ_p, σ_u, σ_m of ``kind`` from human main trials (enough participants), else from the MIS.

    ``rates``: one per model the survey serves (a rate shared by several models appears once per model).
    ``mis_model_sd``: the SD of the MIS deviation a model shares across its units (probability scale), used
    for σ_m when the humans are too few or cannot separate it from σ_p."""
    rates = tuple(sorted(float(r) for r in rates))
    human = trials[(trials["kind"] == kind)] if len(trials) and "kind" in trials else trials
    base = _base_units(mis_units, kind)
    # a shift δ on the logit moves the units' mean P by δ·mean(p(1 − p)), not δ·p̄(1 − p̄)
    p = np.clip(base["mis"].to_numpy(float), *CLIP) if len(base) else np.array([0.5])
    mis_sigma_m = float(mis_model_sd) / float(np.mean(p * (1 - p)))
    if len(human) and human["participant"].nunique() >= MIN_HUMAN_PARTICIPANTS:
        return _human_trial_model(kind, human, rates, mis_sigma_m)
    if base.empty:
        raise ValueError(f"no {kind} MIS of the base model and too few human participants to simulate from")
    mis = base["mis"].to_numpy(float)
    logits = _logit(mis)
    outside = int(((mis < CLIP[0]) | (mis > CLIP[1])).sum())
    clipped = (f"; {outside} of them outside [{CLIP[0]:g}, {CLIP[1]:g}] taken at its edge, where a logit stays finite, "
               f"which narrows σ_u" if outside else "")
    return TrialModel(kind, float(np.mean(logits)), float(assumed_participant_sd),
                      float(np.std(logits, ddof=1)) if len(logits) > 1 else 0.0, rates,
                      f"the base model's {len(base)} unit MIS standing in for people's accuracy (β₀, σ_u{clipped}), "
                      f"the models' shared MIS deviation (σ_m) "
                      f"and the assumed participant SD analysis.power_participant_sd = {assumed_participant_sd:g} "
                      f"(fewer than {MIN_HUMAN_PARTICIPANTS} human participants)",
                      model_sd=mis_sigma_m)


def _human_trial_model(kind: str, human: pd.DataFrame, rates: tuple, mis_sigma_m: float = 0.0) -> TrialModel:
    """Moment estimates from human main trials, turned to the logit scale by :func:`logit_scale`.  The
    accuracy to match is the line through the participants' accuracies at the lowest rate (all of them
    inform it, not only the people on the lowest-rate models).  σ_m needs three or more models and some
    model with two or more participants; otherwise σ_p carries whatever the models share, and σ_m is the
    MIS's ``mis_sigma_m`` (logit) on top, since a planned design puts several people on each model and σ_p
    alone would then average the models' share away (conservative: that share is counted twice)."""
    named = "model_id" in human and human["model_id"].notna().all()
    people = human.assign(model=human["model_id"] if named else None).groupby("participant").agg(
        mean=("correct", "mean"), size=("correct", "size"), rate=("rate", "first"), model=("model", "first"),
        models=("model", "nunique"))
    binomial = float((people["mean"] * (1 - people["mean"]) / people["size"]).mean())
    person_var, model_var, how = _split_model_variance(people)
    by_unit = human.groupby("unit_id")["correct"].agg(["mean", "size"])
    unit_binomial = float((by_unit["mean"] * (1 - by_unit["mean"]) / by_unit["size"]).mean())
    unit_excess = max(float(by_unit["mean"].var(ddof=1)) - unit_binomial, 0.0) if len(by_unit) > 1 else 0.0
    x, y = people["rate"].to_numpy(float), people["mean"].to_numpy(float)
    lowest = float(np.polyval(np.polyfit(x, y, 1), x.min())) if len(np.unique(x)) > 1 else float(y.mean())
    # the spreads were measured about the accuracies of all rates, so they reach the logit scale there; β₀ then
    # puts the accuracy at the lowest rate
    _, (participant_sd, unit_sd, model_sd) = logit_scale(
        float(y.mean()), (max(person_var - binomial, 0.0), unit_excess, model_var))
    if how != MODEL_MEANS and mis_sigma_m > 0:      # the MIS's σ_m on top
        model_sd, how = mis_sigma_m, f"{how}; σ_m from the models' shared MIS deviation instead"
    intercept = _intercept_for(float(np.clip(lowest, 0.01, 0.99)),
                               math.sqrt(participant_sd ** 2 + unit_sd ** 2 + model_sd ** 2))
    return TrialModel(kind, intercept, participant_sd, unit_sd, rates,
                      f"{human['participant'].nunique()} human participants, {len(human)} main trials "
                      f"(moment estimates of the participant, unit and model spread; {how})",
                      model_sd=model_sd)


#: Largest logit SD :func:`logit_scale` gives a random intercept (a spread the logit scale cannot reach).
MAX_LOGIT_SD = 10.0


def logit_scale(accuracy: float, variances, tolerance: float = 1e-6) -> tuple[float, tuple[float, ...]]:
    """``(β₀, SDs)``: the intercept and the logit SD of each random intercept of
    ``logit P = β₀ + Σ_k b_k``, b_k ~ N(0, σ_k²) independent, whose population-averaged accuracy is
    ``accuracy`` and whose levels' mean accuracies, E[P | b_k], vary by ``variances`` (probability scale).

    Both sides are Gauss–Hermite integrals, matched by a fixed-point iteration from the delta method at
    ``accuracy``, ``σ_k = √v_k / (p̄(1 − p̄))``; that start understates every SD as the accuracy nears 0 or 1
    or the spreads grow (a logit shift moves the averaged accuracy by E[p(1 − p)] < p̄(1 − p̄)), and
    ``logit(p̄)`` is not the β₀ whose average is p̄."""
    p = float(np.clip(accuracy, 0.01, 0.99))
    want = np.asarray(variances, dtype=float).clip(min=0.0)
    sds = np.minimum(np.sqrt(want) / (p * (1 - p)), MAX_LOGIT_SD)
    for _ in range(200):
        total = float(np.sqrt(np.sum(sds ** 2)))
        intercept = _intercept_for(p, total)
        have = np.array([_level_variance(intercept, sd, math.sqrt(max(total ** 2 - sd ** 2, 0.0))) for sd in sds])
        scale = np.sqrt(np.divide(want, have, out=np.ones_like(want), where=have > 0))
        new = np.minimum(np.where(want > 0, sds * scale, 0.0), MAX_LOGIT_SD)
        settled = np.all(np.abs(new - sds) <= tolerance * np.maximum(sds, 1e-3))
        sds = new
        if settled:
            break
    return _intercept_for(p, float(np.sqrt(np.sum(sds ** 2)))), tuple(float(v) for v in sds)


def _intercept_for(accuracy: float, sd: float) -> float:
    """β₀ whose population-averaged accuracy, over random intercepts of total SD ``sd``, is ``accuracy``."""
    return float(brentq(lambda b: float(averaged_accuracy(b, sd)) - accuracy, -40.0, 40.0))


def _level_variance(intercept: float, sd: float, rest: float) -> float:
    """Var over b ~ N(0, sd²) of E[expit(intercept + b + r)], r ~ N(0, rest²) (Gauss–Hermite in both)."""
    means = averaged_accuracy(intercept + sd * GH_NODES, rest)
    centre = float(np.sum(GH_WEIGHTS * means))
    return float(np.sum(GH_WEIGHTS * (means - centre) ** 2))


MODEL_MEANS = "σ_m from the model means"


def _split_model_variance(people: pd.DataFrame) -> tuple[float, float, str]:
    """``(participant variance, model variance, how)`` of participant accuracies (``mean``, ``rate``,
    ``model``, one row per participant): the pooled variance within models, and the spread of the model
    means about their rate line beyond what that within-model variance gives them.  Where σ_m cannot be
    separated, the participants' spread about their own rate line (a real effect of rate is no spread)."""
    total = _about_rate_line(people["rate"].to_numpy(float), people["mean"].to_numpy(float))
    if people["model"].isna().any():
        return total, 0.0, "σ_m not separable: the trials name no model"
    if (people["models"] > 1).any():
        return total, 0.0, "σ_m not separable: participants saw several models each"
    models = people.groupby("model").agg(mean=("mean", "mean"), count=("mean", "size"), rate=("rate", "first"))
    shared = people.groupby("model")["mean"].transform("size") > 1
    if len(models) < 3 or not shared.any():
        return total, 0.0, "σ_m not separable: it needs three or more models and two participants on one of them"
    within = people[shared].groupby("model")["mean"].var(ddof=1)
    sizes = people[shared].groupby("model")["mean"].size()
    pooled = float(((sizes - 1) * within).sum() / (sizes - 1).sum())
    spread = _about_rate_line(models["rate"].to_numpy(float), models["mean"].to_numpy(float))
    return pooled, max(spread - float(np.mean(pooled / models["count"])), 0.0), MODEL_MEANS


def _about_rate_line(x: np.ndarray, y: np.ndarray) -> float:
    """Variance of ``y`` about its least-squares line in ``x`` (n − 2 df); the plain variance where ``x`` has
    fewer than two distinct finite values or ``y`` fewer than three."""
    if np.isfinite(x).all() and len(np.unique(x)) > 1 and len(y) > 2:
        resid = y - np.polyval(np.polyfit(x, y, 1), x)
        return float(np.sum(resid ** 2) / (len(y) - 2))
    return float(np.var(y, ddof=1)) if len(y) > 1 else 0.0


def simulate_designs(model: TrialModel, *, changes, participants, trials, margin: float, alpha: float = 0.05,
                     simulations: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Power of each design (participants × trials) to detect each accuracy change over the rate span
    (``change`` 0: to establish equivalence within ``margin``)."""
    rng = np.random.default_rng(seed)
    rows = []
    rates = np.asarray(model.rates)
    if min(participants) < 3:
        raise ValueError(f"a design needs at least 3 participants, got {min(participants)}")
    if min(trials) < 1:
        raise ValueError(f"a participant needs at least 1 main trial, got {min(trials)}")
    by_model = len(rates) >= FEWEST_MODELS      # as the report's fits: a model term wherever models can carry it
    order = _interleaved(rates)
    for change in changes:
        beta = model.slope_for_change(change) if change else 0.0
        for n in participants:
            which = order[np.arange(n) % len(rates)]              # participants spread over the models
            for t in trials:
                acc = np.concatenate([_accuracies(model, beta, which, t, size, rng)
                                      for size in _blocks(simulations, n * t)])
                if by_model:                                      # the models are the experimental units
                    used = np.unique(which)
                    acc = np.stack([acc[:, which == m].mean(axis=1) for m in used], axis=1)
                    x = rates[used]
                else:
                    x = rates[which]
                slope, se = _ols_slopes(x, acc)
                df = len(x) - 2
                tcrit = stats.t.ppf(1 - alpha / 2, df)
                detect = float(np.mean(np.abs(slope / np.where(se > 0, se, np.inf)) > tcrit)) if change else None
                tone = stats.t.ppf(1 - alpha, df)
                lo, hi = (slope - tone * se) * model.span, (slope + tone * se) * model.span
                equivalent = float(np.mean((lo > -margin) & (hi < margin)))
                rows.append({"kind": model.kind, "change_over_span": float(change), "participants": int(n),
                             "trials": int(t), "power_detect": detect, "power_equivalence": equivalent,
                             "simulations": int(simulations)})
    return pd.DataFrame(rows)


def _interleaved(rates: np.ndarray) -> np.ndarray:
    """Model indices in the order participants fill them: one model of each rate in turn (the lowest rates
    first), so a study with fewer participants than models still spans the rates."""
    rank = np.zeros(len(rates), dtype=int)
    for value in np.unique(rates):
        at = np.flatnonzero(rates == value)
        rank[at] = np.arange(len(at))
    return np.lexsort((rates, rank))


def _blocks(simulations: int, per_study: int, budget: int = 4_000_000) -> list[int]:
    """Simulated studies per block, so one block holds at most about ``budget`` trials."""
    size = max(1, budget // max(1, per_study))
    return [min(size, simulations - start) for start in range(0, simulations, size)]


def _accuracies(model: TrialModel, beta: float, which: np.ndarray, trials: int, size: int, rng) -> np.ndarray:
    """Participant accuracies of ``size`` simulated studies (rows), participant i on model ``which[i]``."""
    n = len(which)
    rate = np.asarray(model.rates)[which]
    b = rng.normal(0, model.participant_sd, (size, n, 1))
    c = rng.normal(0, model.unit_sd, (size, n, trials))
    eta = model.intercept + b + c + beta * rate[None, :, None]
    if model.model_sd > 0:
        eta = eta + rng.normal(0, model.model_sd, (size, len(model.rates)))[:, which, None]
    p = _expit(eta)
    return (rng.random(p.shape) < p).mean(axis=2)


def _ols_slopes(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slope and its SE of ``y[s] ~ x`` for every simulated study ``s`` (rows of ``y``)."""
    xc = x - x.mean()
    sxx = float(np.sum(xc ** 2))
    if sxx == 0:
        raise ValueError("the study's models all have one pruning rate; a slope needs two or more")
    slope = (y - y.mean(axis=1, keepdims=True)) @ xc / sxx
    fitted = y.mean(axis=1, keepdims=True) + slope[:, None] * xc[None, :]
    resid = y - fitted
    se = np.sqrt(np.sum(resid ** 2, axis=1) / (len(x) - 2) / sxx)
    return slope, se


def smallest_designs(table: pd.DataFrame, power: float = POWER) -> list[dict]:
    """Per kind and change, the fewest participants (at each trial count) reaching ``power``."""
    out = []
    column = {True: "power_equivalence", False: "power_detect"}
    for (kind, change, t), g in table.groupby(["kind", "change_over_span", "trials"]):
        col = column[change == 0]
        ok = g[g[col] >= power].sort_values("participants")
        out.append({"kind": kind, "change_over_span": change, "trials": int(t), "goal": "equivalence" if change == 0
                    else "detect", "participants": int(ok["participants"].iloc[0]) if len(ok) else None,
                    "largest_tried": int(g["participants"].max())})
    return out



def smallest_display(smallest: list[dict]) -> pd.DataFrame:
    """:func:`smallest_designs` for people: participant counts as whole numbers, "> N" where no design tried
    (up to N participants) reached the power."""
    table = pd.DataFrame(smallest)
    if table.empty:
        return table
    table["participants"] = [str(int(n)) if n is not None and n == n else f"> {int(top)}"
                             for n, top in zip(table["participants"], table["largest_tried"])]
    return table.drop(columns="largest_tried")

def study_power(data, entries, *, changes=None, participants=(20, 40, 80, 160, 320, 640), trials=None,
                simulations: int | None = None) -> dict:
    """``results["power"]``: the model side from the fitted slopes, the human side simulated per kind."""
    cfg = data.config
    a = cfg.analysis
    simulations = simulations or a.power_simulations
    units = data.units
    out = {"target_power": POWER, "alpha": a.alpha_level, "model": model_power(entries, a.alpha_level),
           "human": [], "smallest": [], "notes": []}
    if units.empty:
        out["notes"].append("no MIS results: nothing to simulate from")
        return out
    served = units.drop_duplicates("model_id")
    if cfg.survey.models:
        served = served[served["model_id"].isin(cfg.survey.models)]
    rates = served["rate"].dropna().tolist()           # one per model: the survey balances over models
    if len(set(rates)) < 2:
        out["notes"].append("the study's models have one pruning rate: no slope to plan for")
        return out
    from .descriptives import apply_exclusions
    from .load import human_main
    humans = apply_exclusions(human_main(data.trials))[0]     # the people the report's fits keep
    changes = list(changes) if changes is not None else [0.0, -a.tost_margin, -2 * a.tost_margin]
    trials = list(trials) if trials is not None else [cfg.survey.main_trials, 2 * cfg.survey.main_trials]
    tables = []
    shared = {e.result["kind"]: float(e.result.get("model_sd") or 0.0) for e in entries
              if e.id.startswith("mis_slope.") and e.status == "ok" and e.result.get("scope") == "all methods"}
    for kind in sorted(units["kind"].dropna().unique()):
        try:
            model = fit_trial_model(kind, units, humans, rates, a.power_participant_sd, shared.get(kind, 0.0))
        except ValueError as err:
            out["notes"].append(f"{kind}: {err}")
            continue
        table = simulate_designs(model, changes=changes, participants=participants, trials=trials,
                                 margin=a.tost_margin, alpha=a.alpha_level, simulations=simulations,
                                 seed=cfg.study.seed)
        tables.append(table)
        out.setdefault("trial_models", []).append({"kind": kind, "intercept": model.intercept,
                                                   "accuracy_at_rate_0": model.mean_accuracy(0.0, 0.0),
                                                   "participant_sd": model.participant_sd,
                                                   "unit_sd": model.unit_sd, "model_sd": model.model_sd,
                                                   "rates": list(model.rates),
                                                   "source": model.source})
    if tables:
        table = pd.concat(tables, ignore_index=True)
        out["human"] = table.to_dict("records")
        out["smallest"] = smallest_designs(table)
    return out
