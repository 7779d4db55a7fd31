"""The study stage that writes the report: statistics, figures, ``report/index.html`` and ``report/results.json``."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path


def responses_fingerprint(study) -> dict:
    """What the report's human side depends on (as :func:`analysis.load.read_responses` chooses): the content of
    the survey database's responses when it has any, else that of ``responses.csv``/``.parquet``."""
    from sparsight.errors import NotKnownWhilePlanning
    from sparsight.files import sha256_file
    from survey_app.stages import read_responses
    path = study.layout.responses()
    try:
        stored = read_responses(study.run_dir, study.config, connect=not study.planning)
    except NotKnownWhilePlanning:
        raise
    except Exception as err:  # noqa: BLE001 - an unreachable database leaves the report to say so
        if path is not None:
            return {path.name: sha256_file(path)}
        return {"database": f"unavailable: {type(err).__name__}"}
    if len(stored) or path is None:
        return {"database_responses": len(stored), "content": _table_digest(stored)}
    return {path.name: sha256_file(path)}


def _table_digest(table) -> str:
    """sha256 over every cell of ``table`` (a withdrawn participant replaced by a new one changes it)."""
    import hashlib

    import pandas as pd
    digest = hashlib.sha256()
    if len(table):
        digest.update(pd.util.hash_pandas_object(table.astype(str), index=False).to_numpy().tobytes())
    return digest.hexdigest()


class AnalysisStage:
    name = "analysis"
    description = "statistics, figures and the report (report/index.html, report/results.json)"

    def inputs(self, study) -> dict:
        cfg = study.config
        return {"upstream": {k: study.upstream(k) for k in ("evaluate", "robustness", "mis", "dissection")},
                "analysis": asdict(cfg.analysis), "seed": cfg.study.seed, "responses": responses_fingerprint(study)}

    def run(self, study) -> list[Path]:
        return run_analysis(study)


def run_analysis(study, *, out: Path | None = None, trials=None, source: str | None = None) -> list[Path]:
    """The study's report: statistics, figures, ``report/index.html`` and ``report/results.json`` (under
    ``out`` instead when given); ``trials`` (e.g. imported ones) replace the study's responses."""
    from .report import analyze
    if not study.is_main:
        return []
    results = analyze(study.run_dir, study.config, out, trials=trials, source=source)
    return [Path(p) for p in results["files"].values()]


STAGES = [AnalysisStage()]
