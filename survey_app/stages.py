"""The survey's study stages: the MIS of every unit of every model in the stimulus bank, and the machine
participants; and the reader of the survey database's responses that the MIS fit and the analysis share.

The MIS stage writes ``mis/tasks.csv`` (Δ per task), ``mis/units.csv`` (DESIGN §3), ``mis/models.csv`` (mean
with a bootstrap CI per model and reference kind) and, once enough human responses exist,
``mis/calibration.json`` (fitted α with its CI and the held-out check).  The participants stage answers
survey trials through the app's API with the MIS observer and writes ``survey/machine_participants.csv``.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from sparsight.files import atomic_write_text
from sparsight.layout import Layout

from .embeddings import EmbeddingCache, create_embedding
from .export import human_main_responses
from .material import Material
from .mis import (UNIT_COLUMNS, calibration, human_trials, model_scores, shared_units, task_deltas, unit_scores,
                  with_status)


def read_responses(run_dir: Path, cfg, *, every_study: bool = False, connect: bool = True) -> pd.DataFrame:
    """Every stored response of the study's survey database (empty when no database exists yet), of this
    study only unless ``every_study``.  With ``connect=False`` only a local SQLite file is read (opened
    read-only); a database server raises :class:`NotKnownWhilePlanning`."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.orm import sessionmaker

    from sparsight.errors import NotKnownWhilePlanning

    from .app import database_url
    from .db import make_engine, read_only_sqlite
    from .export import RESPONSE_COLUMNS, responses_frame
    url = database_url(run_dir, cfg)
    parsed = make_url(url)
    sqlite = parsed.get_backend_name() == "sqlite"
    if sqlite and not Path(parsed.database or "").is_file():
        return pd.DataFrame(columns=RESPONSE_COLUMNS)
    if not connect and not sqlite:
        raise NotKnownWhilePlanning(f"depends on the human responses in the survey database "
                                    f"{parsed.render_as_string(hide_password=True)}, which --plan does not connect to")
    engine = make_engine(url) if connect else read_only_sqlite(parsed.database)
    try:
        from sqlalchemy import inspect
        if not inspect(engine).has_table("responses"):
            return pd.DataFrame(columns=RESPONSE_COLUMNS)
        return responses_frame(sessionmaker(engine), None if every_study else cfg.study.name)
    finally:
        engine.dispose()


def _device(study) -> str:
    return str(study.ctx.device) if study.ctx is not None else "cpu"


def run_mis(study, *, log=print) -> list[Path]:
    """MIS of every unit in the study's stimulus bank under its ``[mis]`` settings; returns the files written."""
    run_dir, cfg, layout = study.run_dir, study.config, study.layout
    mis = cfg.mis
    out = layout.mis
    embedding = create_embedding(mis.embedding, run_dir, weights=mis.embedding_weights, device=_device(study),
                                 size=mis.embedding_size)
    cache = EmbeddingCache(embedding, out / "embeddings" / f"{embedding.key}.pt", batch_size=mis.batch_size,
                           progress=cfg.study.progress)
    deltas = task_deltas(Material(layout.stimuli), cache)
    files = [atomic_write_text(layout.mis_tasks, deltas.to_csv(index=False))]
    alpha, source, calibration_file = _alpha(run_dir, cfg, deltas, embedding.key, log)
    files += [calibration_file] if calibration_file else []
    status_csv = layout.stimulus_units
    status = pd.read_csv(status_csv) if status_csv.is_file() and status_csv.stat().st_size > 1 else None
    units, extra = shared_units(with_status(unit_scores(deltas, alpha), status))
    if len(extra):
        shown = ", ".join(f"{r.model_id} {r.layer}:{r.unit} ({r.kind})" for r in extra.head(3).itertuples())
        log(f"[mis] left out {len(extra)} unit(s) that not every model has stimuli for, e.g. {shown}: the "
            f"models are compared on the same units")
    units = units.assign(alpha=alpha, alpha_source=source, embedding=embedding.key)
    files.append(atomic_write_text(layout.mis_units, units.reindex(columns=UNIT_COLUMNS).to_csv(index=False)))
    models = model_scores(units, mis.bootstrap, cfg.study.seed).assign(alpha=alpha, alpha_source=source,
                                                                        embedding=embedding.key)
    files.append(atomic_write_text(layout.mis_models, models.to_csv(index=False)))
    return files


