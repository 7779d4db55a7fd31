"""Stimuli end to end on a tiny trained model: bank, manifest, dead units, resume, preview, the command."""
import pandas as pd
import pytest
from click.testing import CliRunner

from sparsight.cli import main
from stimuli.bank import validate_manifest


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("stim")
    common = ["--set", f'study.output_dir="{out}"', "--set", 'study.name="s"', "--set", "data.image_size=32",
              "--set", "study.progress=false", "--set", 'data.source="folder"', "--set", f'data.path="{tiny_data}"',
              "--device", "cpu"]
    assert CliRunner().invoke(main, ["train", "--epochs", "1", *common]).exit_code == 0
    pruned = CliRunner().invoke(main, ["prune", "--method", "structured", "--rate", "0.5", "--epochs", "0",
                                       "--no-robustness", *common])
    assert pruned.exit_code == 0, pruned.output
    stim = common + ["--set", "stimuli.synthetic_units=0", "--set", "stimuli.n_tasks=2", "--set", "stimuli.n_references=2", "--set", "stimuli.fv_steps=4",
                     "--set", "stimuli.fv_batch_units=4"]
    args = ["stimuli", "--model", "base", "--model", "structured-oneshot-r0.50", "--unit", "inception4a:0-5", *stim]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return out / "s", args, stim


def test_bank_holds_natural_and_synthetic_tasks_for_every_live_unit(run):
    run_dir, _, _ = run
    manifest = pd.read_parquet(run_dir / "stimuli" / "manifest.parquet")
    validate_manifest(manifest, run_dir / "stimuli")
    status = pd.read_csv(run_dir / "stimuli" / "units.csv")
    base_ok = status[(status.model_id == "base") & (status.status == "ok")]
    assert len(base_ok) == 2 * 6  # six units, two kinds
    for kind in ("natural", "synthetic"):
        got = manifest[(manifest.model_id == "base") & (manifest.kind == kind)]
        assert sorted(got.unit.unique()) == sorted(base_ok[base_ok.kind == kind].unit)
        assert set(got.task) == {0, 1}
    nat = manifest[(manifest.model_id == "base") & (manifest.kind == "natural")]
    for _, task in nat.groupby(["unit", "task"]):
        acts = task.set_index("role").activation
        assert acts["query_max"] > acts["query_min"]
        assert task[task.role == "query_max"]["rank"].iloc[0] > task[task.role == "ref_max"]["rank"].max()
    syn = manifest[manifest.kind == "synthetic"]
    assert syn[syn.role.str.startswith("ref")].source.str.startswith("fv:").all()
    assert not syn[syn.role.str.startswith("query")].source.str.startswith("fv:").any()
    # the synthetic condition keeps the natural queries of the same task
    key = ["model_id", "layer", "unit", "task", "role"]
    q = manifest[manifest.role.str.startswith("query")]
    paired = q[q.kind == "natural"].merge(q[q.kind == "synthetic"], on=key)
    assert len(paired) and (paired.image_x == paired.image_y).all()


def test_pruned_away_units_are_recorded_not_dropped(run):
    run_dir, _, _ = run
    status = pd.read_csv(run_dir / "stimuli" / "units.csv")
    pruned = status[status.model_id == "structured-oneshot-r0.50"]
    assert len(pruned) == 2 * 6 and "pruned" in set(pruned.status)
    manifest = pd.read_parquet(run_dir / "stimuli" / "manifest.parquet")
    gone = pruned[pruned.status == "pruned"].unit
    assert not manifest[(manifest.model_id == "structured-oneshot-r0.50") & manifest.unit.isin(gone)].shape[0]


def test_rerun_skips_finished_units_and_preview_draws_a_task(run):
    run_dir, args, stim = run
    parts = sorted((run_dir / "stimuli" / "parts").rglob("*__*.parquet"))
    stamps = [p.stat().st_mtime_ns for p in parts]
    assert CliRunner().invoke(main, args).exit_code == 0
    assert [p.stat().st_mtime_ns for p in parts] == stamps
    out = run_dir / "preview.png"
    result = CliRunner().invoke(main, ["stimuli", "--preview", "base:inception4a:0", "--task", "1", "--kind",
                                       "synthetic", "--out", str(out), *stim])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 0 and "query_max" in result.output
    for kind in ("natural", "synthetic"):                     # each kind has its own default file
        assert CliRunner().invoke(main, ["stimuli", "--preview", "base:inception4a:0", "--kind", kind,
                                         *stim]).exit_code == 0
    made = sorted(p.name for p in (run_dir / "stimuli").glob("preview-*.png"))
    assert made == ["preview-base-inception4a-0-0-natural.png", "preview-base-inception4a-0-0-synthetic.png"]
    bad = CliRunner().invoke(main, ["stimuli", "--preview", "base:inception4a:99", *stim])
    assert bad.exit_code == 2 and "units of inception4a with natural stimuli: 0-" in bad.output


