// Consent page: browser and window-size check; the Continue button unlocks only when both pass.
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
    else if (w < min.width || h < min.height)
      problem = "Your window is " + w + "×" + h + " pixels; the study needs at least " + min.width + "×" + min.height +
                ". Please enlarge the window.";
    warn.textContent = problem;
    warn.hidden = !problem;
    submit.disabled = !!problem || !box.checked;
  }
  box.addEventListener("change", check);
  window.addEventListener("resize", check);
  check();
})();
