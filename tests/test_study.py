"""The quick study end to end, and stage skipping by content."""
import json
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from sparsight.cli import main
from sparsight.config import load_study
from sparsight.cli import pipeline_stages
from sparsight.study import fingerprint, is_current, Study


@pytest.fixture(scope="module")
def quick_run(quick_study):
    _, run_dir, output = quick_study
    return run_dir, output


@pytest.mark.slow
def test_quick_study_writes_data_models_and_resolved_config(quick_run):
    run_dir, output = quick_run
    written = tomllib.loads((run_dir / "study.toml").read_text())
    # the relative default output folder was made absolute where it entered: the working directory's runs/
    assert written["study"]["output_dir"] == str(run_dir.parent) and Path(written["study"]["output_dir"]).is_absolute()
    assert written == load_study(profile="quick", overrides=[f'study.output_dir="{run_dir.parent}"']).to_dict()
    assert len(list((run_dir / "data" / "train").rglob("*.png"))) == 10 * written["data"]["train_per_class"]
    base = json.loads((run_dir / "models" / "base" / "meta.json").read_text())
    assert base["top1"]["after"] >= 0.8
    assert (run_dir / "models" / "observer" / "model.pt").is_file()
    assert "base" in (run_dir / "evaluation.csv").read_text()
    assert "study directory:" in output


@pytest.mark.slow
def test_quick_study_prunes_with_every_method_at_three_rates_with_robustness(quick_run):
    import pandas as pd

    from pruning.methods import METHODS

    run_dir, _ = quick_run
    table = pd.read_csv(run_dir / "evaluation.csv")
    pruned = table[table["method"].notna() & (table["method"] != "")]
    assert set(pruned["method"]) == set(METHODS)
    control = pruned[pruned["method"] == "control"]        # the retrained control: nothing pruned, rate 0
    assert control["model_id"].tolist() == ["control-oneshot-r0.00"] and control["sparsity"].tolist() == [0.0]
    assert (pruned[pruned["method"] != "control"].groupby("method")["rate_requested"].nunique() >= 3).all()
    assert (pruned["sparsity"] >= pruned["rate_requested"] - 0.005).all()
    for mid in pruned["model_id"]:
        meta = json.loads((run_dir / "models" / mid / "meta.json").read_text())
        assert meta["robustness"]["corruptions"] and meta["robustness"]["noise_similarity"]["agreement"]
    potential = pd.read_csv(run_dir / "robustness" / "prune_potential.csv")
    assert set(potential["method"]) == set(METHODS) - {"control"} and "clean" in set(potential["distribution"])


@pytest.mark.slow
def test_quick_study_writes_a_stimulus_bank_for_every_model(quick_run):
    import pandas as pd

    from stimuli.bank import validate_manifest

    run_dir, _ = quick_run
    manifest = pd.read_parquet(run_dir / "stimuli" / "manifest.parquet")
    validate_manifest(manifest, run_dir / "stimuli")
    models = set(pd.read_csv(run_dir / "evaluation.csv").model_id) - {"observer"}
    status = pd.read_csv(run_dir / "stimuli" / "units.csv")
    assert set(status.model_id) == models and set(status.status) <= {"ok", "dead", "pruned"}
    # stimuli for every model with a live unit (at 90 % a method may prune away all of a model's sampled units)
    assert set(manifest.model_id) == set(status[status.status == "ok"].model_id)
    assert len(set(manifest.model_id)) >= len(models) - 3
    assert set(manifest.kind) == {"natural", "synthetic"}


