"""Sessions end to end through HTTP: machine and human flows, practice repeats, idempotent saves,
resuming, catch trials, Prolific identity, exclusions and the responses export — on SQLite and PostgreSQL."""
from __future__ import annotations

import pandas as pd
from sqlalchemy import func, select

from survey_app.exclusions import RULES
from survey_app.export import RESPONSE_COLUMNS, responses_frame
from survey_app.models import Participant, Response, Trial
from survey_helpers import API_TOKEN, auth, human_session, machine_session


def answer(trial: dict, app, correct: bool = True) -> str:
    """The choice that is right (or wrong) for ``trial``, looked up in the database."""
    with app.config["SESSIONS"]() as s:
        truth = s.scalars(select(Trial.max_position).where(Trial.public_id == trial["id"])).one()
    return truth if correct else ("lower" if truth == "upper" else "upper")


def respond(client, sid, trial, choice, *, key, headers=None, confidence=2, rt=1600.0):
    return client.post(f"/api/sessions/{sid}/responses", headers=headers or {},
                       json={"trial": trial["id"], "choice": choice, "confidence": confidence, "rt_ms": rt, "key": key})


def csrf(client) -> dict:
    with client.session_transaction() as s:
        return {"X-CSRF-Token": s["csrf"]}


def test_machine_session_is_served_every_trial_once_and_stores_each_response(app, client):
    sid, token = machine_session(client)
    seen, n = [], 0
    while True:
        state = client.get(f"/api/sessions/{sid}", headers=auth(token)).json
        if state["stage"] == "complete":
            break
        trial = state["trial"]
        seen.append(trial["id"])
        r = respond(client, sid, trial, "upper", key=f"key-{n:04d}", headers=auth(token), confidence=1 + n % 3)
        assert r.status_code == 200 and r.json["replayed"] is False
        assert r.json["correct"] == (r.json["correct_position"] == "upper")
        n += 1
    assert len(seen) == len(set(seen)) == 6 + 2            # main + catch, no practice for machines
    df = responses_frame(app.config["SESSIONS"])
    assert list(df.columns) == RESPONSE_COLUMNS
    assert len(df) == 8 and df["is_machine"].all() and (df["observer"] == "test-observer").all()
    assert sorted(df["trial"]) == sorted(seen)
    assert list(df["confidence"]) == [1 + i % 3 for i in range(8)]
    assert (df["correct"] == (df["max_position"] == "upper")).all()
    assert df["served_at"].notna().all() and (df["served_at"] <= df["responded_at"]).all()
    catch = df["trial_type"] == "catch"                  # which right example a catch query repeats
    assert df.loc[catch, "catch_ref"].between(0, 2).all() and df.loc[~catch, "catch_ref"].isna().all()


def test_human_practice_repeats_after_a_mistake_then_main_trials_then_completion_redirect(app, client):
    sid = human_session(client, PROLIFIC_PID="pp1", STUDY_ID="st", SESSION_ID="se")
    head = csrf(client)
    key = iter(f"k-{i:05d}-xyz" for i in range(100))

    def play(correct_first: bool):
        state = client.get(f"/api/sessions/{sid}").json
        first = True
        stage, attempt = state["stage"], state["practice_attempt"]
        while state["stage"] == stage and state["practice_attempt"] == attempt:
            trial = state["trial"]
            r = respond(client, sid, trial, answer(trial, app, correct=correct_first or not first), key=next(key),
                        headers=head)
            assert r.status_code == 200, r.json
            first = False
            state = client.get(f"/api/sessions/{sid}").json
        return state

    assert client.get(f"/api/sessions/{sid}").json["stage"] == "practice"
    state = play(correct_first=False)                       # one mistake: practice again
    assert state["stage"] == "practice" and state["practice_attempt"] == 2
    assert client.get("/complete").headers["Location"].endswith("/trials")   # not finished: no code
    state = play(correct_first=True)
    assert state["stage"] == "main"
    state = play(correct_first=True)
    assert state["stage"] == "complete"
    r = client.get("/complete")         # the code is shown, and the page goes on to Prolific by itself
    url = "https://app.prolific.com/submissions/complete?cc=DONE42"
    assert r.status_code == 200 and 'id="completion-code">DONE42<' in r.text
    assert f'http-equiv="refresh" content="3;url={url}"' in r.text and f'href="{url}"' in r.text
    with app.config["SESSIONS"]() as s:
        p = s.scalars(select(Participant)).one()
        assert (p.external_id, p.prolific_study_id, p.prolific_session_id) == ("pp1", "st", "se")
        assert p.excluded is False and len(p.exclusions) == len(RULES)
        kinds = s.execute(select(Trial.block, Trial.attempt, func.count()).join(Response)
                          .group_by(Trial.block, Trial.attempt).order_by(Trial.block, Trial.attempt)).all()
    assert kinds == [("main", 0, 8), ("practice", 1, 2), ("practice", 2, 2)]


