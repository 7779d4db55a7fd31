"""Consent from the study's settings, a recorded decline, and participation only through the study link."""
from __future__ import annotations

from sqlalchemy import func, select

from survey_app.models import Decline, Participant
from survey_helpers import csrf_from

LINK = {"PROLIFIC_PID": "p-123", "STUDY_ID": "s-1", "SESSION_ID": "x-1"}


def _count(app, model) -> int:
    with app.config["SESSIONS"]() as s:
        return s.scalar(select(func.count(model.id)))


def test_the_consent_page_states_the_studys_facts_and_its_computed_duration(make_app):
    app = make_app(researcher="Dr. A. Researcher", institution="Example University", contact="lab@example.org",
                   ethics_reference="ERC-2026-042", payment="£2.40 through Prolific", practice_trials=2,
                   main_trials=40, catch_trials=4, seconds_per_trial=6.0, require_external_id="no")
    html = app.test_client().get("/").text
    for text in ("Dr. A. Researcher", "Example University", "lab@example.org", "ERC-2026-042", "£2.40"):
        assert text in html
    assert "about 6 minutes" in html          # (60 s + 46 trials × 6 s) / 60 = 5.6 → 6
    assert "15–20 minutes" not in html and 'id="consent-decline"' in html


def test_a_study_link_is_required_once_a_completion_code_is_set(make_app):
    app = make_app(require_external_id="auto", completion_code="DONE42")
    client = app.test_client()
    r = client.get("/")
    assert r.status_code == 403 and "link on Prolific" in r.text
    page = client.get("/", query_string=LINK)
    assert page.status_code == 200
    token = csrf_from(page.text)
    bare = client.post("/consent", data={"csrf_token": token, "consent": "yes"})
    assert bare.status_code == 403 and _count(app, Participant) == 0
    ok = client.post("/consent", data={"csrf_token": token, "consent": "yes", **LINK})
    assert ok.status_code == 302 and _count(app, Participant) == 1
    again = app.test_client()
    token = csrf_from(again.get("/", query_string=LINK).text)
    r = again.post("/consent", data={"csrf_token": token, "consent": "yes", **{**LINK, "SESSION_ID": "other"}})
    assert r.status_code == 409 and _count(app, Participant) == 1


def test_declining_is_recorded_and_stores_nothing_else(make_app):
    app = make_app(decline_code="NOCONSENT")
    client = app.test_client()
    token = csrf_from(client.get("/", query_string=LINK).text)
    r = client.post("/consent", data={"csrf_token": token, "decision": "decline", **LINK})
    assert r.status_code == 200 and "declined" in r.text and "cc=NOCONSENT" in r.text
    assert _count(app, Decline) == 1 and _count(app, Participant) == 0
    with app.config["SESSIONS"]() as s:
        assert s.scalars(select(Decline.external_id)).one() == "p-123"


def test_a_template_folder_replaces_a_built_in_page(make_app, tmp_path):
    folder = tmp_path / "pages"
    folder.mkdir()
    (folder / "declined.html").write_text("{% extends 'base.html' %}{% block body %}<p>Our own words.</p>"
                                          "{% endblock %}")
    app = make_app(templates=str(folder))
    client = app.test_client()
    token = csrf_from(client.get("/").text)
    r = client.post("/consent", data={"csrf_token": token, "decision": "decline"})
    assert "Our own words." in r.text and "Thank you" not in r.text
    assert "Welcome" in client.get("/").text          # pages the folder lacks stay built in


