"""What a survey still lacks before real participants take it: notes ``sparsight serve`` prints.

None of them stops a server (a local trial run needs none of them), but each one changes what a
participant sees or what the researcher can pay and report."""
from __future__ import annotations

from .screen import minimum_window, trial_window

CONSENT_FIELDS = {"researcher": "who runs the study", "contact": "a contact",
                  "ethics_reference": "the ethics approval"}


def launch_notes(settings, refs_per_side: int) -> list[str]:
    """One line per setting a real study should set, or set differently."""
    notes = []
    missing = [f"{what} (survey.{key})" for key, what in CONSENT_FIELDS.items() if not getattr(settings, key)]
    if missing:
        notes.append(f"the consent page names no {', '.join(missing)}")
    if not settings.completion_code:
        notes.append("no survey.completion_code: a finished participant sees a thank-you page without a code or a "
                     "redirect to Prolific, and the study's address can be taken again without a participant ID")
    elif not settings.screenout_code:
        notes.append("survey.completion_code is set but survey.screenout_code is not: a participant who fails the "
                     "practice gets no code to submit on Prolific")
    width, height = trial_window(settings.reference_px, settings.query_px, refs_per_side)
    asked = minimum_window(settings, refs_per_side)
    if asked != (settings.min_window_width, settings.min_window_height):
        notes.append(f"a trial ({refs_per_side} references per side at {settings.reference_px} px, queries at "
                     f"{settings.query_px} px) needs a {width}×{height} window, more than survey.min_window_width × "
                     f"min_window_height ({settings.min_window_width}×{settings.min_window_height}); participants "
                     f"are asked for {asked[0]}×{asked[1]}")
    return notes