def test_practice_failed_every_attempt_screens_out(make_app):
    app = make_app(practice_attempts=2, screenout_code="NOPE")
    client = app.test_client()
    sid = human_session(client)
    head, n = csrf(client), 0
    while (state := client.get(f"/api/sessions/{sid}").json)["stage"] == "practice":
        assert respond(client, sid, state["trial"], answer(state["trial"], app, False), key=f"key-{n:05d}",
                       headers=head).status_code == 200
        n += 1
    assert state["stage"] == "screened_out" and n == 4
    page = client.get("/screened-out").text
    assert "the study ends here" in page and 'url=https://app.prolific.com/submissions/complete?cc=NOPE"' in page
    with app.config["SESSIONS"]() as s:
        assert s.scalar(select(func.count()).select_from(Trial).where(Trial.block == "main")) == 8   # never served


def test_retried_and_duplicated_responses_never_add_a_row(app, client):
    sid, token = machine_session(client)
    h = auth(token)
    trial = client.get(f"/api/sessions/{sid}", headers=h).json["trial"]
    first = respond(client, sid, trial, "upper", key="retry-key-1", headers=h)
    again = respond(client, sid, trial, "upper", key="retry-key-1", headers=h)
    assert first.status_code == again.status_code == 200
    assert again.json["replayed"] is True and again.json["correct"] == first.json["correct"]
    other_key = respond(client, sid, trial, "upper", key="retry-key-2", headers=h)
    changed = respond(client, sid, trial, "lower", key="retry-key-1", headers=h)
    assert other_key.status_code == changed.status_code == 409
    assert "already answered" in other_key.json["error"] and "different answer" in changed.json["error"]
    with app.config["SESSIONS"]() as s:
        assert s.scalar(select(func.count()).select_from(Response)) == 1
    nxt = client.get(f"/api/sessions/{sid}", headers=h).json["trial"]
    assert nxt["id"] != trial["id"] and nxt["number"] == 2     # a reload resumes at the next trial


def test_catch_trials_repeat_a_right_example_as_the_matching_query(app, client):
    sid, token = machine_session(client)
    h = auth(token)
    with app.config["SESSIONS"]() as s:
        catch = {t.public_id: t.max_position for t in s.scalars(select(Trial).where(Trial.trial_type == "catch"))}
    assert len(catch) == 2
    n, found = 0, 0
    while "trial" in (state := client.get(f"/api/sessions/{sid}", headers=h).json):
        trial = state["trial"]
        if trial["id"] in catch:
            assert trial[catch[trial["id"]]] in trial["right"]
            found += 1
        else:
            assert trial["upper"] not in trial["right"] and trial["lower"] not in trial["right"]
        respond(client, sid, trial, "upper", key=f"key-{n:05d}", headers=h)
        n += 1
    assert found == 2


