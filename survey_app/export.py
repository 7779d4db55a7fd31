"""The tidy responses table (``responses.csv``, DESIGN §3): one row per trial response, human and machine.

Times are UTC.  ``rt_ms``: the browser's time from the trial being painted to the answer (it includes the
``min_response_ms`` lock); ``server_ms``: the server's time from first serving the trial to saving the answer;
``hidden_ms``: of ``rt_ms``, the time an overlay (full-screen prompt, a window too small) or a hidden page covered
the trial, so ``rt_ms − hidden_ms`` is the time it was seen; ``serves``: how often the trial was served while open
(above 1, a reload or a second tab restarted it and ``rt_ms`` counts from its last painting);
``served_at``: when the trial was first served; ``catch_ref``: for a catch trial, which right example its query
repeats (0-based); ``protocol``: a short id of the survey settings the participant was assigned under (the same id,
the same settings; the participants table holds them).  :func:`with_models` adds each model's ``method``,
``schedule``, ``rate`` and ``sparsity`` from the study directory."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from sqlalchemy import and_, inspect, null, select
from sqlalchemy.orm import sessionmaker

from sparsight.modeltable import load_models

from .models import Decline, Event, Exclusion, Participant, Response, SurveyStudy, Trial
from .protocol import protocol_id

RESPONSE_COLUMNS = ["study", "bank_hash", "participant", "external_id", "is_machine", "observer", "condition",
                    "block", "attempt", "position", "trial_type", "trial", "model_id", "kind", "layer", "unit",
                    "task", "max_position", "choice", "confidence", "correct", "rt_ms", "server_ms", "responded_at",
                    "participant_stage", "excluded", "exclusion_reasons", "served_at", "catch_ref", "protocol",
                    "hidden_ms", "serves"]
#: What :func:`with_models` joins onto the responses from the study's model table, after ``model_id``.
MODEL_FIELDS = ("method", "schedule", "rate", "sparsity")


def human_main_responses(responses: pd.DataFrame, *, included_only: bool = False) -> pd.DataFrame:
    """The main (not practice, not catch) trials of human participants, index reset; with ``included_only``
    only those of participants not excluded.  The one definition the MIS fit, the stage messages and the
    analysis share."""
    if not len(responses):
        return responses
    keep = (~responses["is_machine"].astype(bool)) & (responses["trial_type"] == "main")
    if included_only and "excluded" in responses:
        keep &= ~responses["excluded"].astype("boolean").fillna(False).astype(bool)
    return responses[keep].reset_index(drop=True)


#: A cell a spreadsheet would run as a formula starts with one of these (OWASP, CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def safe_csv(df: pd.DataFrame) -> str:
    """``df`` as CSV text with every text cell that a spreadsheet would evaluate as a formula prefixed by
    ``'`` (so ``=HYPERLINK(…)`` in a Prolific ID is shown, never run).  Numbers are left as they are."""
    def neutral(value):
        return f"'{value}" if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value
    text_columns = [c for c in df.columns if df[c].dtype == object or pd.api.types.is_string_dtype(df[c])]
    return df.assign(**{c: df[c].map(neutral) for c in text_columns}).to_csv(index=False)


def _settings_column(s):
    """``Participant.settings``, or NULL in a database made before participants kept their settings and read as it
    is (read-only, as the analysis and ``--plan`` read it, so the column was never added)."""
    present = {c["name"] for c in inspect(s.connection()).get_columns(Participant.__tablename__)}
    return Participant.settings if "settings" in present else null()


def responses_frame(sessions: sessionmaker, study_name: str | None = None) -> pd.DataFrame:
    """Every stored response joined with its trial, participant and exclusion verdict."""
    with sessions() as s:
        rows = s.execute(_responses_query(_settings_column(s), study_name)).all()
        failed = s.execute(select(Exclusion.participant_id, Exclusion.rule).where(Exclusion.passed.is_(False))
                           .order_by(Exclusion.id)).all()
    reasons: dict[int, list[str]] = {}
    for pid, rule in failed:
        reasons.setdefault(pid, []).append(rule)
    records = []
    for *fields, served_at, catch_ref, pid, settings, hidden_ms, serves in rows:
        records.append((*fields, ";".join(reasons.get(pid, [])), served_at, catch_ref, protocol_id(settings),
                        hidden_ms, serves))
    df = pd.DataFrame(records, columns=RESPONSE_COLUMNS)
    df["is_machine"] = df["is_machine"].astype(bool)
    df["correct"] = df["correct"].astype(bool)
    for col in ("unit", "task", "attempt", "position", "confidence"):
        df[col] = df[col].astype("int64")
    return df


