"""Bad requests get a 4xx with a reason and change nothing; nothing served reveals the answer."""
from __future__ import annotations

import hashlib
import json
import re

import pytest
from sqlalchemy import func, select

from survey_app.models import Event, Participant, Response, Trial
from survey_helpers import API_TOKEN, auth, csrf_from, human_session, machine_session


def snapshot(app) -> dict:
    """Row counts and every response, to compare before and after a refused request."""
    with app.config["SESSIONS"]() as s:
        counts = {m.__tablename__: s.scalar(select(func.count()).select_from(m))
                  for m in (Participant, Trial, Response, Event)}
        rows = s.execute(select(Response.trial_id, Response.choice, Response.confidence, Response.rt_ms,
                                Response.idempotency_key).order_by(Response.id)).all()
        stages = s.execute(select(Participant.public_id, Participant.stage, Participant.practice_attempt)).all()
    return {"counts": counts, "responses": rows, "stages": sorted(stages)}


def test_malformed_foreign_replayed_and_out_of_range_requests_are_refused_without_effect(app, client):
    sid, token = machine_session(client)
    other_sid, other_token = machine_session(client)
    h = auth(token)
    trial = client.get(f"/api/sessions/{sid}", headers=h).json["trial"]
    good = {"trial": trial["id"], "choice": "upper", "confidence": 2, "rt_ms": 900.0, "key": "first-answer"}
    assert client.post(f"/api/sessions/{sid}/responses", json=good, headers=h).status_code == 200
    trial2 = client.get(f"/api/sessions/{sid}", headers=h).json["trial"]
    ok2 = {**good, "trial": trial2["id"], "key": "second-answer"}
    before = snapshot(app)
    post = f"/api/sessions/{sid}/responses"
    cases = [
        ("malformed JSON", dict(data="{not json", content_type="application/json", headers=h), 400, "JSON"),
        ("JSON array", dict(json=[1, 2], headers=h), 400, "object"),
        ("missing field", dict(json={k: v for k, v in ok2.items() if k != "choice"}, headers=h), 400, "choice"),
        ("choice out of range", dict(json={**ok2, "choice": "left"}, headers=h), 422, "choice"),
        ("confidence out of range", dict(json={**ok2, "confidence": 4}, headers=h), 422, "confidence"),
        ("confidence bool", dict(json={**ok2, "confidence": True}, headers=h), 422, "confidence"),
        ("negative rt", dict(json={**ok2, "rt_ms": -5}, headers=h), 422, "rt_ms"),
        ("bad key", dict(json={**ok2, "key": "x"}, headers=h), 400, "key"),
        ("no token", dict(json=ok2), 401, "token"),
        ("wrong token", dict(json=ok2, headers=auth("not-the-token")), 403, "token"),
        ("foreign session token", dict(json=ok2, headers=auth(other_token)), 403, "token"),
        ("API token is no session token", dict(json=ok2, headers=auth(API_TOKEN)), 403, "token"),
        ("foreign trial", dict(json={**ok2, "trial": client.get(f"/api/sessions/{other_sid}",
                                                                 headers=auth(other_token)).json["trial"]["id"]},
                               headers=h), 404, "no trial"),
        ("answered trial, new key", dict(json={**good, "key": "replay-new-key"}, headers=h), 409, "already"),
        ("replayed key, other answer", dict(json={**good, "choice": "lower"}, headers=h), 409, "different"),
        ("not the current trial", dict(json={**ok2, "trial": trial["id"], "key": "skip-ahead"}, headers=h), 409,
         "already"),
        ("nested too deeply", dict(data="[" * 100_000 + "]" * 100_000, content_type="application/json", headers=h),
         400, "nested"),
    ]
    for name, kw, status, words in cases:
        r = client.post(post, **kw)
        assert r.status_code == status, (name, r.status_code, r.json)
        assert words.lower() in r.json["error"].lower(), (name, r.json)
    assert client.post("/api/sessions/no-such-session/responses", json=ok2, headers=h).status_code == 404
    assert client.post("/api/sessions", json={"observer": "x"}).status_code == 401
    assert client.post("/api/sessions", json={"observer": "x"}, headers=auth("nope")).status_code == 403
    assert client.post("/api/sessions", json={"observer": "x", "mode": "all"},
                       headers=auth(API_TOKEN)).status_code == 400
    events = f"/api/sessions/{sid}/events"
    for bad in ({"kind": "hack"}, {"kind": "blur", "trial": "../x"}, {"kind": "blur", "trial": 7},
                {"kind": "blur", "epoch_ms": "today"}, {"kind": "blur", "t": True}):
        r = client.post(events, json={"events": [{"kind": "focus"}, bad]}, headers=h)
        assert r.status_code == 400, (bad, r.json)
    assert snapshot(app) == before