def test_quick_study_scores_dissects_runs_machines_and_reports_every_model(quick_run):
    import json

    import pandas as pd

    run_dir, output = quick_run
    models = set(pd.read_csv(run_dir / "evaluation.csv").model_id) - {"observer"}
    mis = pd.read_csv(run_dir / "mis" / "units.csv")
    assert set(mis.model_id) == models and set(mis.kind) == {"natural", "synthetic"}
    ok = mis[mis.status == "ok"]
    assert ok["mis"].between(0, 1).all() and ok["mis"].notna().all() and mis[mis.status != "ok"]["mis"].isna().all()
    assert set(pd.read_csv(run_dir / "dissection" / "units.csv").model_id) == models
    machines = pd.read_csv(run_dir / "survey" / "machine_participants.csv")
    # one session per condition the survey offers: a model with a live unit, per stimulus kind (a model
    # whose sampled units were all pruned away has no trials to show)
    status = pd.read_csv(run_dir / "stimuli" / "units.csv")
    live = set(status[status.status == "ok"].model_id)
    assert len(live) >= len(models) - 3 and "base" in live
    assert sorted(machines.condition) == sorted(f"{m}|{k}" for m in live for k in ("natural", "synthetic"))
    assert (machines["trials"] > 0).all()
    results = json.loads((run_dir / "report" / "results.json").read_text())
    by_model = {m["model_id"]: m for m in results["models"]}
    assert models <= set(by_model)
    assert all({"mis_natural", "top1", "sparsity"} <= set(by_model[m]) for m in models)
    assert any(s["status"] == "ok" and s["p"] is not None for s in results["statistics"])
    for png in (run_dir / "report" / "figures").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert len(list((run_dir / "report" / "figures").glob("*.png"))) >= 4
    html = (run_dir / "report" / "index.html").read_text()
    assert html.count("data:image/png;base64,") >= 4 and "No responses exist yet" in html
    assert "MIS natur" in output and "report:" in output and "sparsight serve" in output
    power = results["power"]
    assert {r["kind"] for r in power["model"]} == {"natural", "synthetic"} and len(power["human"]) > 0
    assert all(r["detectable_slope_per_10pct"] > r["se_per_10pct"] > 0 for r in power["model"])
    assert "id='power'" in html and "id='gallery'" in html and results["gallery"]


def test_the_reports_methods_say_what_the_run_recorded(quick_run):
    """The Methods paragraphs come from the run's own records: the base network's epochs and top-1, each
    method's criterion, the retraining seeds (one per model), the unit layers, the FV steps, the corruption
    parameters, the commit."""
    import pandas as pd

    from pruning.robustness import GAUSSIAN_NOISE_SIGMA
    from sparsight.config import study_from_run_dir

    run_dir, _ = quick_run
    results = json.loads((run_dir / "report" / "results.json").read_text())
    text = {p["title"]: p["text"] for p in results["methods"]}
    assert list(text) == ["Networks and data", "Pruning and retraining", "Units and stimuli", "Network Dissection",
                          "Robustness", "Software and seeds"]
    cfg = study_from_run_dir(run_dir)
    base = json.loads((run_dir / "models" / "base" / "meta.json").read_text())
    assert f"trained from scratch for {cfg.train.epochs} epochs" in text["Networks and data"]
    assert f"validation top-1 is {base['top1']['after']:.3f}" in text["Networks and data"]
    lrp = json.loads((run_dir / "models" / "lrp-oneshot-r0.30" / "meta.json").read_text())
    assert f"lrp ({lrp['criterion']}; 30 convolutions, not conv1, conv2 and conv3)" in text["Pruning and retraining"]
    assert "unstructured-global (l1-magnitude (global); 30 convolutions and the classifier" in text[
        "Pruning and retraining"]
    assert "each model with its own seed" in text["Pruning and retraining"]
    layers = list(dict.fromkeys(pd.read_csv(run_dir / "mis" / "units.csv")["layer"]))
    assert f"the channels of {', '.join(layers[:-1])} and {layers[-1]}" in text["Units and stimuli"]
    assert f"for {cfg.stimuli.fv_steps} steps" in text["Units and stimuli"]
    import math

    from stimuli.featurevis import PAD, REFERENCE_SIZE
    size = cfg.stimuli.fv_image_size or cfg.data.image_size     # the transforms as the images had them
    assert f"scaled to {size}: pad {math.ceil(PAD * size / REFERENCE_SIZE)} px" in text["Units and stimuli"]
    assert "epoch(s)" not in text["Pruning and retraining"]
    sigma = ", ".join(f"{GAUSSIAN_NOISE_SIGMA[s - 1]:g}" for s in cfg.evaluate.severities)
    assert f"gaussian_noise (σ {sigma} at severities" in text["Robustness"]
    assert "Study seed 0" in text["Software and seeds"]
    html = (run_dir / "report" / "index.html").read_text()
    assert "id=\"methods\"" in html and "Pruning and retraining" in html


