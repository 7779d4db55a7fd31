"""Inferential statistics: which model answers which question.

**Trial level — does pruning change how well people (or the machine observer) read a unit?**
Each response is a Bernoulli outcome; participants and units are *crossed* (every participant
sees many units, every unit — probed at the same channel in every pruned model — is seen by many
participants), so responses are correlated along two directions at once.

- :func:`mixed_logistic` — the primary model: logistic GLMM with crossed random intercepts for
  participant and unit (``BinomialBayesMixedGLM``, variational Bayes).  Its coefficients are
  *conditional* (for a typical participant and unit).  Variational posteriors are known to be too
  narrow, so intervals come from a parametric bootstrap.
- :func:`gee_logistic` — population-averaged (*marginal*) slope, exchangeable working correlation
  within one cluster variable (participant, or model when participants are nested in models),
  bias-reduced sandwich SEs with t on (clusters − 1) df.
- :func:`clustered_logistic` — the same marginal slope from plain logistic regression with
  two- or three-way (participant × unit × model) cluster-robust SEs (Cameron, Gelbach & Miller 2011).
- :func:`model_intercept` — whether those fits also need a term per model: rate varies only between
  models, so a model's shared deviation is replicated by models, not by more participants.
- :func:`predicted_change` — the mixed model's slope read as a change in population-averaged accuracy
  (over the fit's random intercepts: participants, units, and models where fitted) across a rate
  span, with its interval and equivalence test from the same bootstrap refits.

Marginal slopes are attenuated relative to conditional ones (roughly by 1/√(1 + 0.346·σ²) for a
total random-intercept variance σ²); the three fits agree in sign and significance, not in size.

**Unit level — does a unit's Machine Interpretability Score move with the pruning rate?**

- :func:`within_unit_slope` — the primary fit: MIS on rate (and covariates such as top-1) within
  units (unit fixed effects), with standard errors clustered two-way by unit and by model, since
  rate varies only between models and each model's training noise is shared by all its units.
- :func:`unit_mixed_model` — linear mixed model with a random intercept per unit (the same unit
  appears in every model); it treats a model's units as independent, so its intervals leave out
  model-level noise — reported beside the primary fit to show how much that noise adds.
- :func:`model_level_mis` — one point per model: its units' MIS compared with themselves, for
  :func:`dose_response` (rate varies only between models).
- :func:`dose_response` — shape of the relationship: straight line vs hinge (no change until a
  breakpoint, then a slope change), compared by AIC, with a bootstrapped breakpoint.
- :func:`tost_estimate` / :func:`tost_paired` — two one-sided tests, for claiming the *absence* of
  an effect within a stated margin (a non-significant slope is not evidence of no slope).
- :func:`holm` — Holm–Bonferroni adjustment across a family of tests.

Model functions filter trials to ``trial_type == "main"`` when that column exists and drop rows with
missing values in the columns they use; exclusions are the caller's business (pass the output of
:func:`analysis.descriptives.apply_exclusions`).  Coefficient tables are DataFrames indexed by term
with columns ``coef, se, ci_low, ci_high, p`` (under ``"table"``), repeated as a dict of dicts under
``"terms"``.
"""
from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd
from scipy import stats

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


# --- Multiple comparisons ------------------------------------------------------------------------

def holm(pvalues) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values (step-down, made monotone, capped at 1), in input order.

    NaNs stay NaN and do not count towards the number of tests.
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p.ravel()))
    m = len(ok)
    if m == 0:
        return out
    flat = p.ravel()[ok]
    order = np.argsort(flat, kind="mergesort")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * flat[order]))
    result = out.ravel()
    result[ok[order]] = adjusted
    return result.reshape(p.shape)


# --- Shared helpers ------------------------------------------------------------------------------

def _model_rows(frame: pd.DataFrame, formula: str, extra=(), main_only: bool = True) -> pd.DataFrame:
    """Main trials (when ``trial_type`` exists) without missing values in the columns the formula
    and ``extra`` use."""
    if main_only and "trial_type" in frame:
        frame = frame[frame["trial_type"] == "main"]
    used = [c for c in dict.fromkeys(_IDENT.findall(formula)) if c in frame.columns]
    extra = [c for c in extra if c]
    missing = [c for c in extra if c not in frame.columns]
    if missing:
        raise ValueError(f"data lacks column(s) {missing}; it has {sorted(frame.columns)}")
    frame = frame.dropna(subset=list(dict.fromkeys([*used, *extra])))
    if frame.empty:
        raise ValueError(f"no rows left to fit {formula!r}")
    return frame.reset_index(drop=True)


def _table(params, se, level: float, df=None, names=None) -> pd.DataFrame:
    params = pd.Series(np.asarray(params, dtype=float), index=names if names is not None else params.index)
    se = np.asarray(se, dtype=float)
    q = stats.norm.ppf(0.5 + level / 2) if df is None else stats.t.ppf(0.5 + level / 2, df)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = params.to_numpy() / se
    p = 2 * (stats.norm.sf(np.abs(z)) if df is None else stats.t.sf(np.abs(z), df))
    return pd.DataFrame({"coef": params.to_numpy(), "se": se, "ci_low": params.to_numpy() - q * se,
                         "ci_high": params.to_numpy() + q * se, "p": p}, index=params.index.rename("term"))


def _terms(table: pd.DataFrame) -> dict:
    return {term: {k: float(v) for k, v in row.items()} for term, row in table.iterrows()}


def _collect(caught) -> list[str]:
    return sorted({f"{w.category.__name__}: {w.message}" for w in caught})


# --- Trial level ---------------------------------------------------------------------------------

#: Largest cluster (rows) for which GEE uses the bias-reduced covariance: its per-cluster hat matrices grow
#: as the square of the cluster size and their inversion as the cube (25 clusters of 4,000 rows: about 20 s
#: on two cores).
BIAS_REDUCED_MAX_CLUSTER = 5000


