"""The study runner: ordered stages, each skipped when its inputs and outputs are unchanged.

A stage declares what it depends on (``inputs``: config values and upstream records) and what it
writes (``outputs``).  After a run its record — an input fingerprint and the sha256 of every
output, and the inputs themselves — lands in ``<run_dir>/.stages/<name>.json``; a later run skips the
stage only when the fingerprint matches and every output still has the recorded content, and otherwise
says why it runs (which settings or upstream results changed, which output is gone or was edited).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .config import StudyConfig, missing_inputs, write_study
from .environment import describe
from .errors import NotKnownWhilePlanning
from .files import atomic_write_text, json_digest, sha256_file
from .layout import Layout


class Stage(Protocol):
    """A step of the study.  It may also define ``check(study) -> list[str]``: what its settings get
    wrong, found from the configuration alone (:func:`study_problems` asks every stage before any runs)."""
    name: str
    description: str

    def inputs(self, study: "Study") -> dict: ...

    def run(self, study: "Study") -> list[Path]: ...


@dataclass
class Study:
    config: StudyConfig
    ctx: object = None                    # the process group (pruning.training.DistContext) it runs in
    records: dict = field(default_factory=dict)
    forced: bool = False                  # the running stage was forced: redo work it could reuse
    planning: bool = False                # --plan: inputs read files only and connect to nothing

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir

    @property
    def layout(self) -> Layout:
        return Layout(self.run_dir)

    @property
    def is_main(self) -> bool:
        return getattr(self.ctx, "is_main", True)

    @property
    def data_root(self) -> Path:
        """Where the study's images live: the generated folder, or the configured ImageFolder tree."""
        d = self.config.data
        return self.layout.data if d.source == "concept-shapes" else Path(d.path).expanduser()

    def path(self, *parts: str) -> Path:
        return self.run_dir.joinpath(*parts)

    def record_path(self, name: str) -> Path:
        return self.layout.stage_record(name)

    def upstream(self, name: str) -> dict:
        """What a later stage depends on of stage ``name``: its input fingerprint and output digests."""
        rec = self.records.get(name) or {}
        return {"fingerprint": rec.get("fingerprint"), "outputs": rec.get("outputs")}

    def load_record(self, name: str) -> dict | None:
        try:
            return json.loads(self.record_path(name).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None


def stage_inputs(stage: Stage, study: Study) -> dict:
    """What ``stage`` depends on, as JSON gives it back (what its record keeps)."""
    return json.loads(json.dumps(stage.inputs(study), sort_keys=True, default=str))


def _fingerprint_of(name: str, inputs: dict) -> str:
    return json_digest({"stage": name, "inputs": inputs})


def fingerprint(stage: Stage, study: Study) -> str:
    return _fingerprint_of(stage.name, stage_inputs(stage, study))


def is_current(stage: Stage, study: Study, fp: str) -> bool:
    return _why_it_runs(study.load_record(stage.name), study, fp, None) is None


#: how many changed inputs a reason names before it says how many more there are
NAMED_CHANGES = 4


def changed_inputs(before: dict | None, now: dict) -> str:
    """The inputs that differ between a stage's record and now, as dotted names two levels deep (``mis.alpha``,
    ``upstream.stimuli``), or a general phrase for a record that kept no inputs."""
    if before is None:
        return "its settings or upstream results changed"

    old, new = _two_levels(before), _two_levels(now)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k, ...) != new.get(k, ...))
    if not changed:
        return "its settings or upstream results changed"
    more = len(changed) - NAMED_CHANGES
    return "changed: " + ", ".join(changed[:NAMED_CHANGES]) + (f" and {more} more" if more > 0 else "")


def _two_levels(inputs: dict) -> dict:
    """``{"mis": {"alpha": 4}}`` → ``{"mis.alpha": 4}``; deeper values are compared whole."""
    out = {}
    for key, value in inputs.items():
        if isinstance(value, dict):
            out.update({f"{key}.{inner}": v for inner, v in value.items()})
        else:
            out[key] = value
    return out


def _why_it_runs(rec: dict | None, study: Study, fp: str, inputs: dict | None) -> str | None:
    """Why a stage with record ``rec`` and fingerprint ``fp`` (of ``inputs``) runs; None when it is up to date."""
    if not rec:
        return "no earlier run"
    if rec.get("fingerprint") != fp:
        return changed_inputs(rec.get("inputs"), inputs) if inputs is not None else "its inputs changed"
    for rel, digest in rec.get("outputs", {}).items():
        path = study.path(rel)
        if not path.is_file():
            return f"{rel} is missing"
        if sha256_file(path) != digest:
            return f"{rel} was changed since"
    return None


