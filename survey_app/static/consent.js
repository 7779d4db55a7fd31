// Consent page: browser and screen-size check; the Continue button unlocks only when both pass. The trials
// run in full screen, so the screen must hold a trial; a smaller window only earns a note.
(function () {
  const min = window.SURVEY_MIN;
  const box = document.getElementById("consent-box");
  const submit = document.getElementById("consent-submit");
  const warn = document.getElementById("browser-check");
  const size = document.getElementById("window-size");
  const capable = "fetch" in window && "Promise" in window && "decode" in HTMLImageElement.prototype &&
                  "performance" in window;
  function check() {
    const w = window.innerWidth, h = window.innerHeight;
    size.value = w + "x" + h;
    let problem = "";
    const phone = window.matchMedia && window.matchMedia("(pointer: coarse)").matches &&
                  Math.max(screen.width, screen.height) < min.width;
    if (!capable) problem = "Your browser is too old for this study. Please use a current Chrome, Firefox, Edge or Safari.";
    else if (phone) problem = "This study needs a computer with a mouse or keyboard; it cannot be done on a phone or a small tablet.";
    else if (screen.width < min.width || screen.height < min.height)
      problem = "Your screen is " + screen.width + "×" + screen.height + " pixels; the study needs at least " +
                min.width + "×" + min.height + " (or reduce the browser zoom).";
    const note = problem || w >= min.width && h >= min.height ? "" :
      "Your window is " + w + "×" + h + " pixels, smaller than the " + min.width + "×" + min.height +
      " the trials need: please allow full-screen mode when the trials start, or enlarge the window.";
    warn.textContent = problem || note;
    warn.hidden = !(problem || note);
    submit.disabled = !!problem || !box.checked;
  }
  box.addEventListener("change", check);
  window.addEventListener("resize", check);
  check();
})();
