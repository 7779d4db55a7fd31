"""Descriptive statistics of 2-AFC trials: accuracies with their intervals, d′, exclusions, RTs.

Every function takes the canonical trial frame of :mod:`analysis.load` (one row per trial response,
columns ``participant, unit_id, model_id, method, rate, sparsity, kind, correct, confidence, rt_ms,
trial_type, is_machine, excluded, exclusion_reasons``) and returns a tidy DataFrame or a dict.
Accuracies are computed on main trials only (``trial_type == "main"``); practice and catch trials
serve the exclusion rules.  ``by`` names the grouping columns; ``by=()`` pools everything.

Conventions follow the IMI papers (Zimmermann et al. 2023; Borowski et al. 2021): a condition's
accuracy is the mean of per-participant accuracies with ± 2 SEM across participants; per-unit
accuracies carry percentile-bootstrap intervals over trials (10 000 resamples); pooled trial counts
get Wilson score intervals.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

MAIN = "main"


# --- Intervals and d′ ----------------------------------------------------------------------------

def _z(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    return float(stats.norm.ppf(0.5 + level / 2))


def _unwrap(*arrays):
    """Return plain floats when every input was a scalar, arrays otherwise."""
    return tuple(float(a) if np.ndim(a) == 0 else a for a in arrays)


def wilson_interval(k, n, level: float = 0.95):
    """Wilson score interval ``(lo, hi)`` for ``k`` successes out of ``n`` trials (vectorized).

    Scalars in, floats out; arrays broadcast.  ``n == 0`` gives ``(nan, nan)``.
    """
    k = np.asarray(k, dtype=float)
    n = np.asarray(n, dtype=float)
    z = _z(level)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = k / n
        denom = 1 + z**2 / n
        centre = (p + z**2 / (2 * n)) / denom
        half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
        lo = np.where(n > 0, np.clip(centre - half, 0, 1), np.nan)
        hi = np.where(n > 0, np.clip(centre + half, 0, 1), np.nan)
    return _unwrap(lo, hi)


def dprime(pc, n=None, correction: str = "clip"):
    """Sensitivity of an unbiased 2-AFC observer: d′ = √2 · Φ⁻¹(pc).

    Without ``n`` the proportion correct is used as is (pc = 1 gives +inf, pc = 0.5 gives 0).  With
    ``n`` (the trials behind ``pc``) extreme proportions are corrected so d′ stays finite:

    - ``correction="clip"`` (default): clip pc to [1/(2n), 1 − 1/(2n)] (the 1/(2N) rule,
      Macmillan & Kaplan 1985) — proportions away from the edges are unchanged;
    - ``correction="loglinear"``: pc → (pc·n + 0.5) / (n + 1) for every proportion (Hautus 1995),
      which shrinks all of them slightly towards 0.5.

    Vectorized; scalars in, float out.  Example: ``dprime(0.76) ≈ 1.0``.
    """
    pc = np.asarray(pc, dtype=float)
    if n is not None:
        n = np.asarray(n, dtype=float)
        if correction == "clip":
            with np.errstate(divide="ignore"):
                pc = np.clip(pc, 1 / (2 * n), 1 - 1 / (2 * n))
        elif correction == "loglinear":
            pc = (pc * n + 0.5) / (n + 1)
        else:
            raise ValueError(f"unknown correction {correction!r}; choose from ['clip', 'loglinear']")
    d = np.sqrt(2) * stats.norm.ppf(pc)
    return float(d) if d.ndim == 0 else d


# --- Helpers -------------------------------------------------------------------------------------

def _main(trials: pd.DataFrame) -> pd.DataFrame:
    if "trial_type" not in trials:
        return trials
    return trials[trials["trial_type"] == MAIN]


def _keys(by) -> list[str]:
    if isinstance(by, str):
        return [by]
    return list(by)


def _check_columns(frame: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"trial frame lacks column(s) {missing}; it has {sorted(frame.columns)}")


def _grouped(frame: pd.DataFrame, keys: list[str]):
    """``groupby`` that also works for no keys (one group holding every row)."""
    if keys:
        return frame.groupby(keys, sort=True, dropna=False, observed=True)
    return frame.assign(_all=0).groupby("_all")


def _finish(table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    table = table.reset_index()
    return table.drop(columns="_all") if not keys else table


# --- Exclusions ----------------------------------------------------------------------------------

def apply_exclusions(trials: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Drop every trial of excluded participants.

    A participant counts as excluded when any of their rows has ``excluded`` true.  Returns
    ``(kept_trials, reasons)``; ``reasons`` has columns ``reason, participants``: one row per rule
    named in ``exclusion_reasons`` (participants who failed it, sorted by rule name; a participant
    may fail several), then ``"any"`` (participants excluded) and ``"kept"`` (participants kept).
    """
    _check_columns(trials, ["participant"])
    excluded = (trials["excluded"].fillna(False).astype(bool) if "excluded" in trials
                else pd.Series(False, index=trials.index))
    dropped = set(trials.loc[excluded, "participant"])
    everyone = set(trials["participant"])

    failed: dict[str, set] = {}
    if "exclusion_reasons" in trials:
        for who, text in zip(trials["participant"], trials["exclusion_reasons"].fillna("").astype(str)):
            for reason in filter(None, (r.strip() for r in text.split(";"))):
                failed.setdefault(reason, set()).add(who)
    rows = [(reason, len(who)) for reason, who in sorted(failed.items())]
    rows += [("any", len(dropped)), ("kept", len(everyone - dropped))]
    reasons = pd.DataFrame(rows, columns=["reason", "participants"])
    kept = trials[~trials["participant"].isin(dropped)].copy()
    return kept, reasons


