"""The command line's error boundary: bad input ends in one ``Error:`` line, never a traceback."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from sparsight.cli import main


@pytest.fixture
def places(tmp_path, tiny_data, monkeypatch):
    """A working directory with an empty study folder, a corrupt checkpoint and a broken study file."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("SPARSIGHT_DEBUG", raising=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt.pt").write_bytes(os.urandom(512))
    torch.save({"w": torch.zeros(1)}, tmp_path / "foreign.pt")
    (tmp_path / "broken.toml").write_text("[study\nname = 1\n")
    (tmp_path / "unknown-key.toml").write_text("[train]\nepoch = 3\n")
    shutil.copytree(tiny_data, tmp_path / "corrupt-data")
    next((tmp_path / "corrupt-data" / "val").glob("*/*.png")).write_bytes(b"not an image")
    shutil.copytree(tiny_data, tmp_path / "uneven-data")
    shutil.rmtree(tmp_path / "uneven-data" / "val" / "circle")
    return {"data": str(tiny_data), "corrupt_data": str(tmp_path / "corrupt-data"), "tmp": str(tmp_path)}


BAD_INPUTS = {
    "run: data folder that does not exist": (["run", "--set", "data.source=folder", "--set", "data.path=/nonexistent"],
                                             "/nonexistent"),
    "run: unknown profile": (["run", "--profile", "huge"], "'huge' is not one of"),
    "run: unknown section": (["run", "--set", "trian.epochs=3"], "unknown section [trian]"),
    "run: bad choice": (["run", "--set", "train.optimizer=lion"], "choose from ['sgd', 'adam', 'adamw']"),
    "run: missing study file": (["run", "missing.toml"], "missing.toml"),
    "run: study file not TOML": (["run", "broken.toml"], "is not valid TOML"),
    "run: unknown key in study file": (["run", "unknown-key.toml"], "unknown key train.epoch"),
    "run: embedding weights file missing, before any stage": (["run", "--set", "mis.embedding=resnet50", "--set",
                                                               "mis.embedding_weights=w/resnet50.pt"],
                                                              "mis.embedding_weights: {tmp}/w/resnet50.pt does not exist"),
    "run: unknown MIS embedding": (["run", "--plan", "--set", "mis.embedding=resnet5"], "choose from"),
    "run: unknown --force stage": (["run", "--plan", "--force", "bogus"], "unknown stage 'bogus'"),
    "evaluate: not a checkpoint": (["evaluate", "/etc/passwd", "--data", "{data}"], "/etc/passwd"),
    "evaluate: corrupt checkpoint": (["evaluate", "corrupt.pt", "--data", "{data}"], "corrupt.pt"),
    "evaluate: batch size 0": (["evaluate", "corrupt.pt", "--data", "{data}", "--batch-size", "0"],
                               "'--batch-size': 0 is not in the range x>=1"),
    "evaluate: unknown device": (["evaluate", "corrupt.pt", "--data", "{data}", "--device", "bogus"],
                                 "'bogus' is not a device; expected auto | cpu | cuda | cuda:N | mps"),
    "participant: unknown device": (["participant", "empty", "--device", "gpu0"], "'gpu0' is not a device"),
    "run: malformed device in a setting": (["run", "--plan", "--set", "study.device=cuda:x"],
                                           "'cuda:x' is not valid; expected auto | cpu | cuda | cuda:N | mps"),
    "evaluate: foreign checkpoint": (["evaluate", "foreign.pt", "--data", "{data}"], "is not a sparsight checkpoint"),
    "train: missing weights file": (["train", "--data", "{data}", "--weights", "/nonexistent/w.pt", "--epochs", "0",
                                     "--set", "data.image_size=32"], "/nonexistent/w.pt"),
    "train: corrupt image, on_corrupt=error": (["train", "--data", "{corrupt_data}", "--epochs", "0", "--set",
                                                "data.image_size=32", "--set", "data.on_corrupt=error"],
                                               "cannot decode image"),
    **({} if torch.cuda.is_available() else {
        "train: CUDA asked for, none here": (["train", "--data", "{data}", "--epochs", "0", "--device", "cuda",
                                              "--set", "data.image_size=32"], "CUDA is not available")}),
    "train: torchvision weights not cached": (["train", "--data", "{data}", "--arch", "resnet18", "--weights",
                                               "IMAGENET1K_V1", "--epochs", "0", "--set", "data.image_size=32"],
                                              "torch-home"),
    "serve: no stimulus bank": (["serve", "empty"], "manifest"),
    "participant: no observer network": (["participant", "empty"], "no observer network"),
    "participant: survey not running": (["participant", "empty", "--url", "http://127.0.0.1:9", "--observer",
                                         "pixels", "--token", "t"], "cannot reach the survey at http://127.0.0.1:9"),
    "participant: no stimulus bank": (["participant", "empty", "--observer", "pixels"], "manifest"),
    "responses: no survey database": (["responses", "empty"], "no survey database"),
    "responses: unknown output format": (["responses", "empty", "--out", "empty/answers.txt"],
                                         "choose a .csv or .parquet file"),
    "responses: database unreachable": (["responses", "empty", "--database",
                                         "postgresql+psycopg://nobody@127.0.0.1:9/none"], "cannot use the survey database"),
    "analyze: import file missing": (["analyze", "empty", "--import", "missing.csv", "--map", "participant=p",
                                      "--map", "correct=c"], "missing.csv"),
    "analyze: not a study directory": (["analyze", "empty"], "is not a study directory"),
    "mis: no stimulus bank": (["mis", "empty"], "no stimulus bank"),
    "stimuli: no base model": (["stimuli", "empty"], "no base model"),
    "stimuli: bad preview": (["stimuli", "empty", "--preview", "base"], "MODEL:LAYER:UNIT"),
    "prune: no parent model": (["prune", "empty"], "no model.pt"),
    "dissect: missing probe folder": (["dissect", "empty", "--probe", "no-probe"], "no-probe"),
    "serve: port out of range": (["serve", "empty", "--port", "99999"], "99999 is not in the range 1<=x<=65535"),
    "serve: bad survey setting": (["serve", "empty", "--set", "survey.main_trials=0"], "survey.main_trials"),
}