def test_a_prolific_id_takes_part_once_but_its_own_session_may_resume(app):
    first = app.test_client()
    sid = human_session(first, PROLIFIC_PID="same", SESSION_ID="s1")
    other = app.test_client()                                # another browser
    html = other.get("/", query_string={"PROLIFIC_PID": "same", "SESSION_ID": "s2"}).text
    from survey_helpers import csrf_from
    r = other.post("/consent", data={"csrf_token": csrf_from(html), "consent": "yes", "PROLIFIC_PID": "same",
                                     "SESSION_ID": "s2"})
    assert r.status_code == 409 and "already taken part" in r.text
    r = other.post("/consent", data={"csrf_token": csrf_from(html), "consent": "yes", "PROLIFIC_PID": "same",
                                     "SESSION_ID": "s1"})
    assert r.status_code == 302
    with other.session_transaction() as s:
        assert s["pid"] == sid                               # resumed, not a second participant
    with app.config["SESSIONS"]() as s:
        assert s.scalar(select(func.count()).select_from(Participant)) == 1


def test_exclusions_are_stored_with_their_reasons(make_app):
    app = make_app(min_instruction_s=3600.0, catch_min_accuracy=1.0)
    client = app.test_client()
    sid = human_session(client)
    head, n = csrf(client), 0
    while (state := client.get(f"/api/sessions/{sid}").json)["stage"] in ("practice", "main"):
        trial = state["trial"]
        correct = state["stage"] == "practice"
        respond(client, sid, trial, answer(trial, app, correct) if correct else "upper", key=f"key-{n:05d}",
                headers=head)
        n += 1
    df = responses_frame(app.config["SESSIONS"])
    assert df["excluded"].all()
    assert "instruction_time" in df["exclusion_reasons"].iloc[0]
    with app.config["SESSIONS"]() as s:
        rules = {e.rule: e for e in s.scalars(select(Participant)).one().exclusions}
        assert rules["instruction_time"].passed is False and "< 3600 s" in rules["instruction_time"].reason
        catch_trials = s.execute(select(Trial, Response).join(Response).where(Trial.trial_type == "catch")).all()
    catch_acc = sum(r.correct for _, r in catch_trials) / len(catch_trials)
    assert rules["catch_accuracy"].value == catch_acc and rules["catch_accuracy"].passed == (catch_acc >= 1.0)


def test_admin_area_needs_the_password_and_exports_the_responses(app, client):
    sid, token = machine_session(client)
    trial = client.get(f"/api/sessions/{sid}", headers=auth(token)).json["trial"]
    respond(client, sid, trial, "lower", key="admin-key-1", headers=auth(token))
    assert client.get("/admin/").status_code == 302
    assert client.get("/admin/export/responses.csv").status_code == 302
    from survey_helpers import ADMIN_PASSWORD, csrf_from
    token_field = csrf_from(client.get("/admin/login").text)
    assert client.post("/admin/login", data={"password": ADMIN_PASSWORD}).status_code == 400   # no CSRF token
    assert client.post("/admin/login", data={"csrf_token": token_field, "password": "wrong"}).status_code == 401
    assert client.post("/admin/login", data={"csrf_token": token_field, "password": ADMIN_PASSWORD}).status_code == 302
    page = client.get("/admin/")
    assert page.status_code == 200 and "machine sessions" in page.text
    csv = client.get("/admin/export/responses.csv")
    import io
    df = pd.read_csv(io.StringIO(csv.text))
    assert list(df.columns) == RESPONSE_COLUMNS and len(df) == 1 and df["choice"].iloc[0] == "lower"
    parquet = pd.read_parquet(io.BytesIO(client.get("/admin/export/responses.parquet").data))
    assert len(parquet) == 1 and parquet["trial"].iloc[0] == trial["id"]
    assert client.get("/admin/export/../../survey.db").status_code == 404
    assert API_TOKEN not in page.text