def test_stimuli_command_rejects_unknown_layers_and_models(run):
    _, _, stim = run
    bad_layer = CliRunner().invoke(main, ["stimuli", "--model", "base", "--unit", "inception9z:0", *stim])
    assert bad_layer.exit_code == 2 and "valid layers" in bad_layer.output
    bad_model = CliRunner().invoke(main, ["stimuli", "--model", "nope", "--unit", "inception4a:0", *stim])
    assert bad_model.exit_code == 2 and "has no checkpoint" in bad_model.output


def test_visualizations_for_a_sample_alive_in_every_model_exemplars_for_all(run, tmp_path):
    """stimuli.synthetic_units: the same units get visualizations in every model, each alive in all of
    them; every unit keeps its natural exemplars (reference: the status rows of the natural kind)."""
    import shutil

    run_dir, _, stim = run
    copy = tmp_path / "s"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("stimuli"))
    args = ["stimuli", str(copy), *stim[4:],     # the fixture's settings but its output folder and name
            "--set", "stimuli.synthetic_units=7", "--set", 'units.sampling="per-layer"',
            "--set", "units.units_per_layer=6", "--set", 'stimuli.models=["base", "structured-oneshot-r0.50"]']
    shutil.rmtree(copy / "models" / "structured-iterative-r0.50", ignore_errors=True)   # another test's model
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    status = pd.read_csv(copy / "stimuli" / "units.csv")
    natural = status[status.kind == "natural"]
    assert natural.groupby("model_id").size().tolist() == [30, 30]      # 6 units × 5 layers, both models
    live = natural[natural.status == "ok"].groupby(["layer", "unit"]).model_id.nunique()
    alive_everywhere = set(live[live == 2].index)
    synthetic = status[status.kind == "synthetic"]
    per_model = [set(zip(g.layer, g.unit)) for _, g in synthetic.groupby("model_id")]
    assert len(per_model) == 2 and per_model[0] == per_model[1] and per_model[0] <= alive_everywhere
    assert len(per_model[0]) == min(7, len(alive_everywhere))
    manifest = pd.read_parquet(copy / "stimuli" / "manifest.parquet")
    shown = manifest.groupby("kind").apply(lambda g: set(zip(g.model_id, g.layer, g.unit)), include_groups=False)
    assert shown["synthetic"] == {(m, la, u) for m in ("base", "structured-oneshot-r0.50") for la, u in per_model[0]}
    assert shown["natural"] == set(zip(*natural[natural.status == "ok"][["model_id", "layer", "unit"]].T.values))


def test_every_fv_option_of_a_study_reaches_the_renderer():
    """Each `stimuli.fv_*` option, set away from its default, arrives in the FeatureVisSettings the stage renders with."""
    import dataclasses

    from sparsight.config import StudyConfig, apply_settings
    from stimuli.featurevis import FeatureVisSettings
    from stimuli.pipeline import StimuliSettings, _visualization_settings

    changed = {"fv_steps": 7, "fv_lr": 0.3, "fv_image_size": 40, "fv_diversity": 2.5, "fv_objective": "post-relu",
               "fv_redirect_steps": 3, "fv_patience": 5, "fv_tolerance": 0.2, "fv_rescue_steps": 11}
    options = {f.name for f in dataclasses.fields(StudyConfig().stimuli) if f.name.startswith("fv_")}
    assert options - {"fv_batch_units"} == set(changed), "a new fv_ option needs a line in this test"
    cfg = apply_settings(StudyConfig(), {"stimuli": changed})
    fv = _visualization_settings(StimuliSettings.from_config(cfg))
    for option, value in changed.items():
        assert getattr(fv, option.removeprefix("fv_")) == value, option
    assert set(changed) <= {"fv_" + f.name for f in dataclasses.fields(FeatureVisSettings)}


def test_a_pass_for_a_few_units_leaves_the_full_pass_in_place(tiny_data, tmp_path):
    """`sparsight stimuli --unit` mines its few units with a state of its own: the study's next full pass reads
    its finished state back instead of mining the split again; a state file of the earlier one-per-model name
    is taken over."""
    import torch

    from pruning.models import create_model
    from stimuli.pipeline import StimuliSettings, live_units
    from stimuli.units import Unit

    torch.manual_seed(0)
    model = create_model("inception-small", num_classes=10, width=0.5).eval()
    settings = StimuliSettings(kinds=("natural",), n_tasks=2, n_references=2, image_size=32, batch_size=16)
    every = [Unit(layer, u) for layer in ("inception3a", "inception4a") for u in range(4)]
    calls = [0]
    handle = model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        live_units(model, "m", every, tiny_data, settings, work_dir=tmp_path)
        mined, (full,) = calls[0], list(tmp_path.glob("m.*.state.pt"))
        live_units(model, "m", every[:1], tiny_data, settings, work_dir=tmp_path)        # a few units
        assert calls[0] == 2 * mined and len(list(tmp_path.glob("m.*.state.pt"))) == 2
        live_units(model, "m", every, tiny_data, settings, work_dir=tmp_path)
        assert calls[0] == 2 * mined                       # read back, not mined again
        full.rename(tmp_path / "m.state.pt")              # the earlier naming: one file per model
        live_units(model, "m", every, tiny_data, settings, work_dir=tmp_path)
        assert calls[0] == 2 * mined and full.is_file() and not (tmp_path / "m.state.pt").exists()
    finally:
        handle.remove()