def test_the_gallery_shows_each_units_own_references(quick_run):
    """A gallery cell is the unit's max references of task 0 in rank order, each at its own size
    (reference: the manifest and the bank's image files)."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    from analysis.gallery import _references, gallery_units, tile_size

    run_dir, _ = quick_run
    manifest = pd.read_parquet(run_dir / "stimuli" / "manifest.parquet")
    chosen = gallery_units(manifest, n=3, seed=0)
    per_unit = manifest[manifest.kind == "synthetic"].groupby(["layer", "unit"]).model_id.nunique()
    assert len(chosen) == 3 and min(per_unit[u] for u in chosen) >= per_unit.drop(chosen).max()
    layer, unit = chosen[0]
    tile_px = tile_size(manifest, run_dir / "stimuli")
    cell = _references(manifest, run_dir / "stimuli", "base", "synthetic", layer, unit, 3, tile_px)
    rows = manifest[(manifest.model_id == "base") & (manifest.kind == "synthetic") & (manifest.layer == layer)
                    & (manifest.unit == unit) & (manifest.task == 0) & (manifest.role == "ref_max")].sort_values("rank")
    second = Image.open(run_dir / "stimuli" / rows.image.iloc[1]).convert("RGB")
    assert tile_px == second.size[0]                    # the quick study's stimuli are below the largest tile
    tile = np.asarray(cell)[:, tile_px + 2:2 * tile_px + 2]
    assert np.array_equal(tile, np.asarray(second))


def _covers_the_seed_paper_design(cfg):
    assert cfg.prune.rates == [0.2, 0.4, 0.6, 0.8]
    assert {"unstructured-global", "structured", "connection", "lrp"} <= set(cfg.prune.methods)
    assert set(cfg.prune.schedules) == {"oneshot", "iterative"}


def test_default_profile_covers_the_seed_papers_methods_and_schedules_with_enough_units():
    cfg = load_study(profile="default")
    assert {"unstructured-global", "structured", "connection", "lrp"} <= set(cfg.prune.methods)
    assert set(cfg.prune.schedules) == {"oneshot", "iterative"} and len(cfg.prune.rates) >= 3
    assert cfg.units.sampling == "all" and cfg.stimuli.synthetic_units >= 30
    assert cfg.study.profile == "default" and cfg.stimuli.fv_objective == "pre-relu"


def test_example_study_files_resolve_to_their_designs():
    studies = Path(__file__).resolve().parents[1] / "studies"
    default = load_study(studies / "default.toml")
    assert default.to_dict() == load_study(profile="default").to_dict()
    gnet = load_study(studies / "googlenet-imagenet.toml")
    _covers_the_seed_paper_design(gnet)
    assert (gnet.model.arch, gnet.data.source, gnet.data.image_size) == ("googlenet", "folder", 224)
    assert gnet.prune.exclude == ["conv1", "conv2", "conv3"]
    assert (gnet.prune.retrain_epochs, gnet.prune.retrain_lr, gnet.prune.retrain_gamma) == (50, 0.01, 0.9)
    # the published stimulus protocol, not the demo's smaller one
    assert (gnet.stimuli.n_tasks, gnet.stimuli.n_references, gnet.stimuli.fv_steps) == (20, 9, 512)
    assert gnet.study.profile == "paper"


@pytest.mark.slow
def test_plan_reports_current_stages_without_running_them(quick_run):
    run_dir, _ = quick_run
    args = ["run", "--profile", "quick", "--set", f'study.output_dir="{run_dir.parent}"', "--set",
            "study.progress=false", "--plan"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "[prune]" in result.output and 'name = "quick"' in result.output    # the resolved study
    names = {s.name for s in pipeline_stages()}
    states = {line.split()[0]: line.split()[1] for line in result.output.splitlines()
              if len(line.split()) > 1 and line.split()[0] in names and line.split()[1] in ("up", "runs")}
    assert set(states) == names and set(states.values()) == {"up"}
    record = run_dir / ".stages" / "mis.json"
    before = record.stat().st_mtime_ns
    forced = CliRunner().invoke(main, args + ["--force", "mis"])
    states = {line.split()[0]: line.split()[1] for line in forced.output.splitlines()
              if len(line.split()) > 1 and line.split()[0] in names and line.split()[1] in ("up", "runs")}
    assert states["mis"] == "runs" and states["base"] == "up"
    assert record.stat().st_mtime_ns == before        # nothing ran
    lines = forced.output.splitlines()
    assert lines[lines.index(next(x for x in lines if x.startswith("mis ")))+1].strip() == "(forced)"
    changed = CliRunner().invoke(main, args + ["--set", "mis.alpha=7.5", "--set", "survey.main_trials=5"])
    lines = changed.output.splitlines()
    mis_line = lines.index(next(x for x in lines if x.startswith("mis ")))
    assert lines[mis_line].split()[1] == "runs" and lines[mis_line + 1].strip() == "(changed: mis.alpha)"
    participants = lines.index(next(x for x in lines if x.startswith("participants ")))
    assert "survey.main_trials" in lines[participants + 1] and "mis.alpha" in lines[participants + 1]


@pytest.mark.slow
def test_rerun_skips_current_stages_and_detects_changed_outputs(quick_run):
    run_dir, _ = quick_run
    result = CliRunner().invoke(main, ["run", "--profile", "quick", "--set", f'study.output_dir="{run_dir.parent}"',
                                       "--set", "study.progress=false"])
    assert result.exit_code == 0, result.output
    assert result.output.count("up to date, skipped") == len(pipeline_stages())

    cfg = load_study(profile="quick", overrides=[f'study.output_dir="{run_dir.parent}"'])
    study = Study(cfg)
    stages = {s.name: s for s in pipeline_stages()}
    for name in ("data", "base", "observer"):
        study.records[name] = study.load_record(name)
    base = stages["base"]
    assert is_current(base, study, fingerprint(base, study))
    meta = run_dir / "models" / "base" / "meta.json"
    original = meta.read_text()
    meta.write_text(original.replace('"model_id"', '"model_id" ', 1))  # same existence, other content
    try:
        assert not is_current(base, study, fingerprint(base, study))
        edited = CliRunner().invoke(main, ["run", "--profile", "quick", "--set",
                                           f'study.output_dir="{run_dir.parent}"', "--plan"])
        assert "(models/base/meta.json was changed since)" in edited.output
    finally:
        meta.write_text(original)
    changed = Study(load_study(profile="quick", overrides=[f'study.output_dir="{run_dir.parent}"',
                                                          "train.epochs=2"]))
    changed.records = study.records
    assert not is_current(base, changed, fingerprint(base, changed))


def test_power_command_prints_the_planning_tables(quick_run):
    run_dir, _ = quick_run
    result = CliRunner().invoke(main, ["power", str(run_dir), "--participants", "12,48", "--trials", "6",
                                       "--change", "0,-0.1", "--simulations", "50"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "Model side" in out and "detectable_slope_per_10pct" in out and "Fewest participants" in out
    assert out.count("power_equivalence") == 1 and "assumed participant SD" in out
    bad = CliRunner().invoke(main, ["power", str(run_dir), "--participants", "2"])
    assert bad.exit_code == 2 and "at least 3 participants" in bad.output
    bad = CliRunner().invoke(main, ["power", str(run_dir), "--trials", "many"])
    assert bad.exit_code == 2 and "comma-separated list of ints" in bad.output


def _dissection_line(output: str) -> str:
    return next(line for line in output.splitlines() if line.startswith("dissection "))


def test_plan_says_dissection_skips_for_folder_data_without_masks_or_probe(tiny_data, tmp_path, monkeypatch):
    """An image folder with neither concept masks nor ``dissection.probe`` has nothing to dissect on: the plan
    says the stage skips and which setting to give, as the run's warning does; with masks, or with generated
    concept-shapes data (masks come with it), the stage runs."""
    import shutil

    monkeypatch.chdir(tmp_path)
    bare = tmp_path / "bare"
    for split in ("train", "val"):
        shutil.copytree(tiny_data / split, bare / split)
    base = ["run", "--profile", "quick", "--plan", "--set", f'study.output_dir="{tmp_path / "runs"}"']
    folder = ["--set", "data.source=folder", "--set", "data.image_size=32"]
    without = CliRunner().invoke(main, base + folder + ["--set", f"data.path={bare}"])
    line = _dissection_line(without.output)
    assert line.split()[1] == "skips", without.output
    assert "dissection.probe is empty" in without.output and str(bare) in without.output
    with_masks = CliRunner().invoke(main, base + folder + ["--set", f"data.path={tiny_data}"])
    assert _dissection_line(with_masks.output).split()[1] == "runs", with_masks.output
    generated = CliRunner().invoke(main, base)
    assert _dissection_line(generated.output).split()[1] == "runs", generated.output
    assert not (tmp_path / "runs").exists()


def test_the_observer_network_is_trained_only_when_the_mis_embeds_with_it(tmp_path, monkeypatch):
    """With another MIS embedding nothing uses the observer network (8 epochs over the data in the paper profile):
    the plan says its stage skips and why; with the observer embedding it runs."""
    monkeypatch.chdir(tmp_path)
    base = ["run", "--profile", "quick", "--plan", "--set", f'study.output_dir="{tmp_path / "runs"}"']
    pixels = CliRunner().invoke(main, base + ["--set", "mis.embedding=pixels"])
    line = next(line for line in pixels.output.splitlines() if line.startswith("observer "))
    assert line.split()[1] == "skips" and "(mis.embedding is 'pixels', so nothing uses" in pixels.output
    observer = CliRunner().invoke(main, base)
    assert next(line for line in observer.output.splitlines() if line.startswith("observer ")).split()[1] == "runs"


def test_a_missing_weights_file_is_one_problem_not_two(tmp_path, monkeypatch):
    """The missing file and the stage's own weights check describe one problem: the plan names it once."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["run", "--profile", "quick", "--plan", "--set", f"model.weights={tmp_path}/w.pt",
                                       "--set", f'study.output_dir="{tmp_path / "runs"}"'])
    assert result.exit_code == 1 and result.output.count("model.weights:") == 1, result.output
    assert f"model.weights: {tmp_path}/w.pt does not exist" in result.output


