"""What a new user does, done the way the README writes it: relative paths, separate processes, no terminal."""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from sparsight.cli import main

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, tries: int = 100) -> tuple[int, bytes]:
    for _ in range(tries):
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"no answer from {url}")


@pytest.fixture
def study_copy(quick_study, tmp_path):
    """A copy of the finished quick study under a new working directory (``runs/quick`` there), made as
    ``cp -r`` makes one: contents only, every file with a new modification time."""
    _, run_dir, _ = quick_study
    cwd = tmp_path / "work"
    shutil.copytree(run_dir, cwd / "runs" / "quick", copy_function=shutil.copyfile)
    return cwd


def test_the_log_of_a_run_without_terminal_has_lines_not_progress_bars(quick_study):
    _, _, output = quick_study
    assert "\r" not in output                                   # no bar redraws in a log file
    assert "epoch 1/" in output                                 # a line per epoch
    assert "[stimuli] 1/" in output and "[dissection] 1/" in output    # a line per model
    assert "[prune] done in" in output                          # a line per stage


def test_serve_with_a_relative_run_dir_serves_the_consent_page_and_stimulus_images(quick_study):
    cwd, run_dir, _ = quick_study
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "sparsight", "serve", "runs/quick", "--port", str(port)],
                              cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        status, page = _get(f"http://127.0.0.1:{port}/")
        assert status == 200 and b"consent" in page.lower()
        names = pd.read_parquet(run_dir / "stimuli" / "manifest.parquet")["image"].drop_duplicates()
        for name in names.sample(3, random_state=0):
            status, body = _get(f"http://127.0.0.1:{port}/stimuli/{Path(name).name}")
            assert status == 200 and body[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        server.terminate()
        server.wait(timeout=20)
    banner = server.stdout.read()
    assert f"on http://127.0.0.1:{port}/" in banner
    assert "for participants run gunicorn" in banner            # the development server says what to use instead


def test_participant_with_a_relative_run_dir_answers_a_trial_list(study_copy):
    proc = subprocess.run([sys.executable, "-m", "sparsight", "participant", "runs/quick", "--observer", "pixels",
                           "--mode", "participant"], cwd=study_copy, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pixels:" in proc.stdout and "accuracy" in proc.stdout
    written = list((study_copy / "runs" / "quick" / "survey").glob("machine-pixels-*.csv"))
    assert len(written) == 1 and len(pd.read_csv(written[0])) > 0


def test_stimuli_for_one_model_or_unit_keep_every_other_model_and_unit(study_copy, monkeypatch):
    monkeypatch.chdir(study_copy)
    stimuli = Path("runs/quick/stimuli")
    before = pd.read_parquet(stimuli / "manifest.parquet")
    status_before = pd.read_csv(stimuli / "units.csv")
    keys = ["model_id", "kind", "layer", "unit", "task", "role", "rank"]

    result = CliRunner().invoke(main, ["stimuli", "runs/quick", "--model", "base"])
    assert result.exit_code == 0, result.output
    after = pd.read_parquet(stimuli / "manifest.parquet")
    pd.testing.assert_frame_equal(after.sort_values(keys, ignore_index=True),
                                  before.sort_values(keys, ignore_index=True))
    pd.testing.assert_frame_equal(pd.read_csv(stimuli / "units.csv"), status_before)

    unit = before[(before.model_id == "base") & (before.kind == "natural")][["layer", "unit"]].iloc[0]
    result = CliRunner().invoke(main, ["stimuli", "exemplars", "runs/quick", "--model", "base", "--unit",
                                       f"{unit.layer}:{unit.unit}", "--fresh"])
    assert result.exit_code == 0, result.output
    after = pd.read_parquet(stimuli / "manifest.parquet")
    assert set(after.model_id) == set(before.model_id) and len(after) == len(before)
    assert (after.image.map(lambda n: (stimuli / n).is_file())).all()
    redone = (after.model_id == "base") & (after.kind == "natural") & (after.layer == unit.layer) & \
             (after.unit == unit.unit)
    pd.testing.assert_frame_equal(after[~redone].sort_values(keys, ignore_index=True),
                                  before[~redone.values].sort_values(keys, ignore_index=True))
    assert redone.sum() > 0


def test_mis_takes_a_run_dir_says_why_alpha_is_not_fitted_and_removes_a_stale_calibration(study_copy,
                                                                                            monkeypatch):
    monkeypatch.chdir(study_copy)
    stale = Path("runs/quick/mis/calibration.json")
    stale.write_text('{"alpha": 9.68}')
    result = CliRunner().invoke(main, ["mis", "runs/quick", "--set", 'study.name="renamed"'])
    assert result.exit_code == 0, result.output
    assert "no human responses" in result.output and "removed the earlier calibration.json" in result.output
    assert not stale.exists()
    units = pd.read_csv("runs/quick/mis/units.csv")
    assert set(units.alpha_source) == {"configured"}


def test_mis_names_human_responses_filed_under_another_study(monkeypatch, tmp_path):
    from sparsight.config import load_study
    from survey_app import stages

    others = pd.DataFrame({"study": ["first-study"] * 3, "is_machine": [False] * 3, "trial_type": ["main"] * 3})

    def read(run_dir, cfg, *, every_study=False, connect=True):
        return others if every_study else others.iloc[:0]

    monkeypatch.setattr(stages, "read_responses", read)
    cfg = load_study(overrides=['study.name="second-study"'])
    why = stages._why_not_fitted(tmp_path, cfg, others.iloc[:0], 0)
    assert "no human responses for study 'second-study'" in why and "3 for 'first-study'" in why


def test_mis_counts_responses_of_excluded_participants_apart_from_a_stale_bank(tmp_path):
    """10 human main trials, 4 of them from an excluded participant, all matching the bank: the reason α was
    not fitted names the exclusions, not the stimulus bank; the fit's trials leave the excluded ones out."""
    from sparsight.config import load_study
    from survey_app import stages
    from survey_app.mis import TASK_KEYS, human_trials

    responses = pd.DataFrame({"study": "s", "is_machine": False, "trial_type": ["main"] * 10 + ["catch"],
                              "excluded": [True] * 4 + [False] * 7, "model_id": "base", "kind": "natural",
                              "layer": "l", "unit": 0, "task": range(11), "correct": True})
    deltas = pd.DataFrame({**{k: responses[k] for k in TASK_KEYS}, "delta": 0.1})
    fitted_on = human_trials(responses, deltas)
    assert len(fitted_on) == 6 and not fitted_on["excluded"].any()
    why = stages._why_not_fitted(tmp_path, load_study(), responses, len(fitted_on))
    assert why == ("6 human responses of included participants (4 more are from excluded participants and do not "
                   "count), fewer than mis.min_human_responses = 200")
    why = stages._why_not_fitted(tmp_path, load_study(), responses, 5)
    assert why.startswith("5 of the study's 6 human main-trial responses of included participants match tasks")


def test_plan_of_a_study_with_a_database_server_connects_to_nothing(tmp_path, monkeypatch):
    """--plan on the GoogLeNet study (PostgreSQL survey, ImageNet folder) prints the plan and touches nothing."""
    import re

    import sqlalchemy

    from survey_app import db

    def refuse(*_a, **_k):
        raise AssertionError("--plan opened a database connection")

    monkeypatch.setattr(sqlalchemy, "create_engine", refuse)
    monkeypatch.setattr(db, "make_engine", refuse)
    monkeypatch.chdir(tmp_path)
    study = Path(__file__).resolve().parents[1] / "studies" / "googlenet-imagenet.toml"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))       # an empty weights cache
    result = CliRunner().invoke(main, ["run", str(study), "--plan"])
    assert re.search(r"^mis +may run ", result.output, re.M) and "does not connect" in result.output
    assert not (tmp_path / "runs").exists()
    inputs = {"data.path": "/data/imagenet", "dissection.probe": "/data/broden1_224"}     # the study file's
    problems = [line for line in result.output.splitlines() if line.startswith("problem")]
    assert problems[:2] == [f"problem (the run stops before its first stage): {key}: {path} does not exist"
                            for key, path in inputs.items() if not Path(path).exists()]
    cache = tmp_path / "torch-home" / "hub" / "checkpoints"          # the weights names, checked without loading
    assert [p.split(": ")[1] for p in problems[2:]] == ["model.weights", "observer.weights"]
    assert f"expected {cache}/googlenet-1378be20.pth" in problems[2] and "resnet50-11ad3fa6.pth" in problems[3]
    assert result.exit_code == 1                     # a script that plans first learns the run would stop


