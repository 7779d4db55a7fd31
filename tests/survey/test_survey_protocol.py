"""Each participant keeps the survey settings they were assigned under: a server restarted with other settings
judges an earlier participant's session by theirs (timing, practice, exclusions), and the exports tell the two
protocols apart."""
from __future__ import annotations

import json

from sqlalchemy import select, text

from survey_app import create_app
from survey_app.app import study_config
from survey_app.export import participants_frame, responses_frame
from survey_app.models import Participant, Trial
from survey_app.stages import read_responses
from survey_helpers import ADMIN_PASSWORD, API_TOKEN, human_session


def restarted(app, **survey):
    """The same study and database served again, with ``survey`` settings given as ``--set`` gives them."""
    return create_app({"RUN_DIR": str(app.config["RUN_DIR"]), "DATABASE_URL": app.config["DATABASE"],
                       "TESTING": True, "API_TOKEN": API_TOKEN, "ADMIN_PASSWORD": ADMIN_PASSWORD, "SURVEY": survey})


def play(app, sid: str, *, wrong_first: bool = False, rt_ms: float = 1600.0) -> str:
    """Answer every trial of the session through ``app``'s service (right, but the first one wrong with
    ``wrong_first``); return the stage it ends in."""
    service, n = app.extensions["survey"], 0
    while "trial" in (state := service.state(sid)):
        with app.config["SESSIONS"]() as s:
            truth = s.scalars(select(Trial.max_position).where(Trial.public_id == state["trial"]["id"])).one()
        choice = ("lower" if truth == "upper" else "upper") if wrong_first and n == 0 else truth
        service.record_response(sid, {"trial": state["trial"]["id"], "choice": choice, "confidence": 2,
                                      "rt_ms": rt_ms, "key": f"key-{n:05d}"})
        n += 1
    return state["stage"]


def test_a_restarted_server_judges_an_earlier_participant_by_the_settings_they_were_assigned_under(make_app):
    app = make_app(practice_trials=2, practice_attempts=3, min_response_ms=1500, min_instruction_s=0.0)
    first = human_session(app.test_client())
    later = restarted(app, practice_trials=3, practice_attempts=1, min_response_ms=5000, min_instruction_s=3600.0)
    state = later.extensions["survey"].state(first)
    assert state["practice_attempts"] == 3 and state["progress"]["total"] == 6 + 2 + 2     # main, catch, practice
    # answered at 1.6 s (the participant's lock is 1.5 s) with one practice mistake (three attempts are theirs)
    assert play(later, first, wrong_first=True) == "complete"
    with later.config["SESSIONS"]() as s:
        person = s.scalars(select(Participant).where(Participant.public_id == first)).one()
        rules = {e.rule: e for e in person.exclusions}
    assert person.excluded is False
    assert rules["instruction_time"].passed and "≥ 0 s" in rules["instruction_time"].reason
    second = human_session(later.test_client())          # a new participant runs under the new settings
    assert later.extensions["survey"].state(second)["practice_attempts"] == 1
    people = participants_frame(later.config["SESSIONS"]).set_index("participant")
    protocols = people["protocol"]
    assert protocols.str.fullmatch(r"[0-9a-f]{12}").all() and protocols[first] != protocols[second]
    assert json.loads(people.loc[first, "settings"])["min_response_ms"] == 1500
    assert json.loads(people.loc[second, "settings"])["min_response_ms"] == 5000
    assert "database" not in json.loads(people.loc[first, "settings"])          # no connection string (password)
    answers = responses_frame(later.config["SESSIONS"])
    assert set(answers["protocol"]) == {protocols[first]}


def test_a_participant_stored_before_settings_were_kept_is_judged_by_the_servers(make_app):
    """A database made by an earlier version is read as it is (the analysis opens it read-only), then gets the
    column when a server starts; its participants have no stored settings, no protocol id, and the server's
    settings judge them."""
    app = make_app(min_response_ms=1500)
    sid = human_session(app.test_client())
    trial = app.extensions["survey"].state(sid)["trial"]
    with app.config["SESSIONS"]() as s:
        truth = s.scalars(select(Trial.max_position).where(Trial.public_id == trial["id"])).one()
    app.extensions["survey"].record_response(sid, {"trial": trial["id"], "choice": truth, "confidence": 2,
                                                   "rt_ms": 1600.0, "key": "before-00001"})
    engine, url = app.config["ENGINE"], app.config["DATABASE"]
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE participants DROP COLUMN settings"))
    engine.dispose()
    cfg = study_config(app.config["RUN_DIR"], {"database": url})
    stored = read_responses(app.config["RUN_DIR"], cfg, connect=not url.startswith("sqlite"))
    assert len(stored) == 1 and stored["protocol"].isna().all()
    later = restarted(app, min_response_ms=1500, practice_attempts=1)
    assert later.extensions["survey"].state(sid)["practice_attempts"] == 1
    assert play(later, sid, wrong_first=True) == "screened_out"
    people = participants_frame(later.config["SESSIONS"])
    assert people["protocol"].isna().all() and people["settings"].isna().all()
