"""The study directory's layout (DESIGN §3): every path of the file contracts, named in one place.

``Layout(run_dir)`` answers where a file of the study lives; it creates nothing.  Packages read and
write the study's files through it, so a path is spelled once::

    layout = Layout(Path("runs/default"))
    layout.checkpoint("base")     # runs/default/models/base/model.pt
    layout.manifest               # runs/default/stimuli/manifest.parquet
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CHECKPOINT_FILE = "model.pt"
META_FILE = "meta.json"
STUDY_FILE = "study.toml"
MANIFEST_FILE = "manifest.parquet"
UNITS_FILE = "units.csv"
MODELS_FILE = "models.csv"
RESPONSE_FILES = ("responses.csv", "responses.parquet")
REPORT_HTML = "index.html"
REPORT_JSON = "results.json"
#: The study-level robustness tables (``robustness/<name>.csv``).
ROBUSTNESS_TABLES = ("accuracy", "noise_similarity", "prune_potential")


@dataclass(frozen=True)
class Layout:
    """Paths under one study directory ``root``."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @property
    def study_toml(self) -> Path:
        return self.root / STUDY_FILE

    @property
    def data(self) -> Path:
        """The generated dataset (default study only)."""
        return self.root / "data"

    # models ------------------------------------------------------------------------------------
    @property
    def models(self) -> Path:
        return self.root / "models"

    def model_dir(self, model_id: str) -> Path:
        return self.models / model_id

    def checkpoint(self, model_id: str) -> Path:
        return self.model_dir(model_id) / CHECKPOINT_FILE

    def meta(self, model_id: str) -> Path:
        return self.model_dir(model_id) / META_FILE

    def has_model(self, model_id: str) -> bool:
        """Both files of a finished model are there."""
        return self.checkpoint(model_id).is_file() and self.meta(model_id).is_file()

    def model_ids_on_disk(self) -> list[str]:
        return sorted(p.name for p in self.models.iterdir()) if self.models.is_dir() else []

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation.csv"

    @property
    def robustness(self) -> Path:
        return self.root / "robustness"

    def robustness_table(self, name: str) -> Path:
        """One of :data:`ROBUSTNESS_TABLES`."""
        return self.robustness / f"{name}.csv"

    # stimuli -----------------------------------------------------------------------------------
    @property
    def stimuli(self) -> Path:
        return self.root / "stimuli"

    @property
    def manifest(self) -> Path:
        return self.stimuli / MANIFEST_FILE

    @property
    def stimulus_units(self) -> Path:
        """Per model and unit: its stimulus status (ok, dead, sparse, …)."""
        return self.stimuli / UNITS_FILE

    @property
    def mining(self) -> Path:
        return self.stimuli / "mining"

    # measures ----------------------------------------------------------------------------------
    @property
    def mis(self) -> Path:
        return self.root / "mis"

    @property
    def mis_units(self) -> Path:
        return self.mis / UNITS_FILE

    @property
    def mis_models(self) -> Path:
        return self.mis / MODELS_FILE

    @property
    def mis_tasks(self) -> Path:
        """Δ of every task (the MIS stage's first table)."""
        return self.mis / "tasks.csv"

    @property
    def calibration(self) -> Path:
        """α fitted on the human responses, with its held-out check (only once there are enough)."""
        return self.mis / "calibration.json"

    @property
    def dissection(self) -> Path:
        return self.root / "dissection"

    @property
    def dissection_units(self) -> Path:
        return self.dissection / UNITS_FILE

    @property
    def dissection_models(self) -> Path:
        return self.dissection / MODELS_FILE

    # survey and report -------------------------------------------------------------------------
    @property
    def survey_db(self) -> Path:
        return self.root / "survey.db"

    @property
    def survey(self) -> Path:
        return self.root / "survey"

    def responses(self) -> Path | None:
        """The tidy response export (CSV preferred to Parquet), None when there is none."""
        return next((p for p in map(self.path, RESPONSE_FILES) if p.is_file()), None)

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def report_html(self) -> Path:
        return self.report / REPORT_HTML

    @property
    def report_json(self) -> Path:
        return self.report / REPORT_JSON

    def holds_a_study(self) -> bool:
        """Whether the folder is a study directory: it has a study.toml, models, MIS, an evaluation, a
        dissection, a survey database or a response export."""
        marks = (self.study_toml, self.models, self.mis_units, self.evaluation, self.dissection_units, self.survey_db)
        return any(p.exists() for p in marks) or self.responses() is not None

    @property
    def stage_records(self) -> Path:
        """The folder of the study runner's records, one ``<stage>.json`` per stage."""
        return self.root / ".stages"

    def stage_record(self, name: str) -> Path:
        return self.stage_records / f"{name}.json"
