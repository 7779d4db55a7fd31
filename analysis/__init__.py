"""Analysis: responses, scores, statistics, figures and the report.

``from analysis import open_run`` gives a study run's tidy tables for a notebook (:mod:`analysis.api`)."""
from .api import MissingRunOutput, StudyRun, open_run

__all__ = ["MissingRunOutput", "StudyRun", "open_run"]
