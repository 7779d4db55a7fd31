"""Exclusion rules (DESIGN §7 defaults, configurable), evaluated on the server when a session ends.

Each rule returns the value it measured and whether the participant passed, so the stored record
says *why* someone was excluded, not only *that* they were.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RuleResult:
    rule: str
    value: float | None
    passed: bool
    reason: str


def _seconds(a, b) -> float | None:
    return None if a is None or b is None else (b - a).total_seconds()


def catch_accuracy(participant, answered, settings) -> RuleResult:
    catch = [r for t, r in answered if t.trial_type == "catch"]
    if not catch:
        return RuleResult("catch_accuracy", None, True, "no catch trials")
    acc = sum(r.correct for r in catch) / len(catch)
    ok = acc >= settings.catch_min_accuracy
    return RuleResult("catch_accuracy", acc, ok, f"catch accuracy {acc:.2f} "
                      f"{'≥' if ok else '<'} {settings.catch_min_accuracy:.2f}")


def answers_per_position(participant, answered, settings) -> RuleResult:
    main = [r for t, r in answered if t.trial_type == "main"]     # not the catch trials of the block
    fewest = min(sum(r.choice == side for r in main) for side in ("upper", "lower")) if main else 0
    ok = fewest >= settings.min_answers_per_position
    return RuleResult("answers_per_position", float(fewest), ok,
                      f"fewest answers on one query position {fewest} {'≥' if ok else '<'} "
                      f"{settings.min_answers_per_position}")


def instruction_time(participant, answered, settings) -> RuleResult:
    s = _seconds(participant.instructions_started_at, participant.instructions_done_at)
    ok = s is not None and s >= settings.min_instruction_s
    shown = "unknown" if s is None else f"{s:.1f} s"
    return RuleResult("instruction_time", s, ok, f"instructions read for {shown} "
                      f"({'≥' if ok else '<'} {settings.min_instruction_s:g} s)")


def total_time(participant, answered, settings) -> RuleResult:
    s = _seconds(participant.created_at, participant.finished_at)
    ok = s is not None and settings.min_total_s <= s <= settings.max_total_s
    shown = "unknown" if s is None else f"{s:.1f} s"
    return RuleResult("total_time", s, ok, f"session took {shown} (allowed {settings.min_total_s:g}–"
                      f"{settings.max_total_s:g} s)")


def button_variability(participant, answered, settings) -> RuleResult:
    """IMI's response-variability rule: a participant who presses one button (row and confidence) for
    nearly every main trial is not doing the task."""
    main = [r for t, r in answered if t.trial_type == "main"]     # not the catch trials of the block
    if not main:
        return RuleResult("button_variability", None, True, "no main trials")
    counts: dict = {}
    for r in main:
        counts[(r.choice, r.confidence)] = counts.get((r.choice, r.confidence), 0) + 1
    share = max(counts.values()) / len(main)
    ok = share <= settings.max_same_button_share
    return RuleResult("button_variability", share, ok, f"most-pressed button on {share:.0%} of main trials "
                      f"({'≤' if ok else '>'} {settings.max_same_button_share:.0%})")


RULES = {"catch_accuracy": catch_accuracy, "answers_per_position": answers_per_position,
         "button_variability": button_variability, "instruction_time": instruction_time, "total_time": total_time}


def evaluate(participant, answered, settings) -> list[RuleResult]:
    """Every rule on ``answered`` — (trial, response) pairs of the finished session."""
    return [rule(participant, answered, settings) for rule in RULES.values()]
