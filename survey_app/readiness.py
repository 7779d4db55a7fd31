"""What a survey still lacks before real participants take it: notes ``sparsight serve`` and the gunicorn
entry (``survey_app.wsgi``) print.

None of them stops a server (a local trial run needs none of them), but each one changes what a
participant sees or what the researcher can pay and report."""
from __future__ import annotations

from sparsight.config import SurveySection

from .screen import minimum_window, trial_window

CONSENT_FIELDS = {"researcher": "the researcher running the study", "contact": "a contact",
                  "ethics_reference": "the ethics approval"}
#: Settings whose smaller value makes a session shorter or its exclusions laxer than the protocol's (DESIGN §7).
PROTOCOL_FLOORS = ("practice_trials", "main_trials", "catch_trials", "min_response_ms", "catch_min_accuracy",
                   "min_answers_per_position", "min_instruction_s", "min_total_s")


def launch_notes(settings, refs_per_side: int, material=None) -> list[str]:
    """One line per setting a real study should set, or set differently; with ``material`` (the tasks served)
    also what one participant's trials repeat."""
    notes = []
    below = below_protocol(settings)
    if below:
        notes.append(f"survey settings below the protocol's built-in defaults: {', '.join(below)}; a real study "
                     f"sets its own in the [survey] section of study.toml (the demo profile's are for trying it)")
    missing = [f"{what} (survey.{key})" for key, what in CONSENT_FIELDS.items() if not getattr(settings, key)]
    if missing:
        notes.append(f"the consent page lacks {', '.join(missing)}")
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
    if material is not None:
        notes += repetition_notes(settings, material)
    return notes


def below_protocol(settings) -> list[str]:
    """``"main_trials 12 (built-in 40)"`` for every setting of :data:`PROTOCOL_FLOORS` below its declared default."""
    defaults = SurveySection()
    return [f"{key} {getattr(settings, key):g} (built-in {getattr(defaults, key):g})" for key in PROTOCOL_FLOORS
            if getattr(settings, key) < getattr(defaults, key)]


def repetition_notes(settings, material) -> list[str]:
    """What one participant sees twice in the smallest condition: main trials beyond its items repeat items (beyond
    its main tasks, tasks, whose answer the feedback has shown); catch and practice trials beyond the items the main
    trials leave reuse their items; beyond its reserved tasks, they share tasks."""
    name, items = min(material.conditions(settings.condition_by).items(), key=lambda c: (len(c[1]), c[0]))
    reserved = settings.reserved_tasks
    main_tasks = sum(len(material.tasks[i]) - reserved for i in items)
    spare_tasks = sum(min(reserved, len(material.tasks[i])) for i in items)
    main, others = settings.main_trials, settings.catch_trials + settings.practice_trials
    left = len(items) - min(main, len(items))
    repeats = []
    if main > main_tasks:
        repeats.append(f"the {main} main trials repeat tasks (query pairs whose answer the feedback has shown)")
    elif main > len(items):
        repeats.append(f"the {main} main trials show items more than once (on other tasks)")
    if others > left:
        repeats.append(f"the {others} catch and practice trials reuse items of the main trials or of one another "
                       f"(on reserved tasks; {left} items are left for them)")
    if others > spare_tasks:
        repeats.append(f"catch and practice trials share tasks ({spare_tasks} reserved tasks for {others})")
    if not repeats:
        return []
    return [f"condition {name!r} has {len(items)} items (a unit of one model and reference kind) with {main_tasks} "
            f"main and {spare_tasks} reserved tasks: {'; '.join(repeats)}; serve more units or tasks "
            f"(stimuli.n_tasks), or fewer trials"]
