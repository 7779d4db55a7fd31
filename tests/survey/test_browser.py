"""The participant's whole journey in a real browser (Chromium through Playwright).

Consent with Prolific parameters → instructions → a failed practice attempt and its repeat → the
main and catch trials with a page reload half-way → the redirect to the completion URL; then what
the database holds is checked against what was clicked.  The app is served by a real threaded
werkzeug server on a free local port; the answers come from the stored trials (``max_position``),
and the images on screen are checked against the stored trial before each answer.
"""
from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from flask import request
from sqlalchemy import select
from werkzeug.serving import make_server

from survey_app import create_app
from survey_app.models import Event, Participant, Response, Trial
from survey_app.testing import make_study_dir

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

pytestmark = pytest.mark.slow

PROLIFIC = {"PROLIFIC_PID": "p1", "STUDY_ID": "s1", "SESSION_ID": "x1"}
SETTINGS = {"min_response_ms": 300, "feedback_delay_ms": 50, "feedback_ms": 100, "practice_trials": 2,
            "practice_attempts": 3, "main_trials": 6, "catch_trials": 2, "min_window_width": 800,
            "min_window_height": 600, "completion_code": "TESTCODE", "reference_px": 100, "query_px": 150,
            # exclusion thresholds a fast scripted participant can meet, so `excluded` is checked too
            "min_instruction_s": 0.0, "min_total_s": 0.0, "min_answers_per_position": 1}
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 900}
N_PRACTICE, N_MAIN = 2, 6 + 2          # practice trials per attempt; main + catch trials
RELOAD_AFTER = 3                       # main trials answered before the page is reloaded

# Records every feedback frame (class "right"/"wrong") put on the centre images, so a test can wait
# for the feedback of its answer however briefly it is shown.
FEEDBACK_RECORDER = """
window.__feedback = [];
window.__status = [];
document.addEventListener("DOMContentLoaded", () => {
  const status = document.getElementById("status");
  if (status) new MutationObserver(() => window.__status.push(status.textContent))
    .observe(status, {childList: true, characterData: true, subtree: true});
  const seen = new MutationObserver((records) => records.forEach((r) => {
    if (/\\b(right|wrong)\\b/.test(r.target.className))
      window.__feedback.push({id: r.target.id, cls: r.target.className});
  }));
  ["upper", "lower"].forEach((id) => {
    const el = document.getElementById(id);
    if (el) seen.observe(el, {attributes: true, attributeFilter: ["class"]});
  });
});
"""
BUTTONS_READY = """() => {
  const overlay = document.getElementById("overlay"), trial = document.getElementById("trial");
  const buttons = Array.from(document.querySelectorAll("button.answer"));
  return overlay.hidden && !trial.hidden && buttons.length === 6 && buttons.every((b) => !b.disabled);
}"""


@dataclass
class Answer:
    """One answer the browser gave, and the stored trial it was for."""
    trial_id: str
    block: str
    attempt: int
    position: int
    choice: str
    confidence: int
    correct: bool
    by_key: bool


class _LateApp:
    """A WSGI callable forwarding to an app assigned after the server (and so its port) exists."""
    app = None

    def __call__(self, environ, start_response):
        return self.app(environ, start_response)


# ---- fixtures --------------------------------------------------------------------------------------------

@pytest.fixture
def live_survey(tmp_path, database_url):
    """The survey served on a free local port; its completion URL is a route of the same server."""
    with _served(tmp_path, database_url, SETTINGS) as live:
        yield live


@contextmanager
def _served(tmp_path, database_url, settings: dict, **bank):
    late = _LateApp()
    server = make_server("127.0.0.1", 0, late, threaded=True)
    base = f"http://127.0.0.1:{server.server_port}"
    run_dir = make_study_dir(tmp_path / "study", {**settings, "completion_url": base + "/prolific-done?cc={code}"},
                             **bank)
    app = create_app({"RUN_DIR": str(run_dir), "DATABASE_URL": database_url, "TESTING": True})
    app.add_url_rule("/prolific-done", "prolific_done", lambda: f"Prolific would now record code {request.args['cc']}")
    late.app = app
    thread = threading.Thread(target=server.serve_forever, name="survey-server", daemon=True)
    thread.start()
    try:
        yield SimpleNamespace(app=app, base=base, sessions=app.config["SESSIONS"], service=app.extensions["survey"])
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()
        app.config["ENGINE"].dispose()