def _alpha(run_dir: Path, cfg, deltas: pd.DataFrame, embedding_key: str, log) -> tuple[float, str, Path | None]:
    """The MIS temperature α, its source, and ``mis/calibration.json`` when α was fitted on human
    responses (``mis.alpha_source = "auto"`` and enough of them), else the configured α and None."""
    mis = cfg.mis
    layout = Layout(run_dir)
    alpha, source, written = mis.alpha, "configured", None
    if mis.alpha_source == "auto":
        responses = read_responses(run_dir, cfg)
        trials = human_trials(responses, deltas)
        if len(trials) >= mis.min_human_responses:
            report = calibration(trials, seed=cfg.study.seed)
            report.update(embedding=embedding_key, configured_alpha=mis.alpha)
            written = atomic_write_text(layout.calibration, json.dumps(report, indent=2))
            alpha, source = report["alpha"], "fitted"
            log(f"[mis] α fitted on {report['responses']} human responses: {alpha:.3g} "
                f"(95% CI {report['alpha_ci'][0]:.3g}–{report['alpha_ci'][1]:.3g})")
        else:
            log(f"[mis] {_why_not_fitted(run_dir, cfg, responses, len(trials))}; α stays the configured {alpha:.3g}")
    stale = layout.calibration
    if source != "fitted" and stale.is_file():
        stale.unlink()
        log(f"[mis] removed the earlier {stale.name}: it no longer describes this MIS (α {alpha:.3g}, {source})")
    return alpha, source, written


def _why_not_fitted(run_dir: Path, cfg, responses: pd.DataFrame, usable: int) -> str:
    """Why α was not fitted on human responses, naming responses filed under another study and those of
    excluded participants."""
    mine = len(human_main_responses(responses))
    included = len(human_main_responses(responses, included_only=True))
    need = cfg.mis.min_human_responses
    if mine == 0:
        others = human_main_responses(read_responses(run_dir, cfg, every_study=True))
        if len(others):
            names = ", ".join(repr(n) for n in sorted(others["study"].astype(str).unique()))
            return (f"no human responses for study {cfg.study.name!r}, although the survey database holds "
                    f"{len(others)} for {names} (run under that study name to use them)")
        return "no human responses yet"
    excluded = (f" ({mine - included} more are from excluded participants and do not count)"
                if included < mine else "")
    if usable < included:
        return (f"{usable} of the study's {included} human main-trial responses of included participants match tasks "
                f"of the current stimulus bank{excluded}, fewer than mis.min_human_responses = {need}")
    if included < mine:
        return (f"{usable} human responses of included participants{excluded}, fewer than "
                f"mis.min_human_responses = {need}")
    return f"{usable} human responses, fewer than mis.min_human_responses = {need}"


def human_response_count(run_dir: Path, cfg, *, connect: bool = True) -> int:
    return len(human_main_responses(read_responses(run_dir, cfg, connect=connect)))


