"""The study stage that writes the report: statistics, figures, ``report/index.html`` and ``report/results.json``."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path


def responses_fingerprint(study) -> dict:
    """What the report's human side depends on: ``responses.csv``/``.parquet`` content, else the number of
    responses stored in the survey database."""
    from sparsight.files import sha256_file
    for name in ("responses.csv", "responses.parquet"):
        path = study.path(name)
        if path.is_file():
            return {name: sha256_file(path)}
    from sparsight.errors import NotKnownWhilePlanning
    from survey_app.stages import read_responses
    try:
        return {"database_responses": len(read_responses(study.run_dir, study.config, connect=not study.planning))}
    except NotKnownWhilePlanning:
        raise
    except Exception as err:  # noqa: BLE001 - an unreachable database leaves the report to say so
        return {"database": f"unavailable: {type(err).__name__}"}


class AnalysisStage:
    name = "analysis"
    description = "statistics, figures and the report (report/index.html, report/results.json)"

    def inputs(self, study) -> dict:
        from pruning.stages import _upstream
        cfg = study.config
        return {"upstream": {k: _upstream(study, k) for k in ("evaluate", "robustness", "mis", "dissection")},
                "analysis": asdict(cfg.analysis), "seed": cfg.study.seed, "responses": responses_fingerprint(study)}

    def run(self, study) -> list[Path]:
        from .report import analyze
        if not study.is_main:
            return []
        results = analyze(study.run_dir, study.config)
        return [Path(p) for p in results["files"].values()]


STAGES = [AnalysisStage()]