def test_one_button_for_every_main_trial_is_excluded_by_response_variability(make_app):
    """IMI's variability rule (reference: the share counted from the stored responses)."""
    app = make_app(max_same_button_share=0.9)
    client = app.test_client()
    sid = human_session(client)
    head, n = csrf(client), 0
    while (state := client.get(f"/api/sessions/{sid}").json)["stage"] in ("practice", "main"):
        trial = state["trial"]
        choice = answer(trial, app, True) if state["stage"] == "practice" else "upper"
        respond(client, sid, trial, choice, key=f"key-{n:05d}", headers=head)
        n += 1
    with app.config["SESSIONS"]() as s:
        person = s.scalars(select(Participant)).one()
        rule = {e.rule: e for e in person.exclusions}["button_variability"]
        main = s.execute(select(Response).join(Trial).where(Trial.block == "main")).scalars().all()
    buttons = [(r.choice, r.confidence) for r in main]
    share = max(buttons.count(b) for b in set(buttons)) / len(buttons)
    assert rule.value == share and share == 1.0 and rule.passed is False and person.excluded


def test_the_response_rules_count_main_trials_only_not_the_catch_trials_among_them(make_app):
    """Someone who answers 'upper' on every main trial but gets the catch trials right (their max query
    sits below half the time) presses one button on every *main* trial: the variability and position
    rules must see that; counting the catch trials of the block would hide it."""
    app = make_app(main_trials=8, catch_trials=4, max_same_button_share=0.9, min_answers_per_position=1)
    client = app.test_client()
    sid = human_session(client)
    head, n = csrf(client), 0
    while (state := client.get(f"/api/sessions/{sid}").json)["stage"] in ("practice", "main"):
        trial = state["trial"]
        with app.config["SESSIONS"]() as s:
            kind = s.scalars(select(Trial.trial_type).where(Trial.public_id == trial["id"])).one()
        choice = "upper" if kind == "main" else answer(trial, app, True)
        respond(client, sid, trial, choice, key=f"key-{n:05d}", headers=head)
        n += 1
    with app.config["SESSIONS"]() as s:
        person = s.scalars(select(Participant)).one()
        rules = {e.rule: e for e in person.exclusions}
        catch = s.execute(select(Response).join(Trial).where(Trial.trial_type == "catch")).scalars().all()
    assert any(r.choice == "lower" for r in catch)          # the catch answers alone would vary the buttons
    assert rules["button_variability"].value == 1.0 and rules["button_variability"].passed is False
    assert rules["answers_per_position"].value == 0.0 and rules["answers_per_position"].passed is False
    assert person.excluded


def test_admin_accuracies_count_only_completed_sessions_not_excluded(app, client):
    """A participant who finished (every answer right) and one still under way (every main answer wrong, in
    another condition): the admin accuracies, like the analysis, count only the finished, checked one."""
    import re

    from survey_helpers import ADMIN_PASSWORD, csrf_from
    service = app.extensions["survey"]
    done, left = human_session(app.test_client()), human_session(app.test_client())
    n = 0
    for sid, stop in ((done, "complete"), (left, None)):
        while (state := service.state(sid))["stage"] != stop and "trial" in state:
            correct = sid == done or state["stage"] == "practice"
            if sid == left and state["stage"] == "main" and state["progress"]["done"] >= 5:
                break                                   # left half-way through the main trials
            service.record_response(sid, {"trial": state["trial"]["id"], "choice": answer(state["trial"], app, correct),
                                          "confidence": 2, "rt_ms": 1600.0, "key": f"key-{n:05d}"})
            n += 1
    stages = {sid: service.stage(sid) for sid in (done, left)}
    assert stages == {done: "complete", left: "main"}
    token = csrf_from(client.get("/admin/login").text)
    client.post("/admin/login", data={"csrf_token": token, "password": ADMIN_PASSWORD})
    page = client.get("/admin/").text
    rows = re.findall(r"<tr><td>([^<]+)</td><td>(\d+)</td><td>(\d+)</td><td>([\d.]+)</td></tr>", page)
    assert [(responses, people, accuracy) for _, responses, people, accuracy in rows] == [("6", "1", "1.000")]
    assert "who completed the study and were not excluded" in page
