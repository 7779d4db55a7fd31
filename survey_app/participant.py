"""Participant pages: consent → instructions → trials (practice, main) → completion.

The browser holds only a signed cookie with its session id and token; where a participant is in
the study is always read from the server, so a reload or a new tab resumes at the next trial.
Prolific's ``PROLIFIC_PID``, ``STUDY_ID`` and ``SESSION_ID`` are recorded; one participant ID
takes the study once (the same Prolific session may resume on another browser, or, finished, see its
completion or screen-out page again there).
"""
from __future__ import annotations

import math

from flask import (Blueprint, Response, current_app, redirect, render_template, request, session, url_for)

from .screen import minimum_window
from .security import CSRF_FIELD, check_csrf
from .service import SurveyError

bp = Blueprint("participant", __name__)
PROMPT = "Which image in the centre matches the Right examples better?"
PROLIFIC = ("PROLIFIC_PID", "STUDY_ID", "SESSION_ID")
STAGE_PAGES = {"instructions": "participant.instructions", "practice": "participant.trials",
               "main": "participant.trials", "complete": "participant.complete",
               "screened_out": "participant.screened_out"}


def _service():
    return current_app.extensions["survey"]


def _settings():
    return current_app.config["SETTINGS"]


def _current() -> str | None:
    """This browser's session id, if its cookie still matches a stored session."""
    pid = session.get("pid")
    if not pid:
        return None
    try:
        _service().authenticate(pid, session.get("tok"))
    except SurveyError:
        session.pop("pid", None)
        session.pop("tok", None)
        return None
    return pid


def _minimum_window() -> tuple[int, int]:
    """The window a trial of this study needs (the configured minimum, raised to fit the trial layout)."""
    return minimum_window(_settings(), _service().material.refs_per_side)


def _to_stage(pid: str):
    return redirect(url_for(STAGE_PAGES[_service().stage(pid)]))


def external_id_required(settings) -> bool:
    """Whether a session needs the study link's PROLIFIC_PID (``auto``: when a completion code is set)."""
    return settings.require_external_id == "yes" or (settings.require_external_id == "auto"
                                                     and bool(settings.completion_code))


NEEDS_LINK = ("this study can only be started from its link on Prolific, which carries your participant ID; "
              "open it from there")


DECLINED_BEFORE = ("this participant ID declined to take part earlier, so the study cannot start for it; if that was "
                   "a mistake, please contact the researchers")
ALREADY_TOOK_PART = ("this participant ID has already taken part in the study, so it cannot start again; if you "
                     "think this is a mistake, please contact the researchers")


def duration_minutes(settings) -> int:
    """The duration the consent page states: one minute of instructions plus every trial."""
    trials = settings.practice_trials + settings.main_trials + settings.catch_trials
    return max(1, math.ceil((60 + trials * settings.seconds_per_trial) / 60))


def _current_for(external: str | None) -> str | None:
    """This browser's session, unless the study link names another participant ID than the session's (or the
    session has none): then the browser is shared (a second person, or a pilot), and the old session is
    forgotten here (not deleted), so the new ID starts its own instead of answering under the first one's."""
    pid = _current()
    if pid and external and _service().external_id(pid) != external:
        session.pop("pid", None)
        session.pop("tok", None)
        return None
    return pid


@bp.get("/favicon.ico")
def favicon():
    """No icon: an empty answer instead of a 404 in every page's console."""
    return Response(status=204)


@bp.get("/")
def start():
    external = request.args.get("PROLIFIC_PID", "").strip()[:128] or None
    pid = _current_for(external)
    if pid:
        return _to_stage(pid)
    if external and (final := _finished_page(external, request.args.get("SESSION_ID", "").strip()[:128])):
        return final
    params = {k: request.args.get(k, "") for k in PROLIFIC}
    if external_id_required(_settings()) and not params["PROLIFIC_PID"].strip():
        raise SurveyError(403, NEEDS_LINK)
    return render_template("consent.html", params=params, settings=_settings(), min_window=_minimum_window(),
                           duration=duration_minutes(_settings()))


