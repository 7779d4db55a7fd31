"""Loading a study for analysis: the canonical trial frame, the unit table and the model table.

Everything the analysis reads comes through here, from the files of DESIGN §3:

* **model metadata** — :func:`sparsight.modeltable.load_models`: ``models/<id>/meta.json``
  (``evaluation.csv`` for models without one), one row per model with ``method`` (``"base"`` for the
  unpruned parent), ``schedule``, ``rate`` (the requested rate), ``sparsity`` (measured, after
  retraining) and ``top1`` (after retraining);
* **trial frame** — one row per response (:data:`TRIAL_COLUMNS`) from ``responses.csv`` (or
  ``responses.parquet``), else from the survey database, joined with the model metadata; or an
  external trial-level CSV through :func:`import_trials`;
* **unit table** — ``mis/units.csv`` with the model metadata, ``unit_id`` and the unit's Network
  Dissection label when ``dissection/units.csv`` exists;
* **model table** — one row per model: metadata, MIS per reference kind with its CI, interpretable
  units and unique concepts, and human accuracy per kind.

Units are named ``"layer:unit"`` (``unit_id``), the same string in every table.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from sparsight.config import StudyConfig, read_toml, study_from_run_dir
from sparsight.layout import ROBUSTNESS_TABLES, Layout
from sparsight.modeltable import BASE_METHOD, load_models, read_table
from stimuli.units import Unit, split_unit_name

#: Model metadata joined onto the per-unit and per-model MIS tables.
MODEL_KEYS = ("method", "schedule", "series", "rate", "sparsity", "sparsity_effective", "top1")
TRIAL_COLUMNS = ["participant", "unit_id", "model_id", "method", "schedule", "rate", "sparsity", "kind",
                 "correct", "confidence", "rt_ms", "trial_type", "is_machine", "excluded", "exclusion_reasons",
                 "layer", "unit", "task", "observer", "condition"]

# Canonical names an external CSV can map (``--map canonical=column``); the first two are required.
REQUIRED_IMPORT = ("participant", "correct")
IMPORT_NAMES = ("participant", "correct", "unit", "condition", "confidence", "rt", "catch", "trial_type",
                "model_id", "method", "rate", "sparsity", "kind", "layer", "task", "is_machine", "excluded")
#: What a trial's ``trial_type`` may be (the survey's blocks); anything else must be recoded on import.
TRIAL_TYPES = ("main", "practice", "catch")
TRUE_WORDS = {"1", "1.0", "true", "t", "yes", "y", "correct", "hit"}
FALSE_WORDS = {"0", "0.0", "false", "f", "no", "n", "incorrect", "wrong", "error", "miss"}


# ---- small helpers --------------------------------------------------------------------------------
def unit_id(layer, unit) -> str:
    """``("inception4a", 3)`` → ``"inception4a:3"``."""
    return str(Unit(str(layer), int(unit)))


split_unit_id = split_unit_name


def to_bool(values: pd.Series, name: str = "value", missing=np.nan) -> pd.Series:
    """Booleans from bools, 0/1 numbers or words (true/false, yes/no, correct/incorrect); an empty cell
    becomes ``missing`` (NaN by default; a bool gives a bool Series).

    Anything else raises ValueError naming the column and the offending values."""
    def one(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return missing
        if isinstance(v, (bool, np.bool_)):
            return bool(v)
        if isinstance(v, (int, float, np.integer, np.floating)) and v in (0, 1):
            return bool(v)
        word = str(v).strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        return "?"
    out = values.map(one)
    bad = sorted({str(v) for v, o in zip(values, out) if isinstance(o, str)})
    if bad:
        raise ValueError(f"column {name!r} holds values that are not 0/1, true/false or correct/incorrect: "
                         f"{bad[:5]}")
    return out.astype(bool) if isinstance(missing, bool) else out.astype(object)


def study_config(run_dir: str | Path) -> StudyConfig:
    """The resolved configuration in ``run_dir/study.toml`` (the built-in default when there is none)."""
    return study_from_run_dir(run_dir)


def _attach_models(frame: pd.DataFrame, models: pd.DataFrame, keys=MODEL_KEYS) -> pd.DataFrame:
    """Join model metadata on ``model_id`` (columns already in ``frame`` are filled, not duplicated)."""
    keys = [k for k in keys if k in models.columns]
    if frame.empty or models.empty or "model_id" not in frame:
        for k in keys:
            if k not in frame:
                frame[k] = np.nan
        return frame
    meta = models.set_index("model_id")[keys]
    ids = frame["model_id"].astype(str)
    for k in keys:
        mapped = ids.map(meta[k])
        frame[k] = mapped if k not in frame else frame[k].where(frame[k].notna(), mapped)
    return frame


# ---- trials ----------------------------------------------------------------------------------------
def empty_trials() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="float64" if c in ("rate", "sparsity", "rt_ms", "confidence")
                                      else "object") for c in TRIAL_COLUMNS})


def read_responses(run_dir: str | Path, cfg: StudyConfig | None = None) -> tuple[pd.DataFrame, str]:
    """The tidy responses table and where it came from: the study's survey database when it holds responses
    (an export, ``RUN_DIR/responses.csv``, is a copy of it that may be older: answers given after it would be
    lost), else that export (a study folder analysed without its database); an empty table (source
    ``"none"``) when neither has any.  A different table: ``sparsight analyze --import FILE``."""
    run_dir = Path(run_dir)
    path = Layout(run_dir).responses()
    cfg = cfg or study_config(run_dir)
    from survey_app.stages import read_responses as read_database
    try:
        table = read_database(run_dir, cfg)
    except Exception as err:  # noqa: BLE001 - an unreachable database server: the export, if there is one
        if path is None:
            raise
        return read_table(path), f"{path.name} (the survey database is unreachable: {type(err).__name__})"
    if len(table):
        if path is not None and len(exported := read_table(path)) != len(table):
            return table, (f"survey database ({len(table)} responses; {path.name}, an export of "
                           f"{len(exported)}, is not read)")
        return table, "survey database"
    if path is not None:
        return read_table(path), path.name
    return table, "none"


def trials_from_responses(responses: pd.DataFrame, models: pd.DataFrame | None = None) -> pd.DataFrame:
    """The canonical trial frame (:data:`TRIAL_COLUMNS`) from a tidy responses table (survey export); ``rt_ms`` is
    the time the trial was seen: the export's ``rt_ms`` less its ``hidden_ms`` (under an overlay, a hidden page)."""
    if responses is None or responses.empty:
        return empty_trials()
    r = responses.reset_index(drop=True)
    missing = [c for c in ("participant", "correct") if c not in r]
    if missing:
        raise ValueError(f"the responses table lacks column {missing[0]!r}; its columns are {list(r.columns)}")

    def col(name, default=np.nan):
        return r[name] if name in r else pd.Series([default] * len(r))

    layer = col("layer", "").astype(str)
    unit = pd.to_numeric(col("unit"), errors="coerce")
    out = pd.DataFrame({
        "participant": r["participant"].astype(str),
        "unit_id": [f"{lay}:{int(u)}" if not math.isnan(u) else lay for lay, u in zip(layer, unit)],
        "model_id": col("model_id", "").astype(str),
        "kind": col("kind", "").astype(str),
        "correct": to_bool(r["correct"], "correct").astype(float),
        "confidence": pd.to_numeric(col("confidence"), errors="coerce"),
        "rt_ms": pd.to_numeric(col("rt_ms"), errors="coerce") - pd.to_numeric(col("hidden_ms", 0.0),
                                                                              errors="coerce").fillna(0.0),
        "trial_type": col("trial_type", "main").fillna("main").astype(str),
        "is_machine": to_bool(col("is_machine", False), "is_machine", missing=False),
        "excluded": to_bool(col("excluded", False), "excluded", missing=False),
        "exclusion_reasons": col("exclusion_reasons", "").fillna("").astype(str),
        "layer": layer, "unit": unit, "task": pd.to_numeric(col("task"), errors="coerce"),
        "observer": col("observer", "").fillna("").astype(str),
        "condition": col("condition", "").fillna("").astype(str),
    })
    if "participant_stage" in r:
        # the survey judges a session by its rules only when it ends: a person who left part-way was never
        # checked (catch trials, times, buttons), so their answers do not enter the analysis
        stage = r["participant_stage"].fillna("").astype(str)
        unfinished = ~out["is_machine"] & (stage != "complete")
        out.loc[unfinished, "excluded"] = True
        out.loc[unfinished, "exclusion_reasons"] = [
            "; ".join(filter(None, [reason, f"incomplete (left at {s or 'an unknown stage'})"]))
            for reason, s in zip(out.loc[unfinished, "exclusion_reasons"], stage[unfinished])]
    if out["correct"].isna().any():
        raise ValueError(f"{int(out['correct'].isna().sum())} responses have no 'correct' value")
    out["correct"] = out["correct"].astype(int)
    out.loc[out["is_machine"] & (out["observer"] == ""), "observer"] = "machine"
    out.loc[~out["is_machine"] & (out["observer"] == ""), "observer"] = "human"
    for extra in ("method", "schedule", "rate", "sparsity"):
        if extra in r:
            out[extra] = r[extra]
    out = _attach_models(out, models if models is not None else pd.DataFrame(),
                         keys=("method", "schedule", "rate", "sparsity"))
    return out[TRIAL_COLUMNS]