def gee_logistic(trials: pd.DataFrame, formula: str = "correct ~ rate", group: str = "participant",
                 level: float = 0.95, main_only: bool = True) -> dict:
    """Marginal logistic regression by GEE (Binomial family, exchangeable working correlation
    within ``group``), with Mancl and DeRouen's bias-reduced sandwich covariance and intervals and
    p-values from t with (clusters − 1) df: the plain sandwich runs small with few clusters (in 200
    simulated null studies with 12 models as clusters a nominal 5 % test rejected 19 % of the time with
    the plain sandwich and normal intervals, 7 % with the bias-reduced one and t).  Clusters over
    :data:`BIAS_REDUCED_MAX_CLUSTER` rows get the plain robust sandwich; ``covariance`` says which was
    used.

    Returns ``table``/``terms`` (``coef, se, ci_low, ci_high, p``), ``n_obs``, ``n_groups``, ``df``,
    ``covariance``, ``correlation`` (the fitted exchangeable correlation), ``formula``, ``group``,
    ``warnings``.
    """
    import statsmodels.api as sm
    import statsmodels.formula.api as smf

    data = _model_rows(trials, formula, [group], main_only)
    covariance = "bias-reduced" if data.groupby(group).size().max() <= BIAS_REDUCED_MAX_CLUSTER else "robust"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = smf.gee(formula, groups=group, data=data, family=sm.families.Binomial(),
                        cov_struct=sm.cov_struct.Exchangeable())
        fit = model.fit(cov_type="bias_reduced" if covariance == "bias-reduced" else "robust")
    n_groups = int(data[group].nunique())
    table = _table(fit.params, fit.bse, level, df=n_groups - 1)
    return dict(table=table, terms=_terms(table), n_obs=int(fit.nobs), n_groups=n_groups, df=n_groups - 1,
                covariance=covariance, correlation=float(model.cov_struct.dep_params), formula=formula, group=group,
                warnings=_collect(caught))


def _psd(cov: np.ndarray) -> tuple[np.ndarray, float]:
    """Clip negative eigenvalues of a symmetric matrix to zero; also return the smallest one."""
    cov = (cov + cov.T) / 2
    values, vectors = np.linalg.eigh(cov)
    if values.min() >= 0:
        return cov, float(values.min())
    return (vectors * np.clip(values, 0, None)) @ vectors.T, float(values.min())


def clustered_logistic(trials: pd.DataFrame, formula: str = "correct ~ rate",
                       clusters=("participant", "unit_id"), level: float = 0.95,
                       main_only: bool = True) -> dict:
    """Logistic regression (maximum likelihood) with one-, two- or three-way cluster-robust covariance.

    With several cluster variables the covariance is Cameron–Gelbach–Miller's inclusion–exclusion sum
    over the cluster variables and their intersections: V₁ + V₂ − V₁₂ for two (statsmodels computes
    exactly this when ``cov_type="cluster"`` receives a two-column ``groups`` array; checked against the
    one-way pieces in the tests), and V₁ + V₂ + V₃ − V₁₂ − V₁₃ − V₂₃ + V₁₂₃ for three (a participant, a
    unit and a model: participants nested in models reduce it to the two-way sum by model and unit).
    Each piece is a CRV1 sandwich with the small-sample factor G/(G−1)·(N−1)/(N−K).  The sum need not
    be positive semidefinite; when it is not, negative eigenvalues are set to zero (Cameron, Gelbach &
    Miller 2011, §2.3) and ``clipped`` is true.  Intervals and p-values use t with (fewest clusters − 1)
    degrees of freedom (``df``), since cluster-robust errors run small with few clusters.

    Returns ``table``/``terms``, ``n_obs``, ``n_clusters`` (dict per cluster variable), ``df``,
    ``clipped``, ``min_eigenvalue``, ``formula``, ``clusters``, ``warnings``.
    """
    import statsmodels.formula.api as smf

    clusters = [clusters] if isinstance(clusters, str) else list(clusters)
    if not 1 <= len(clusters) <= 3:
        raise ValueError(f"clusters must name one, two or three columns, got {clusters!r}")
    data = _model_rows(trials, formula, clusters, main_only)
    codes = np.column_stack([pd.factorize(data[c])[0] for c in clusters])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = smf.logit(formula, data=data)
        if len(clusters) <= 2:
            groups = codes if len(clusters) == 2 else codes[:, 0]
            fit = model.fit(disp=0, cov_type="cluster", cov_kwds={"groups": groups})
            raw = np.asarray(fit.cov_params())
        else:
            fit = model.fit(disp=0)
            raw = _multiway_covariance(model, fit.params, codes)
    cov, smallest = _psd(raw)
    n_clusters = {c: int(data[c].nunique()) for c in clusters}
    df = min(n_clusters.values()) - 1
    table = _table(fit.params, np.sqrt(np.diag(cov)), level, df=df)
    return dict(table=table, terms=_terms(table), n_obs=int(fit.nobs), n_clusters=n_clusters, df=int(df),
                clipped=smallest < 0, min_eigenvalue=smallest, formula=formula, clusters=tuple(clusters),
                warnings=_collect(caught))


def _multiway_covariance(model, params, codes: np.ndarray) -> np.ndarray:
    """CGM's multiway cluster-robust covariance of ``model`` at ``params``: the one-way CRV1 covariances
    by every non-empty set of the columns of ``codes`` (clustered on their intersection), added with
    sign (−1)^(size + 1)."""
    from itertools import combinations

    total = np.zeros((len(params), len(params)))
    for size in range(1, codes.shape[1] + 1):
        for subset in combinations(range(codes.shape[1]), size):
            cells = pd.factorize(pd.MultiIndex.from_arrays([codes[:, j] for j in subset]))[0]
            one_way = model.fit(start_params=np.asarray(params), disp=0, cov_type="cluster",
                                cov_kwds={"groups": cells})
            total += (-1) ** (size + 1) * np.asarray(one_way.cov_params())
    return total