@bp.post("/consent")
def consent():
    check_csrf(request.form.get(CSRF_FIELD))
    external = request.form.get("PROLIFIC_PID", "").strip()[:128] or None
    if request.form.get("decision") == "decline":
        _service().record_decline(external)
        code = _settings().decline_code
        url = _settings().completion_url.format(code=code) if code else None
        started = bool(external) and _service().find_by_external(external) is not None
        return render_template("declined.html", redirect_url=url, started=started, contact=_settings().contact)
    if request.form.get("consent") != "yes":
        raise SurveyError(400, "consent is required to take part; tick the box to agree")
    pid = _current_for(external)
    if pid:
        return _to_stage(pid)
    if external_id_required(_settings()) and not external:
        raise SurveyError(403, NEEDS_LINK)
    study_id = request.form.get("STUDY_ID", "").strip()[:128] or None
    session_id = request.form.get("SESSION_ID", "").strip()[:128] or None
    service = _service()
    if external:
        if (resumed := _resume_started(external, session_id)) is not None:
            return resumed
        if service.declined(external):          # a new session only: one already under way may resume
            raise SurveyError(409, DECLINED_BEFORE)
    try:
        public_id, token = service.create_participant(
            external_id=external, prolific_study_id=study_id, prolific_session_id=session_id,
            user_agent=request.headers.get("User-Agent"), window=request.form.get("window", ""))
    except SurveyError as error:                # a concurrent consent (a double submit) created it first
        resumed = _resume_started(external, session_id) if error.status == 409 and external else None
        if resumed is None:
            raise
        return resumed
    session.update(pid=public_id, tok=token)
    return redirect(url_for("participant.instructions"))


def _resume_started(external: str, session_id: str | None):
    """The stage page of the participant ID's own session (same study-link SESSION_ID), this browser signed in
    to it; a 409 for someone else's ID; None while the ID has not started."""
    service = _service()
    found = service.find_by_external(external)
    if found is None:
        return None
    public_id, prolific_session, _ = found
    if session_id and session_id == prolific_session:     # its own session: resume, or show its code
        session.update(pid=public_id, tok=service.reissue_token(public_id))
        return _to_stage(public_id)
    raise SurveyError(409, ALREADY_TOOK_PART)


def _finished_page(external: str, session_id: str):
    """The completion (or screen-out) page of a finished session reopened from its own study link (the same
    PROLIFIC_PID and SESSION_ID) on another browser, without asking for consent again; None otherwise.  Nothing
    is signed in or stored: the page only repeats the session's code."""
    found = _service().find_by_external(external)
    if found is None or not session_id or found[1] != session_id or found[2] not in ("complete", "screened_out"):
        return None
    return _final_page(found[2])


def _final_page(stage: str):
    """The page that ends a session at ``stage`` (complete or screened_out), with its code and redirect."""
    code = _settings().completion_code if stage == "complete" else _settings().screenout_code
    url = _settings().completion_url.format(code=code) if code else None
    return render_template("complete.html" if stage == "complete" else "screened_out.html", code=code,
                           redirect_url=url)


def _require_session() -> str:
    pid = _current()
    if not pid:
        raise SurveyError(401, "no study session in this browser; open the study link again")
    return pid


@bp.get("/instructions")
def instructions():
    pid = _require_session()
    if _service().stage(pid) != "instructions":
        return _to_stage(pid)
    _service().instructions_seen(pid)
    return render_template("instructions.html", settings=_service().settings_for(pid), prompt=PROMPT)


@bp.post("/instructions")
def instructions_done():
    check_csrf(request.form.get(CSRF_FIELD))
    pid = _require_session()
    _service().instructions_done(pid)
    return _to_stage(pid)


@bp.get("/instructions/example.png")
def example_image():
    cache = current_app.extensions.setdefault("survey_example", {})
    if "png" not in cache:
        from .example import example_png
        cache["png"] = example_png(_service().material)
    return Response(cache["png"], mimetype="image/png")


@bp.get("/trials")
def trials():
    pid = _require_session()
    if _service().stage(pid) not in ("practice", "main"):
        return _to_stage(pid)
    s = _service().settings_for(pid)      # the session's own timing, whatever this server was started with
    # the configured floor: the trial measures what else it needs once it is on screen
    timing = {"min_response_ms": s.min_response_ms, "feedback_delay_ms": s.feedback_delay_ms,
              "feedback_ms": s.feedback_ms, "min_width": s.min_window_width, "min_height": s.min_window_height,
              "reference_px": s.reference_px, "query_px": s.query_px}
    return render_template("trials.html", session_id=pid, timing=timing, prompt=PROMPT, settings=s)


@bp.get("/complete")
def complete():
    pid = _require_session()
    state = _service().completion(pid)
    if state["stage"] != "complete":
        return _to_stage(pid)
    return _final_page("complete")


@bp.get("/screened-out")
def screened_out():
    pid = _require_session()
    if _service().stage(pid) != "screened_out":
        return _to_stage(pid)
    return _final_page("screened_out")