@pytest.mark.parametrize("args, fragment", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_bad_input_ends_in_one_error_line_without_traceback(places, args, fragment):
    result = CliRunner().invoke(main, [a.format(**places) for a in args])
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)   # nothing escaped the boundary
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    assert result.output.rstrip().splitlines()[-1] == errors[0]
    assert fragment.format(**places) in errors[0], errors[0]
    assert not os.listdir(os.path.join(places["tmp"], "empty")), "a failed command left files in the study folder"
    print(errors[0])


def test_debug_shows_the_traceback(places):
    result = CliRunner().invoke(main, ["--debug", "evaluate", "corrupt.pt", "--data", places["data"]])
    assert result.exit_code != 0 and not isinstance(result.exception, SystemExit)   # the error itself escapes
    env = {**os.environ, "SPARSIGHT_DEBUG": "1"}
    proc = subprocess.run([sys.executable, "-m", "sparsight", "evaluate", "corrupt.pt", "--data", places["data"]],
                          capture_output=True, text=True, env=env, cwd=places["tmp"])
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_a_real_process_prints_one_line_and_fails(places):
    proc = subprocess.run([sys.executable, "-m", "sparsight", "run", "--set", "data.source=folder",
                           "--set", "data.path=/nonexistent"], capture_output=True, text=True, cwd=places["tmp"])
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.strip()][-1].startswith("Error: ")


SETTINGS_WRONG_BEFORE_ANY_STAGE = {
    "unit layer": ('units.layers=["inception9"]', "layer 'inception9' does not exist; valid layers: ['conv1',"),
    "unit index": ('units.units=["inception3b:112"]', "unit inception3b:112 is out of range: inception3b has 112"),
    "stimulus model": ('stimuli.models=["lrp-oneshot-r0.3"]', "stimuli.models: 'lrp-oneshot-r0.3' is not a model"),
    "survey model": ('survey.models=["base", "gone"]', "survey.models: 'gone' gets no stimuli in this study"),
    "probe folder": ("dissection.probe=no-probe", "dissection.probe: {tmp}/no-probe does not exist"),
    "splits with other classes": (("data.source=folder", "data.path=uneven-data"),
                                  "data.path: data folder {tmp}/uneven-data: val/ lacks 1 class(es) train/ has: "
                                  "['circle']"),
    "torchvision weights name": ('model.weights="IMAGENET1K_V1"', "model.weights: model 'inception-small' has no "
                                                                  "torchvision weights"),
    "classifier as unit layer": ('units.layers=["fc"]', "layer 'fc' puts out a 2-D tensor, not a map of channels"),
    "layer kept from pruning": ('prune.exclude=["conv9"]', "prune.exclude (unstructured-local): layer 'conv9' does "
                                                           "not exist; valid layers: ["),
}


