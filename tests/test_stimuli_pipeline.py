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
    stim = common + ["--set", "stimuli.n_tasks=2", "--set", "stimuli.n_references=2", "--set", "stimuli.fv_steps=4",
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
    bad = CliRunner().invoke(main, ["stimuli", "--preview", "base:inception4a:99", *stim])
    assert bad.exit_code == 2 and "units with stimuli" in bad.output


def test_stimuli_command_rejects_unknown_layers_and_models(run):
    _, _, stim = run
    bad_layer = CliRunner().invoke(main, ["stimuli", "--model", "base", "--unit", "inception9z:0", *stim])
    assert bad_layer.exit_code == 2 and "valid layers" in bad_layer.output
    bad_model = CliRunner().invoke(main, ["stimuli", "--model", "nope", "--unit", "inception4a:0", *stim])
    assert bad_model.exit_code == 2 and "has no checkpoint" in bad_model.output