# --- Accuracies ----------------------------------------------------------------------------------

def participant_accuracy(trials: pd.DataFrame, by=("kind",)) -> pd.DataFrame:
    """Accuracy of every participant in every ``by`` cell: columns ``[*by, participant, n, accuracy]``
    (main trials only)."""
    keys = _keys(by)
    _check_columns(trials, [*keys, "participant", "correct"])
    main = _main(trials)
    table = (main.groupby([*keys, "participant"], sort=True, observed=True)["correct"]
             .agg(n="size", accuracy="mean").reset_index())
    table["n"] = table["n"].astype(int)
    return table


def condition_summary(trials: pd.DataFrame, by=("kind",), level: float = 0.95) -> pd.DataFrame:
    """One row per ``by`` cell, as the IMI papers plot it.

    Columns ``[*by, participants, trials, accuracy, sem, lo_2sem, hi_2sem, wilson_low, wilson_high,
    dprime]``: ``accuracy`` is the mean of per-participant accuracies and ``sem`` their standard
    deviation (ddof 1) over √participants (NaN with a single participant); ``lo_2sem``/``hi_2sem`` =
    accuracy ∓ 2·sem.  The Wilson interval (at ``level``) is on the pooled trials (correct / trials),
    and ``dprime`` is √2·Φ⁻¹(accuracy) with the 1/(2n) clip over the cell's trials.
    """
    keys = _keys(by)
    per = participant_accuracy(trials, by=keys)
    per = per.assign(k=per["accuracy"] * per["n"])
    table = _grouped(per, keys).agg(participants=("participant", "size"), trials=("n", "sum"),
                                    accuracy=("accuracy", "mean"), sd=("accuracy", "std"), k=("k", "sum"))
    table["sem"] = table.pop("sd") / np.sqrt(table["participants"])
    table["lo_2sem"] = table["accuracy"] - 2 * table["sem"]
    table["hi_2sem"] = table["accuracy"] + 2 * table["sem"]
    k = table.pop("k").round().to_numpy()
    table["wilson_low"], table["wilson_high"] = wilson_interval(k, table["trials"].to_numpy(), level)
    table["dprime"] = dprime(table["accuracy"].to_numpy(), n=table["trials"].to_numpy())
    table["trials"] = table["trials"].astype(int)
    return _finish(table, keys)


def _binomial_bootstrap(k: np.ndarray, n: np.ndarray, n_boot: int, level: float, rng, chunk: int = 512):
    """Percentile interval of Binomial(n, k/n)/n draws for every (k, n); cells sharing (k, n) share
    one set of draws (their bootstrap distributions are identical), so the cost grows with the
    number of distinct (k, n) pairs, not with the number of units."""
    lo, hi = np.full(len(n), np.nan), np.full(len(n), np.nan)
    q = [50 * (1 - level), 50 * (1 + level)]
    ok = n > 0
    pairs, inverse = np.unique(np.column_stack([k[ok], n[ok]]), axis=0, return_inverse=True)
    plo, phi = np.empty(len(pairs)), np.empty(len(pairs))
    for start in range(0, len(pairs), chunk):          # bounded memory: chunk × n_boot draws at a time
        kk, nn = pairs[start:start + chunk, 0], pairs[start:start + chunk, 1]
        draws = rng.binomial(nn[:, None], (kk / nn)[:, None], size=(len(nn), n_boot)) / nn[:, None]
        plo[start:start + chunk], phi[start:start + chunk] = np.percentile(draws, q, axis=1)
    lo[ok], hi[ok] = plo[inverse.ravel()], phi[inverse.ravel()]
    return lo, hi