def test_plan_names_an_empty_class_folder_and_too_few_classifier_outputs(tiny_data, tmp_path, monkeypatch):
    """What the data alone shows stops the plan (exit 1) with one line each: a class folder without an image
    (torchvision's loader would stop the run only after the data stage), and ``model.num_classes`` below the
    data's class count (a label past the classifier's outputs, an IndexError in the first step)."""
    import shutil

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    for split in ("train", "val"):
        shutil.copytree(tiny_data / split, data / split)
    base = ["run", "--profile", "quick", "--plan", "--set", f'study.output_dir="{tmp_path / "runs"}"',
            "--set", "data.source=folder", "--set", "data.image_size=32", "--set", f"data.path={data}"]
    classes = sorted(p.name for p in (data / "train").iterdir())
    fewer = CliRunner().invoke(main, base + ["--set", f"model.num_classes={len(classes) - 1}"])
    assert fewer.exit_code == 1 and f"fewer outputs than the {len(classes)} class folders" in fewer.output
    assert CliRunner().invoke(main, base + ["--set", f"model.num_classes={len(classes)}"]).exit_code == 0
    for split in ("train", "val"):
        (data / split / "empty").mkdir()
    empty = CliRunner().invoke(main, base)
    assert empty.exit_code == 1 and "class folder(s) without an image file: ['empty']" in empty.output
    assert "Traceback" not in fewer.output + empty.output


