"""The study report: every analysis that its data allow, as ``report/index.html`` and ``report/results.json``.

:func:`analyze` reads a study directory (:mod:`analysis.load`), runs

* **model side** (:mod:`analysis.model_fits`, needs ``mis/units.csv``): per reference kind, the slope of unit MIS
  on pruning rate within units (``mis ~ rate``, and ``+ top1`` as the secondary analysis; errors clustered by unit
  and model, with the unit mixed model beside it) pooled over methods and per method, with sensitivity fits on
  other unit sets and doses; the dose–response shape (line vs hinge), equivalence of the MIS change over the
  studied rates within ``analysis.tost_margin`` (TOST), and per pruned model a paired TOST of its units' MIS
  against the same units in the base model; top-1 and Network Dissection counts per model;
* **human side** (:mod:`analysis.human_fits`, needs human main trials): exclusions, accuracy per condition (± 2 SEM
  over participants, Wilson intervals, d′), per-unit bootstrap CIs, RTs, accuracy by confidence, the
  natural-vs-synthetic paired comparison, the rate slope by a crossed mixed logistic model (primary)
  with GEE and two-way cluster-robust logistic regression as checks, per-model equivalence to the
  base, and MIS ↔ human calibration per unit;

adjusts for multiplicity (:func:`analysis.entries.apply_holm`: the primary slope tests, which the answers rest on,
and the exploratory per-method MIS slopes, each family among itself), derives the answers
(:mod:`analysis.answers`), the validity checks and the power tables, and writes the figures
(:mod:`analysis.figures`), the self-contained HTML page and the JSON file (:mod:`analysis.render`).  Each analysis
runs only when its data exist; one that cannot run (too few participants, no variation in rate, a fit that fails)
becomes an entry saying why — never a crash.
"""
from __future__ import annotations

import datetime as _dt
import json
import warnings
from pathlib import Path

import pandas as pd

from sparsight.config import StudyConfig
from sparsight.files import atomic_write_text
from sparsight.layout import Layout, REPORT_HTML, REPORT_JSON

from . import figures as fig
from .answers import answers
from .entries import Entry, Outcome, PER_METHOD, PRIMARY, Skip, apply_holm, run_analysis, skipped
from .gallery import make_gallery
from .human_fits import (Humans, TRIAL_FITS, calibration_check, condition_pairs, human_equivalence, human_slope,
                         kind_comparison, split_humans)
from .load import (BASE_METHOD, StudyData, base_at_chance, load_study_data, model_table, study_config,
                   unreadable_images)
from .methods import methods
from .model_fits import (ALPHA_FACTORS, dissection_summary, mis_dose, mis_equivalence, mis_slope, mis_slope_alpha,
                         mis_slope_effective, mis_slope_matched, mis_slope_retrained, mis_slope_same_units,
                         mis_slope_valid_fv, ok_units, top1_summary)
from .power import study_power
from .render import NO_RESPONSES, plain, render
from .validity import study_checks


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


def _kinds(*frames) -> list[str]:
    return sorted({k for f in frames if len(f) and "kind" in f for k in f["kind"].dropna().unique()})


def model_side(data: StudyData, entries: list) -> None:
    cfg = data.config
    units = ok_units(data.units)
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
        run_analysis(entries, f"mis_slope_retrained.{kind}", f"MIS vs pruning rate on retrained models only ({kind}; "
                     f"sensitivity: the retrained control as the rate-0 reference)", "model",
                     lambda kind=kind: mis_slope_retrained(units, kind, cfg))
        for name, factor in ALPHA_FACTORS.items():
            run_analysis(entries, f"mis_slope_alpha_{name}.{kind}", f"MIS vs pruning rate with α × {factor:g} "
                         f"({kind}; sensitivity: the MIS scale)", "model",
                         lambda kind=kind, factor=factor: mis_slope_alpha(units, data.mis_tasks, kind, factor, cfg))
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
    units = ok_units(data.units)
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
        "layers": lambda p: fig.layer_mis_vs_sparsity(ok_units(data.units), p),
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
    if cfg.data.source == "concept-shapes":     # the embedded data: a check of the pipeline, not the research setting
        notes.append(f"This study runs on the generated concept-shapes data ({cfg.data.image_size} px) with the "
                     f"{cfg.model.arch} network: its answers hold for that setting, which exercises and checks every "
                     f"step of the method; a study of ImageNet networks (studies/googlenet-imagenet.toml) is where "
                     f"they speak to the question about real vision networks.")
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