def catch_summary(trials: pd.DataFrame, threshold: float = 0.8, by=("kind",), level: float = 0.95) -> pd.DataFrame:
    """Catch-trial accuracy (a query that also appears among the references: attention, not skill).

    One row per ``by`` group and one for all catch trials (``kind`` = ``"all"``): trials, participants,
    pooled accuracy with its Wilson interval, the mean and SEM of per-participant accuracy, the lowest
    participant's, and the share of participants at or above ``threshold`` (the exclusion rule).
    """
    _check_columns(trials, ["participant", "correct", "trial_type"])
    catch = trials[trials["trial_type"] == "catch"]
    keys = [k for k in _keys(by) if k in catch]
    groups = [("all", catch)] + ([(name, g) for name, g in catch.groupby(keys[0], sort=True)] if keys else [])
    rows = []
    for name, g in groups:
        if g.empty:
            continue
        per = g.groupby("participant")["correct"].mean()
        k, n = int(g["correct"].sum()), len(g)
        lo, hi = wilson_interval(k, n, level)
        rows.append({"kind": name, "trials": n, "participants": int(per.size), "accuracy": k / n,
                     "wilson_low": float(lo), "wilson_high": float(hi), "participant_mean": float(per.mean()),
                     "participant_sem": float(per.sem()) if per.size > 1 else float("nan"),
                     "lowest": float(per.min()), "share_at_threshold": float((per >= threshold).mean())})
    return pd.DataFrame(rows)


def unit_accuracy(trials: pd.DataFrame, n_boot: int = 10000, seed: int = 0,
                  by=("model_id", "kind", "unit_id"), level: float = 0.95) -> pd.DataFrame:
    """Accuracy per unit with a percentile-bootstrap interval over its trials.

    Columns ``[*by, n, accuracy, ci_low, ci_high]`` (main trials only).  Resampling a unit's n 0/1
    outcomes with replacement makes the number correct exactly Binomial(n, p̂) with p̂ the unit's
    observed accuracy, so the bootstrap is drawn as ``rng.binomial(n, p̂, size=n_boot) / n`` — the
    same distribution as resampling the rows, at a fraction of the cost.  Since that distribution
    depends only on (n, number correct), units sharing both share one set of draws (and so one
    interval); 10 000 resamples for thousands of units take about a second.  Units answered all
    right or all wrong get the degenerate interval [p̂, p̂]; use :func:`wilson_interval` where that
    matters.
    """
    keys = _keys(by)
    _check_columns(trials, [*keys, "correct"])
    table = _grouped(_main(trials), keys)["correct"].agg(n="size", k="sum")
    n = table["n"].to_numpy(dtype=np.int64)
    k = table.pop("k").to_numpy(dtype=np.int64)
    table["n"] = n
    table["accuracy"] = k / n
    table["ci_low"], table["ci_high"] = _binomial_bootstrap(k, n, n_boot, level, np.random.default_rng(seed))
    return _finish(table, keys)


def rt_summary(trials: pd.DataFrame, by=("kind",)) -> pd.DataFrame:
    """Response times (``rt_ms``) of main trials per ``by`` cell, all trials and correct ones.

    Columns ``[*by, n, rt_median, rt_q25, rt_q75, rt_iqr, n_correct, rt_median_correct,
    rt_q25_correct, rt_q75_correct, rt_iqr_correct]``.
    """
    keys = _keys(by)
    _check_columns(trials, [*keys, "rt_ms", "correct"])
    main = _main(trials)

    def describe(frame: pd.DataFrame, suffix: str) -> pd.DataFrame:
        rt = _grouped(frame, keys)["rt_ms"]
        out = pd.DataFrame({f"n{suffix}": rt.size(), f"rt_median{suffix}": rt.median(),
                            f"rt_q25{suffix}": rt.quantile(0.25), f"rt_q75{suffix}": rt.quantile(0.75)})
        out[f"rt_iqr{suffix}"] = out[f"rt_q75{suffix}"] - out[f"rt_q25{suffix}"]
        return out

    table = describe(main, "").join(describe(main[main["correct"] == 1], "_correct"), how="left")
    table["n_correct"] = table["n_correct"].fillna(0).astype(int)
    return _finish(table, keys)


