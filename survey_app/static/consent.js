// Consent page: browser check (the Continue button unlocks only when it passes) and a note where the screen or
// the window is smaller than a trial needs: full screen or a smaller browser zoom make room, and the trial page
// measures the trial itself.
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
    let note = "";
    if (problem || (w >= min.width && h >= min.height)) note = "";
    else if (screen.width < min.width || screen.height < min.height)
      note = "Your screen is " + screen.width + "×" + screen.height + " pixels, smaller than the " + min.width + "×" +
             min.height + " the trials need: please reduce the browser zoom (Ctrl and −) until they fit.";
    else
      note = "Your window is " + w + "×" + h + " pixels, smaller than the " + min.width + "×" + min.height +
             " the trials need: please allow full-screen mode when the trials start, or enlarge the window.";
    warn.textContent = problem || note;
    warn.hidden = !(problem || note);
    submit.disabled = !!problem || !box.checked;
  }
  box.addEventListener("change", check);
  window.addEventListener("resize", check);
  check();
})();