@pytest.fixture
def page(chromium_path):
    """A fresh Chromium page (1280×900) that records page errors and failed HTTP requests."""
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport=VIEWPORT)
            context.set_default_timeout(15_000)
            context.add_init_script(FEEDBACK_RECORDER)
            pg = context.new_page()
            pg.problems = []

            def failed(response):
                if response.status >= 400 and not response.url.endswith("/favicon.ico"):
                    pg.problems.append(f"HTTP {response.status} {response.request.method} {response.url}")
            pg.on("response", failed)
            pg.on("pageerror", lambda err: pg.problems.append(f"page error: {err}"))
            yield pg
        finally:
            browser.close()


# ---- helpers ---------------------------------------------------------------------------------------------

def wait_until(predicate, timeout: float = 10.0, what: str = "condition"):
    """Poll ``predicate`` (a database read) until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
    return result


def participant(live, external_id: str = "p1") -> Participant:
    """The stored participant with this Prolific ID."""
    with live.sessions() as s:
        return s.scalars(select(Participant).where(Participant.external_id == external_id)).one()


def current_trial(live, external_id: str = "p1") -> Trial:
    """The trial the server serves now: the first unanswered one of the participant's current block."""
    with live.sessions() as s:
        p = s.scalars(select(Participant).where(Participant.external_id == external_id)).one()
        assert p.stage in ("practice", "main"), p.stage
        block, attempt = ("practice", p.practice_attempt) if p.stage == "practice" else ("main", 0)
        answered = select(Response.trial_id)
        return s.scalars(select(Trial).where(Trial.participant_id == p.id, Trial.block == block,
                                             Trial.attempt == attempt, Trial.id.not_in(answered))
                         .order_by(Trial.position).limit(1)).one()


def wait_for_trial(page) -> None:
    """Wait until a trial is on screen (no overlay) and its answer buttons have unlocked."""
    page.wait_for_function(BUTTONS_READY)


def open_trials(page, live) -> None:
    """Through consent (with the Prolific parameters) and the instructions to the trial page."""
    page.goto(f"{live.base}/?" + "&".join(f"{k}={v}" for k, v in PROLIFIC.items()))
    page.locator("#consent-box").check()
    page.locator("#consent-submit").click()
    page.wait_for_url(f"{live.base}/instructions")
    page.locator("#start-practice").click()
    page.wait_for_url(f"{live.base}/trials")


def continue_past_overlay(page, text: str, button: str) -> None:
    """Check the overlay's message contains ``text``, then press its button once it is wired up."""
    expect(page.locator("#overlay")).to_be_visible()
    expect(page.locator("#overlay-text")).to_contain_text(text)
    expect(page.locator("#overlay-button")).to_have_text(button)   # label and handler are set together
    page.locator("#overlay-button").click()
    expect(page.locator("#overlay")).to_be_hidden()


def answer_key(choice: str, confidence: int) -> str:
    """Keys 1–3 answer 'upper' with confidence 1–3, keys 4–6 'lower'."""
    return str(confidence + (0 if choice == "upper" else 3))


def answer_trial(page, live, *, correct: bool, confidence: int, by_key: bool) -> Answer:
    """Answer the trial on screen (click or key) right or wrong, and wait for its feedback frame.

    The answer is looked up in the database; the centre images on screen are first checked to be
    the stored trial's (so the page shows what the server thinks is current).
    """
    wait_for_trial(page)
    trial = current_trial(live)
    shown = live.service.payload(trial)
    expect(page.locator("#upper")).to_have_attribute("src", shown["upper"])
    expect(page.locator("#lower")).to_have_attribute("src", shown["lower"])
    choice = trial.max_position if correct else {"upper": "lower", "lower": "upper"}[trial.max_position]
    before, said = page.evaluate("[window.__feedback.length, window.__status.length]")
    if by_key:
        page.keyboard.press(answer_key(choice, confidence))
    else:
        page.locator(f'button.answer[data-choice="{choice}"][data-confidence="{confidence}"]').click()
    # the chosen image is framed green or red; after a wrong answer the right one is framed green too
    frames = [(choice, "right" if correct else "wrong")] + ([] if correct else [(trial.max_position, "right")])
    try:
        page.wait_for_function("([n, frames]) => frames.every(([id, frame]) => window.__feedback.slice(n).some("
                               "(f) => f.id === id && f.cls.split(' ').includes(frame)))", arg=[before, frames])
    except playwright_api.Error as err:   # say why: the page's status line and any failed request
        raise AssertionError(f"no feedback {frames} for trial {trial.public_id}; status line "
                             f"{page.text_content('#status')!r}; problems {page.problems}") from err
    words = "Correct." if correct else f"Wrong: the {trial.max_position} image is the one that matches the Right"
    page.wait_for_function("([n, w]) => window.__status.slice(n).some((s) => s.startsWith(w))",
                           arg=[said, words])                                   # the feedback in words too
    return Answer(trial.public_id, trial.block, trial.attempt, trial.position, choice, confidence, correct, by_key)