#: Fewest models over which a trial-level fit carries a model term (fewer leave no spread about the rate line).
FEWEST_MODELS = 3


def model_intercept(trials: pd.DataFrame, participant: str = "participant", model: str = "model_id",
                    fewest: int = FEWEST_MODELS) -> tuple[bool, bool, str]:
    """Whether a trial-level fit should carry a random intercept (or cluster) per model, as ``(use,
    nested, why)``: rate varies only between models, so what a model shares across its participants
    (its training run, its units' state after pruning) is an error common to all of them, and leaving it
    out counts each model once per participant.  ``nested``: every participant saw one model.  Not used
    with fewer than ``fewest`` models (no spread about the rate line to estimate), nor when each model
    was answered by one participant (the participant's intercept is then the model's too); ``why``
    says which."""
    if model not in trials or trials[model].isna().all():
        return False, False, "the trials name no model, so model-level variation is not in the interval"
    if trials[model].isna().any():
        return False, False, "not every trial names its model, so model-level variation is not in the interval"
    n_models = int(trials[model].nunique())
    nested = bool((trials.groupby(participant)[model].nunique() <= 1).all())
    if n_models < fewest:
        return False, nested, (f"with {n_models} model(s) model-level variation cannot be estimated and is not in "
                               f"the interval")
    if nested and int(trials.groupby(model)[participant].nunique().max()) <= 1:
        return False, nested, "each model was answered by one participant, whose intercept carries the model's too"
    how = "participants nested in models" if nested else "participants crossed with models"
    return True, nested, f"with a model term too ({n_models} models, {how})"


def _fit_vb(model, fit_method: str, seed, mean=None, sd=None):
    return model.fit_vb(mean=mean, sd=sd, fit_method=fit_method, rng=seed)


#: Bootstrap refits from which the mixed logistic model's p-values use the bootstrap standard error.
MIN_BOOT_FOR_P = 10


def mixed_logistic(trials: pd.DataFrame, formula: str = "correct ~ rate",
                   groups=("participant", "unit_id"), n_boot: int = 200, seed: int = 0,
                   level: float = 0.95, fit_method: str = "L-BFGS-B", main_only: bool = True) -> dict:
    """Logistic mixed model with crossed random intercepts, variational Bayes plus parametric
    bootstrap.

    ``BinomialBayesMixedGLM`` with one variance component (random intercept) per column of
    ``groups``, fitted with ``fit_vb`` (statsmodels' default priors: fixed effects N(0, 2²), log-SDs
    N(0, 1)).  ``fit_method="L-BFGS-B"`` reaches the same optimum as statsmodels' default BFGS to
    ~1e-4 and is about five times faster; the optimizer's random start is seeded with ``seed``.

    The variational posterior SDs understate uncertainty, so the reported interval (``ci_low``,
    ``ci_high``) is a parametric-bootstrap percentile interval: ``n_boot`` times, draw new random
    intercepts with the fitted SDs, simulate responses from fixed effects + intercepts, refit (same
    design), and take percentiles of the refitted fixed effects.  ``n_boot=0`` skips the bootstrap
    and falls back to the variational intervals.

    Returns ``table`` indexed by term with ``coef`` (posterior mean), ``se`` (posterior SD), ``vb_low,
    vb_high`` (posterior mean ± z·SD), ``boot_low, boot_high``, ``ci_low, ci_high`` (bootstrap, or
    variational when n_boot=0), ``boot_se`` (SD of the refitted fixed effects), ``p`` (Wald: posterior
    mean over ``boot_se``, so it agrees with the bootstrap interval; with fewer than ``MIN_BOOT_FOR_P``
    refits from the posterior SD, too small for the same reason), ``p_vb`` (from the posterior SD);
    ``terms``; ``sd`` (random-intercept SD per group: exp of the posterior mean of the log-SD), ``sd_ci`` (bootstrap percentile interval per group, NaN without bootstrap);
    ``n_obs``, ``n_groups``, ``n_boot``, ``n_failed`` (refits that raised), ``formula``,
    ``warnings``; ``boot_draws`` (the refitted fixed effects, one row per refit, a column per term) and
    ``boot_sd_draws`` (the refitted random-intercept SDs, a column per group).
    """
    from statsmodels.genmod.bayes_mixed_glm import BinomialBayesMixedGLM

    groups = [groups] if isinstance(groups, str) else list(groups)
    data = _model_rows(trials, formula, groups, main_only)
    vc = {g: f"0 + C({g})" for g in groups}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = BinomialBayesMixedGLM.from_formula(formula, vc, data)
        fit = _fit_vb(model, fit_method, seed)
    names = list(model.fep_names)
    fe, fe_sd = np.asarray(fit.fe_mean), np.asarray(fit.fe_sd)
    sds = np.exp(np.asarray(fit.vcp_mean))
    z = stats.norm.ppf(0.5 + level / 2)

    boot_fe, boot_sd, failed = _parametric_bootstrap(model, fit, n_boot, seed, fit_method, caught)
    q = [50 * (1 - level), 50 * (1 + level)]
    if len(boot_fe):
        boot_low, boot_high = np.percentile(boot_fe, q, axis=0)
        sd_low, sd_high = np.percentile(boot_sd, q, axis=0)
    else:
        boot_low = boot_high = np.full(len(fe), np.nan)
        sd_low = sd_high = np.full(len(sds), np.nan)

    table = _table(fe, fe_sd, level, names=names)
    table.insert(2, "vb_low", fe - z * fe_sd)
    table.insert(3, "vb_high", fe + z * fe_sd)
    table.insert(4, "boot_low", boot_low)
    table.insert(5, "boot_high", boot_high)
    if len(boot_fe):
        table["ci_low"], table["ci_high"] = boot_low, boot_high
    else:
        table["ci_low"], table["ci_high"] = table["vb_low"], table["vb_high"]
    table["p_vb"] = table["p"]
    table.insert(2, "boot_se", np.std(boot_fe, axis=0, ddof=1) if len(boot_fe) > 1 else np.nan)
    if len(boot_fe) >= MIN_BOOT_FOR_P:
        with np.errstate(divide="ignore", invalid="ignore"):
            table["p"] = 2 * stats.norm.sf(np.abs(fe / table["boot_se"].to_numpy()))
    return dict(table=table, terms=_terms(table), sd=dict(zip(groups, map(float, sds))),
                sd_ci={g: (float(lo), float(hi)) for g, lo, hi in zip(groups, sd_low, sd_high)},
                n_obs=int(len(data)), n_groups={g: int(data[g].nunique()) for g in groups},
                n_boot=int(len(boot_fe)), n_failed=failed, formula=formula, warnings=_collect(caught),
                boot_draws=pd.DataFrame(boot_fe, columns=names),
                boot_sd_draws=pd.DataFrame(boot_sd, columns=groups))


