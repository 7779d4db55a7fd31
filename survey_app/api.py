"""The JSON API: the browser's trial page and machine participants use the same routes.

    POST /api/sessions                      create a machine session (API token)      → 201 {session, token}
    GET  /api/sessions/<id>                 stage, progress, current trial, next images
    POST /api/sessions/<id>/responses       {trial, choice, confidence, rt_ms, key}   → feedback
    POST /api/sessions/<id>/events          {events: [{kind, detail, t}]}
    GET  /stimuli/<sha256>.png              an image of the bank (content-addressed; nothing else is served)

Errors are ``{"error": reason}`` with a 4xx status; a refused request changes nothing.
"""
from __future__ import annotations

from flask import Blueprint, abort, current_app, jsonify, request, send_file

from .security import authorize_session, check_api_token
from .service import SurveyError

bp = Blueprint("api", __name__)


def _service():
    return current_app.extensions["survey"]


def _json_body() -> dict:
    try:
        body = request.get_json(silent=True)
    except RecursionError:          # nested too deeply for the parser: no request of the survey looks like this
        raise SurveyError(400, "the request body is nested too deeply to be a survey request") from None
    if body is None:
        raise SurveyError(400, "the request body must be JSON (Content-Type: application/json)")
    if not isinstance(body, dict):
        raise SurveyError(400, "the request body must be a JSON object")
    return body


@bp.post("/api/sessions")
def create_session():
    check_api_token()
    body = _json_body()
    observer = body.get("observer")
    if not isinstance(observer, str) or not 1 <= len(observer) <= 128:
        raise SurveyError(400, "'observer' (the machine participant's name, 1–128 characters) is required")
    practice = body.get("practice", False)
    if not isinstance(practice, bool):
        raise SurveyError(400, "'practice' must be true or false")
    condition = body.get("condition")
    if condition is not None and not isinstance(condition, str):
        raise SurveyError(400, "'condition' must be a string")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31):
        raise SurveyError(400, "'seed' must be an integer in [0, 2**31)")
    public_id, token = _service().create_participant(
        is_machine=True, observer=observer, mode=body.get("mode", "participant"), condition=condition,
        practice=practice, user_agent=request.headers.get("User-Agent"), seed=seed)
    return jsonify(session=public_id, token=token, state=_service().state(public_id, serve=False)), 201


@bp.get("/api/conditions")
def conditions():
    check_api_token()
    return jsonify(conditions={c: len(items) for c, items in _service().conditions.items()})


@bp.get("/api/sessions/<public_id>")
def session_state(public_id):
    authorize_session(public_id)
    return jsonify(_service().state(public_id))


@bp.post("/api/sessions/<public_id>/responses")
def respond(public_id):
    authorize_session(public_id)
    return jsonify(_service().record_response(public_id, _json_body()))


@bp.post("/api/sessions/<public_id>/events")
def events(public_id):
    authorize_session(public_id)
    return jsonify(stored=_service().record_events(public_id, _json_body()))


@bp.get("/stimuli/<name>")
def image(name: str):
    stem, dot, ext = name.partition(".")
    try:
        if ext != "png":
            raise KeyError(name)
        path = _service().material.image_path(stem)
    except KeyError:
        abort(404, description="no such stimulus image")
    return send_file(path, mimetype="image/png", max_age=86400, conditional=True, etag=True)