def answer_many(page, live, n: int, start: int = 0) -> list[Answer]:
    """Answer ``n`` trials correctly, alternating clicks and keys and cycling the confidence 1–3."""
    return [answer_trial(page, live, correct=True, confidence=1 + (start + i) % 3, by_key=(start + i) % 2 == 1)
            for i in range(n)]


# ---- the test --------------------------------------------------------------------------------------------

def test_participant_completes_the_study_in_chromium(live_survey, page):
    live = live_survey
    query = "&".join(f"{k}={v}" for k, v in PROLIFIC.items())

    # Consent: the Prolific parameters travel in hidden fields; Continue unlocks with the box ticked.
    page.goto(f"{live.base}/?{query}")
    for key, value in PROLIFIC.items():
        expect(page.locator(f'#consent-form input[name="{key}"]')).to_have_value(value)
    expect(page.locator("#consent-submit")).to_be_disabled()
    page.locator("#consent-box").check()
    expect(page.locator("#consent-submit")).to_be_enabled()
    page.locator("#consent-submit").click()

    # Instructions, with the example screenshot actually decoded.
    page.wait_for_url(f"{live.base}/instructions")
    page.wait_for_function("() => { const i = document.getElementById('example-image');"
                           " return i.complete && i.naturalWidth > 0; }")
    page.locator("#start-practice").click()
    page.wait_for_url(f"{live.base}/trials")

    # Practice attempt 1: the first answer wrong, so the practice is repeated.
    continue_past_overlay(page, "practice trials start now", "Start practice")
    wait_for_trial(page)        # shown at the study's display sizes (a query has a 6 px frame on each side)
    sizes = page.evaluate("() => [document.querySelector('#left img').getBoundingClientRect().width,"
                          " document.getElementById('upper').getBoundingClientRect().width]")
    assert sizes == [SETTINGS["reference_px"], SETTINGS["query_px"] + 12]
    answers = [answer_trial(page, live, correct=False, confidence=1, by_key=False),
               answer_trial(page, live, correct=True, confidence=2, by_key=True)]
    continue_past_overlay(page, "try again (attempt 2 of 3)", "Practice again")

    # Practice attempt 2: all right.
    answers += [answer_trial(page, live, correct=True, confidence=3, by_key=False),
                answer_trial(page, live, correct=True, confidence=1, by_key=True)]
    continue_past_overlay(page, "practice is over", "Start")

    # Main and catch trials, with a reload while the next trial is on screen (not yet answered).
    answers += answer_many(page, live, RELOAD_AFTER)
    wait_for_trial(page)
    before_reload = current_trial(live)
    page.reload()
    continue_past_overlay(page, "Press the button to continue", "Continue")
    wait_for_trial(page)
    expect(page.locator("#block-label")).to_have_text(f"Trial {RELOAD_AFTER + 1} of {N_MAIN}")
    progress = page.evaluate("(p => [p.value, p.max])(document.getElementById('progress'))")
    assert progress == [N_PRACTICE + RELOAD_AFTER, N_PRACTICE + N_MAIN]       # practice counts as done
    after_reload = answer_trial(page, live, correct=True, confidence=2, by_key=True)
    assert after_reload.trial_id == before_reload.public_id
    assert after_reload.position == RELOAD_AFTER
    assert after_reload.trial_id not in {a.trial_id for a in answers}
    answers.append(after_reload)
    answers += answer_many(page, live, N_MAIN - RELOAD_AFTER - 1, start=1)

    # The last answer sends the browser through /complete to the completion URL.
    page.wait_for_url(f"{live.base}/prolific-done?cc=TESTCODE")
    expect(page.locator("body")).to_contain_text("TESTCODE")
    assert page.problems == []

    check_database(live, answers)