def _consent_at_once(app, sessions: list[str]) -> list[tuple[int, str]]:
    """One browser per SESSION_ID consents with LINK's PROLIFIC_PID at the same moment; (status, Location)."""
    import threading

    clients = [app.test_client() for _ in sessions]
    tokens = [csrf_from(c.get("/", query_string=LINK).text) for c in clients]
    barrier, answers = threading.Barrier(len(clients)), []

    def consent(client, token, session_id):
        barrier.wait()
        r = client.post("/consent", data={"csrf_token": token, "consent": "yes", **{**LINK, "SESSION_ID": session_id}})
        answers.append((r.status_code, r.headers.get("Location", "")))
    threads = [threading.Thread(target=consent, args=args) for args in zip(clients, tokens, sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def test_one_participant_id_takes_part_once_under_concurrent_consents(make_app):
    """Eight browsers consent with the same PROLIFIC_PID at once (SQLite and PostgreSQL): one session."""
    app = make_app(require_external_id="yes")
    codes = [code for code, _ in _consent_at_once(app, [f"s-{i}" for i in range(8)])]
    assert sorted(codes) == [302] + [409] * 7 and _count(app, Participant) == 1


def test_a_double_submitted_consent_resumes_the_one_session_it_created(make_app):
    """The same study link submitted four times at once (a double click, a retried request): every request
    lands in the one session the first created, none is told the ID has already taken part."""
    app = make_app(require_external_id="yes")
    answers = _consent_at_once(app, [LINK["SESSION_ID"]] * 4)
    assert [code for code, _ in answers] == [302] * 4, answers
    assert {location.rsplit("/", 1)[-1] for _, location in answers} == {"instructions"}
    assert _count(app, Participant) == 1


def _consent(client, link: dict):
    """Consent with ``link`` from a consent page opened with the link's PROLIFIC_PID (a finished session's own
    link would show its code instead of the form)."""
    token = csrf_from(client.get("/", query_string={"PROLIFIC_PID": link.get("PROLIFIC_PID", "")}).text)
    return client.post("/consent", data={"csrf_token": token, "consent": "yes", **link})


def test_a_second_participant_id_in_the_same_browser_starts_its_own_session(make_app):
    """A shared browser (a pilot, a lab computer): the link of a second participant ID must not continue the
    first one's session, or the second person's answers would be stored and paid under the first ID."""
    app = make_app()
    client = app.test_client()
    assert _consent(client, LINK).status_code == 302
    second = {**LINK, "PROLIFIC_PID": "p-456", "SESSION_ID": "x-2"}
    page = client.get("/", query_string=second)
    assert page.status_code == 200 and 'id="consent-form"' in page.text       # the consent page, not a redirect
    assert _consent(client, second).status_code == 302
    with app.config["SESSIONS"]() as s:
        assert sorted(s.scalars(select(Participant.external_id))) == ["p-123", "p-456"]
    assert client.get("/", query_string=second).status_code == 302        # its own session resumes
    assert client.get("/").status_code == 302                             # a bare reload resumes it too


def test_a_link_with_a_participant_id_does_not_continue_a_session_started_without_one(make_app):
    """A pilot run without an ID, then a real participant's link in the same browser: the participant starts
    their own session, stored under their ID."""
    app = make_app(require_external_id="no")
    client = app.test_client()
    assert _consent(client, {}).status_code == 302
    assert client.get("/", query_string=LINK).status_code == 200            # the consent page again
    assert _consent(client, LINK).status_code == 302
    with app.config["SESSIONS"]() as s:
        assert sorted(s.scalars(select(Participant.external_id)), key=str) == [None, "p-123"]


def test_a_participant_id_that_declined_cannot_start_and_the_decline_is_exported(make_app, tmp_path):
    """A declined ID cannot start a session afterwards; one whose session was already under way (a decline
    clicked in a second tab) still resumes through its Prolific session."""
    app = make_app(contact="lab@example.org")
    client = app.test_client()
    token = csrf_from(client.get("/", query_string=LINK).text)
    client.post("/consent", data={"csrf_token": token, "decision": "decline", **LINK})
    r = _consent(app.test_client(), LINK)
    assert r.status_code == 409 and "declined" in r.text and "lab@example.org" in r.text
    assert _count(app, Participant) == 0 and _count(app, Decline) == 1
    other = {**LINK, "PROLIFIC_PID": "p-777", "SESSION_ID": "x-7"}
    assert _consent(app.test_client(), other).status_code == 302           # under way …
    second_tab = app.test_client()
    token = csrf_from(second_tab.get("/", query_string=other).text)
    page = second_tab.post("/consent", data={"csrf_token": token, "decision": "decline", **other}).text
    # what it answered stays stored: the page must not say nothing is, and says how to withdraw or go on
    assert "Nothing about you is stored" not in page and "had already started" in page and "lab@example.org" in page
    assert _consent(app.test_client(), other).status_code == 302           # … and resumes on another browser
    from survey_app.export import declines_frame
    frame = declines_frame(app.config["SESSIONS"], app.extensions["survey"].study_name)
    assert frame["external_id"].tolist() == ["p-123", "p-777"]
    with app.config["SESSIONS"]() as s:
        started = s.scalar(select(Participant.public_id).where(Participant.external_id == "p-777"))
    assert frame["participant"].isna().tolist() == [True, False] and frame["participant"].iloc[1] == started
    assert frame["participant_stage"].tolist()[1] == "instructions"
    assert declines_frame(app.config["SESSIONS"], "another-study").empty


def test_serve_lists_what_a_real_study_still_lacks():
    """Consent contacts, the Prolific codes, and a window minimum below what a trial needs (9 references per
    side at the default sizes need 1092×643); a study with all of them set gets no note."""
    from sparsight.config import SurveySection
    from survey_app.readiness import launch_notes
    from survey_app.screen import trial_window

    notes = launch_notes(SurveySection(), 9)
    assert len(notes) == 3
    assert ("lacks the researcher running the study (survey.researcher), a contact (survey.contact), the ethics "
            "approval") in notes[0]
    assert notes[1].startswith("no survey.completion_code")
    assert trial_window(128, 176, 9) == (1092, 643) and "participants are asked for 1092×643" in notes[2]
    ready = SurveySection(researcher="A", contact="a@b", ethics_reference="E-1", completion_code="C",
                          min_window_width=1100, min_window_height=700)
    assert launch_notes(ready, 9) == ["survey.completion_code is set but survey.screenout_code is not: a "
                                      "participant who fails the practice gets no code to submit on Prolific"]
    ready.screenout_code = "S"
    assert launch_notes(ready, 9) == []


def _finish(app, sid: str, *, correct: bool = True) -> str:
    """Answer every trial of ``sid`` (right, or every one wrong); return the stage it ends in."""
    from survey_app.models import Trial
    service, n = app.extensions["survey"], 0
    while "trial" in (state := service.state(sid)):
        with app.config["SESSIONS"]() as s:
            truth = s.scalars(select(Trial.max_position).where(Trial.public_id == state["trial"]["id"])).one()
        service.record_response(sid, {"trial": state["trial"]["id"], "choice": truth if correct else
                                      ("lower" if truth == "upper" else "upper"), "confidence": 2, "rt_ms": 1600.0,
                                      "key": f"key-{n:05d}"})
        n += 1
    return state["stage"]


def test_a_finished_participant_who_lost_the_code_sees_it_again_from_their_own_prolific_session(make_app):
    """Consenting with the same PROLIFIC_PID and SESSION_ID on another browser leads to the completion page (or
    the screen-out redirect); another or no SESSION_ID is still refused."""
    from survey_helpers import human_session
    app = make_app(completion_code="DONE42", screenout_code="NOPE", practice_attempts=1)
    done, out = LINK, {**LINK, "PROLIFIC_PID": "p-out", "SESSION_ID": "x-out"}
    assert _finish(app, human_session(app.test_client(), **done)) == "complete"
    assert _finish(app, human_session(app.test_client(), **out), correct=False) == "screened_out"
    other = app.test_client()
    r = _consent(other, done)
    assert r.status_code == 302 and r.headers["Location"].endswith("/complete")
    page = other.get("/complete")
    assert page.status_code == 200 and 'id="completion-code">DONE42<' in page.text
    third = app.test_client()
    r = _consent(third, out)
    assert r.status_code == 302 and r.headers["Location"].endswith("/screened-out")
    page = third.get("/screened-out")          # says why the study ended, then returns to Prolific with the code
    assert 'id="screenout-code">NOPE<' in page.text
    assert 'content="5;url=https://app.prolific.com/submissions/complete?cc=NOPE"' in page.text
    for link in ({**done, "SESSION_ID": "x-other"}, {k: v for k, v in done.items() if k != "SESSION_ID"}):
        r = _consent(app.test_client(), link)
        assert r.status_code == 409 and "already taken part" in r.text
    assert _count(app, Participant) == 2


def test_reopening_a_finished_sessions_link_shows_its_code_without_consent_again(make_app):
    """The study link of a finished session (its PROLIFIC_PID and SESSION_ID), opened on a new browser, shows the
    completion or screen-out page at once; another SESSION_ID still gets the consent page, and nothing is
    signed in or stored."""
    from survey_helpers import human_session
    app = make_app(completion_code="DONE42", screenout_code="NOPE", practice_attempts=1)
    done, out = LINK, {**LINK, "PROLIFIC_PID": "p-out", "SESSION_ID": "x-out"}
    assert _finish(app, human_session(app.test_client(), **done)) == "complete"
    assert _finish(app, human_session(app.test_client(), **out), correct=False) == "screened_out"
    with app.config["SESSIONS"]() as s:
        tokens = sorted(s.scalars(select(Participant.token_hash)))
    browser = app.test_client()
    page = browser.get("/", query_string=done)
    assert page.status_code == 200 and 'id="completion-code">DONE42<' in page.text and "consent" not in page.text
    assert browser.get("/complete").status_code == 401          # shown, not signed in
    page = app.test_client().get("/", query_string=out)
    assert 'id="screenout-code">NOPE<' in page.text
    for link in ({**done, "SESSION_ID": "x-other"}, {k: v for k, v in done.items() if k != "SESSION_ID"}):
        page = app.test_client().get("/", query_string=link)
        assert page.status_code == 200 and 'name="consent"' in page.text and "DONE42" not in page.text
    with app.config["SESSIONS"]() as s:
        assert sorted(s.scalars(select(Participant.token_hash))) == tokens
    assert _count(app, Participant) == 2