def load_trials(run_dir: str | Path, cfg: StudyConfig | None = None,
                models: pd.DataFrame | None = None) -> tuple[pd.DataFrame, str]:
    """The study's trial frame and its source (see :func:`read_responses`)."""
    responses, source = read_responses(run_dir, cfg)
    models = load_models(run_dir) if models is None else models
    return trials_from_responses(responses, models), source


def human_main(trials: pd.DataFrame) -> pd.DataFrame:
    """Main (non-practice, non-catch) trials of human participants — excluded participants still in."""
    from survey_app.export import human_main_responses
    return human_main_responses(trials)


# ---- external trial-level data --------------------------------------------------------------------
def parse_mapping(items) -> dict[str, str]:
    """``["participant=subj", "correct=acc"]`` → ``{"participant": "subj", "correct": "acc"}``."""
    mapping = {}
    for item in items:
        canonical, sep, column = str(item).partition("=")
        if not sep or not canonical.strip() or not column.strip():
            raise ValueError(f"--map {item!r} must look like canonical=column, e.g. participant=subj")
        canonical, column = canonical.strip(), column.strip()
        if canonical in mapping and mapping[canonical] != column:
            raise ValueError(f"--map maps {canonical!r} twice ({mapping[canonical]!r} and {column!r}); give one")
        mapping[canonical] = column
    return mapping