@pytest.mark.slow
def test_prune_with_other_settings_does_not_replace_a_study_model(quick_run):
    """`sparsight prune RUN_DIR` with a setting of its own would overwrite one of the study's models (and leave
    its stimuli and scores describing a model that is gone): it stops, naming the setting, and touches nothing."""
    run_dir, _ = quick_run
    meta = run_dir / "models" / "structured-oneshot-r0.30" / "meta.json"
    before = meta.read_bytes()
    result = CliRunner().invoke(main, ["prune", str(run_dir), "--method", "structured", "--rate", "0.3",
                                       "--epochs", "0", "--no-robustness"])
    assert result.exit_code == 2, result.output
    assert "models/structured-oneshot-r0.30 is the study's, made with prune.retrain_epochs = 1" in result.output
    assert "--out-root" in result.output and meta.read_bytes() == before


@pytest.mark.slow
def test_a_copied_study_reuses_its_models_when_its_prune_stage_runs_again(quick_run, tmp_path):
    """The study's data lie inside it, so a copy (`cp -r`) names them by their place in the study: pruning the
    copy again with the study's settings reuses the model instead of retraining it."""
    import shutil

    run_dir, _ = quick_run
    copy = tmp_path / "moved" / "quick"
    shutil.copytree(run_dir, copy, copy_function=shutil.copyfile)
    checkpoint = copy / "models" / "structured-oneshot-r0.30" / "model.pt"
    before = checkpoint.read_bytes()
    result = CliRunner().invoke(main, ["prune", str(copy), "--method", "structured", "--rate", "0.3"])
    assert result.exit_code == 0, result.output
    assert "epoch 1/1" not in result.output and checkpoint.read_bytes() == before


