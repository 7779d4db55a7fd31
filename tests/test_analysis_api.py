"""The analysts' Python API: the README example runs on a real quick study, the tables are the files on
disk, the fitted slope is the report's, and a missing output stops with one line naming it."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from analysis import MissingRunOutput, open_run
from analysis.load import TRIAL_COLUMNS, load_models, load_units
from analysis.statistics import within_unit_slope

README = Path(__file__).resolve().parents[1] / "README.md"
SLOPE_LINE = re.compile(r"natural MIS slope per unit of rate: (-?\d+\.\d{4}) \(95 % CI (-?\d+\.\d{4}) to "
                        r"(-?\d+\.\d{4})\)")


def readme_example() -> str:
    """The ```python block of the README's "Python API for analysts" section."""
    section = README.read_text().split("## Python API for analysts", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's Python API section has no ```python block"
    return match.group(1)


def report_slope(run_dir: Path, kind: str) -> dict:
    """The ``rate`` term of the report's primary MIS slope of ``kind`` (``report/results.json``)."""
    results = json.loads((run_dir / "report" / "results.json").read_text())
    entry = next(e for e in results["statistics"] if e["id"] == f"mis_slope.{kind}.all")
    assert entry["status"] == "ok", entry["reason"]
    return entry["result"]["terms"]["rate"]


# ---- on a real quick study -------------------------------------------------------------------------
@pytest.mark.slow
def test_the_readme_example_prints_the_table_shapes_and_the_reports_slope(quick_study, monkeypatch, capsys):
    cwd, run_dir, _ = quick_study
    monkeypatch.chdir(cwd)
    exec(compile(readme_example(), str(README), "exec"), {"__name__": "readme_example"})
    printed = capsys.readouterr().out
    run = open_run(run_dir)
    for name in ("models", "mis", "units", "dissection", "trials"):
        assert f"{name}: {getattr(run, name).shape}" in printed
    match = SLOPE_LINE.search(printed)
    assert match, printed
    expected = report_slope(run_dir, "natural")
    assert [float(v) for v in match.groups()] == [round(expected[k], 4) for k in ("coef", "ci_low", "ci_high")]


@pytest.mark.slow
def test_the_tables_are_the_files_of_the_run(quick_study):
    _, run_dir, _ = quick_study
    run = open_run(run_dir)
    assert run.run_dir == run_dir.resolve() and run.config.study.profile == "quick"

    on_disk = {p.parent.name for p in run_dir.glob("models/*/meta.json")} - {"observer"}
    assert set(run.models["model_id"]) == on_disk
    pd.testing.assert_frame_equal(run.models, load_models(run_dir))

    csv = pd.read_csv(run_dir / "mis" / "units.csv")
    pd.testing.assert_frame_equal(run.mis[csv.columns], csv.assign(model_id=csv["model_id"].astype(str)))
    pd.testing.assert_frame_equal(run.mis, load_units(run_dir))
    assert run.mis is run.mis                                           # read once, then kept

    dissection = pd.read_csv(run_dir / "dissection" / "units.csv")
    pd.testing.assert_frame_equal(run.dissection, dissection)
    pd.testing.assert_frame_equal(run.units[run.mis.columns], run.mis)
    assert {"concept", "iou", "interpretable"} <= set(run.units.columns)

    assert list(run.trials.columns) == TRIAL_COLUMNS
    assert list(run.humans.columns) == TRIAL_COLUMNS


@pytest.mark.slow
def test_the_primary_slope_on_the_mis_table_is_the_reports(quick_study):
    _, run_dir, _ = quick_study
    run = open_run(run_dir)
    level = 1 - run.config.analysis.alpha_level
    for kind in sorted(run.mis["kind"].unique()):
        fit = within_unit_slope(run.mis[run.mis["kind"] == kind], formula="mis ~ rate", level=level)
        expected = report_slope(run_dir, kind)
        assert fit["terms"]["rate"] == pytest.approx(expected, rel=1e-6, abs=1e-12), kind


# ---- missing outputs --------------------------------------------------------------------------------
def _run_with_base_model(root: Path) -> Path:
    meta = {"model_id": "base", "arch": "inception-small", "sparsity": {"total": 0.0}, "top1": {"after": 0.9}}
    (root / "models" / "base").mkdir(parents=True)
    (root / "models" / "base" / "meta.json").write_text(json.dumps(meta))
    return root


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, FileNotFoundError)
    return message


def test_a_missing_run_directory_says_which_command_makes_one(tmp_path):
    with pytest.raises(MissingRunOutput) as err:
        open_run(tmp_path / "runs" / "quick")
    message = _one_line(err)
    assert str(tmp_path / "runs" / "quick") in message and "`sparsight run --profile quick`" in message


def test_a_run_without_mis_names_the_file_and_the_mis_command(tmp_path):
    run = open_run(_run_with_base_model(tmp_path / "study"))
    assert list(run.models["model_id"]) == ["base"]
    for table in ("mis", "units"):
        with pytest.raises(MissingRunOutput) as err:
            getattr(run, table)
        message = _one_line(err)
        assert str(run.run_dir / "mis" / "units.csv") in message
        assert f"`sparsight mis {run.run_dir}`" in message


def test_a_run_without_models_names_the_meta_file_and_the_run_command(tmp_path):
    (tmp_path / "study.toml").write_text('[study]\nname = "study"\nprofile = "quick"\n')
    run = open_run(tmp_path)
    with pytest.raises(MissingRunOutput) as err:
        run.models
    message = _one_line(err)
    assert str(tmp_path / "models" / "base" / "meta.json") in message
    assert f"`sparsight run {tmp_path / 'study.toml'}`" in message


def test_a_run_without_responses_or_dissection_gives_empty_tables(tmp_path):
    run = open_run(_run_with_base_model(tmp_path))
    assert run.trials.empty and list(run.trials.columns) == TRIAL_COLUMNS
    assert run.humans.empty and run.dissection.empty