@pytest.mark.parametrize("setting, fragment", SETTINGS_WRONG_BEFORE_ANY_STAGE.values(),
                         ids=SETTINGS_WRONG_BEFORE_ANY_STAGE.keys())
def test_a_wrong_setting_stops_the_run_before_its_first_stage(places, setting, fragment):
    """Found from the configuration alone: no data generated, nothing trained, no study directory."""
    sets = [arg for one in ([setting] if isinstance(setting, str) else setting) for arg in ("--set", one)]
    result = CliRunner().invoke(main, ["run", "--profile", "quick", *sets])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output.startswith("Error: ") and fragment.format(**places) in result.output, result.output
    assert not os.path.exists(os.path.join(places["tmp"], "runs"))
    plan = CliRunner().invoke(main, ["run", "--profile", "quick", "--plan", *sets])
    assert plan.exit_code == 1 and "problem (the run stops before its first stage): " in plan.output
    assert fragment.format(**places) in plan.output


def test_serve_on_a_taken_port_or_a_misspelt_setting_says_so_in_one_line_before_making_a_password(tmp_path):
    """A port another server holds stops `serve` with one line naming it, before an admin password is made
    (it is shown once: a server that never starts would lose it); a misspelt survey key offers the right one."""
    import socket

    from survey_app.testing import make_study_dir

    run_dir = make_study_dir(tmp_path / "study", {})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", str(run_dir), "--port", str(port)])
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert f"cannot listen on 127.0.0.1:{port}" in errors[0] and "--port" in errors[0]
    assert "admin password" not in result.output and not (run_dir / "survey.db").exists()
    typo = CliRunner().invoke(main, ["serve", str(run_dir), "--set", "survey.main_trails=20"])
    assert typo.exit_code == 2 and "survey settings: unknown key survey.main_trails; did you mean 'main_trials'" \
        in typo.output


@pytest.mark.parametrize("debug", [False, True])
def test_a_warning_is_one_line_unless_debugging(debug):
    """A warning raised inside a command reaches the user as `warning: …` (not Python's file:line form with the
    source line); --debug keeps the full form."""
    args = ["--debug"] * debug + ["warn"]
    script = ("import warnings; from sparsight.cli import main\n"
              "main.command('warn')(lambda: warnings.warn('the probe has 3 images'))\n"
              f"main({args!r})\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "SPARSIGHT_DEBUG"})
    assert proc.returncode == 0, proc.stderr
    if debug:
        assert "UserWarning: the probe has 3 images" in proc.stderr
    else:
        assert proc.stderr == "warning: the probe has 3 images\n"


def test_training_at_an_input_too_small_for_the_network_says_so_in_one_line(places):
    result = CliRunner().invoke(main, ["train", "--data", places["data"], "--arch", "alexnet", "--epochs", "1",
                                       "--set", "data.image_size=32", "--out", os.path.join(places["tmp"], "t")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output.startswith("Error: an input of 32 px is too small for alexnet (") and \
        "use a larger data.image_size" in result.output and "Traceback" not in result.output


class _BadProbe(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        from stimuli.probes import ProbeError
        raise ProbeError("probe label map p05.png: mask layer 'object' holds value 9, but the layer has only 3 "
                         "concepts")


def test_a_subcommand_gives_a_worker_error_as_the_worker_raised_it():
    """A ProbeError raised in a DataLoader worker reaches the main process wrapped in the worker's traceback; the
    subcommands' one-line error is the worker's own message, not the traceback."""
    from sparsight.clitools import usage_error

    with pytest.raises(ValueError) as caught:
        next(iter(torch.utils.data.DataLoader(_BadProbe(), num_workers=1)))
    assert "Original Traceback" in str(caught.value)
    assert usage_error(caught.value).message == ("probe label map p05.png: mask layer 'object' holds value 9, but the "
                                                 "layer has only 3 concepts")


def test_an_interrupted_command_says_that_the_same_command_goes_on(tmp_path, monkeypatch, capsys):
    """Ctrl-C ends a command with one line that tells the researcher what was kept and how to go on."""
    from pruning.data import concept_shapes

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(concept_shapes, "generate", interrupted)
    with pytest.raises(SystemExit) as stop:
        main.main(["data", "synth", str(tmp_path / "shapes")], prog_name="sparsight")
    assert stop.value.code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == ["Error: interrupted; what was finished is kept, and the same command goes on from there"]
