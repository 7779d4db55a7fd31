"""Survey-app fixtures: a synthetic study directory and app/client factories on every database backend."""
from __future__ import annotations

import pytest

from survey_app import create_app
from survey_app.testing import make_study_dir
from survey_helpers import ADMIN_PASSWORD, API_TOKEN

FAST = {"practice_trials": 2, "practice_attempts": 3, "main_trials": 6, "catch_trials": 2, "min_response_ms": 1500,
        "min_answers_per_position": 1, "min_instruction_s": 0.0, "min_total_s": 0.0, "completion_code": "DONE42",
        "check_server_time": False,     # tests answer at once; test_survey_security turns the check on
        "require_external_id": "no"}    # most tests start without a study link; test_survey_consent requires one


@pytest.fixture
def make_app(tmp_path, database_url):
    """``make_app(bank={...}, **survey_settings)`` → a Flask app on a fresh study directory (``bank``: arguments of
    :func:`survey_app.testing.make_bank`) and database."""
    def factory(bank=None, **survey):
        run_dir = make_study_dir(tmp_path / "study", {**FAST, **survey}, **(bank or {}))
        return create_app({"RUN_DIR": str(run_dir), "DATABASE_URL": database_url, "TESTING": True,
                           "API_TOKEN": API_TOKEN, "ADMIN_PASSWORD": ADMIN_PASSWORD})
    return factory


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()