def plan_study(config: StudyConfig, stages: list[Stage], *, force: tuple[str, ...] = ()):
    """``(stage, state)`` for every stage from the records on disk, state ``"up to date"``, ``"runs"``,
    ``"may run (…why…)"`` or ``"skips (…why…)"`` (a stage whose ``skip_reason`` says it would do nothing);
    nothing runs, only files are read and nothing is connected to.

    A stage after one that runs is reported from its current record: it may still be skipped when
    its upstream outputs come out unchanged.
    """
    check_force(stages, force)
    study = Study(config, planning=True)
    plan = []
    for stage in stages:
        try:
            _, _, record, reason = _current_record(stage, study, "all" in force or stage.name in force)
        except NotKnownWhilePlanning as why:
            plan.append((stage, f"may run ({why})"))
            continue
        except (OSError, ValueError):
            record, reason = None, "its record cannot be read"
        if record is not None:
            study.records[stage.name] = record
            plan.append((stage, "up to date"))
            continue
        skip = getattr(stage, "skip_reason", None)
        why = skip(study) if skip is not None else None
        plan.append((stage, f"skips ({why})" if why else f"runs ({reason})"))
    return plan


def study_problems(config: StudyConfig, stages: list[Stage]) -> list[str]:
    """Everything the study gets wrong that shows before it runs: input files and folders that are
    not there, and each stage's own ``check``."""
    study = Study(config, planning=True)
    problems = missing_inputs(config)
    missing = {p.split(":", 1)[0] for p in problems}        # a setting whose file is missing is named once
    for stage in stages:
        check = getattr(stage, "check", None)
        if check is not None:
            problems += [p for p in check(study) if p.split(":", 1)[0] not in missing]
    return problems


def check_force(stages: list[Stage], force: tuple[str, ...]) -> None:
    names = [s.name for s in stages]
    unknown = [f for f in force if f not in names and f != "all"]
    if unknown:
        raise ValueError(f"unknown stage {unknown[0]!r} for --force; choose from {names + ['all']}")


def _quiet(*_args, **_kwargs) -> None:
    pass


def run_study(study: Study, stages: list[Stage], *, force: tuple[str, ...] = (), log=print) -> Study:
    """Run (or skip) every stage of an opened study; return it with each stage's record.

    ``study.ctx`` is the process group the study runs in (``pruning.training.open_study`` joins it).
    Rank 0 alone logs, writes the records and decides whether a stage is up to date (its inputs may
    read a database only rank 0 reaches); every rank takes its decision and its records, so that all
    of them run the same stages.
    """
    check_force(stages, force)
    if not study.is_main:     # one log for the whole job: rank 0's
        log = _quiet
    if study.is_main:
        write_study(study.config, study.run_dir)
    for stage in stages:
        forced = "all" in force or stage.name in force
        fp, inputs, record, reason = decided_by_main(study, lambda: _current_record(stage, study, forced))
        if record is not None:
            study.records[stage.name] = record
            log(f"[{stage.name}] up to date, skipped")
            continue
        log(f"[{stage.name}] {stage.description}" + ("" if reason == "no earlier run" else f" ({reason})"))
        rec = _run_stage(stage, study, fp, forced, inputs)
        log(f"[{stage.name}] done in {rec['seconds']:.1f} s")
    return study


def _current_record(stage: Stage, study: Study, forced: bool) -> tuple[str, dict, dict | None, str | None]:
    """``(fingerprint, inputs, the stage's record if it is up to date else None, why it runs)``."""
    inputs = stage_inputs(stage, study)
    fp = _fingerprint_of(stage.name, inputs)
    rec = study.load_record(stage.name)
    reason = _why_it_runs(rec, study, fp, inputs)
    if reason is None and forced:
        reason = "forced"
    return fp, inputs, (rec if reason is None else None), reason


def decided_by_main(study: Study, decide):
    """``decide()`` evaluated on rank 0 and handed to every process; an error there stops every rank (the
    others with a one-line error naming it) instead of leaving them waiting."""
    outcome, error = None, None
    if study.is_main:
        try:
            outcome = ("ok", decide(), None)
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            outcome, error = ("error", None, f"{type(err).__name__}: {err}"), err
    if study.ctx is not None:
        outcome = study.ctx.broadcast_object(outcome)
    kind, value, message = outcome
    if error is not None:
        raise error
    if kind == "error":
        raise RuntimeError(f"rank 0 stopped: {message}")
    return value


def _run_stage(stage: Stage, study: Study, fp: str, forced: bool, inputs: dict) -> dict:
    """Run one stage, wait for every process, and record its fingerprint and output digests (rank 0's
    record on every rank: the outputs are the ones rank 0 wrote)."""
    study.forced = forced
    t0 = time.perf_counter()
    outputs = stage.run(study)
    if study.ctx is not None:
        study.ctx.barrier()
    rec = decided_by_main(study, lambda: {
        "fingerprint": fp, "seconds": round(time.perf_counter() - t0, 2),
        "outputs": {str(Path(p).relative_to(study.run_dir)): sha256_file(Path(p)) for p in outputs},
        "environment": describe(), "inputs": inputs})
    study.records[stage.name] = rec
    if study.is_main:
        atomic_write_text(study.record_path(stage.name), json.dumps(rec, indent=2))
    return rec