def test_events_carry_the_trial_on_screen_and_the_wall_clock_into_the_export(app, client):
    from survey_app.export import events_frame
    sid, token = machine_session(client)
    trial = client.get(f"/api/sessions/{sid}", headers=auth(token)).json["trial"]["id"]
    sent = [{"kind": "display", "detail": "screen 1920x1080 window 1900x960 pixel_ratio 1", "t": 5.5,
             "epoch_ms": 1.7e12, "trial": None},
            {"kind": "fullscreen_exit", "t": 1200.25, "epoch_ms": 1.7e12 + 1194.75, "trial": trial}]
    r = client.post(f"/api/sessions/{sid}/events", json={"events": sent}, headers=auth(token))
    assert r.status_code == 200
    frame = events_frame(app.config["SESSIONS"], app.extensions["survey"].study_name)
    assert frame[["kind", "trial", "client_ms", "client_epoch_ms"]].fillna({"trial": ""}).to_dict("records") == [
        {"kind": "display", "trial": "", "client_ms": 5.5, "client_epoch_ms": 1.7e12},
        {"kind": "fullscreen_exit", "trial": trial, "client_ms": 1200.25, "client_epoch_ms": 1.7e12 + 1194.75}]


def test_browser_requests_need_the_csrf_token_and_their_own_session(app, client):
    sid = human_session(client)
    with client.session_transaction() as s:
        csrf = s["csrf"]
    state = client.get(f"/api/sessions/{sid}").json
    body = {"trial": state["trial"]["id"], "choice": "upper", "confidence": 1, "rt_ms": 2000, "key": "browser-key-1"}
    other_sid, _ = machine_session(client)
    before = snapshot(app)
    r = client.post(f"/api/sessions/{sid}/responses", json=body)
    assert r.status_code == 400 and "CSRF" in r.json["error"]
    r = client.post(f"/api/sessions/{sid}/responses", json=body, headers={"X-CSRF-Token": "forged"})
    assert r.status_code == 400 and "CSRF" in r.json["error"]
    r = client.post(f"/api/sessions/{sid}/responses", json={**body, "rt_ms": 400}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 422 and "1500 ms" in r.json["error"]                 # too early for a person
    assert client.get(f"/api/sessions/{other_sid}").status_code == 403          # the cookie is for another session
    fresh = client.application.test_client()
    html = fresh.get("/").text
    r = fresh.post("/consent", data={"consent": "yes"})
    assert r.status_code == 400 and "CSRF" in r.text
    r = fresh.post("/consent", data={"csrf_token": csrf_from(html)})
    assert r.status_code == 400 and "Consent is required" in r.text      # a sentence on the page
    assert snapshot(app) == before
    r = client.post(f"/api/sessions/{sid}/responses", json=body, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200


@pytest.mark.parametrize("path", ["/stimuli/..%2F..%2Fstudy.toml", "/stimuli/../survey.db", "/stimuli/%2e%2e/x.png",
                                  "/stimuli/" + "0" * 64 + ".png", "/stimuli/manifest.parquet",
                                  "/stimuli/images%2F" + "a" * 64 + ".png", "/stimuli/x.png%00.png"])
def test_image_route_serves_bank_images_only(app, client, path):
    r = client.get(path)
    assert r.status_code == 404
    assert b"sparsight" not in r.data and b"[study]" not in r.data


def test_no_page_or_url_reveals_which_query_is_the_max_image(app, client):
    sid, token = machine_session(client, mode="exhaustive")
    h = auth(token)
    with app.config["SESSIONS"]() as s:
        truth = dict(s.execute(select(Trial.public_id, Trial.max_position)).all())
    keysets, upper_is_max, n = set(), [], 0
    while "trial" in (state := client.get(f"/api/sessions/{sid}", headers=h).json):
        trial = state["trial"]
        text = json.dumps(state).lower()
        assert not re.search(r"max|min|query|correct|catch|rank|activation", text.replace(trial["id"].lower(), ""))
        keysets.add(tuple(sorted(trial)))
        for url in [trial["upper"], trial["lower"]] + trial["left"] + trial["right"]:
            assert re.fullmatch(r"/stimuli/[0-9a-f]{64}\.png", url)
        data = client.get(trial["upper"]).data                           # the name is the content hash, nothing else
        assert hashlib.sha256(data).hexdigest() == trial["upper"][9:73]
        upper_is_max.append(truth[trial["id"]] == "upper")
        client.post(f"/api/sessions/{sid}/responses", headers=h,
                    json={"trial": trial["id"], "choice": "upper", "confidence": 1, "rt_ms": 1.0, "key": f"k-{n:06d}"})
        n += 1
    assert len(keysets) == 1                                               # same shape whichever side is the max
    assert n == 2 * 2 * 4 * 4 and abs(sum(upper_is_max) - n / 2) <= 1   # positions exactly balanced
    human = app.test_client()
    hid = human_session(human)
    for page in ("/trials", "/instructions", "/"):
        html = human.get(page).text.lower()
        assert "max_position" not in html and "query_max" not in html and "ref_max" not in html
    assert hid not in json.dumps(truth)


def test_an_app_for_a_folder_without_stimuli_fails_before_it_makes_a_database(tmp_path):
    """The WSGI entry point pointed at the wrong folder names the missing manifest and leaves no survey.db."""
    from survey_app import create_app
    from survey_app.testing import make_study_dir
    with pytest.raises(FileNotFoundError, match="manifest"):
        create_app({"RUN_DIR": str(tmp_path)})
    assert list(tmp_path.iterdir()) == []
    run_dir = make_study_dir(tmp_path / "study")
    with pytest.raises(ValueError, match="survey.models names 'nope'"):
        create_app({"RUN_DIR": str(run_dir), "SURVEY": {"models": ["nope"]}})
    assert not (run_dir / "survey.db").exists()


def test_one_session_stores_a_bounded_number_of_events(app, client, monkeypatch):
    import survey_app.service as service

    monkeypatch.setattr(service, "MAX_EVENTS_PER_SESSION", 3)
    sid, token = machine_session(client)
    post = f"/api/sessions/{sid}/events"
    assert client.post(post, json={"events": [{"kind": "blur"}] * 2}, headers=auth(token)).status_code == 200
    before = snapshot(app)
    r = client.post(post, json={"events": [{"kind": "focus"}] * 2}, headers=auth(token))
    assert r.status_code == 429 and "the most one session keeps is 3" in r.json["error"]
    assert snapshot(app) == before
    assert client.post(post, json={"events": [{"kind": "focus"}]}, headers=auth(token)).status_code == 200


def test_instructions_cannot_be_skipped_by_posting_their_form_unseen(app, client):
    """A bare POST to /instructions (the page never loaded) leads back to the instructions and records no
    reading time; once they are shown, the same POST moves on."""
    html = client.get("/").text
    token = csrf_from(html)
    consent = {"csrf_token": token, "consent": "yes", "window": "1280x900"}
    assert client.post("/consent", data=consent).status_code == 302
    skipped = client.post("/instructions", data={"csrf_token": token})
    assert skipped.status_code == 302 and skipped.headers["Location"].endswith("/instructions")
    with app.config["SESSIONS"]() as s:
        p = s.scalars(select(Participant)).one()
        assert (p.stage, p.instructions_started_at, p.instructions_done_at) == ("instructions", None, None)
    assert client.get("/instructions").status_code == 200
    read = client.post("/instructions", data={"csrf_token": token})
    assert read.status_code == 302 and not read.headers["Location"].endswith("/instructions")
    with app.config["SESSIONS"]() as s:
        p = s.scalars(select(Participant)).one()
        assert p.stage != "instructions" and p.instructions_done_at >= p.instructions_started_at