def read_mapping(path: str | Path) -> dict[str, str]:
    """Column mapping from a TOML file with a ``[columns]`` table (``participant = "subj"``)."""
    tree = read_toml(path, "mapping file", ValueError)
    columns = tree.get("columns")
    if not isinstance(columns, dict) or not columns:
        raise ValueError(f"mapping file {path} needs a [columns] table, e.g. [columns] participant = \"subj\"")
    bad = [k for k, v in columns.items() if not isinstance(v, str)]
    if bad:
        raise ValueError(f"mapping file {path}: columns.{bad[0]} must be a column name (a string)")
    return dict(columns)


#: Canonical columns whose values a mapping file may recode (``[values.trial_type] test = "main"``).
RECODABLE = ("trial_type", "condition", "kind")


def read_recoding(path: str | Path) -> dict[str, dict[str, str]]:
    """The ``[values.<canonical>]`` tables of a mapping file: the file's value → sparsight's, per column."""
    values = read_toml(path, "mapping file", ValueError).get("values", {})
    if not isinstance(values, dict) or not all(isinstance(v, dict) for v in values.values()):
        raise ValueError(f"mapping file {path}: [values] holds one table per column, e.g. [values.trial_type] "
                         f"test = \"main\"")
    unknown = sorted(set(values) - set(RECODABLE))
    if unknown:
        raise ValueError(f"mapping file {path}: values.{unknown[0]} cannot be recoded; choose from {list(RECODABLE)}")
    bad = [f"values.{c}.{k}" for c, table in values.items() for k, v in table.items() if not isinstance(v, str)]
    if bad:
        raise ValueError(f"mapping file {path}: {bad[0]} must be a string")
    return {c: dict(table) for c, table in values.items()}


