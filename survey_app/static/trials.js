// The trial loop. The server decides everything (trial order, positions, the answer); the page shows
// the current trial once all its images have decoded, measures the reaction time with
// performance.now(), saves each answer immediately (retrying with the same idempotency key) and
// only then shows feedback and moves on. A reload asks the server where the session stands.
(function () {
  const S = window.SURVEY;
  const api = "/api/sessions/" + encodeURIComponent(S.session);
  const $ = (id) => document.getElementById(id);
  const buttons = Array.from(document.querySelectorAll("button.answer"));
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const preloaded = new Map();
  let pendingEvents = [];
  let onScreen = null;      // the id of the trial on screen, which every event carries

  // ---- events (focus, blur, fullscreen, resize) --------------------------------------------
  // t: ms since this page loaded (performance.now); epoch_ms: the same instant on the client's wall clock,
  // so events of several page loads (reloads) keep their order.
  function logEvent(kind, detail) {
    const t = performance.now();
    pendingEvents.push({kind: kind, detail: detail || "", t: t, epoch_ms: performance.timeOrigin + t,
                        trial: onScreen});
    if (pendingEvents.length >= 20) flushEvents();
  }
  function flushEvents(keepalive) {
    if (!pendingEvents.length) return;
    const batch = pendingEvents.splice(0, 100);
    fetch(api + "/events", {method: "POST", keepalive: !!keepalive, credentials: "same-origin",
      headers: {"Content-Type": "application/json", "X-CSRF-Token": S.csrf},
      body: JSON.stringify({events: batch})}).catch(() => { pendingEvents = batch.concat(pendingEvents); });
  }
  window.addEventListener("focus", () => logEvent("focus"));
  window.addEventListener("blur", () => logEvent("blur"));
  document.addEventListener("visibilitychange", () => {
    logEvent("visibility", document.visibilityState);
    trackCover();
  });
  document.addEventListener("fullscreenchange", () => {
    logEvent(document.fullscreenElement ? "fullscreen_enter" : "fullscreen_exit");
    $("left-fullscreen").hidden = !!document.fullscreenElement || !started || !document.fullscreenEnabled;
    if (!$("left-fullscreen").hidden) $("fullscreen-button").focus();
    checkSize();
  });
  let resizeLog = null;      // one event per resize gesture (its final size), not one per frame of a drag
  window.addEventListener("resize", () => {
    checkSize();
    clearTimeout(resizeLog);
    resizeLog = setTimeout(() => logEvent("resize", window.innerWidth + "x" + window.innerHeight), 500);
  });
  window.addEventListener("pagehide", () => flushEvents(true));
  setInterval(flushEvents, 3000);
  if (performance.getEntriesByType && (performance.getEntriesByType("navigation")[0] || {}).type === "reload")
    logEvent("reload");
  logEvent("display", "screen " + screen.width + "x" + screen.height + " window " + window.innerWidth + "x" +
                      window.innerHeight + " pixel_ratio " + window.devicePixelRatio);

  const root = document.documentElement.style;       // display sizes of the study (CSSOM: allowed by the CSP)
  root.setProperty("--reference-px", S.timing.reference_px + "px");
  root.setProperty("--query-px", S.timing.query_px + "px");
  const phone = window.matchMedia && window.matchMedia("(pointer: coarse)").matches &&
                Math.max(screen.width, screen.height) < S.timing.min_width;
  let started = false;

  // The window a trial needs: the study's minimum, or more where the trial on screen measures larger (its
  // images have fixed sizes, so its width and height do not depend on the window).
  function needed() {
    let w = S.timing.min_width, h = S.timing.min_height;
    if (!$("trial").hidden) {
      const layout = document.querySelector(".layout"), main = document.querySelector("main");
      const page = getComputedStyle(main), parts = Array.from(layout.children);
      const gap = parseFloat(getComputedStyle(layout).columnGap) || 0;
      const width = parts.reduce((sum, el) => sum + el.getBoundingClientRect().width, 0) +
                    gap * (parts.length - 1) + parseFloat(page.paddingLeft) + parseFloat(page.paddingRight);
      w = Math.max(w, Math.ceil(width));
      h = Math.max(h, Math.ceil(main.getBoundingClientRect().bottom + window.scrollY));
    }
    return {w: w, h: h};
  }
  // Only a trial on screen is checked (the start overlay stays reachable: its button asks for full screen).
  function checkSize() {
    const need = needed();
    const small = phone || (!$("trial").hidden && (window.innerWidth < need.w || window.innerHeight < need.h));
    $("too-small-text").textContent = phone ?
      "This study needs a computer with a mouse or keyboard; it cannot be done on a phone or a small tablet." :
      "Your window is too small to show the whole trial (it needs " + need.w + "×" + need.h + " pixels, the " +
      "window has " + window.innerWidth + "×" + window.innerHeight + "). " + (document.fullscreenElement ?
        "Please reduce the browser zoom (Ctrl and the minus key)." :
        "Please switch to full screen, enlarge the window, or reduce the browser zoom.");
    $("too-small-fullscreen").hidden = phone || !document.fullscreenEnabled || !!document.fullscreenElement;
    $("too-small").hidden = !small;
    trackCover();
    return !small;
  }
  const overlaid = () => Array.from(document.querySelectorAll(".overlay")).some((el) => !el.hidden);

  // ---- time the trial on screen is covered (an overlay, a hidden page) --------------------------------
  // The lock counts the time the trial was seen, and each answer reports the covered part of its rt_ms.
  let coveredSince = null, coveredMs = 0;
  function trackCover() {
    if (onScreen === null) return;
    const now = performance.now();
    const covered = overlaid() || document.visibilityState === "hidden";
    if (covered && coveredSince === null) {
      coveredSince = now;
      logEvent("covered", document.visibilityState === "hidden" ? "page hidden" :
        Array.from(document.querySelectorAll(".overlay")).filter((el) => !el.hidden).map((el) => el.id).join(" "));
    } else if (!covered && coveredSince !== null) {
      coveredMs += now - coveredSince;
      coveredSince = null;
      logEvent("uncovered");
    }
  }
  const coverWatch = new MutationObserver(trackCover);     // an overlay shown or hidden, whatever showed it
  document.querySelectorAll(".overlay").forEach((el) =>
    coverWatch.observe(el, {attributes: true, attributeFilter: ["hidden"]}));
  function hiddenSoFar() {
    return coveredMs + (coveredSince === null ? 0 : performance.now() - coveredSince);
  }

  // What a participant reads when an answer is refused (the server's reason goes to the event log).
  function plainError(result) {
    logEvent("note", "answer refused: " + result.status + " " + result.error);
    if (result.status === 409) return "This trial was already answered (perhaps in another tab or window).";
    return "Your answer could not be saved. Please answer this trial again.";
  }
  // Keys 1–6 on the top row or the number pad, whatever the keyboard layout types there.
  function digitOf(e) {
    const m = /^(?:Digit|Numpad)([1-6])$/.exec(e.code || "");
    return m ? m[1] : e.key;
  }

  // ---- server calls ---------------------------------------------------------------------------
  async function getState() {
    for (let attempt = 0; ; attempt++) {
      let r = null;
      try { r = await fetch(api, {credentials: "same-origin", cache: "no-store"}); } catch (e) { r = null; }
      if (r && r.ok) return await r.json();
      if (r && r.status >= 400 && r.status < 500) {
        const err = await r.json().catch(() => ({error: r.statusText}));
        $("status").textContent = err.error;
        if (r.status === 403) {   // this tab's session is not the browser's any more: it continues elsewhere
          $("status").textContent = "This study continues in another window or tab. Please close this one.";
          document.querySelectorAll("button.answer").forEach((b) => { b.disabled = true; });
        } else if (r.status === 401) location.assign("/");
        throw new Error(err.error);
      }
      $("status").textContent = "Connection problem — retrying…";
      await sleep(Math.min(8000, 500 * 2 ** attempt));
    }
  }
  async function postResponse(body) {
    // The same key on every retry: the server stores one response however often this arrives.
    for (let attempt = 0; ; attempt++) {
      let r = null;
      try {
        r = await fetch(api + "/responses", {method: "POST", credentials: "same-origin",
          headers: {"Content-Type": "application/json", "X-CSRF-Token": S.csrf}, body: JSON.stringify(body)});
      } catch (e) { r = null; }
      if (r && r.ok) { $("status").textContent = ""; return await r.json(); }
      if (r && r.status >= 400 && r.status < 500 && r.status !== 408 && r.status !== 429) {
        const err = await r.json().catch(() => ({error: r.statusText}));
        return {error: err.error, status: r.status};
      }
      $("status").textContent = "Saving your answer — connection problem, retrying…";
      await sleep(Math.min(8000, 300 * 2 ** attempt));
    }
  }

  // ---- images ---------------------------------------------------------------------------------
  function load(url) {
    if (!preloaded.has(url)) {
      const img = new Image();
      img.src = url;
      // true once decoded; a failure is logged and forgotten, so the next call tries the image again
      preloaded.set(url, img.decode().then(() => true).catch(() => {
        preloaded.delete(url);
        logEvent("preload_error", url);
        return false;
      }));
    }
    return preloaded.get(url);
  }
  function prefetch(urls) { (urls || []).forEach(load); }

  function fillGrid(el, urls) {
    el.replaceChildren(...urls.map((u) => { const i = document.createElement("img"); i.src = u; i.alt = ""; return i; }));
  }

  // ---- one trial --------------------------------------------------------------------------------
  function setButtons(on) { buttons.forEach((b) => { b.disabled = !on; }); }

  function waitForAnswer() {
    return new Promise((resolve) => {
      function finish(choice, confidence) {
        if (buttons[0].disabled || !checkSize() || overlaid()) return;   // never an answer to a hidden trial
        setButtons(false);
        document.removeEventListener("keydown", onKey);
        buttons.forEach((b) => b.removeEventListener("click", onClick));
        resolve({choice: choice, confidence: confidence, t: performance.now()});
      }
      function onClick(e) { finish(e.currentTarget.dataset.choice, +e.currentTarget.dataset.confidence); }
      function onKey(e) {
        if (e.repeat || e.ctrlKey || e.metaKey || e.altKey) return;   // a held key must not answer the next trial
        const key = digitOf(e);
        const b = buttons.find((x) => x.dataset.key === key);
        if (b) finish(b.dataset.choice, +b.dataset.confidence);
      }
      buttons.forEach((b) => b.addEventListener("click", onClick));
      document.addEventListener("keydown", onKey);
    });
  }

  async function runTrial(state) {
    const t = state.trial;
    const urls = t.left.concat(t.right, [t.upper, t.lower]);
    $("status").textContent = "Loading…";
    // a trial is shown only with every image decoded: never answered over a missing image
    for (let attempt = 0; !(await Promise.all(urls.map(load))).every(Boolean); attempt++) {
      $("status").textContent = "Loading the images — connection problem, retrying…";
      await sleep(Math.min(8000, 300 * 2 ** attempt));
    }
    fillGrid($("left"), t.left);
    fillGrid($("right"), t.right);
    ["upper", "lower"].forEach((k) => { $(k).className = "query"; $(k).src = t[k]; });
    $("block-label").textContent = (t.block === "practice" ? "Practice " : "Trial ") + t.number + " of " + t.of;
    $("progress").max = state.progress.total;
    $("progress").value = state.progress.done;
    $("trial").hidden = false;
    $("status").textContent = "";
    onScreen = t.id;
    checkSize();
    await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));  // painted
    const shown = performance.now();
    coveredMs = 0;
    coveredSince = null;
    trackCover();
    prefetch(state.prefetch);
    setButtons(false);
    // unlocked after min_response_ms on screen: time under an overlay or on a hidden page does not count
    const unlock = setInterval(() => {
      if (performance.now() - shown - hiddenSoFar() >= S.timing.min_response_ms) {
        clearInterval(unlock);
        setButtons(true);
      }
    }, 50);
    const answer = await waitForAnswer();
    clearInterval(unlock);
    const hidden = Math.min(hiddenSoFar(), answer.t - shown);
    $(answer.choice).classList.add("chosen");
    const key = S.session.slice(0, 8) + "-" + t.id + "-" + Math.random().toString(36).slice(2, 10);
    const feedbackDue = sleep(S.timing.feedback_delay_ms);     // counted from the answer, not from the reply
    const result = await postResponse({trial: t.id, choice: answer.choice, confidence: answer.confidence,
                                       rt_ms: Math.round((answer.t - shown) * 10) / 10,
                                       hidden_ms: Math.round(hidden * 10) / 10, key: key});
    if (result.error) {
      $("status").textContent = plainError(result);
      await sleep(2500);
      $("status").textContent = "";
      return result;
    }
    await feedbackDue;
    const chosen = $(answer.choice), right = $(result.correct_position);
    chosen.classList.remove("chosen");
    chosen.classList.add(result.correct ? "right" : "wrong");
    if (!result.correct) right.classList.add("right");
    // in words too, for whoever does not tell the frames' colours apart (and for screen readers)
    $("status").textContent = result.correct ? "Correct." : "Wrong: the " + result.correct_position +
                                                          " image is the one that matches the Right examples.";
    await sleep(S.timing.feedback_ms);
    return result;
  }

  function overlay(text, label) {
    return new Promise((resolve) => {
      $("trial").hidden = true;
      onScreen = null;
      $("overlay-text").textContent = text;
      $("overlay-button").textContent = label;
      $("overlay-button").disabled = false;
      $("overlay").hidden = false;
      $("overlay-button").onclick = () => { $("overlay").hidden = true; resolve(); };
      $("overlay-button").focus();          // Enter or Space goes on, without a Tab first
    });
  }

  function requestFullscreen() {
    const el = document.documentElement;
    if (el.requestFullscreen && !document.fullscreenElement)
      el.requestFullscreen().catch(() => logEvent("note", "fullscreen refused"));
  }

  async function main() {
    checkSize();
    $("fullscreen-button").onclick = () => { $("left-fullscreen").hidden = true; requestFullscreen(); };
    $("too-small-fullscreen").onclick = () => requestFullscreen();
    let state = await getState();
    const resumed = state.trial && state.trial.number > 1;
    const practice = state.stage === "practice" && !resumed;
    const again = practice && state.practice_attempt > 1;     // a reload right after a failed attempt
    await overlay(again ? "Not all practice answers were right. Please look carefully at the examples and try " +
                          "again (attempt " + state.practice_attempt + " of " + S.practiceAttempts + ")."
                  : practice ? "The practice trials start now. The study switches to full-screen mode."
                  : "Press the button to continue. The study switches to full-screen mode.",
                  again ? "Practice again" : practice ? "Start practice" : "Continue");
    requestFullscreen();
    started = true;
    while (true) {
      if (state.stage === "complete") { flushEvents(true); location.assign("/complete"); return; }
      if (state.stage === "screened_out") { flushEvents(true); location.assign("/screened-out"); return; }
      if (!state.trial) { location.assign("/"); return; }
      const before = {stage: state.stage, attempt: state.practice_attempt};
      const result = await runTrial(state);
      state = await getState();
      if (before.stage === "practice" && state.stage === "main") {
        await overlay("Well done — the practice is over. The main trials start now.", "Start");
        requestFullscreen();
      } else if (state.stage === "practice" && state.practice_attempt !== before.attempt) {
        await overlay("Not all practice answers were right. Please look carefully at the examples and try again " +
                      "(attempt " + state.practice_attempt + " of " + S.practiceAttempts + ").", "Practice again");
        requestFullscreen();
      }
      if (result && result.error && result.status === 401) { location.assign("/"); return; }
    }
  }
  main();
})();