def check_database(live, answers: list[Answer]) -> None:
    """Everything the browser did is stored once, exactly as it was clicked."""
    p = participant(live)
    assert (p.external_id, p.prolific_study_id, p.prolific_session_id) == ("p1", "s1", "x1")
    assert p.stage == "complete" and p.finished_at is not None
    assert p.practice_attempt == 2
    assert p.window == f"{VIEWPORT['width']}x{VIEWPORT['height']}"
    assert p.excluded is False

    with live.sessions() as s:
        rows = s.execute(select(Trial, Response).join(Response, Response.trial_id == Trial.id)
                         .where(Trial.participant_id == p.id)).all()
        trials = s.scalars(select(Trial).where(Trial.participant_id == p.id)).all()
    assert len(answers) == len(rows) == 2 * N_PRACTICE + N_MAIN == 12
    stored = {t.public_id: (t, r) for t, r in rows}
    assert len(stored) == len(rows)                               # one response per trial
    for a in answers:
        t, r = stored[a.trial_id]
        assert (r.choice, r.confidence, r.correct) == (a.choice, a.confidence, a.correct), a
        assert r.rt_ms >= SETTINGS["min_response_ms"], (a, r.rt_ms)
        assert t.served_at is not None
    assert {a.by_key for a in answers} == {True, False}
    assert {a.confidence for a in answers} == {1, 2, 3}

    practice = [stored[a.trial_id][1] for a in answers if a.block == "practice"]
    assert [(a.attempt, r.correct) for a, r in zip(answers[:4], practice)] == [(1, False), (1, True),
                                                                              (2, True), (2, True)]
    main = [t for t in trials if t.block == "main"]
    assert len(main) == N_MAIN and {t.trial_type for t in main} == {"main", "catch"}
    assert all(t.public_id in stored for t in main)
    assert [a.position for a in answers if a.block == "main"] == list(range(N_MAIN))

    # Browser events arrive in batches (every 3 s, and with keepalive when the page is left).
    def event_kinds_once_reload_logged():
        with live.sessions() as s:
            kinds = set(s.scalars(select(Event.kind).where(Event.participant_id == p.id)))
        return kinds if "reload" in kinds else None
    kinds = wait_until(event_kinds_once_reload_logged, what="the reload event")
    assert kinds & {"fullscreen_enter", "note"}       # full screen entered, or its refusal noted


# ---- the network misbehaving ------------------------------------------------------------------------

FEEDBACK_DELAY_MS, REPLY_DELAY_MS = 600, 500
CLICK_RECORDER = """
window.__clicks = [];
window.__frames = [];
document.addEventListener("click", (e) => {
  if (e.target.closest && e.target.closest("button.answer")) window.__clicks.push(performance.now());
}, true);
document.addEventListener("DOMContentLoaded", () => {
  const seen = new MutationObserver((records) => records.forEach((r) => {
    if (/\\b(right|wrong)\\b/.test(r.target.className)) window.__frames.push(performance.now());
  }));
  ["upper", "lower"].forEach((id) => {
    const el = document.getElementById(id);
    if (el) seen.observe(el, {attributes: true, attributeFilter: ["class"]});
  });
});
"""


def test_a_trial_waits_for_every_image_and_its_feedback_delay_counts_from_the_answer(tmp_path, database_url, page):
    """Every stimulus fails to load twice before it arrives, and every saved answer's reply takes
    500 ms: the first practice trial must unlock only with all its images decoded (never answered over a
    missing one), and the correct frame must appear the feedback delay (600 ms) after the answer, not the
    delay after the server's reply."""
    failures: dict[str, int] = {}

    def flaky_stimulus(route):
        url = route.request.url
        failures[url] = failures.get(url, 0) + 1
        route.abort() if failures[url] <= 2 else route.continue_()

    def slow_reply(route):
        if route.request.method == "POST":
            time.sleep(REPLY_DELAY_MS / 1000)
        route.continue_()

    settings = {**SETTINGS, "feedback_delay_ms": FEEDBACK_DELAY_MS, "feedback_ms": 300}
    with _served(tmp_path, database_url, settings) as live:
        page.context.add_init_script(CLICK_RECORDER)
        page.route("**/stimuli/**", flaky_stimulus)
        page.route("**/responses", slow_reply)
        open_trials(page, live)
        continue_past_overlay(page, "practice trials start now", "Start practice")
        wait_for_trial(page)
        widths = page.evaluate("() => Array.from(document.querySelectorAll('#left img, #right img, #upper, #lower'))"
                               ".map((i) => i.naturalWidth)")
        assert len(widths) == 2 * 3 + 2 and all(w > 0 for w in widths), widths
        assert any(n > 2 for n in failures.values())          # the images did fail before they arrived

        trial = current_trial(live)
        page.locator(f'button.answer[data-choice="{trial.max_position}"][data-confidence="2"]').click()
        page.wait_for_function("() => window.__frames.length > 0")
        delay = page.evaluate("() => window.__frames[0] - window.__clicks[0]")
        assert FEEDBACK_DELAY_MS - 20 <= delay < FEEDBACK_DELAY_MS + REPLY_DELAY_MS - 150, delay