#: Gauss–Hermite nodes and weights of a standard normal (probabilists' form), for averaging over random effects.
GH_NODES, GH_WEIGHTS = np.polynomial.hermite_e.hermegauss(41)
GH_WEIGHTS = GH_WEIGHTS / GH_WEIGHTS.sum()


def averaged_accuracy(eta, sd) -> np.ndarray:
    """Population-averaged P(correct): E[expit(η + b)], b ~ N(0, sd²), by Gauss–Hermite (broadcasts)."""
    eta, sd = np.asarray(eta, dtype=float)[..., None], np.asarray(sd, dtype=float)[..., None]
    return np.sum(GH_WEIGHTS / (1 + np.exp(-(eta + sd * GH_NODES))), axis=-1)


def random_intercept_sd(fit: dict) -> float:
    """The SD of the summed random intercepts of a :func:`mixed_logistic` fit (its groups are crossed)."""
    return float(np.sqrt(sum(v ** 2 for v in fit.get("sd", {}).values())))


def predicted_change(fit: dict, x_low: float, x_high: float, term: str = "rate", level: float = 0.95,
                     margin: float = 0.0, alpha: float = 0.05) -> dict | None:
    """Change in population-averaged P(correct) — averaged over the fit's random intercepts, as the
    survey's data average it — when ``term`` goes from ``x_low`` to ``x_high``, other
    terms at 0, from a :func:`mixed_logistic` fit.  ``accuracy_low``, ``accuracy_high``: the averaged
    accuracies at the two ends.

    The change is a nonlinear function of intercept, slope *and* random-intercept SDs, so its uncertainty
    comes from the same function of each bootstrap refit: ``ci_low, ci_high`` is the percentile interval
    at ``level``, ``se`` the refits' SD; with ``margin > 0``, ``tost`` holds :func:`tost_estimate` on that
    SE (its interval is the (1 − 2·alpha) one, as for every other equivalence claim).  ``None`` with fewer
    than ``MIN_BOOT_FOR_P`` refits.
    """
    draws = fit.get("boot_draws")
    if draws is None or len(draws) < MIN_BOOT_FOR_P:
        return None
    for name in ("Intercept", term):
        if name not in fit["terms"]:
            raise ValueError(f"the fit has no {name!r} term; terms: {sorted(fit['terms'])}")

    def ends(b0, b1, sd):
        return averaged_accuracy(b0 + b1 * x_low, sd), averaged_accuracy(b0 + b1 * x_high, sd)

    sd = random_intercept_sd(fit)
    sd_draws = fit.get("boot_sd_draws")
    boot_sd = (np.sqrt((sd_draws.to_numpy() ** 2).sum(axis=1)) if sd_draws is not None and len(sd_draws) == len(draws)
               else np.full(len(draws), sd))
    low_acc, high_acc = ends(fit["terms"]["Intercept"]["coef"], fit["terms"][term]["coef"], sd)
    estimate = float(high_acc - low_acc)
    b_low, b_high = ends(draws["Intercept"].to_numpy(), draws[term].to_numpy(), boot_sd)
    boot = b_high - b_low
    low, high = np.percentile(boot, [50 * (1 - level), 50 * (1 + level)])
    se = float(np.std(boot, ddof=1))
    out = dict(estimate=estimate, se=se, ci_low=float(low), ci_high=float(high), level=level,
               x_low=float(x_low), x_high=float(x_high), n_boot=int(len(boot)),
               accuracy_low=float(low_acc), accuracy_high=float(high_acc), random_sd=sd)
    if margin > 0 and se > 0:
        out["tost"] = tost_estimate(estimate, se, margin, alpha=alpha)
    return out


def _parametric_bootstrap(model, fit, n_boot: int, seed: int, fit_method: str, caught):
    """Refit ``model``'s design on responses simulated from ``fit``; returns (fixed effects, SDs,
    failures)."""
    from statsmodels.genmod.bayes_mixed_glm import BinomialBayesMixedGLM

    if n_boot <= 0:
        return np.empty((0, model.k_fep)), np.empty((0, model.k_vcp)), 0
    rng = np.random.default_rng(seed)
    fe = np.asarray(fit.fe_mean)
    sds = np.exp(np.asarray(fit.vcp_mean))
    fixed = model.exog @ fe
    exog_vc = model.exog_vc                      # sparse indicator matrix, one column per level
    level_sd = sds[model.ident]                  # SD of each random-intercept column
    start = np.asarray(fit.params, dtype=float).copy()
    start[model.k_fep + model.k_vcp:] = 0.0      # random effects start at zero, the rest warm
    out_fe, out_sd, failed = [], [], 0
    for b in range(n_boot):
        effects = rng.normal(0.0, level_sd)
        eta = fixed + exog_vc @ effects
        y = rng.binomial(1, 1 / (1 + np.exp(-eta))).astype(float)
        refit_model = BinomialBayesMixedGLM(y, model.exog, exog_vc, model.ident, vcp_p=model.vcp_p,
                                            fe_p=model.fe_p, fep_names=model.fep_names,
                                            vcp_names=model.vcp_names, vc_names=model.vc_names)
        try:
            refit = _fit_vb(refit_model, fit_method, int(rng.integers(2**32)), mean=start)
        except (ValueError, np.linalg.LinAlgError, FloatingPointError):
            failed += 1
            continue
        out_fe.append(refit.fe_mean)
        out_sd.append(np.exp(refit.vcp_mean))
    return np.asarray(out_fe).reshape(-1, model.k_fep), np.asarray(out_sd).reshape(-1, model.k_vcp), failed