class MisStage:
    name = "mis"
    description = "Machine Interpretability Score of every unit (MIS surrogate on the stimulus bank)"

    def check(self, study) -> list[str]:
        """A registered network as the embedding: its weights can be found before anything runs."""
        from pruning.models import MODELS, WeightsError
        from pruning.models.weights import resolve_weights

        mis = study.config.mis
        if mis.embedding not in MODELS:
            return []
        if not mis.embedding_weights:
            return [f"mis.embedding_weights: mis.embedding = {mis.embedding!r} needs weights (a file, or a torchvision "
                    f"weights name present in the TORCH_HOME cache)"]
        try:
            resolve_weights(mis.embedding, mis.embedding_weights)
        except (WeightsError, ValueError) as err:
            return [f"mis.embedding_weights: {err}"]
        return []

    def inputs(self, study) -> dict:
        cfg = study.config
        humans = (human_response_count(study.run_dir, cfg, connect=not study.planning)
                  if cfg.mis.alpha_source == "auto" else 0)
        return {"upstream": {k: study.upstream(k) for k in ("observer", "stimuli")}, "mis": asdict(cfg.mis),
                "seed": cfg.study.seed, "human_responses": humans}

    def run(self, study) -> list[Path]:
        if not study.is_main:
            return []
        return run_mis(study)


def machine_seed(study_seed: int, condition: str, index: int) -> int:
    """The seed of a study's ``index``-th machine session in ``condition``: the study's seed decides it, so the
    machine participants (their trials, hence their accuracies) repeat when the study is run again."""
    import hashlib
    digest = hashlib.sha256(f"machine-session:{study_seed}:{condition}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 2**31


def run_participants(study, *, log=print) -> list[Path]:
    """``survey.machine_participants`` machine sessions per condition, answered through the app's API
    (in-process) by the MIS observer; earlier sessions of the same observer are replaced."""
    import secrets

    from .app import create_app
    from .machine import FlaskTransport, SimilarityObserver, SurveyClient, run_session
    run_dir, cfg = study.run_dir, study.config
    token = secrets.token_urlsafe(24)
    app = create_app({"RUN_DIR": str(run_dir), "API_TOKEN": token})
    service = app.extensions["survey"]
    mis = cfg.mis
    embedding = create_embedding(mis.embedding, run_dir, weights=mis.embedding_weights, device=_device(study),
                                 size=mis.embedding_size)
    name = f"study:{mis.embedding}"
    removed = service.delete_machine_sessions(name)
    observer = SimilarityObserver(embedding, mis.alpha, name=name)
    rows = []
    try:
        for condition in sorted(service.conditions):
            for index in range(cfg.survey.machine_participants):
                summary = run_session(SurveyClient(FlaskTransport(app)), observer, api_token=token,
                                      mode="participant", condition=condition,
                                      seed=machine_seed(cfg.study.seed, condition, index))
                rows.append({"session": summary["session"], "observer": name, "condition": condition,
                             "trials": summary["trials"], "accuracy": summary["accuracy"]})
    finally:
        app.config["ENGINE"].dispose()      # the database connections go back, also after an error
    log(f"[participants] {len(rows)} machine sessions ({name}) over {len(service.conditions)} conditions"
        + (f"; replaced {removed} earlier ones" if removed else ""))
    return [atomic_write_text(study.layout.survey / "machine_participants.csv", pd.DataFrame(rows).to_csv(index=False))]


class ParticipantsStage:
    name = "participants"
    description = "machine participants answer survey trials through the app's API (survey.machine_participants)"

    def check(self, study) -> list[str]:
        """``survey.models`` must be models that get stimuli."""
        from pruning.stages import study_model_ids

        cfg = study.config
        served = list(cfg.stimuli.models) or study_model_ids(study, observer=False)
        unknown = [m for m in cfg.survey.models if m not in served]
        return [f"survey.models: {unknown[0]!r} gets no stimuli in this study; models with stimuli: {served}"
                ] if unknown else []

    def inputs(self, study) -> dict:
        cfg = study.config
        return {"upstream": {k: study.upstream(k) for k in ("observer", "stimuli")}, "mis": asdict(cfg.mis),
                "survey": asdict(cfg.survey)}

    def run(self, study) -> list[Path]:
        if not study.is_main or study.config.survey.machine_participants == 0:
            return []
        return run_participants(study)


STAGES = [MisStage(), ParticipantsStage()]
