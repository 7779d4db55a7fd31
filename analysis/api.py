"""A study run as tidy tables for a notebook: ``run = open_run("runs/quick")``.

:class:`StudyRun` reads its tables through :mod:`analysis.load` the first time each is asked for
and keeps them.  The analyses are the report's own functions, called on these tables:

* **the primary slope** (the report's ``mis_slope.<kind>.all``: MIS on pruning rate within units,
  standard errors clustered by unit and model, no top-1 adjustment) —
  ``statistics.within_unit_slope(run.mis[run.mis["kind"] == "natural"], formula="mis ~ rate")``; the
  ``"rate"`` row of its ``table`` holds the slope and its 95 % CI, and ``formula="mis ~ rate + top1"``
  gives the secondary, accuracy-adjusted model; ``statistics.unit_mixed_model`` the unit mixed model
  the report shows beside it;
* **the dose–response shape** — with ``m = statistics.model_level_mis(d)`` (one point per model, each unit
  compared with itself), ``statistics.dose_response(m["rate"], m["mis"])``;
* **trial level**, with ``h = run.humans[run.humans["kind"] == "natural"]`` —
  ``statistics.mixed_logistic(h, "correct ~ rate", groups=("participant", "unit_id", "model_id"))`` (the
  primary human model, with the model term where ``statistics.model_intercept(h)`` says the design can
  estimate it; then
  ``statistics.predicted_change(fit, 0.0, h["rate"].max(), margin=0.05)`` for the accuracy change over
  the rate span with its bootstrap interval and TOST), ``gee_logistic`` and ``clustered_logistic``;
* **descriptives** — ``descriptives.condition_summary(run.humans, by=("model_id", "kind"))``,
  ``unit_accuracy(run.humans)``, ``rt_summary(run.humans)``;
* **power** — ``power.detectable_slope(se, df=fit["df"])`` for a fitted slope's standard error and degrees
  of freedom (without ``df`` a normal approximation, too small with few models); for a human study
  ``power.fit_trial_model(kind, run.mis, load.human_main(run.trials), rates,
  run.config.analysis.power_participant_sd, mis_model_sd)`` (``rates``: those of ``run.mis``;
  ``mis_model_sd``: the primary MIS slope's ``model_sd``), then
  ``power.simulate_designs``.

A table whose file the run lacks raises :class:`MissingRunOutput`: one line naming the file and the
command that makes it.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

import pandas as pd

from sparsight.config import StudyConfig
from sparsight.layout import Layout

from .load import load_dissection, load_models, load_trials, load_units, study_config


class MissingRunOutput(FileNotFoundError):
    """A file a table is read from does not exist; the message names it and the command that makes it."""


def _missing(path: Path, command: str) -> MissingRunOutput:
    return MissingRunOutput(f"{path} does not exist; make it with `{command}`")


class StudyRun:
    """The tables of one study directory (``runs/<study>/``, DESIGN §3), each read once on first use.

    ``models``, ``mis``, ``units``, ``dissection``, ``trials`` and ``humans`` are pandas DataFrames;
    ``config`` is the resolved :class:`~sparsight.config.StudyConfig`; ``run_dir`` the absolute directory."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir).expanduser().resolve()
        if not self.run_dir.is_dir():
            raise MissingRunOutput(f"study directory {self.run_dir} does not exist; make it with `sparsight run "
                                   f"STUDY.toml` (`sparsight run --profile quick` makes runs/quick)")

    def __repr__(self) -> str:
        return f"StudyRun({str(self.run_dir)!r})"

    @cached_property
    def config(self) -> StudyConfig:
        """The resolved study configuration (``study.toml``)."""
        return study_config(self.run_dir)

    @cached_property
    def models(self) -> pd.DataFrame:
        """One row per model (:data:`sparsight.modeltable.MODEL_COLUMNS`: ``model_id``, ``method`` — ``"base"``
        for the unpruned parent —, ``schedule``, ``series``, ``rate``, ``sparsity``, ``top1``, …)."""
        models = load_models(self.run_dir)
        if models.empty:
            raise _missing(Layout(self.run_dir).meta("base"), self._rerun_command())
        return models

    @cached_property
    def mis(self) -> pd.DataFrame:
        """Per-unit MIS, one row per model × reference kind × unit: ``mis/units.csv`` (``mis``, ``mis_hard``,
        ``status``, …) with ``unit_id`` and the model's ``method, schedule, series, rate, sparsity, top1``."""
        self._require(Path("mis") / "units.csv", f"sparsight mis {self.run_dir}")
        return load_units(self.run_dir, self.models)

    @cached_property
    def units(self) -> pd.DataFrame:
        """The unit table: :attr:`mis` with each unit's Network Dissection ``concept``, ``iou`` and
        ``interpretable`` flag where the run has a dissection (the table the report analyses)."""
        self._require(Path("mis") / "units.csv", f"sparsight mis {self.run_dir}")
        return load_units(self.run_dir, self.models, self.dissection)

    @cached_property
    def dissection(self) -> pd.DataFrame:
        """``dissection/units.csv``: concept, IoU and interpretable flag of every unit of every model
        (empty when the run has no dissection)."""
        return load_dissection(self.run_dir)[0]

    @cached_property
    def trials(self) -> pd.DataFrame:
        """Every trial response, human and machine (:data:`analysis.load.TRIAL_COLUMNS`), from
        ``responses.csv`` or the survey database; empty, with those columns, when there are none."""
        return load_trials(self.run_dir, self.config, self.models)[0]

    @cached_property
    def humans(self) -> pd.DataFrame:
        """Human main trials of the included participants: what the report's human-side analyses use."""
        from .human_fits import split_humans
        return split_humans(self.trials).included

    def _rerun_command(self) -> str:
        """``sparsight run`` on this run's own study file (its outputs land in this directory again)."""
        study_file = Layout(self.run_dir).study_toml
        return f"sparsight run {study_file}" if study_file.is_file() else "sparsight run STUDY.toml"

    def _require(self, relative: Path, command: str) -> None:
        path = self.run_dir / relative
        if not path.is_file():
            raise _missing(path, command)


def open_run(run_dir: str | Path) -> StudyRun:
    """The study in ``run_dir`` (e.g. ``"runs/quick"``, made by ``sparsight run --profile quick``)."""
    return StudyRun(run_dir)
