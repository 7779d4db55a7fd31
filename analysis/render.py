"""The report as files: results made JSON-ready (:func:`plain`) and the self-contained HTML page
(``templates/report.html.j2``, figures embedded), every number formatted here."""
from __future__ import annotations

import base64
import functools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from sparsight.config import StudyConfig

from .entries import PER_METHOD, fmt, pct
from .power import smallest_display


NO_RESPONSES = "No responses exist yet"


#: What every sparsity axis is: the share of weights at zero, which for methods that remove whole filters or
#: input slices understates what they take out of the network.
SPARSITY_AXIS = ("Sparsity is the measured share of zero weights; structured and LRP pruning also leave the next "
                 "layer's weights on removed channels without effect (the models table's effective sparsity).")
FIGURE_CAPTIONS = {
    "interpretability": "MIS (circles, bootstrap 95 % CI over units) and human accuracy (squares, Wilson 95 % CI) "
                        "vs measured sparsity, per pruning method (points of one sparsity set slightly apart; the "
                        "base model in black; the retrained control, at sparsity 0, unjoined); dotted line: chance "
                        "(0.5), where a panel reaches it. Each panel's y axis spans its own points (at least 0.2). "
                        "Each point averages the model's live units, a set that shrinks where pruning silences "
                        "units; the primary slope compares each unit with itself instead. " + SPARSITY_AXIS,
    "top1": "Top-1 validation accuracy vs sparsity after retraining (the base model in black; dotted: just after "
            "the last pruning step, before its retraining; an iterative model was retrained after each earlier "
            "step, so its dotted point is not the one-shot drop; dashed grey: chance, one class for every image; "
            "points of one sparsity set slightly apart). " + SPARSITY_AXIS,
    "layers": "MIS per layer (mean ± SEM over the layer's units, not the bootstrap CIs of the other figures) vs "
              "sparsity, one row of layers per reference kind (synthetic: the visualized units of the layer only; "
              "the base model in black; points of one sparsity set slightly apart; dotted: chance, 0.5).",
    "mis_vs_human": "Per unit: MIS against human accuracy, with the identity line.",
    "dissection": "Network Dissection: interpretable units, their share of the live (not removed, not dead) "
                  "units, and unique concepts vs sparsity (axes from zero; the base model in black; points of one "
                  "sparsity set slightly apart). The share rises where pruning removes units faster than it "
                  "removes interpretable ones, also while their count falls: a share, not a gain.",
    "robustness": "Robustness: top-1 under corruption vs severity, and noise similarity to the parent (top-1 "
                  "agreement) vs ε, the half-width of uniform noise added to the normalized input (units of a "
                  "channel's standard deviation), one line per pruning rate (the base in black, dashed; the "
                  "retrained control in grey); colour here is the rate, not the method; shaded: 95 % Wilson "
                  "interval over the images (for the mean over corruptions, that of one corruption's images).",
}


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
                counts = [None if not np.isfinite(n) else int(n) for n in table[f"{col}_units"].astype(float)]
                show[f"live units {kind}"] = pd.Series(counts, index=show.index, dtype=object)   # right-aligned
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
        dose = "effective sparsity" if "effective sparsity" in (e["sentence"] or "") else "pruning rate"
        note = f"rate per unit of {dose} (0 to 1): ten times the per-10 % figures above"
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
        left_out = (f" Left out of the means: {', '.join(subset['base_at_chance'])}, on which the base model is at "
                    "chance at one or more severities.")
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
    allowed = math.floor(delta * n + 1e-9)
    text += (", more than δ, so a potential here reads single images." if 1 / n > delta else
             f", so δ allows {allowed} image{'s' if allowed > 1 else ''} more misread than the base's.")
    if subset.get("base_at_chance"):
        text += (f" Empty for {', '.join(subset['base_at_chance'])}: at one or more of its severities the base "
                 "model is not above chance (a one-sided binomial test at each, α = 0.05), so the mean over its "
                 "severities would partly read chance rather than a loss.")
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
    return {"target": pct(power["target_power"]), "alpha": f"{power['alpha']:g}", "model": table_data(model),
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
        "analysis": {"level": pct(1 - a.alpha_level), "alpha": f"{a.alpha_level:g}", "margin": f"{a.tost_margin:g}",
                     "bootstrap": a.bootstrap, "holm_tests": len(results["holm"]["tests"]),
                     "holm_per_method": len(results["holm"].get("families", {}).get(PER_METHOD, {}).get("tests", [])),
                     "tost_level": pct(1 - 2 * a.alpha_level), "mis_bootstrap": cfg.mis.bootstrap},
        "groups": [{"title": title, "entries": [_entry_data(e, pct(1 - 2 * a.alpha_level)) for e in stats
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
