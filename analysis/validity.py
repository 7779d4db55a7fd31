"""A study checks itself (DESIGN §11): the checks a reviewer would make, computed from the study's own outputs.

Each check is ``{"name", "value", "threshold", "passed", "detail"}``; ``passed`` is ``None`` when the
check has no data to look at (e.g. no machine participants yet), and the detail then says why.  The
report shows them first; ``sparsight run`` prints the failed ones at the end.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from sparsight.layout import META_FILE, Layout

#: Share of max visualizations that may leave their unit at zero activation.
MAX_ZERO_SHARE = 0.02
#: How the checks count units: the same channel in two models is two units.
EACH = " (a channel counts once per model)"

#: Share of live units whose max visualizations must reach their natural max references.
MIN_REACH_SHARE = 0.80
#: Share of live units whose max visualizations must activate them more than the min visualizations.
MIN_MAX_BEATS_MIN = 0.98
#: Mean relative dataset position of tied minima: random choice gives 0.5, dataset order much less.
TIE_POSITION_RANGE = (0.4, 0.6)
#: Robustness subsets: smallest class count relative to the largest.
MIN_CLASS_BALANCE = 0.8
#: A reported standard error above this is absurd on the accuracy/MIS scale.
MAX_REPORTED_SE = 10.0
#: Live units a model needs for its mean MIS to carry an interval worth reading.
MIN_LIVE_UNITS = 10
#: One-sided binomial p below which the base model's validation top-1 counts as above chance (one class in k).
MAX_CHANCE_P = 0.001
#: Agreement of the machine participants' answers with the offline MIS decision (Δ > 0) on the same tasks.
MIN_MACHINE_AGREEMENT = 0.99


def failed_line(c: dict) -> str:
    """One line for a failed check: its name, value (3 significant digits), threshold and detail."""
    value = f"{c['value']:.3g}" if isinstance(c["value"], float) else c["value"]
    return f"{c['name']}: {value} (needs {c['threshold']}; {c['detail']})"


def check(name: str, value, threshold: str, passed, detail: str = "") -> dict:
    value = None if value is None or (isinstance(value, float) and not math.isfinite(value)) else value
    return {"name": name, "value": value, "threshold": threshold,
            "passed": None if passed is None else bool(passed), "detail": detail}


def _read(path: Path) -> pd.DataFrame | None:
    if not path.is_file() or path.stat().st_size <= 1:
        return None
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def _live_units(status: pd.DataFrame | None, kind: str) -> pd.DataFrame:
    if status is None or status.empty:
        return pd.DataFrame(columns=["model_id", "layer", "unit"])
    return status[(status["kind"] == kind) & (status["status"] == "ok")][["model_id", "layer", "unit"]]


def visualization_checks(manifest: pd.DataFrame | None, status: pd.DataFrame | None) -> list[dict]:
    """Do the feature visualizations drive their units (zero share, reach, max beats min)?"""
    names = ("visualizations at zero activation", "units whose max visualizations reach their natural max references",
             "units whose max visualizations beat their min visualizations")
    if manifest is None or "synthetic" not in set(manifest["kind"]):
        return [check(n, None, "", None, "no feature visualizations in the stimulus bank") for n in names]
    keys = ["model_id", "layer", "unit"]
    synthetic = manifest[manifest["kind"] == "synthetic"]
    if status is not None and len(status):      # live units only: a dead unit's images are meant to be flat
        synthetic = synthetic.merge(_live_units(status, "synthetic"), on=keys)
    refs = synthetic[synthetic["role"].isin(["ref_max", "ref_min"])].drop_duplicates(keys + ["role", "image"])
    fv = refs.groupby(keys + ["role"])["activation"].mean().unstack("role").reindex(columns=["ref_max", "ref_min"])
    natural = manifest[(manifest["kind"] == "natural") & (manifest["role"] == "ref_max")]
    target = natural.groupby(keys)["activation"].mean().rename("natural")
    joined = fv.join(target, how="inner")
    zero = refs[refs["role"] == "ref_max"]["activation"] <= 0
    reach = joined["ref_max"] >= joined["natural"]
    beats = joined["ref_max"] > joined["ref_min"]
    n = len(joined)
    return [
        check(names[0], float(zero.mean()) if len(zero) else None, f"≤ {MAX_ZERO_SHARE:g}",
              zero.mean() <= MAX_ZERO_SHARE if len(zero) else None, f"{int(zero.sum())} of {len(zero)} max images"),
        check(names[1], float(reach.mean()) if n else None, f"≥ {MIN_REACH_SHARE:g}",
              reach.mean() >= MIN_REACH_SHARE if n else None, f"{int(reach.sum())} of {n} live units{EACH}"),
        check(names[2], float(beats.mean()) if n else None, f"≥ {MIN_MAX_BEATS_MIN:g}",
              beats.mean() >= MIN_MAX_BEATS_MIN if n else None, f"{int(beats.sum())} of {n} live units{EACH}"),
    ]


def tie_order_check(manifest: pd.DataFrame | None, data_root: Path, split: str) -> dict:
    """Are tied minima (many images at exactly the unit's minimum, common after a ReLU) in dataset order?"""
    name = "tied minima: mean relative dataset position"
    lo, hi = TIE_POSITION_RANGE
    if manifest is None:
        return check(name, None, f"{lo:g}–{hi:g}", None, "no stimulus bank")
    split_root = data_root / split
    files = sorted(p.relative_to(split_root).as_posix() for p in split_root.rglob("*") if p.is_file()) \
        if split_root.is_dir() else []
    if not files:
        return check(name, None, f"{lo:g}–{hi:g}", None, f"no images under {split_root}")
    position = {f: i / max(len(files) - 1, 1) for i, f in enumerate(files)}
    nat = manifest[(manifest["kind"] == "natural") & manifest["role"].isin(["ref_min", "query_min"])]
    keys = ["model_id", "layer", "unit"]
    unit_min = nat.groupby(keys)["activation"].transform("min")
    tied = nat[nat["activation"] == unit_min]
    counts = tied.groupby(keys)["image"].transform("size")
    tied = tied[counts >= 2].drop_duplicates(keys + ["source"])
    where = tied["source"].map(position).dropna()
    if where.empty:
        return check(name, None, f"{lo:g}–{hi:g}", None, "no unit has tied minima")
    units = tied.groupby(keys).ngroups
    value = float(where.mean())
    # a random choice puts each tied image at a uniform position (variance 1/12): with few of them the range
    # widens to three standard errors of their mean, so two tied images cannot fail the study
    half = max((hi - lo) / 2, 3 * math.sqrt(1 / (12 * len(where))))
    lo, hi = max(0.0, 0.5 - half), min(1.0, 0.5 + half)
    return check(name, value, f"{lo:.2g}–{hi:.2g}", lo <= value <= hi,
                 f"{len(where)} tied images of {units} units{EACH}; such a unit's min references are a seeded "
                 f"draw among the images at its minimum, none less activating than another")


def robustness_balance_check(run_dir: Path) -> dict:
    name = "robustness subsets: smallest / largest class count"
    ratios = {}
    for meta_path in sorted(Layout(run_dir).models.glob(f"*/{META_FILE}")):
        try:
            counts = json.loads(meta_path.read_text()).get("robustness", {}).get("images_per_class")
        except (OSError, json.JSONDecodeError):
            continue
        if counts:
            values = [v for v in counts.values()]
            ratios[meta_path.parent.name] = min(values) / max(values) if max(values) else 0.0
    if not ratios:
        return check(name, None, f"≥ {MIN_CLASS_BALANCE:g}", None, "no model records images_per_class")
    worst = min(ratios, key=ratios.get)
    where = (f"every one of {len(ratios)} models" if len(set(ratios.values())) == 1
             else f"worst: {worst}; {len(ratios)} models")
    return check(name, ratios[worst], f"≥ {MIN_CLASS_BALANCE:g}", ratios[worst] >= MIN_CLASS_BALANCE, where)


def fit_checks(entries: list) -> list[dict]:
    """Every reported fit has finite standard errors of a sane size, and says how it was fitted."""
    worst, where, n, refits = 0.0, "", 0, []
    bad = []
    for e in entries:
        table = e.get("table") if isinstance(e, dict) else getattr(e, "table", None)
        status = e.get("status") if isinstance(e, dict) else getattr(e, "status", "")
        if status != "ok" or not isinstance(table, pd.DataFrame) or "se" not in table:
            continue
        n += 1
        se = pd.to_numeric(table["se"], errors="coerce").to_numpy(dtype=float)
        ident = e.get("id") if isinstance(e, dict) else e.id
        if not np.all(np.isfinite(se)):
            bad.append(ident)
            continue
        if se.size and se.max() > worst:
            worst, where = float(se.max()), ident
        result = e.get("result") if isinstance(e, dict) else e.result
        if isinstance(result, dict) and result.get("method") not in (None, "lbfgs", "within-unit"):
            refits.append(f"{ident}: {result.get('method')}")
    name = "largest standard error of a reported fit"
    if n == 0:
        return [check(name, None, f"finite, ≤ {MAX_REPORTED_SE:g}", None, "no fitted model was reported")]
    detail = f"{n} fits; largest in {where}" + (f"; non-finite in {', '.join(bad)}" if bad else "")
    if refits:
        detail += f"; refitted: {', '.join(refits)}"
    return [check(name, None if bad else worst, f"finite, ≤ {MAX_REPORTED_SE:g}",
                  not bad and worst <= MAX_REPORTED_SE, detail)]


def base_accuracy_check(run_dir: Path, model_id: str = "base") -> dict:
    """The base model learned its task: validation top-1 above chance (1 / classes), one-sided binomial test over
    the validation images.  Units of a network at chance describe nothing the question is about."""
    from scipy.stats import binomtest

    name = "base model's top-1 above chance"
    threshold = f"binomial p < {MAX_CHANCE_P:g}"
    try:
        meta = json.loads((Layout(run_dir).models / model_id / META_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return check(name, None, threshold, None, f"no {model_id} model")
    top1 = (meta.get("top1") or {}).get("after")
    classes = len(meta.get("classes") or [])
    n = next((h["val"].get("n") for h in reversed(meta.get("history") or []) if (h.get("val") or {}).get("n")), None)
    robustness = meta.get("robustness") or {}
    if not n and robustness.get("n") and robustness.get("clean") is not None:   # weights used as they are
        top1, n = robustness["clean"], robustness["n"]
    if top1 is None or classes < 2 or not n:
        return check(name, top1, threshold, None, "the base model records no validation count or classes")
    p = binomtest(int(round(top1 * n)), int(n), 1 / classes, alternative="greater").pvalue
    return check(name, float(top1), threshold, p < MAX_CHANCE_P,
                 f"chance {1 / classes:.3g} ({classes} classes), {int(n)} validation images, p = {p:.2g}")


def live_units_check(status: pd.DataFrame | None) -> dict:
    name = "fewest live units of a model"
    live = _live_units(status, "natural")
    if status is None or status.empty:
        return check(name, None, f"≥ {MIN_LIVE_UNITS}", None, "no unit status (stimuli/units.csv)")
    per_model = live.groupby("model_id").size().reindex(sorted(set(status["model_id"])), fill_value=0)
    sampled = status[status["kind"] == "natural"].groupby("model_id").size()
    worst = per_model.idxmin()
    return check(name, int(per_model.min()), f"≥ {MIN_LIVE_UNITS}", per_model.min() >= MIN_LIVE_UNITS,
                 f"{worst}: {int(per_model.min())} of {int(sampled.get(worst, 0))} sampled units live")


def machine_agreement_check(trials: pd.DataFrame, tasks: pd.DataFrame | None, embedding: str | None = None) -> dict:
    """Machine participants answer through the survey exactly as the offline MIS decides (Δ > 0).  With
    ``embedding`` (the study's ``mis.embedding``) only the machine participants that decide by that
    embedding (named after it, or ``study:<embedding>`` as the run's participants stage names them) are
    compared: another observer (``--observer pixels``) has its own Δ, not the offline one."""
    name = "machine participants agree with offline mis_hard"
    if tasks is None or trials is None or trials.empty or "is_machine" not in trials:
        return check(name, None, f"≥ {MIN_MACHINE_AGREEMENT:g}", None, "no machine-participant responses")
    machine = trials[trials["is_machine"].astype(bool) & (trials["trial_type"] == "main")]
    others = ""
    if embedding is not None and "observer" in machine:
        same = machine["observer"].astype(str).str.removeprefix("study:") == embedding   # the run's own sessions
        other, machine = machine[~same], machine[same]
        if len(other):
            names = ", ".join(sorted(set(other["observer"].astype(str))))
            others = f"; {len(other)} answers of other observers ({names}) not compared"
    keys = ["model_id", "kind", "layer", "unit", "task"]
    joined = machine.merge(tasks[keys + ["delta"]], on=keys, how="inner")
    joined = joined[joined["delta"] != 0]
    if joined.empty:
        scope = f" of the '{embedding}' embedding the MIS used" if embedding is not None else ""
        return check(name, None, f"≥ {MIN_MACHINE_AGREEMENT:g}", None,
                     f"no machine answer{scope} matches an offline task{others}")
    agree = float((joined["correct"].astype(bool) == (joined["delta"] > 0)).mean())
    scope = f" of the '{embedding}' embedding" if embedding is not None else ""
    return check(name, agree, f"≥ {MIN_MACHINE_AGREEMENT:g}", agree >= MIN_MACHINE_AGREEMENT,
                 f"{len(joined)} machine answers{scope}{others}")


TRIAL_KEYS = ["model_id", "kind", "layer", "unit", "task"]


def _query_images(manifest: pd.DataFrame | None) -> dict | None:
    """(model, kind, layer, unit, task) as strings → the task's query images, from the stimulus manifest."""
    if manifest is None or manifest.empty:
        return None
    queries = manifest[manifest["role"].isin(["query_max", "query_min"])]
    keys = queries[TRIAL_KEYS].astype(str).itertuples(index=False, name=None)
    out: dict = {}
    for key, image in zip(keys, queries["image"]):
        out.setdefault(key, set()).add(image)
    return out


def _leaks(g: pd.DataFrame, queries: dict | None) -> bool:
    """Whether one session's practice or catch trials reuse a main task, or (people only) two of its trials
    show the same query image: feedback on the first then gives the second's answer away."""
    keys = list(map(tuple, g[TRIAL_KEYS].astype(str).to_numpy()))
    main_flags = (g["trial_type"] == "main").to_numpy()
    main = {k for k, m in zip(keys, main_flags) if m}
    if main & {k for k, m in zip(keys, main_flags) if not m}:
        return True
    if queries is None or ("is_machine" in g and g["is_machine"].astype(bool).any()):
        return False    # a machine observer learns nothing from feedback (and exhaustive sessions show every task)
    shown: set = set()
    for key in dict.fromkeys(keys):
        images = queries.get(key, set())
        if shown & images:
            return True
        shown |= images
    return False


def practice_leak_check(trials: pd.DataFrame, manifest: pd.DataFrame | None = None) -> dict:
    """No session's practice or catch trials reuse one of its main (model, kind, unit, task) items, and no
    person's session shows a query image in two tasks (with ``manifest``, the stimulus bank's)."""
    name = "participants whose trials give a main trial's answer away"
    if trials is None or trials.empty or "trial_type" not in trials:
        return check(name, None, "0", None, "no responses")
    if "task" not in trials or trials["task"].isna().all():
        return check(name, None, "0", None, "the trials do not say which task they showed (imported data)")
    queries = _query_images(manifest)
    leaks, people = 0, 0
    for _, g in trials.groupby("participant"):
        if not (g["trial_type"] == "main").any():
            continue
        people += 1
        leaks += _leaks(g, queries)
    if people == 0:
        return check(name, None, "0", None, "no participant has main trials")
    scope = "a main task in practice or catch trials, or a query image twice" if queries is not None else \
        "a main task in practice or catch trials"
    return check(name, leaks, "0", leaks == 0, f"{leaks} of {people} sessions (machine ones included) show {scope}")


def study_checks(data, entries: list) -> list[dict]:
    """Every validity check of the study in ``data`` (:class:`analysis.load.StudyData`)."""
    run_dir = Path(data.run_dir)
    layout = Layout(run_dir)
    cfg = data.config
    manifest = _read(layout.manifest)
    status = _read(layout.stimulus_units)
    tasks = _read(layout.mis_tasks)
    data_root = layout.data if cfg.data.source == "concept-shapes" else Path(cfg.data.path)
    checks = visualization_checks(manifest, status)
    checks.append(tie_order_check(manifest, data_root, cfg.stimuli.split))
    checks.append(base_accuracy_check(run_dir))
    checks.append(robustness_balance_check(run_dir))
    checks += fit_checks(entries)
    checks.append(live_units_check(status))
    checks.append(machine_agreement_check(data.trials, tasks, cfg.mis.embedding))
    checks.append(practice_leak_check(data.trials, manifest))
    return checks