# ---- the trial's layout, keys and overlays ------------------------------------------------------------------

LAYOUT_PROBE = """() => {
  const inside = (r) => r.left >= 0 && r.top >= 0 && r.right <= innerWidth && r.bottom <= innerHeight;
  const images = Array.from(document.querySelectorAll('#left img, #right img, #upper, #lower'));
  const hit = (x, y) => {
    const e = document.elementFromPoint(x, y);
    return e ? (e.id || e.className || e.tagName) : null;
  };
  const buttons = Array.from(document.querySelectorAll('button.answer')).map((b) => {
    const r = b.getBoundingClientRect(), x = r.left + r.width / 2;
    return [document.elementFromPoint(x, r.top + r.height / 2) === b &&
            document.elementFromPoint(x, r.bottom - 2) === b,
            hit(x, r.bottom - 2)];       // what lies over a button that does not take its click
  });
  const layout = document.querySelector('.layout'), main = document.querySelector('main');
  const width = Array.from(layout.children).reduce((s, el) => s + el.getBoundingClientRect().width, 0) +
                2 * parseFloat(getComputedStyle(layout).columnGap) + 2 * parseFloat(getComputedStyle(main).paddingLeft);
  return {images: images.length, imagesInside: images.every((i) => inside(i.getBoundingClientRect())),
          buttonsTakeClicks: buttons.every((b) => b[0]), hits: buttons, width: width,
          height: main.getBoundingClientRect().bottom,
          tooSmall: !document.getElementById('too-small').hidden,
          tooSmallText: document.getElementById('too-small-text').textContent};
}"""


def _stored_responses(live) -> int:
    with live.sessions() as s:
        return len(s.scalars(select(Response.id)).all())