def _responses_query(settings, study_name: str | None):
    q = (select(SurveyStudy.name, SurveyStudy.bank_hash, Participant.public_id, Participant.external_id,
                Participant.is_machine, Participant.observer, Participant.condition, Trial.block, Trial.attempt,
                Trial.position, Trial.trial_type, Trial.public_id, Trial.model_id, Trial.kind, Trial.layer,
                Trial.unit, Trial.task, Trial.max_position, Response.choice, Response.confidence, Response.correct,
                Response.rt_ms, Response.server_ms, Response.created_at, Participant.stage, Participant.excluded,
                Trial.served_at, Trial.catch_ref, Participant.id, settings, Response.hidden_ms, Trial.serves)
         .join(Trial, Response.trial_id == Trial.id)
         .join(Participant, Response.participant_id == Participant.id)
         .join(SurveyStudy, Participant.study_id == SurveyStudy.id)
         .order_by(Participant.id, Response.id))
    return q if study_name is None else q.where(SurveyStudy.name == study_name)


def with_models(responses: pd.DataFrame, run_dir: str | Path) -> pd.DataFrame:
    """``responses`` with :data:`MODEL_FIELDS` of each ``model_id`` inserted after it, from the study's model table
    (``models/<id>/meta.json``, else ``evaluation.csv``); unchanged when the study directory has neither."""
    models = load_models(run_dir)
    if models.empty:
        return responses
    meta = models.set_index("model_id")
    out = responses.copy()
    at = out.columns.get_loc("model_id") + 1
    for offset, name in enumerate(MODEL_FIELDS):
        out.insert(at + offset, name, responses["model_id"].astype(str).map(meta[name]))
    return out


def participants_frame(sessions: sessionmaker, study_name: str | None = None) -> pd.DataFrame:
    """One row per participant with stage, timing, the exclusion verdict and the survey settings of their assignment
    (``settings``, JSON; ``protocol``, its short id; both empty for a participant stored before they were kept)."""
    q = select(Participant).order_by(Participant.id)
    if study_name is not None:
        q = q.where(Participant.study_name == study_name)
    with sessions() as s:
        ps = s.scalars(q).all()
        excl = s.execute(select(Exclusion.participant_id, Exclusion.rule, Exclusion.passed, Exclusion.reason)).all()
    by_p: dict[int, list] = {}
    for pid, rule, passed, reason in excl:
        by_p.setdefault(pid, []).append((rule, passed, reason))
    return pd.DataFrame([{
        "participant": p.public_id, "external_id": p.external_id, "prolific_study_id": p.prolific_study_id,
        "prolific_session_id": p.prolific_session_id, "is_machine": p.is_machine, "observer": p.observer,
        "condition": p.condition, "seed": p.seed, "stage": p.stage, "practice_attempt": p.practice_attempt,
        "user_agent": p.user_agent, "window": p.window, "created_at": p.created_at,
        "instructions_started_at": p.instructions_started_at, "instructions_done_at": p.instructions_done_at,
        "instruction_s": ((p.instructions_done_at - p.instructions_started_at).total_seconds()
                          if p.instructions_done_at and p.instructions_started_at else None),
        "finished_at": p.finished_at, "last_seen_at": p.last_seen_at, "excluded": p.excluded,
        "failed_rules": ";".join(r for r, ok, _ in by_p.get(p.id, []) if not ok),
        "reasons": " | ".join(why for _, ok, why in by_p.get(p.id, []) if not ok),
        "protocol": protocol_id(p.settings), "settings": p.settings} for p in ps])


EVENT_COLUMNS = ["participant", "external_id", "is_machine", "kind", "detail", "trial", "client_ms", "client_epoch_ms",
                 "created_at"]


def events_frame(sessions: sessionmaker, study_name: str | None = None) -> pd.DataFrame:
    """Every stored browser event (focus, blur, visibility, full screen, resize, …) with its participant."""
    q = (select(Participant.public_id, Participant.external_id, Participant.is_machine, Event.kind, Event.detail,
                Event.trial, Event.client_ms, Event.client_epoch_ms, Event.created_at)
         .join(Participant, Event.participant_id == Participant.id).order_by(Event.id))
    if study_name is not None:
        q = q.where(Participant.study_name == study_name)
    with sessions() as s:
        rows = s.execute(q).all()
    return pd.DataFrame([tuple(r) for r in rows], columns=EVENT_COLUMNS)


DECLINE_COLUMNS = ["study", "external_id", "created_at", "participant", "participant_stage"]


def declines_frame(sessions: sessionmaker, study_name: str | None = None) -> pd.DataFrame:
    """Everyone who declined consent (the study link's participant ID, if any, and when); ``participant`` and
    ``participant_stage``: the session that ID had started, where it had one (a decline on a second browser)."""
    started = and_(Participant.study_name == Decline.study_name, Participant.external_id == Decline.external_id)
    q = (select(Decline.study_name, Decline.external_id, Decline.created_at, Participant.public_id, Participant.stage)
         .outerjoin(Participant, started).order_by(Decline.id))
    if study_name is not None:
        q = q.where(Decline.study_name == study_name)
    with sessions() as s:
        rows = s.execute(q).all()
    return pd.DataFrame([tuple(r) for r in rows], columns=DECLINE_COLUMNS)
