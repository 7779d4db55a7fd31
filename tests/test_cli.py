import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from sparsight.cli import main


@pytest.fixture
def runner():
    return CliRunner()


def _commands(group, path=()):
    """Every command path of the CLI, groups included."""
    import click
    yield list(path)
    if isinstance(group, click.Group):
        for name, command in group.commands.items():
            yield from _commands(command, path + (name,))


@pytest.mark.parametrize("command", list(_commands(main)), ids=lambda c: " ".join(c) or "sparsight")
def test_every_command_has_help_with_a_verbatim_example(runner, command):
    result = runner.invoke(main, command + ["--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and len(result.output.splitlines()) > 6
    examples = [line.strip() for line in result.output.splitlines()
                if line.startswith("    ") and line.strip().startswith(("sparsight ", "torchrun "))]
    assert examples, f"`sparsight {' '.join(command)} --help` shows no example"
    usage_name = " ".join(command)
    assert any(e.startswith(f"sparsight {usage_name}") or "-m sparsight" in e for e in examples)


def test_serve_help_keeps_the_production_command_verbatim(runner):
    result = runner.invoke(main, ["serve", "--help"], terminal_width=60)
    assert "gunicorn -w 4 -k gthread --threads 8 -b 0.0.0.0:8000 survey_app.wsgi:app" in result.output
    assert "SPARSIGHT_RUN_DIR=RUN_DIR SPARSIGHT_DATABASE_URL=postgresql+psycopg://u:pw@db/survey \\" in result.output


def test_data_synth_writes_the_dataset(runner, tmp_path):
    result = runner.invoke(main, ["data", "synth", str(tmp_path / "d"), "--train-per-class", "2",
                                  "--val-per-class", "1", "--image-size", "24", "--seed", "5"])
    assert result.exit_code == 0, result.output
    assert "wrote 20 training and 10 validation images (24 px, 10 classes)" in result.output
    assert len(list((tmp_path / "d" / "masks" / "train").rglob("*.png"))) == 20
    # again with fewer images: the earlier dataset is replaced, not mixed in
    again = runner.invoke(main, ["data", "synth", str(tmp_path / "d"), "--train-per-class", "1",
                                 "--val-per-class", "1", "--image-size", "24", "--seed", "6"])
    assert again.exit_code == 0 and "replacing the dataset there" in again.output
    assert len(list((tmp_path / "d" / "train").rglob("*.png"))) == 10
    assert len(list((tmp_path / "d" / "masks" / "train").rglob("*.png"))) == 10
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    refused = runner.invoke(main, ["data", "synth", str(tmp_path / "mine"), "--train-per-class", "1"])
    assert refused.exit_code == 2 and "holds no concept-shapes dataset" in refused.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_train_keeps_a_model_trained_with_other_settings_unless_told_to_replace_it(runner, tiny_data, tmp_path):
    """`sparsight train` into a folder that holds a model from other settings (a study's base model, which its
    pruned models and stimuli came from) stops with one line and leaves the file as it was; the same settings
    reuse it; --replace trains anew."""
    out = tmp_path / "m"
    common = ["--data", str(tiny_data), "--arch", "observer-small", "--out", str(out), "--set", "data.image_size=32",
              "--set", "study.progress=false", "--set", f'study.output_dir="{tmp_path}"']
    assert runner.invoke(main, ["train", "--epochs", "1", *common]).exit_code == 0
    before = (out / "model.pt").read_bytes()
    refused = runner.invoke(main, ["train", "--epochs", "2", *common])
    assert refused.exit_code == 2 and "already holds a model (observer-small, top-1" in refused.output
    assert "--replace" in refused.output and (out / "model.pt").read_bytes() == before
    again = runner.invoke(main, ["train", "--epochs", "1", *common])
    assert again.exit_code == 0 and (out / "model.pt").read_bytes() == before
    replaced = runner.invoke(main, ["train", "--epochs", "2", "--replace", *common])
    assert replaced.exit_code == 0 and (out / "model.pt").read_bytes() != before
    assert len(json.loads((out / "meta.json").read_text())["history"]) == 2


def test_train_then_evaluate_agree(runner, tiny_data, tmp_path):
    out = tmp_path / "m"
    result = runner.invoke(main, ["train", "--data", str(tiny_data), "--arch", "observer-small", "--epochs", "1",
                                  "--out", str(out), "--set", "data.image_size=32", "--set", "study.progress=false",
                                  "--set", f'study.output_dir="{tmp_path}"'])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "meta.json").read_text())
    for key in ("model_id", "arch", "parent", "method", "criterion", "schedule", "rate_requested", "sparsity",
                "params_total", "params_nonzero", "flops", "top1", "top5", "retrain", "robustness", "seed",
                "created", "software_version"):
        assert key in meta
    assert meta["arch"] == "observer-small" and meta["sparsity"]["total"] == 0.0
    assert not (out / "train_state.pt").exists()
    result = runner.invoke(main, ["evaluate", str(out), "--data", str(tiny_data), "--image-size", "32",
                                  "--device", "cpu", "--write-meta"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["top1"] == pytest.approx(meta["top1"]["after"])
    assert report["n"] == 60
    assert "evaluations" in json.loads((out / "meta.json").read_text())
    # without --image-size: the size it was trained at (meta.json), not the architecture's 64 px
    again = json.loads(runner.invoke(main, ["evaluate", str(out), "--data", str(tiny_data), "--device", "cpu"]).output)
    assert meta["input_size"] == again["image_size"] == 32 and again["top1"] == pytest.approx(report["top1"])
    # a study's model from before meta.json recorded the size: the size of the study it lies in
    from sparsight.config import load_study, write_study
    study = tmp_path / "study"
    write_study(load_study(None, "quick", ["data.image_size=32"]), study)
    shutil.copytree(out, study / "models" / "base")
    (study / "models" / "base" / "meta.json").write_text(json.dumps({k: v for k, v in meta.items()
                                                                     if k != "input_size"}))
    older = runner.invoke(main, ["evaluate", str(study / "models" / "base"), "--data", str(tiny_data),
                                 "--device", "cpu"])
    assert json.loads(older.output)["image_size"] == 32
    # a study's model is measured with the study's robustness settings, and its meta.json is the study's to write
    study_cfg = load_study(None, "quick", ["data.image_size=32"])
    robust = runner.invoke(main, ["evaluate", str(study / "models" / "base"), "--data", str(tiny_data),
                                  "--device", "cpu", "--robustness", "--max-images", "20"])
    settings = json.loads(robust.output)["robustness"]["settings"]
    assert (settings["severities"], settings["corruptions"]) == (study_cfg.evaluate.severities,
                                                                  study_cfg.evaluate.corruptions)
    before = (study / "models" / "base" / "meta.json").read_bytes()
    refused = runner.invoke(main, ["evaluate", str(study / "models" / "base"), "--data", str(tiny_data),
                                   "--device", "cpu", "--write-meta"])
    assert refused.exit_code == 2 and "is a model of the study" in refused.output
    assert (study / "models" / "base" / "meta.json").read_bytes() == before
    # data whose class folders differ from those it was trained on: its labels would be other classes'
    other = tmp_path / "other"
    for split in ("train", "val"):
        shutil.copytree(tiny_data / split, other / split)
        (other / split / "circle").rename(other / split / "disc")
    wrong = runner.invoke(main, ["evaluate", str(out), "--data", str(other), "--device", "cpu"])
    assert wrong.exit_code == 2 and "was trained on 10 classes" in wrong.output
    assert "the data lacks ['circle']; the data has ['disc'] it was not trained on" in wrong.output


@pytest.mark.parametrize("args, fragment", [
    (["train", "--arch", "vit"], "'vit' is not one of 'inception-small'"),
    (["run", "--set", "trian.epochs=3"], "unknown section [trian]; did you mean 'train'? valid sections:"),
    (["run", "--set", "train.optimizer=lion"], "choose from ['sgd', 'adam', 'adamw']"),
    (["evaluate", "{ckpt}", "--data", "{data}"], "is not a sparsight checkpoint"),
])
def test_bad_input_is_a_clear_usage_error(runner, tiny_data, tmp_path, args, fragment):
    ckpt = tmp_path / "x.pt"
    torch.save({"w": torch.zeros(1)}, ckpt)
    args = [a.format(ckpt=ckpt, data=tiny_data) for a in args]
    result = runner.invoke(main, args)
    assert result.exit_code != 0
    text = result.output + (str(result.exception) if result.exception else "")
    assert fragment in text


def test_unknown_force_stage_lists_stages(runner, tmp_path):
    result = runner.invoke(main, ["run", "--profile", "quick", "--force", "bogus",
                                  "--set", f'study.output_dir="{tmp_path}"'])
    assert result.exit_code != 0
    stages = ("['data', 'base', 'observer', 'prune', 'robustness', 'evaluate', 'stimuli', 'dissection', 'mis', "
              "'participants', 'analysis', 'all']")
    assert f"unknown stage 'bogus' for --force; choose from {stages}" in result.output


def test_the_run_summary_names_the_cheapest_design_per_goal_and_says_when_none_reaches_the_power(capsys):
    """Per goal and change the design with the fewest trials in all is printed (with a true minus sign);
    a goal no tried design reaches reads "more than <largest tried> participants", not nothing."""
    from analysis.cli import echo_power as _print_power

    def design(change, goal, participants, trials):
        return {"kind": "natural", "change_over_span": change, "goal": goal, "trials": trials,
                "participants": participants, "largest_tried": 640}

    power = {"target_power": 0.8,
             "model": [{"scope": "all methods", "kind": "natural", "units": 30, "models": 5,
                        "detectable_slope_per_10pct": 0.01, "ci_half_width_per_10pct": 0.007}],
             "smallest": [design(-0.1, "detect", 160, 12), design(-0.1, "detect", 40, 24),
                          design(-0.05, "detect", None, 12), design(-0.05, "detect", None, 24),
                          design(0.0, "equivalence", 320, 12), design(0.0, "equivalence", 320, 24)]}
    _print_power(power)
    line = capsys.readouterr().out.splitlines()[-1]
    assert line == ("  natural: 30 units in 5 models detect an MIS slope of 0.0100 per 10 % pruning rate (CI ±0.0070); "
                    "a human study needs 40 participants × 24 trials to detect an accuracy change of −0.1, more "
                    "than 640 participants at 24 trials to detect an accuracy change of −0.05, 320 participants × "
                    "12 trials for equivalence.")


def test_the_power_header_says_its_participant_counts_are_per_reference_kind_when_there_are_two(capsys):
    from analysis.cli import echo_power as _print_power

    model = {"scope": "all methods", "units": 30, "models": 5, "detectable_slope_per_10pct": 0.01,
             "ci_half_width_per_10pct": 0.007}
    smallest = {"change_over_span": -0.1, "goal": "detect", "trials": 12, "participants": 160, "largest_tried": 640}
    power = {"target_power": 0.8, "model": [{**model, "kind": k} for k in ("natural", "synthetic")],
             "smallest": [{**smallest, "kind": k} for k in ("natural", "synthetic")]}
    _print_power(power)
    header = capsys.readouterr().out.splitlines()[1]
    assert header == "power (80%; participants per reference kind; `sparsight power RUN_DIR` plans other designs):"
    _print_power({**power, "model": power["model"][:1], "smallest": power["smallest"][:1]})
    assert "per reference kind" not in capsys.readouterr().out