def test_a_nine_reference_trial_fits_the_window_it_asks_for_and_answers_only_when_seen(tmp_path, database_url,
                                                                                      page):
    """With 9 references per side at the default sizes (the published protocol), the window the study asks for
    (``screen.trial_window``) shows every image and every answer button takes its click (the status line
    lies over none); a narrower window than the trial measures is refused with the size it needs.  A key
    answers by its physical digit whatever character the layout types (AZERTY's top row), and never while an
    overlay hides the trial."""
    from survey_app.screen import trial_window

    settings = {**SETTINGS, "reference_px": 128, "query_px": 176, "min_window_width": 0, "min_window_height": 0}
    width, height = trial_window(128, 176, 9)
    with _served(tmp_path, database_url, settings, k=9) as live:
        open_trials(page, live)
        page.set_viewport_size({"width": 1300, "height": 600})       # a laptop window, lower than a trial
        expect(page.locator("#overlay-button")).to_have_text("Start practice")
        assert page.evaluate("() => { const b = document.getElementById('overlay-button');"
                             " const r = b.getBoundingClientRect();"
                             " return document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2) === b; }")
        continue_past_overlay(page, "practice trials start now", "Start practice")    # it asks for full screen
        page.wait_for_function("() => !document.getElementById('trial').hidden && "
                               "!document.getElementById('too-small').hidden")     # the trial does not fit: covered
        assert "reduce the browser zoom" in page.text_content("#too-small-text")
        page.set_viewport_size({"width": width, "height": height})
        wait_for_trial(page)
        page.wait_for_function("() => innerWidth === %d && innerHeight === %d" % (width, height))
        seen = page.evaluate(LAYOUT_PROBE)
        assert seen["images"] == 2 * 9 + 2 and seen["imagesInside"] and seen["buttonsTakeClicks"], seen
        assert not seen["tooSmall"] and seen["width"] <= width and seen["height"] <= height, seen
        assert width - seen["width"] < 60 and height - seen["height"] < 60, seen     # the estimate is not lavish
        tight = {"width": math.ceil(seen["width"]), "height": math.ceil(seen["height"])}
        page.set_viewport_size(tight)                          # exactly the room the trial takes: still whole
        page.wait_for_function("([w, h]) => innerWidth === w && innerHeight === h && "
                               "document.getElementById('too-small').hidden", arg=[tight["width"], tight["height"]])
        at_tight = page.evaluate(LAYOUT_PROBE)
        assert at_tight["imagesInside"] and at_tight["buttonsTakeClicks"], at_tight
        page.set_viewport_size({"width": width, "height": height})

        page.set_viewport_size({"width": int(seen["width"]) - 10, "height": height})
        page.wait_for_function("() => !document.getElementById('too-small').hidden")
        assert f"it needs {tight['width']}×{tight['height']} pixels" in page.text_content("#too-small-text")
        page.set_viewport_size({"width": width, "height": height})
        page.wait_for_function("() => document.getElementById('too-small').hidden")

        before = _stored_responses(live)
        page.evaluate("() => { document.getElementById('left-fullscreen').hidden = false; }")
        page.keyboard.press("1")
        time.sleep(0.5)
        assert _stored_responses(live) == before                  # nothing answered under the overlay
        page.evaluate("() => { document.getElementById('left-fullscreen').hidden = true; }")
        trial = current_trial(live)
        page.evaluate("() => document.dispatchEvent(new KeyboardEvent('keydown', {key: \"'\", code: 'Digit4'}))")
        wait_until(lambda: _stored_responses(live) > before, what="the answer typed on an AZERTY top row")
        with live.sessions() as s:
            answer = s.scalars(select(Response).where(Response.trial_id == trial.id)).one()
        assert (answer.choice, answer.confidence) == ("lower", 1)


def test_the_lock_counts_only_the_time_a_trial_is_seen_and_the_answer_reports_the_rest(tmp_path, database_url,
                                                                                      page):
    """An overlay over a just-painted trial (left full screen) for 1.5 s: once it is gone the answer buttons stay
    locked until the trial has been on screen for ``min_response_ms`` (1 s) in all, and the saved answer reports
    the covered time as ``hidden_ms`` (reference: the time the test kept the overlay up), so ``rt_ms − hidden_ms``
    is the time the trial was seen."""
    settings = {**SETTINGS, "min_response_ms": 1000}
    with _served(tmp_path, database_url, settings) as live:
        open_trials(page, live)
        continue_past_overlay(page, "practice trials start now", "Start practice")
        page.wait_for_function("() => !document.getElementById('trial').hidden")
        page.evaluate("() => { document.getElementById('left-fullscreen').hidden = false; }")
        covered_at = time.monotonic()
        time.sleep(1.5)
        page.evaluate("() => { document.getElementById('left-fullscreen').hidden = true; }")
        uncovered_at = time.monotonic()
        time.sleep(0.3)
        assert page.evaluate("() => Array.from(document.querySelectorAll('button.answer')).every((b) => b.disabled)")
        wait_for_trial(page)
        unlocked_after = time.monotonic() - uncovered_at
        assert unlocked_after > 0.5, unlocked_after           # the 1.5 s under the overlay did not count
        trial = current_trial(live)
        page.locator(f'button.answer[data-choice="{trial.max_position}"][data-confidence="2"]').click()
        wait_until(lambda: _stored_responses(live) > 0, what="the answer")
        with live.sessions() as s:
            answer = s.scalars(select(Response).where(Response.trial_id == trial.id)).one()
        covered = (uncovered_at - covered_at) * 1000
        assert covered - 150 <= answer.hidden_ms <= covered + 400, (answer.hidden_ms, covered)
        assert answer.rt_ms - answer.hidden_ms >= 1000

        def kinds():
            with live.sessions() as s:
                return [e.kind for e in s.scalars(select(Event).order_by(Event.id))]
        wait_until(lambda: {"covered", "uncovered"} <= set(kinds()), what="the covered and uncovered events")
