"""What every analysis of the report shares: its entry (:class:`Entry`, run by :func:`run_analysis`; one that
cannot run says why), the sentences' number formatting, and multiplicity control (Holm within each family of slope
tests, and over the models of a per-model equivalence table)."""
from __future__ import annotations

import traceback
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from sparsight.config import StudyConfig


PER_STEP = 0.1          # slopes are reported per 10 percentage points of pruning rate


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


def pct(level: float) -> str:
    return f"{100 * level:g} %"


def rate_term(res: dict, term: str = "rate") -> dict:
    if term not in res.get("terms", {}):
        raise ValueError(f"the fit has no {term!r} term; terms: {sorted(res.get('terms', {}))}")
    return res["terms"][term]


def slope_sentence(subject: str, t: dict, level: float, alpha: float, unit: str = "") -> str:
    """E.g. "MIS decreased by 0.040 per 10 % pruning rate (95 % CI −0.052 to −0.028; p < 0.001)"."""
    b, lo, hi = (t[k] * PER_STEP for k in ("coef", "ci_low", "ci_high"))
    change = f"{'decreased' if b < 0 else 'increased'} by {fmt(abs(b))}{unit}"
    sig = t["p"] < alpha
    tail = "" if sig else f" — not significant at α = {alpha:g}"
    return (f"{subject} {change} per 10 % pruning rate ({pct(level)} CI {fmt(lo)} to "
            f"{fmt(hi)}; {fmt_p(t['p'])}){tail}.")


def tost_sentence(subject: str, tost: dict) -> str:
    verdict = (f"equivalent within ±{tost['margin']:g}" if tost["equivalent"]
               else f"not shown to be equivalent within ±{tost['margin']:g}")
    level = 1 - 2 * tost["alpha"]
    return (f"{subject}: {fmt(tost['estimate'])} ({pct(level)} CI {fmt(tost['ci_low'])} to {fmt(tost['ci_high'])}), "
            f"{verdict} (TOST {fmt_p(tost['p'])}).")


def need_margin(cfg: StudyConfig):
    if not cfg.analysis.tost_margin > 0:
        raise Skip("analysis.tost_margin is 0: without an equivalence margin no equivalence is tested")


def holm_equivalence(table: pd.DataFrame, cfg: StudyConfig) -> pd.DataFrame:
    """The per-model TOSTs Holm-adjusted among themselves (``p_tost_holm``, ``equivalent_holm``): each model's
    equivalence is a claim of its own, and with many models some pass by chance."""
    from .statistics import holm
    p = table["p_tost"] if "p_tost" in table else pd.Series(np.nan, index=table.index)
    adjusted = holm(p.to_numpy(dtype=float))
    table = table.assign(p_tost_holm=adjusted)
    table["equivalent_holm"] = [None if not np.isfinite(a) else bool(a < cfg.analysis.alpha_level) for a in adjusted]
    return table


def equivalent_count(table: pd.DataFrame, column: str = "equivalent") -> int:
    return int((table[column] == True).sum()) if column in table else 0  # noqa: E712 - None stays out


def holm_count(table: pd.DataFrame) -> str:
    """How many stay equivalent once the models' tests are Holm-adjusted among themselves."""
    tested = int(table["p_tost_holm"].notna().sum())
    if tested < 2:
        return ""
    return f"; {equivalent_count(table, 'equivalent_holm')} after Holm adjustment over the {tested} models"


def compared_models(table: pd.DataFrame) -> str:
    """The models compared with the base, counted: "N pruned models", or, with retrained controls (rate 0), "N
    retrained models (k pruned, c retrained control(s))"."""
    controls = int((table["rate"] == 0).sum())
    if not controls:
        return f"{len(table)} pruned models"
    return (f"{len(table)} retrained models ({len(table) - controls} pruned, {controls} retrained control"
            f"{'s' if controls > 1 else ''})")


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