def test_every_profile_is_offered_and_paper_plans(tmp_path, monkeypatch):
    from sparsight.config import PROFILES

    monkeypatch.chdir(tmp_path)
    help_text = CliRunner().invoke(main, ["run", "--help"]).output
    assert all(name in help_text for name in PROFILES)
    result = CliRunner().invoke(main, ["run", "--profile", "paper", "--plan"])
    assert result.exit_code == 0, result.output
    assert 'profile = "paper"' in result.output and "fv_steps = 512" in result.output
    assert f"study directory: {tmp_path / 'runs' / 'paper'}" in result.output      # not the demo's folder


def test_a_copied_study_directory_runs_where_it_is_and_leaves_the_original_alone(quick_study, study_copy, tmp_path):
    """`sparsight run COPY` and `sparsight run COPY/study.toml` plan and run the copy (its recorded study.toml
    names the original's output folder), find every stage up to date there, and change nothing in the original."""
    _, original, _ = quick_study
    copy = study_copy / "runs" / "quick"
    before = {p: p.stat().st_mtime_ns for p in original.rglob("*")}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for target in (copy, copy / "study.toml"):
        plan = subprocess.run([sys.executable, "-m", "sparsight", "run", str(target), "--plan"], cwd=elsewhere,
                              capture_output=True, text=True)
        assert plan.returncode == 0, plan.stderr[-2000:]
        assert f"study directory: {copy}" in plan.stdout
        states = [line.split()[1] for line in plan.stdout.splitlines()[-11:] if line and not line.startswith(" ")]
        assert states and set(states) == {"up"}, plan.stdout[-1500:]
    rerun = subprocess.run([sys.executable, "-m", "sparsight", "run", str(copy)], cwd=elsewhere,
                           capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"study directory: {copy}" in rerun.stdout
    assert {p: p.stat().st_mtime_ns for p in original.rglob("*")} == before
    assert not (elsewhere / "runs").exists()
    named = CliRunner().invoke(main, ["run", str(copy), "--name", "other"])
    assert named.exit_code == 2 and "runs where it is" in named.output
    empty = CliRunner().invoke(main, ["run", str(elsewhere), "--plan"])
    assert empty.exit_code == 2 and "not a study directory" in empty.output
