"""The Flask application factory.

``create_app(config)`` reads the study (``RUN_DIR/study.toml``, its ``[survey]`` section, optionally
overridden by ``config["SURVEY"]``), opens the database (``DATABASE_URL``, else ``survey.database``,
else SQLite at ``RUN_DIR/survey.db``), loads the stimulus bank and registers three blueprints:
participant pages, the admin area and the JSON API.  Environment variables fill what ``config``
leaves out: ``SPARSIGHT_RUN_DIR``, ``SPARSIGHT_DATABASE_URL``, ``SPARSIGHT_ADMIN_PASSWORD``,
``SPARSIGHT_API_TOKEN`` (this is how gunicorn workers are configured).
"""
from __future__ import annotations

import os
from pathlib import Path

from flask import Flask, jsonify, make_response, render_template, request
from werkzeug.exceptions import HTTPException

from sparsight.config import StudyConfig, absolute_database_url, apply_settings, study_from_run_dir
from sparsight.files import absolute
from sparsight.layout import Layout

from .db import open_sessions
from .material import Material
from .security import csp_nonce, csrf_token, load_secrets, security_headers
from .service import SurveyError, SurveyService

ENV = {"RUN_DIR": "SPARSIGHT_RUN_DIR", "DATABASE_URL": "SPARSIGHT_DATABASE_URL",
       "ADMIN_PASSWORD": "SPARSIGHT_ADMIN_PASSWORD", "API_TOKEN": "SPARSIGHT_API_TOKEN"}


def study_config(run_dir: Path, survey_overrides: dict | None = None) -> StudyConfig:
    cfg = study_from_run_dir(run_dir)
    if survey_overrides:
        apply_settings(cfg, {"survey": dict(survey_overrides)}, "survey settings")
    return cfg


def database_url(run_dir: Path, cfg: StudyConfig, explicit: str | None = None) -> str:
    """``explicit`` (--database, DATABASE_URL, SPARSIGHT_DATABASE_URL), else ``survey.database``, else SQLite in
    the study directory; a relative SQLite file is taken from the working directory and made absolute."""
    return absolute_database_url(explicit or cfg.survey.database or f"sqlite:///{Layout(absolute(run_dir)).survey_db}")


def survey_material(run_dir: Path, cfg: StudyConfig) -> Material:
    """The tasks the survey of ``cfg`` serves from the stimulus bank of ``run_dir`` (FileNotFoundError
    without a manifest, ValueError when ``survey.models`` or ``survey.kinds`` leave nothing)."""
    settings = cfg.survey
    return Material(Layout(run_dir).stimuli, models=list(settings.models) or None, kinds=list(settings.kinds),
                    every_kind=settings.units == "every-kind")


def check_templates(settings) -> None:
    """FileNotFoundError when ``survey.templates`` names a folder that is not there (the built-in pages would be
    served instead of the study's own, consent page included)."""
    folder = Path(settings.templates) if settings.templates else None
    if folder is not None and not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"survey.templates: {folder} {what} (a folder of Jinja pages that replace built-in "
                                f"ones)")


def create_app(test_config: dict | None = None) -> Flask:
    app = Flask(__name__)
    app.config.update({k: os.environ.get(v) for k, v in ENV.items()})
    app.config.update(test_config or {})
    if not app.config.get("RUN_DIR"):
        raise ValueError("create_app needs RUN_DIR (a study directory with stimuli/manifest.parquet); "
                         "set it in the config or SPARSIGHT_RUN_DIR")
    run_dir = app.config["RUN_DIR"] = absolute(app.config["RUN_DIR"])   # send_file resolves against the package
    cfg = study_config(run_dir, app.config.get("SURVEY"))
    settings = cfg.survey
    check_templates(settings)
    material = survey_material(run_dir, cfg)      # before the database: a wrong folder gets no survey.db
    url = database_url(run_dir, cfg, app.config.get("DATABASE_URL"))
    sessions = open_sessions(url)
    engine = sessions.kw["bind"]
    service = SurveyService(sessions, material, settings, cfg.study.name)

    app.config["SECRETS"] = load_secrets(sessions)
    app.secret_key = app.config.get("SECRET_KEY") or app.config["SECRETS"]["cookie_key"]
    app.config.update(SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Lax", MAX_CONTENT_LENGTH=256 * 1024,
                      SESSION_COOKIE_SECURE=settings.secure_cookies,
                      STUDY=cfg, SETTINGS=settings, ENGINE=engine, SESSIONS=sessions, DATABASE=url)
    if settings.proxy_hops:
        from werkzeug.middleware.proxy_fix import ProxyFix
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.proxy_hops, x_proto=settings.proxy_hops)
    app.extensions["survey"] = service
    if settings.templates:      # the study's own pages first, the built-in ones for the rest
        from jinja2 import ChoiceLoader, FileSystemLoader
        app.jinja_loader = ChoiceLoader([FileSystemLoader(settings.templates), app.jinja_loader])
    app.jinja_env.globals["csrf_token"] = csrf_token
    app.jinja_env.globals["csp_nonce"] = csp_nonce
    app.after_request(security_headers)

    from .admin import bp as admin_bp
    from .api import bp as api_bp
    from .participant import bp as participant_bp
    app.register_blueprint(participant_bp)
    app.register_blueprint(admin_bp)
    app.register_blueprint(api_bp)
    _error_handlers(app)
    return app


def _wants_json() -> bool:
    return request.path.startswith("/api/") or request.is_json


def _error_handlers(app: Flask) -> None:
    @app.errorhandler(SurveyError)
    def survey_error(err: SurveyError):
        if _wants_json():
            return jsonify(error=err.reason), err.status
        settings = app.config.get("SETTINGS")
        return render_template("message.html", title="Cannot continue", message=err.reason,
                               contact=getattr(settings, "contact", "")), err.status

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException):
        reason = err.description or err.name
        if _wants_json():
            response = make_response(jsonify(error=reason), err.code)
        else:
            response = make_response(render_template("message.html", title=err.name, message=reason), err.code)
        for name in ("Allow", "Retry-After", "WWW-Authenticate"):     # what the exception's own response says
            value = err.get_response().headers.get(name)
            if value:
                response.headers[name] = value
        return response