def accuracy_by_confidence(trials: pd.DataFrame, by=("kind",), level: float = 0.95) -> pd.DataFrame:
    """Accuracy per confidence level (1–3) of main trials: columns ``[*by, confidence, n, share,
    accuracy, wilson_low, wilson_high]``; ``share`` is the fraction of the cell's trials given with
    that confidence."""
    keys = _keys(by)
    _check_columns(trials, [*keys, "confidence", "correct"])
    table = (_main(trials).groupby([*keys, "confidence"], sort=True, observed=True)["correct"]
             .agg(n="size", k="sum").reset_index())
    total = table.groupby(keys, observed=True)["n"].transform("sum") if keys else table["n"].sum()
    table["share"] = table["n"] / total
    table["accuracy"] = table["k"] / table["n"]
    table["wilson_low"], table["wilson_high"] = wilson_interval(table.pop("k").to_numpy(),
                                                                table["n"].to_numpy(), level)
    return table


# --- Paired comparison ---------------------------------------------------------------------------

def paired_comparison(trials: pd.DataFrame, pair: str = "participant", condition: str = "kind",
                      a="natural", b="synthetic", level: float = 0.95) -> dict:
    """Compare accuracy in conditions ``a`` and ``b`` within pairs (participants, or units with
    ``pair="unit_id"``), main trials only; pairs lacking either condition are left out.

    Returns a dict: ``pair, condition, a, b, n_pairs, mean_a, mean_b, mean_diff`` (a − b),
    ``ci_low, ci_high`` (t interval of the mean difference at ``level``), ``t, df, p_t``
    (``scipy.stats.ttest_rel``), ``wilcoxon, p_wilcoxon`` (signed-rank; NaN when every difference
    is zero or fewer than two pairs), and ``per_pair``: a DataFrame ``[pair, n_a, n_b, accuracy_a,
    accuracy_b, diff]``.
    """
    _check_columns(trials, [pair, condition, "correct"])
    main = _main(trials)
    main = main[main[condition].isin([a, b])]
    cells = main.groupby([pair, condition], observed=True)["correct"].agg(["size", "mean"]).unstack(condition)
    per = pd.DataFrame(index=cells.index)
    for label, value in (("a", a), ("b", b)):
        has = ("size", value) in cells.columns
        per[f"n_{label}"] = cells[("size", value)] if has else np.nan
        per[f"accuracy_{label}"] = cells[("mean", value)] if has else np.nan
    per = per.dropna().reset_index()
    per[["n_a", "n_b"]] = per[["n_a", "n_b"]].astype(int)
    per["diff"] = per["accuracy_a"] - per["accuracy_b"]
    n = len(per)
    out = dict(pair=pair, condition=condition, a=a, b=b, n_pairs=n,
               mean_a=float(per["accuracy_a"].mean()) if n else np.nan,
               mean_b=float(per["accuracy_b"].mean()) if n else np.nan,
               mean_diff=float(per["diff"].mean()) if n else np.nan,
               ci_low=np.nan, ci_high=np.nan, t=np.nan, df=max(n - 1, 0), p_t=np.nan,
               wilcoxon=np.nan, p_wilcoxon=np.nan, per_pair=per)
    if n >= 2:
        with np.errstate(divide="ignore", invalid="ignore"):
            test = stats.ttest_rel(per["accuracy_a"], per["accuracy_b"])
        half = stats.t.ppf(0.5 + level / 2, n - 1) * per["diff"].std(ddof=1) / np.sqrt(n)
        out.update(t=float(test.statistic), p_t=float(test.pvalue),
                   ci_low=out["mean_diff"] - half, ci_high=out["mean_diff"] + half)
        if (per["diff"] != 0).any():
            w = stats.wilcoxon(per["accuracy_a"], per["accuracy_b"])
            out.update(wilcoxon=float(w.statistic), p_wilcoxon=float(w.pvalue))
    return out