def import_trials(csv_path: str | Path, mapping: dict[str, str], models: pd.DataFrame | None = None,
                  catch_min_accuracy: float | None = None, recode: dict[str, dict[str, str]] | None = None,
                  kinds=None) -> pd.DataFrame:
    """A trial frame from an external trial-level CSV whose columns ``mapping`` names.

    ``mapping`` maps canonical names (:data:`IMPORT_NAMES`; ``participant`` and ``correct`` required)
    to the CSV's columns; a column that already bears a canonical name and that the mapping leaves alone
    is taken by that name (listed in the frame's ``attrs["columns_by_name"]``).  ``condition`` becomes
    the trial's ``kind`` (the condition descriptives group by; ``"all"`` without either) unless ``kind``
    is mapped too; ``unit`` may be ``"layer:unit"``; ``rt`` is in milliseconds; ``correct`` accepts 0/1,
    true/false and correct/incorrect; a true ``catch`` flag makes the trial a catch trial.  A missing
    column raises ValueError naming it and the columns the CSV has, as do a numeric column (rate,
    sparsity, confidence, rt, task) holding text and, with ``models``, a ``model_id`` the study lacks on a
    row without its own rate.  Without an ``excluded`` column and with ``catch_min_accuracy`` (the
    survey's ``catch_min_accuracy``), the survey's catch rule excludes participants (:func:`_apply_catch_rule`).

    ``recode`` (:func:`read_recoding`) rewrites values of ``trial_type``, ``condition`` and ``kind`` first; a
    ``trial_type`` other than main, practice or catch (jsPsych's plugin names, a psiTurk phase), a file without
    rows and a row without a participant are errors.  A separate ``layer`` column names units ``layer:unit``.
    Conditions that are not among ``kinds`` (the study's reference kinds) are listed in
    ``attrs["foreign_kinds"]``: they are analysed as conditions but meet no MIS of the study."""
    csv_path = Path(csv_path)
    unknown = sorted(set(mapping) - set(IMPORT_NAMES))
    if unknown:
        raise ValueError(f"unknown canonical name {unknown[0]!r} in the column mapping; choose from "
                         f"{list(IMPORT_NAMES)}")
    raw = _read_trial_csv(csv_path)
    if raw.empty:
        raise ValueError(f"trial file {csv_path} has a header but no trials")
    mapping, by_name = _resolved_mapping(raw, mapping, csv_path.name)
    n = len(raw)
    raw = _recoded(raw, mapping, recode or {})
    _check_participants(raw[mapping["participant"]], mapping["participant"])

    def get(name, default=np.nan):
        return raw[mapping[name]] if name in mapping else pd.Series([default] * n)

    def numeric(name):
        return _numbers(get(name), name, mapping.get(name))

    correct = to_bool(get("correct"), mapping["correct"])
    if correct.isna().any():
        raise ValueError(f"column {mapping['correct']!r} (correct) has {int(correct.isna().sum())} empty cells")
    units, layer, unit_index = _import_units(get, mapping)
    condition = get("condition", "").fillna("").astype(str)
    trial_type = get("trial_type", "main").fillna("main").astype(str)
    _check_trial_types(trial_type, mapping.get("trial_type"), "trial_type" in by_name)
    if "catch" in mapping:
        catch = to_bool(get("catch"), mapping["catch"], missing=False)
        trial_type = trial_type.where(~catch, "catch")
    out = pd.DataFrame({
        "participant": get("participant").astype(str),
        "unit_id": units.where(units != "", "unit"),
        "model_id": get("model_id", "external").fillna("external").astype(str),
        "method": get("method", np.nan),
        "schedule": pd.Series([np.nan] * n, dtype="object"),
        "rate": numeric("rate"),
        "sparsity": numeric("sparsity"),
        "kind": get("kind").astype(str) if "kind" in mapping else condition.where(condition != "", "all"),
        "correct": correct.astype(int),
        "confidence": numeric("confidence"),
        "rt_ms": numeric("rt"),
        "trial_type": trial_type,
        "is_machine": to_bool(get("is_machine", False), "is_machine", missing=False),
        "excluded": to_bool(get("excluded", False), "excluded", missing=False),
        "exclusion_reasons": "",
        "layer": layer, "unit": unit_index, "task": numeric("task"),
        "observer": "human", "condition": condition,
    })
    if models is not None and len(models):
        if "model_id" in mapping:
            _check_model_ids(out, models, csv_path.name, mapping["model_id"])
        out = _attach_models(out, models, keys=("method", "schedule", "rate", "sparsity"))
    out = out[TRIAL_COLUMNS].copy()
    out.attrs["columns_by_name"] = by_name
    if kinds and ("condition" in mapping or "kind" in mapping) and set(out["kind"]) - set(kinds):
        out.attrs["foreign_kinds"] = sorted(set(out["kind"]) - set(kinds))
    if "excluded" not in mapping and catch_min_accuracy is not None:
        out = _apply_catch_rule(out, catch_min_accuracy)
    return out