def test_plan_names_weights_whose_classifier_does_not_fit_the_data(tmp_path, monkeypatch):
    """Weights trained for another number of classes (ImageNet weights on 10 concept-shapes classes) would stop
    the base stage after the data stage: the plan names them and the fix, and passes them once
    ``model.new_classifier`` is set or the file fits; it builds no model tensors to find out."""
    import torch
    from pruning.models import create_model

    monkeypatch.chdir(tmp_path)
    arch = load_study(profile="quick").model.arch
    torch.save(create_model(arch, num_classes=7).state_dict(), tmp_path / "seven.pt")
    torch.save(create_model(arch, num_classes=10).state_dict(), tmp_path / "ten.pt")
    base = ["run", "--profile", "quick", "--plan", "--set", f'study.output_dir="{tmp_path / "runs"}"']
    seven = CliRunner().invoke(main, base + ["--set", f"model.weights={tmp_path}/seven.pt"])
    assert seven.exit_code == 1 and "model.weights:" in seven.output, seven.output
    assert "the file's has 7 classes, the model's 10" in seven.output and "Traceback" not in seven.output
    fresh = CliRunner().invoke(main, base + ["--set", f"model.weights={tmp_path}/seven.pt",
                                             "--set", "model.new_classifier=true"])
    assert fresh.exit_code == 0, fresh.output
    assert CliRunner().invoke(main, base + ["--set", f"model.weights={tmp_path}/ten.pt"]).exit_code == 0
    assert not (tmp_path / "runs").exists()
