"""What `sparsight serve` and the gunicorn entry say before real participants: settings below the protocol's,
material that repeats within one participant's trials, --set values that hold for one server only; and a
templates folder that is not there stops both."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from sparsight.cli import main
from sparsight.config import SurveySection, load_study
from survey_app import create_app
from survey_app.material import Material
from survey_app.readiness import launch_notes, repetition_notes
from survey_app.testing import make_bank, make_study_dir

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def serve(monkeypatch):
    """``serve(args)`` → the CliRunner result of `sparsight serve ARGS`, the server itself not started."""
    import flask

    import survey_app.cli
    monkeypatch.setattr(flask.Flask, "run", lambda self, **kw: None)
    monkeypatch.setattr(survey_app.cli, "_check_port", lambda host, port: None)
    monkeypatch.setenv("SPARSIGHT_ADMIN_PASSWORD", "pw-for-tests")
    return lambda args: CliRunner().invoke(main, ["serve", *map(str, args)])


def test_the_demo_profiles_survey_numbers_are_named_against_the_protocols():
    demo = load_study(profile="default").survey
    defaults = SurveySection()
    notes = [n for n in launch_notes(demo, 9) if n.startswith("survey settings below")]
    assert len(notes) == 1
    for key in ("main_trials", "catch_trials", "practice_trials", "min_answers_per_position", "min_total_s"):
        assert f"{key} {getattr(demo, key):g} (built-in {getattr(defaults, key):g})" in notes[0]
    assert "min_instruction_s" not in notes[0]                  # the demo keeps the protocol's 15 s
    assert not [n for n in launch_notes(load_study(profile="paper").survey, 9) if n.startswith("survey settings")]


def test_trials_beyond_a_conditions_material_are_named_with_what_repeats(tmp_path):
    """4 units × 4 tasks per condition, the last task reserved: 4 items, 12 main and 4 reserved tasks."""
    make_bank(tmp_path)
    material = Material(tmp_path / "stimuli")

    def notes(**survey):
        return repetition_notes(SurveySection(**{"practice_trials": 1, "catch_trials": 1, **survey}), material)
    assert notes(main_trials=2) == []                       # 2 units left for 1 catch and 1 practice trial
    items = notes(main_trials=4)[0]
    assert items.startswith("condition 'base|natural' has 4 items") and "12 main and 4 reserved tasks" in items
    assert "2 catch and practice trials reuse items of the main trials" in items and "main trials show" not in items
    assert "the 6 main trials show items more than once" in notes(main_trials=6)[0]
    tasks = notes(main_trials=13)[0]
    assert "the 13 main trials repeat tasks" in tasks and "show items" not in tasks
    assert "share tasks (4 reserved tasks for 5)" in notes(main_trials=2, catch_trials=3, practice_trials=2)[0]


def test_serve_names_set_values_that_hold_for_this_server_only_and_what_repeats(tmp_path, serve):
    run_dir = make_study_dir(tmp_path / "study", {"main_trials": 6, "catch_trials": 2, "practice_trials": 2})
    plain = serve([run_dir]).output
    assert "for this server only" not in plain
    result = serve([run_dir, "--set", "survey.main_trials=13", "--set", "survey.catch_trials=2"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "for this server only" in line]
    assert len(lines) == 1 and lines[0].startswith("--set survey.main_trials=13 (study file: 6): for this server")
    assert "catch_trials" not in lines[0]                       # the same as the study file's
    assert f"[survey] section of {run_dir / 'study.toml'} for gunicorn (survey_app.wsgi)" in lines[0]
    assert "before real participants: condition 'base|natural' has 4 items" in result.output
    assert "the 13 main trials repeat tasks" in result.output


def test_a_templates_folder_that_is_not_there_stops_serve_and_the_app(tmp_path, serve):
    run_dir = make_study_dir(tmp_path / "study", {})
    missing = tmp_path / "no-such-pages"
    result = serve([run_dir, "--set", f'survey.templates="{missing}"'])
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"Error: survey.templates: {missing} does not exist (a folder")
    assert not (run_dir / "survey.db").exists() and "admin password" not in result.output
    with pytest.raises(FileNotFoundError, match="survey.templates: .* does not exist"):
        create_app({"RUN_DIR": str(run_dir), "SURVEY": {"templates": str(missing)}})


def test_the_gunicorn_entry_prints_the_launch_notes(tmp_path):
    run_dir = make_study_dir(tmp_path / "study", {})
    env = {**os.environ, "SPARSIGHT_RUN_DIR": str(run_dir), "SPARSIGHT_DATABASE_URL": f"sqlite:///{tmp_path}/s.db"}
    proc = subprocess.run([sys.executable, "-c", "import survey_app.wsgi"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    notes = [line for line in proc.stderr.splitlines() if line.startswith("before real participants: ")]
    assert any("no survey.completion_code" in n for n in notes)
    assert any("survey settings below the protocol's built-in defaults" in n for n in notes)