def _resolved_mapping(raw: pd.DataFrame, mapping: dict[str, str], name: str) -> tuple[dict[str, str], list[str]]:
    """``mapping`` with the columns taken by their own canonical names, and those names; a required name
    without a column, or a mapped column the file lacks, is an error naming the file's columns."""
    by_name = [c for c in IMPORT_NAMES if c not in mapping and c in raw.columns and c not in mapping.values()]
    mapping = {**mapping, **{c: c for c in by_name}}
    absent = [c for c in REQUIRED_IMPORT if c not in mapping]
    if absent:
        raise ValueError(f"{name} has no {absent[0]!r} column and the column mapping names none "
                         f"(e.g. --map {absent[0]}=COLUMN); its columns are {list(raw.columns)}")
    for canonical, column in mapping.items():
        if column not in raw.columns:
            raise ValueError(f"column {column!r} (mapped to {canonical!r}) is not in {name}; "
                             f"its columns are {list(raw.columns)}")
    return mapping, by_name


def _import_units(get, mapping: dict[str, str]) -> tuple[pd.Series, pd.Series, pd.Series]:
    """``(unit_id text, layer, unit index)`` from a ``unit`` column of ``layer:unit`` names, or from separate
    ``layer`` and ``unit`` (channel index) columns."""
    units = get("unit", "").fillna("").astype(str)
    index = pd.to_numeric(get("unit"), errors="coerce")
    if "layer" in mapping and "unit" in mapping and index.notna().all():
        units = get("layer").astype(str) + ":" + index.astype(int).astype(str)
    parsed = [split_unit_id(u) for u in units]
    layer = get("layer").astype(str) if "layer" in mapping else pd.Series([p[0] for p in parsed])
    return units, layer, pd.Series([p[1] for p in parsed], dtype="float64")


def _recoded(raw: pd.DataFrame, mapping: dict[str, str], recode: dict[str, dict[str, str]]) -> pd.DataFrame:
    """``raw`` with the recoded columns' values replaced (values without an entry stay as they are)."""
    raw = raw.copy()
    for canonical, table in recode.items():
        if canonical in mapping:
            column = mapping[canonical]
            raw[column] = [table.get(str(v), v) if pd.notna(v) else v for v in raw[column]]
    return raw


def _check_participants(values: pd.Series, column: str) -> None:
    """Every trial names its participant: trials without one would be pooled as one person."""
    blank = values.isna() | (values.astype(str).str.strip() == "")
    if blank.any():
        rows = ", ".join(str(i + 2) for i in np.flatnonzero(blank.to_numpy())[:5])
        raise ValueError(f"column {column!r} (participant) is empty in {int(blank.sum())} trial(s), e.g. on line(s) "
                         f"{rows}: drop those rows or fill in who answered")