# --- Unit level ----------------------------------------------------------------------------------

def unit_mixed_model(units: pd.DataFrame, formula: str = "mis ~ rate + top1", group: str = "unit_id",
                     level: float = 0.95) -> dict:
    """Linear mixed model with a random intercept per ``group`` (the same unit across models), REML,
    on rows with ``status == "ok"`` (when that column exists) and no missing values in the used
    columns.  Intervals and p-values are normal-based (statsmodels' Wald z).

    Every fit is checked before it is reported (:func:`fit_problems`): finite log-likelihood and
    standard errors, a positive-definite fixed-effect covariance, no absurd standard error.  A fit
    that fails is refitted with the next optimizer (L-BFGS, BFGS, Powell, Nelder–Mead: L-BFGS can
    stop at a degenerate point where the REML log-likelihood is +inf and call it converged); when
    none passes, the simpler model is reported: OLS with standard errors clustered by ``group``.

    Returns ``table``/``terms`` (fixed effects), ``group_sd`` (random-intercept SD; ``None`` for the
    OLS fallback), ``residual_sd``, ``n_obs``, ``n_groups``, ``converged``, ``method`` (optimizer, or
    ``"ols-cluster"``), ``fit`` (a sentence: which fit is shown and why), ``attempts`` (each
    optimizer's problems), ``boundary`` (random-intercept variance at zero), ``formula``, ``warnings``.
    """
    import statsmodels.formula.api as smf

    if "status" in units:
        units = units[units["status"] == "ok"]
    data = _model_rows(units, formula, [group], main_only=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = smf.mixedlm(formula, data=data, groups=data[group])
        ols = smf.ols(formula, data=data).fit()
        largest_group = int(data[group].value_counts().max())
        fit, method, attempts = _fit_mixedlm(model, ols, largest_group)
    k = model.k_fe
    if fit is None:
        codes = pd.factorize(data[group])[0]
        fallback = smf.ols(formula, data=data).fit(cov_type="cluster", cov_kwds={"groups": codes})
        table = _table(fallback.params, fallback.bse, level)
        why = "; ".join(f"{a['method']}: {', '.join(a['problems'])}" for a in attempts)
        return dict(table=table, terms=_terms(table), group_sd=None, residual_sd=float(np.sqrt(fallback.scale)),
                    n_obs=int(fallback.nobs), n_groups=int(data[group].nunique()), converged=False,
                    method="ols-cluster", attempts=attempts, boundary=False, formula=formula,
                    fit=f"OLS with standard errors clustered by {group}: no mixed-model fit passed the checks ({why})",
                    warnings=_collect(caught))
    table = _table(fit.fe_params, np.asarray(fit.bse)[:k], level)
    group_var = max(float(fit.cov_re.iloc[0, 0]), 0.0)
    boundary = group_var <= 1e-8 * float(fit.scale)
    shown = f"REML mixed model ({method})"
    if len(attempts) > 1:
        shown += " after " + "; ".join(f"{a['method']} failed the checks ({', '.join(a['problems'])})"
                                       for a in attempts[:-1])
    if boundary:
        shown += "; the random-intercept variance is at its boundary (0): units do not differ beyond noise"
    return dict(table=table, terms=_terms(table), group_sd=float(np.sqrt(group_var)),
                residual_sd=float(np.sqrt(fit.scale)), n_obs=int(fit.nobs), n_groups=int(data[group].nunique()),
                converged=bool(fit.converged), method=method, attempts=attempts, boundary=bool(boundary),
                fit=shown, formula=formula, warnings=_collect(caught))


FEW_CLUSTERS = 10     # below this many models, cluster-robust standard errors are known to run small


def within_unit_slope(units: pd.DataFrame, formula: str = "mis ~ rate", unit: str = "unit_id",
                      model: str = "model_id", level: float = 0.95) -> dict:
    """MIS on model-level predictors (rate, top-1) within units, with model-level noise in the intervals.

    Pruning rate varies between models, never within one, so whatever a model shares across its units
    (its training run, its retraining noise) is an error common to all of them.  A fit that treats a
    model's units as independent given the unit (:func:`unit_mixed_model`) counts that noise once per
    unit and gives intervals that are too narrow; a retrained model can then land outside them.  Here
    each unit's own mean is removed (unit fixed effects: the same unit is compared with itself across
    models), the deviations are fitted by OLS, and the covariance is two-way cluster-robust by unit and
    by model (Cameron, Gelbach & Miller 2011; statsmodels' CRV1 with a two-column ``groups``), never below
    clustering on either factor alone (see :func:`_clustered_fit`).
    Intervals and p-values use t with (fewer clusters − 1) degrees of freedom.  With fewer than
    :data:`FEW_CLUSTERS` models, where cluster-robust errors run small (with 4 models and t(3) the 95 %
    intervals of a per-method slope miss far more often than 5 %), the slope and its error come instead
    from the model-level two-step (Donald & Lang 2007): each unit's deviations from its own mean are
    averaged per model and regressed, with an intercept, on the model-level predictors across the
    models, t with (models − predictors − 1) df.  With fewer than 3 models the covariance is clustered
    by unit only, and ``fit`` says so.

    Returns the keys of :func:`unit_mixed_model` (``method="within-unit"``, ``group_sd=None``) plus
    ``n_models``, ``df``, ``model_sd`` (the SD of the error a model's units share, by the method of
    moments from the residuals' model means, 0 when they vary no more than the units' own noise
    explains) and ``model_variance_share`` (that error's share of a model mean's variance: the part
    of the slope's variance that more units per model do not shrink).
    """
    import patsy
    import statsmodels.api as sm

    if "status" in units:
        units = units[units["status"] == "ok"]
    data = _model_rows(units, formula, [unit, model], main_only=False)
    data = data[data.groupby(unit)[unit].transform("size") > 1].reset_index(drop=True)  # one row: no deviation
    if data.empty:
        raise ValueError(f"no unit appears in two or more models: {formula!r} has nothing to compare")
    y, x = patsy.dmatrices(formula, data, return_type="dataframe")
    x = x.drop(columns=["Intercept"], errors="ignore")
    if x.shape[1] == 0:
        raise ValueError(f"{formula!r} has no predictor")
    keys = data.loc[y.index, unit]
    yd = y.iloc[:, 0] - y.iloc[:, 0].groupby(keys).transform("mean")
    xd = x - x.groupby(keys).transform("mean")
    constant = [c for c in xd if not np.any(np.abs(xd[c].to_numpy()) > 1e-12)]
    if constant:
        raise ValueError(f"{constant} do not vary within any unit: the fit cannot separate them from the unit")
    unit_codes = pd.factorize(keys)[0]
    model_codes = pd.factorize(data.loc[y.index, model])[0]
    n_units, n_models = int(unit_codes.max() + 1), int(model_codes.max() + 1)
    two_way = n_models >= 3
    two_step = two_way and n_models < FEW_CLUSTERS and n_models - xd.shape[1] - 1 >= 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit, variances, fallback = _clustered_fit(sm.OLS(yd.to_numpy(), xd.to_numpy()), unit_codes,
                                                  model_codes if two_way and not two_step else None)
    if two_step:
        params, se, df = _model_level_two_step(yd.to_numpy(), xd, model_codes)
        shown = (f"unit fixed effects; model-level two-step (Donald & Lang 2007): the {n_units} units' deviations "
                 f"from their own means averaged per model, regressed on {', '.join(x.columns)} across the "
                 f"{n_models} models, t with {df} df (clustered errors run small with fewer than {FEW_CLUSTERS} "
                 f"models)")
    else:
        params, se = np.asarray(fit.params, dtype=float), np.sqrt(np.clip(variances, 0.0, None))
        df = (min(n_units, n_models) if two_way else n_units) - 1
        shown = (f"unit fixed effects, OLS, standard errors clustered two-way by unit ({n_units}) and model "
                 f"({n_models}), t with {df} df{fallback}" if two_way else
                 f"unit fixed effects, OLS, standard errors clustered by unit ({n_units}) only: {n_models} model(s) "
                 f"are too few to cluster on, so model-level noise is not in the interval")
        if two_way and n_models < FEW_CLUSTERS:     # a predictor too many for the two-step
            shown += (f" (with fewer than {FEW_CLUSTERS} models clustered errors are approximate and tend to run "
                      f"small)")
    table = _table(pd.Series(params, index=list(x.columns)), se, level, df=df)
    model_var, noise_var, per_model = _model_variance(np.asarray(fit.resid), model_codes, n_units, xd.shape[1])
    return dict(table=table, terms=_terms(table), group_sd=None, residual_sd=float(np.sqrt(noise_var)),
                n_obs=int(fit.nobs), n_groups=n_units, n_models=n_models, df=int(df), converged=True,
                method="within-unit", attempts=[], boundary=False, formula=formula, fit=shown,
                two_way=bool(two_way), model_sd=float(np.sqrt(model_var)),
                model_variance_share=float(model_var / (model_var + noise_var / per_model)) if model_var > 0 else 0.0,
                warnings=_collect(caught))


def _clustered_fit(ols, unit_codes: np.ndarray, model_codes: np.ndarray | None):
    """``(fit, variances, note)``: OLS with its coefficients' variances clustered by unit, and with
    ``model_codes`` two-way by unit and model (CGM: V_unit + V_model − V_both).  The inclusion–exclusion
    sum can come out below a one-way variance (or negative) when the intersection term is large; a two-way
    error smaller than clustering on either factor alone claims more precision than either dependence
    allows, so each coefficient takes the largest of the two-way and the two one-way variances (the
    conservative rule), and the note names where that happened."""
    fit = ols.fit(cov_type="cluster", cov_kwds={"groups": unit_codes})
    by_unit = np.diag(np.asarray(fit.cov_params(), dtype=float))
    if model_codes is None:
        return fit, by_unit, ""
    two_way = np.diag(np.asarray(ols.fit(cov_type="cluster", cov_kwds={
        "groups": np.column_stack([unit_codes, model_codes])}).cov_params(), dtype=float))
    by_model = np.diag(np.asarray(ols.fit(cov_type="cluster", cov_kwds={"groups": model_codes}).cov_params(),
                                  dtype=float))
    variances = np.maximum.reduce([two_way, by_unit, by_model])
    raised = variances > two_way
    if not raised.any():
        return fit, two_way, ""
    larger = "unit" if np.all(by_unit[raised] >= by_model[raised]) else "model"
    return (fit, variances, f"; the two-way variance was below the one-way one (by {larger}), so the larger "
                            f"one-way variance is used (conservative)")


def _model_level_two_step(yd: np.ndarray, xd: pd.DataFrame, model_codes: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray, int]:
    """Slopes, standard errors and df of the model means of within-unit deviations regressed (OLS, with an
    intercept) on the model means of the demeaned predictors: one observation per model."""
    import statsmodels.api as sm

    y = pd.Series(yd).groupby(model_codes).mean()
    x = pd.DataFrame(xd.to_numpy(), columns=list(xd.columns)).groupby(model_codes).mean()
    fit = sm.OLS(y.to_numpy(), sm.add_constant(x.to_numpy(), has_constant="add")).fit()
    return np.asarray(fit.params[1:], dtype=float), np.asarray(fit.bse[1:], dtype=float), int(fit.df_resid)


def _model_variance(resid: np.ndarray, model_codes: np.ndarray, n_units: int, k: int) -> tuple[float, float, float]:
    """``(σ²_model, σ²_noise, units per model)`` of within-unit residuals by the method of moments: the
    noise variance from the residuals about their model means, the model variance from the spread of the
    model means beyond what that noise gives them (clipped at 0); the unit count is the harmonic mean."""
    frame = pd.DataFrame({"r": resid, "m": model_codes})
    means = frame.groupby("m")["r"].agg(["mean", "size"])
    n_models = len(means)
    noise_df = len(frame) - n_models - n_units - k + 1
    noise_var = float(((frame["r"] - frame["m"].map(means["mean"])) ** 2).sum() / max(noise_df, 1))
    per_model = float(n_models / (1.0 / means["size"]).sum())
    model_df = n_models - 1 - k
    if model_df < 1:
        return 0.0, noise_var, per_model
    spread = float((means["mean"] ** 2).sum() / model_df)
    return max(spread - noise_var / per_model, 0.0), noise_var, per_model


def fit_problems(fit, k_fe: int, reference_se, largest_group: int) -> list[str]:
    """What makes a fitted mixed model unreportable (empty when it passes).

    ``reference_se``: the OLS standard errors of the same fixed effects; a random intercept can
    inflate them by about √(largest group size), so a standard error 10× beyond that is absurd.
    """
    problems = []
    if not fit.converged:
        problems.append("did not converge")
    if not np.isfinite(fit.llf):
        problems.append(f"log-likelihood {fit.llf}")
    se = np.asarray(fit.bse, dtype=float)[:k_fe]
    if not np.all(np.isfinite(se)):
        problems.append("non-finite standard errors")
    else:
        bound = 10 * np.sqrt(max(largest_group, 1)) * np.asarray(reference_se, dtype=float)
        if np.any(se > bound):
            problems.append(f"absurd standard error {float(np.max(se)):.3g}")
    try:
        cov = np.asarray(fit.cov_params(), dtype=float)[:k_fe, :k_fe]
        if not np.all(np.isfinite(cov)) or np.linalg.eigvalsh((cov + cov.T) / 2).min() <= 0:
            problems.append("fixed-effect covariance (inverse Hessian) not positive definite")
    except (np.linalg.LinAlgError, ValueError):
        problems.append("fixed-effect covariance not available")
    return problems


def _fit_mixedlm(model, ols, largest_group: int, methods=("lbfgs", "bfgs", "powell", "nm")):
    """REML fits with each optimizer in turn until one passes :func:`fit_problems`.

    Returns ``(fit or None, optimizer, attempts)``, attempts listing every optimizer tried with its problems.
    """
    attempts = []
    for method in methods:
        try:
            fit = model.fit(reml=True, method=method)
        except (np.linalg.LinAlgError, ValueError) as error:
            attempts.append({"method": method, "problems": [f"{type(error).__name__}: {error}"]})
            continue
        problems = fit_problems(fit, model.k_fe, ols.bse, largest_group)
        attempts.append({"method": method, "problems": problems})
        if not problems:
            return fit, method, attempts
    return None, None, attempts


def _hinge_rss(x: np.ndarray, y: np.ndarray, grid: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Residual sums of squares of y ~ 1 + x + max(0, x − c) for every c in ``grid`` and every row of
    ``weights`` (bootstrap counts; shape (B, n)) by batched normal equations; returns (B, len(grid)).

    The weighted cross-products of all (resample, breakpoint) pairs come out of two matrix products,
    so a thousand resamples over a hundred breakpoints cost well under a second for a few hundred
    rows."""
    G, n = len(grid), len(x)
    X = np.stack(np.broadcast_arrays(np.ones((1, n)), x[None], np.maximum(0, x[None] - grid[:, None])), -1)
    outer = (X[..., :, None] * X[..., None, :]).reshape(G, n, 9).transpose(1, 0, 2).reshape(n, G * 9)
    XtX = (weights @ outer).reshape(-1, G, 3, 3)
    Xty = (weights @ (X * y[None, :, None]).transpose(1, 0, 2).reshape(n, G * 3)).reshape(-1, G, 3)
    yty = weights @ (y * y)
    beta = np.linalg.solve(XtX + 1e-12 * np.eye(3), Xty[..., None])[..., 0]
    return np.maximum(yty[:, None] - np.einsum("bgj,bgj->bg", beta, Xty), 0.0)


def _aic(rss: float, n: int, k: int) -> float:
    """Gaussian AIC up to a constant shared by all models: n·log(RSS/n) + 2k (k counts σ²)."""
    return float(n * np.log(max(rss, 1e-300) / n) + 2 * k)


def model_level_mis(units: pd.DataFrame, tol: float = 1e-12, max_iter: int = 1000) -> pd.DataFrame:
    """One row per model: its rate and its level of MIS with every unit compared with itself — the model
    effects of ``mis ~ C(unit) + C(model)`` (found by alternating projections), plus the mean unit effect —
    so a unit that pruning removes does not move the models it is missing from, and a model's shared
    noise counts once.  Columns ``model_id, rate, mis, units``."""
    d = units[units["mis"].notna()]
    if "status" in d:
        d = d[d["status"] == "ok"]
    d = d[d.groupby("unit_id")["unit_id"].transform("size") > 1]
    unit_codes, model_codes = pd.factorize(d["unit_id"])[0], pd.factorize(d["model_id"], sort=True)
    y = d["mis"].to_numpy(dtype=float)
    model_effect = np.zeros(len(model_codes[1]))
    for _ in range(max_iter):
        unit_effect = pd.Series(y - model_effect[model_codes[0]]).groupby(unit_codes).mean().to_numpy()
        updated = pd.Series(y - unit_effect[unit_codes]).groupby(model_codes[0]).mean().to_numpy()
        done = np.max(np.abs(updated - model_effect)) < tol
        model_effect = updated
        if done:
            break
    out = d.groupby("model_id", sort=True).agg(rate=("rate", "first"), units=("mis", "size"))
    out.insert(1, "mis", model_effect + unit_effect.mean())
    return out.reset_index()


def dose_response(x, y, n_boot: int = 1000, seed: int = 0, grid=None, level: float = 0.95) -> dict:
    """Straight line vs hinge, y = a + b·x + d·max(0, x − c), by least squares and AIC.

    The breakpoint c is found by profile least squares over ``grid`` (default: 101 points evenly
    spaced between the second-smallest and second-largest distinct x, so each side keeps two
    distinct x values).  AIC counts a, b, σ² for the line (k = 3) and a, b, d, c, σ² for the hinge
    (k = 5); ``preferred`` is the lower.  Because c is chosen to fit best, the hinge wins on AIC for
    roughly one truly linear data set in five (simulation: 200 points, 10 distinct x); ``delta_aic``
    above about 4 happens in a few per cent, so treat small positive values as weak evidence.
    The breakpoint interval is a percentile bootstrap over
    rows (``n_boot`` resamples, each re-profiled over the same grid).

    Returns ``n``, ``linear`` (``intercept, slope, rss, aic, k``), ``hinge`` (``intercept, slope,
    slope_change, slope_after, breakpoint, rss, aic, k``), ``preferred`` ("linear"/"hinge"),
    ``delta_aic`` (linear − hinge; positive favours the hinge), ``breakpoint_ci`` (lo, hi),
    ``grid`` and ``profile_rss`` (hinge RSS at every grid point).
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    n = len(x)
    distinct = np.unique(x)
    if len(distinct) < 4 or n < 6:
        raise ValueError(f"a hinge needs at least 4 distinct x values and 6 points; got {len(distinct)} and {n}")
    if grid is None:
        grid = np.linspace(distinct[1], distinct[-2], 101)
    grid = np.asarray(grid, dtype=float)
    grid = grid[(grid > distinct[0]) & (grid < distinct[-1])]
    if grid.size == 0:
        raise ValueError("no candidate breakpoint lies strictly inside the range of x")

    X = np.column_stack([np.ones(n), x])
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    rss_lin = float(np.sum((y - X @ coef) ** 2))

    profile = _hinge_rss(x, y, grid, np.ones((1, n)))[0]
    c = float(grid[np.argmin(profile)])
    H = np.column_stack([np.ones(n), x, np.maximum(0, x - c)])
    hcoef, *_ = np.linalg.lstsq(H, y, rcond=None)
    rss_hinge = float(np.sum((y - H @ hcoef) ** 2))

    rng = np.random.default_rng(seed)
    draws = []
    chunk = max(1, int(4e6 // (len(grid) * 9)))              # bound memory per batch
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        counts = rng.multinomial(n, np.full(n, 1 / n), size=b).astype(float)
        draws.append(grid[np.argmin(_hinge_rss(x, y, grid, counts), axis=1)])
    draws = np.concatenate(draws) if draws else np.empty(0)
    ci = tuple(np.percentile(draws, [50 * (1 - level), 50 * (1 + level)])) if draws.size else (np.nan, np.nan)

    linear = dict(intercept=float(coef[0]), slope=float(coef[1]), rss=rss_lin, aic=_aic(rss_lin, n, 3), k=3)
    hinge = dict(intercept=float(hcoef[0]), slope=float(hcoef[1]), slope_change=float(hcoef[2]),
                 slope_after=float(hcoef[1] + hcoef[2]), breakpoint=c, rss=rss_hinge,
                 aic=_aic(rss_hinge, n, 5), k=5)
    return dict(n=n, linear=linear, hinge=hinge,
                preferred="hinge" if hinge["aic"] < linear["aic"] else "linear",
                delta_aic=linear["aic"] - hinge["aic"], breakpoint_ci=(float(ci[0]), float(ci[1])),
                breakpoint_boot=draws, grid=grid, profile_rss=profile)


# --- Equivalence ---------------------------------------------------------------------------------

def tost_estimate(estimate: float, se: float, margin: float, df=None, alpha: float = 0.05) -> dict:
    """Two one-sided tests of −margin < θ < margin for an estimate with standard error ``se``.

    ``p_lower`` tests H₀: θ ≤ −margin, ``p_upper`` tests H₀: θ ≥ margin (normal reference, or t with
    ``df``); ``p`` is the larger and ``equivalent`` is ``p < alpha`` — the same as the
    (1 − 2·alpha) interval (``ci_low, ci_high``, also returned) lying inside ±margin.
    """
    if not margin > 0:
        raise ValueError(f"margin must be positive, got {margin!r}")
    if not se > 0:
        raise ValueError(f"se must be positive, got {se!r}")
    dist = stats.norm if df is None else stats.t(df)
    p_lower = float(dist.sf((estimate + margin) / se))
    p_upper = float(dist.cdf((estimate - margin) / se))
    q = float(dist.ppf(1 - alpha))
    p = max(p_lower, p_upper)
    return dict(estimate=float(estimate), se=float(se), margin=float(margin), df=df, alpha=alpha,
                p_lower=p_lower, p_upper=p_upper, p=p, equivalent=bool(p < alpha),
                ci_low=float(estimate - q * se), ci_high=float(estimate + q * se))


def tost_paired(a, b, margin: float, alpha: float = 0.05) -> dict:
    """TOST on paired differences a − b (t with n − 1 df); pairs with a NaN are dropped.

    Returns :func:`tost_estimate`'s keys (estimate = mean difference) plus ``n``.
    """
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    d = d[~np.isnan(d)]
    if len(d) < 2:
        raise ValueError(f"need at least two complete pairs, got {len(d)}")
    se = float(np.std(d, ddof=1) / np.sqrt(len(d)))
    out = tost_estimate(float(d.mean()), se, margin, df=len(d) - 1, alpha=alpha)
    out["n"] = len(d)
    return out