def _check_trial_types(values: pd.Series, column: str | None, by_name: bool) -> None:
    """Trial types are the survey's blocks; any other value (a jsPsych plugin name, a psiTurk phase) would drop
    the trial from every analysis of main trials."""
    other = sorted(set(values) - set(TRIAL_TYPES))
    if not other:
        return
    shown = ", ".join(repr(v) for v in other[:4]) + (" …" if len(other) > 4 else "")
    how = "taken by its own name" if by_name else "mapped to 'trial_type'"
    raise ValueError(f"column {column!r} ({how}) holds {shown}, not the trial types {list(TRIAL_TYPES)}: recode its "
                     f"values in a --mapping file ([values.trial_type] test = \"main\"), map another column "
                     f"(--map trial_type=COLUMN), or rename it so that every trial counts as a main trial")


def _read_trial_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise ValueError(f"trial file {path} does not exist")
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise ValueError(f"trial file {path} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ValueError(f"trial file {path} is not a readable CSV ({str(err).splitlines()[0]})") from None


def _numbers(values: pd.Series, name: str, column: str | None) -> pd.Series:
    """A mapped column as numbers; a value that is not one (a text column mapped by mistake) is an error."""
    numbers = pd.to_numeric(values, errors="coerce")
    bad = values.notna() & numbers.isna()
    if bad.any():
        shown = ", ".join(repr(str(v)) for v in values[bad].unique()[:3])
        raise ValueError(f"column {column!r} (mapped to {name!r}) holds {int(bad.sum())} values that are "
                         f"not numbers, e.g. {shown}")
    return numbers


def _check_model_ids(trials: pd.DataFrame, models: pd.DataFrame, name: str, column: str) -> None:
    """Every row names a model of the study, or gives its own rate: a misspelt id would drop its rows."""
    known = set(models["model_id"].astype(str))
    unknown = trials["model_id"].notna() & ~trials["model_id"].isin(known) & trials["rate"].isna()
    if unknown.any():
        ids = sorted(set(trials.loc[unknown, "model_id"]))
        raise ValueError(f"{name}: column {column!r} names {len(ids)} model(s) the study does not have and gives no "
                         f"rate for them: {', '.join(ids[:5])}{' …' if len(ids) > 5 else ''}; the study's models: "
                         f"{', '.join(sorted(known))}")


def _apply_catch_rule(trials: pd.DataFrame, min_accuracy: float) -> pd.DataFrame:
    """The survey's catch rule on imported trials that bring no exclusions of their own: a participant whose
    catch-trial accuracy is below ``min_accuracy`` is excluded (reason ``catch_accuracy``).  ``attrs``
    records ``catch_rule``: ``(excluded, participants with catch trials)``."""
    catch = trials[trials["trial_type"] == "catch"]
    if catch.empty:
        return trials
    accuracy = catch.groupby("participant")["correct"].mean()
    failed = set(accuracy.index[accuracy < min_accuracy])
    out = trials.copy()
    hit = out["participant"].isin(failed)
    out.loc[hit, "excluded"] = True
    out.loc[hit, "exclusion_reasons"] = "catch_accuracy"
    out.attrs = {**trials.attrs, "catch_rule": (len(failed), int(accuracy.size))}
    return out


# ---- units, dissection, MIS per model, robustness --------------------------------------------------
def load_units(run_dir: str | Path, models: pd.DataFrame | None = None,
               dissection: pd.DataFrame | None = None) -> pd.DataFrame:
    """``mis/units.csv`` with ``unit_id``, the model metadata (method, schedule, series, rate, sparsity,
    top1) and, where dissected, the unit's ``concept``, ``iou`` and ``interpretable`` flag."""
    units = read_table(Layout(run_dir).mis_units)
    if units is None or units.empty:
        from survey_app.mis import UNIT_COLUMNS
        return pd.DataFrame(columns=[*UNIT_COLUMNS, "unit_id", *MODEL_KEYS])
    units = units.copy()
    units["model_id"] = units["model_id"].astype(str)
    units["unit_id"] = [unit_id(lay, u) for lay, u in zip(units["layer"], units["unit"])]
    if "status" not in units:
        units["status"] = np.where(units["mis"].notna(), "ok", "missing")
    units = _attach_models(units, models if models is not None else load_models(run_dir))
    if dissection is not None and len(dissection):
        d = dissection[["model_id", "layer", "unit", "concept", "iou", "interpretable"]].copy()
        d["model_id"] = d["model_id"].astype(str)
        d["interpretable"] = d["interpretable"].fillna(False).astype(bool)
        units = units.merge(d, on=["model_id", "layer", "unit"], how="left")
    return units


def load_dissection(run_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``dissection/units.csv`` and ``dissection/models.csv`` (empty frames when absent)."""
    layout = Layout(run_dir)
    units = read_table(layout.dissection_units)
    models = read_table(layout.dissection_models)
    units = pd.DataFrame() if units is None else units
    models = pd.DataFrame() if models is None else models
    if len(models) and "unique_concepts" not in models and len(units):
        from stimuli.dissection import summarize  # pragma: no cover - older tables
        models = summarize(units)
    return units, models


def load_mis_models(run_dir: str | Path, models: pd.DataFrame | None = None) -> pd.DataFrame:
    """``mis/models.csv`` (one row per model and reference kind, MIS with its bootstrap CI) plus metadata."""
    table = read_table(Layout(run_dir).mis_models)
    if table is None or table.empty:
        from survey_app.mis import MODEL_COLUMNS
        return pd.DataFrame(columns=[*MODEL_COLUMNS, *MODEL_KEYS])
    table = table.copy()
    table["model_id"] = table["model_id"].astype(str)
    return _attach_models(table, models if models is not None else load_models(run_dir))


def load_robustness(run_dir: str | Path) -> dict[str, pd.DataFrame]:
    """``robustness/{accuracy,noise_similarity,prune_potential}.csv`` that exist and have rows."""
    out = {}
    for name in ROBUSTNESS_TABLES:
        table = read_table(Layout(run_dir).robustness_table(name))
        if table is not None and len(table):
            out[name] = table
    return out


def base_at_chance(accuracy: pd.DataFrame | None) -> list[str]:
    """Distributions of ``robustness/accuracy.csv`` on which the base model is not above chance
    (``base_above_chance`` false; tables without the column have none): they measure nothing about pruning."""
    if accuracy is None or "base_above_chance" not in accuracy:
        return []
    flag = accuracy["base_above_chance"].astype(str).str.lower()
    return sorted(set(accuracy.loc[flag == "false", "distribution"].astype(str)))


def load_robustness_subset(run_dir: str | Path) -> dict | None:
    """The images the robustness curves were measured on, as the base model's record states them:
    ``n``, ``images_per_class`` and the ``settings`` (corruptions, severities, …); None when not recorded."""
    from sparsight.layout import META_FILE
    try:
        record = json.loads((Layout(run_dir).models / BASE_METHOD / META_FILE).read_text()).get("robustness") or {}
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not record.get("n"):
        return None
    return {k: record[k] for k in ("n", "images_per_class", "settings") if k in record}


def load_calibration(run_dir: str | Path) -> dict | None:
    path = Layout(run_dir).calibration
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# ---- the model table ------------------------------------------------------------------------------
def human_by_model(trials: pd.DataFrame) -> pd.DataFrame:
    """Accuracy per model and kind of included human main trials (``condition_summary`` columns)."""
    from .descriptives import apply_exclusions, condition_summary
    main = human_main(trials)
    if main.empty:
        return pd.DataFrame()
    included, _ = apply_exclusions(main)
    included = human_main(included)
    return condition_summary(included, by=("model_id", "kind")) if len(included) else pd.DataFrame()


def model_table(models: pd.DataFrame, mis_models: pd.DataFrame | None = None,
                dissection_models: pd.DataFrame | None = None, human: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per model: metadata; ``mis_<kind>`` with ``_ci_low``/``_ci_high``/``_units`` per reference
    kind; ``interpretable``, ``interpretable_fraction_alive`` and ``unique_concepts`` (dissection);
    ``human_<kind>`` accuracy with its Wilson interval, participants and trials (from :func:`human_by_model`)."""
    table = models.copy()
    if mis_models is not None and len(mis_models):
        for kind, g in mis_models.groupby("kind", sort=True):
            g = g.set_index("model_id")
            for src, dst in (("mis", ""), ("mis_ci_low", "_ci_low"), ("mis_ci_high", "_ci_high"),
                             ("units", "_units"), ("fv_invalid", "_fv_invalid"), ("mis_valid_fv", "_valid_fv")):
                if kind != "synthetic" and src in ("fv_invalid", "mis_valid_fv"):
                    continue
                if src in g:
                    table[f"mis_{kind}{dst}"] = table["model_id"].map(g[src])
    if dissection_models is not None and len(dissection_models):
        d = dissection_models.assign(model_id=dissection_models["model_id"].astype(str)).set_index("model_id")
        for col in ("interpretable", "interpretable_fraction_alive", "unique_concepts", "alive", "units"):
            if col in d:
                table[f"dissection_{col}" if col in ("alive", "units") else col] = table["model_id"].map(d[col])
    if human is not None and len(human):
        for kind, g in human.groupby("kind", sort=True):
            g = g.assign(model_id=g["model_id"].astype(str)).set_index("model_id")
            for src, dst in (("accuracy", ""), ("wilson_low", "_low"), ("wilson_high", "_high"),
                             ("participants", "_participants"), ("trials", "_trials")):
                if src in g:
                    table[f"human_{kind}{dst}"] = table["model_id"].map(g[src])
    return table


# ---- everything at once ---------------------------------------------------------------------------
@dataclass
class StudyData:
    """Every table of a study the analysis uses (frames are empty where the files do not exist)."""
    run_dir: Path
    config: StudyConfig
    models: pd.DataFrame
    trials: pd.DataFrame
    units: pd.DataFrame
    mis_models: pd.DataFrame
    dissection_units: pd.DataFrame
    dissection_models: pd.DataFrame
    robustness: dict = field(default_factory=dict)
    robustness_subset: dict | None = None
    calibration: dict | None = None
    responses_source: str = "none"
    mis_tasks: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def human(self) -> pd.DataFrame:
        return human_main(self.trials)

    @property
    def has_responses(self) -> bool:
        return len(self.human) > 0


def load_study_data(run_dir: str | Path, cfg: StudyConfig | None = None, trials: pd.DataFrame | None = None,
                    source: str | None = None) -> StudyData:
    """Read every table of ``run_dir``; ``trials`` (e.g. from :func:`import_trials`) replaces the responses."""
    run_dir = Path(run_dir)
    cfg = cfg or study_config(run_dir)
    models = load_models(run_dir)
    if trials is None:
        trials, source = load_trials(run_dir, cfg, models)
    else:
        trials = _attach_models(trials.copy(), models, keys=("method", "schedule", "rate", "sparsity"))
        source = source or "imported trials"
    d_units, d_models = load_dissection(run_dir)
    return StudyData(run_dir=run_dir, config=cfg, models=models, trials=trials,
                     units=load_units(run_dir, models, d_units), mis_models=load_mis_models(run_dir, models),
                     dissection_units=d_units, dissection_models=d_models, robustness=load_robustness(run_dir),
                     robustness_subset=load_robustness_subset(run_dir),
                     calibration=load_calibration(run_dir), responses_source=source or "none",
                     mis_tasks=load_mis_tasks(run_dir))


def load_mis_tasks(run_dir: str | Path) -> pd.DataFrame:
    """``mis/tasks.csv``: Δ of every task, from which MIS at any α follows (empty where the MIS stage has not run)."""
    tasks = read_table(Layout(run_dir).mis_tasks)
    if tasks is None or tasks.empty:
        return pd.DataFrame()
    return tasks.assign(model_id=tasks["model_id"].astype(str))


def unreadable_images(run_dir: str | Path) -> dict | None:
    """How many images the base model's last training epoch skipped as unreadable (``train``, of ``images``
    read) and its validation (``val``); None where the base model was not trained or skipped none."""
    from pruning.training.engine import METRICS_FILE
    path = Layout(run_dir).model_dir("base") / METRICS_FILE
    try:
        last = json.loads(path.read_text().strip().splitlines()[-1])
    except (OSError, IndexError, ValueError):
        return None
    train, val = int(last.get("skipped", 0)), int((last.get("val") or {}).get("skipped", 0))
    return {"train": train, "val": val, "images": int(last.get("images", 0)) + train} if train or val else None
