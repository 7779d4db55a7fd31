"""Unit strings and sampling, the content-addressed stimulus bank, its manifest contract, the preview."""
import hashlib
import zlib

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pruning.models import create_model
from stimuli.bank import EXTRA_COLUMNS, MANIFEST_COLUMNS, StimulusBank, validate_manifest
from stimuli.preview import HEADER, MARGIN, TITLE, task_sheet
from stimuli.units import Unit, layer_channels, parse_units, resolve_units, sample_among, sample_units
from tiny_models import assert_no_hooks


def test_parse_units_reads_single_units_and_ranges():
    assert parse_units("inception4a:3") == [Unit("inception4a", 3)]
    assert parse_units(" layer1.0.conv2:2-4 ") == [Unit("layer1.0.conv2", u) for u in (2, 3, 4)]
    for bad in ("inception4a", "inception4a:x", "4a:3", "inception4a:5-2"):
        with pytest.raises(ValueError):
            parse_units(bad)


def test_layer_channels_and_a_wrong_layer_lists_the_valid_ones():
    model = create_model("inception-small", num_classes=10)
    channels = layer_channels(model, ["inception3a", "inception4a"], 64)
    assert channels["inception3a"] == model.inception3a.out_channels
    with pytest.raises(ValueError, match=r"layer 'inception9z' does not exist; valid layers: \['conv1'"):
        layer_channels(model, ["inception9z"], 64)
    assert_no_hooks(model)
    with pytest.raises(ValueError, match=r"layer 'fc' puts out a 2-D tensor, not a map of channels"):
        layer_channels(model, ["inception3a", "fc"], 64)       # a layer that exists but has no channels
    alexnet = create_model("alexnet", num_classes=10)
    with pytest.raises(ValueError, match="an input of 32 px is too small for alexnet .*use a larger data.image_size"):
        layer_channels(alexnet, ["features.0"], 32)
    googlenet = create_model("googlenet", num_classes=10, aux_logits=True)
    with pytest.raises(ValueError, match="layer 'aux1' does not run in the model's forward pass in eval mode"):
        layer_channels(googlenet, ["aux1"], 96)
    assert_no_hooks(model)
    assert_no_hooks(alexnet)


def test_sampling_is_seeded_in_range_and_layer_independent():
    channels = {"a": 16, "b": 40, "c": 3}
    one = sample_units(channels, per_layer=5, seed=1)
    assert one == sample_units(channels, per_layer=5, seed=1) != sample_units(channels, per_layer=5, seed=2)
    assert [sum(u.layer == name for u in one) for name in channels] == [5, 5, 3]
    assert all(0 <= u.unit < channels[u.layer] for u in one)
    # a layer's sample does not depend on which other layers are sampled
    assert [u for u in one if u.layer == "b"] == sample_units({"b": 40}, per_layer=5, seed=1)
    imi = sample_units(channels, sampling="imi", per_layer=4, seed=0)
    assert len(imi) == len(set(imi)) == 12
    assert len(sample_units(channels, sampling="all")) == 59
    with pytest.raises(ValueError, match=r"unknown sampling 'some'; choose from \['per-layer', 'imi', 'all'\]"):
        sample_units(channels, sampling="some")


def test_explicit_units_are_checked_against_the_model():
    model = create_model("inception-small", num_classes=10)
    units = resolve_units(model, layers=[], explicit=["inception4a:0-2", "inception3a:1"])
    assert units == [Unit("inception3a", 1)] + [Unit("inception4a", u) for u in range(3)]
    with pytest.raises(ValueError, match="out of range"):
        resolve_units(model, layers=[], explicit=["inception4a:9999"])


def _img(value):
    return torch.full((3, 8, 8), value / 255, dtype=torch.float32)


def _task_rows(bank, model_id="m", layer="l", unit=0, n_tasks=2, k=3, kind="natural"):
    rows = []
    for t in range(n_tasks):
        for role, n in (("query_max", 1), ("query_min", 1), ("ref_max", k), ("ref_min", k)):
            for r in range(n):
                value = zlib.crc32(f'{t}{role}{r}'.encode()) % 200 + 20
                rows.append({"model_id": model_id, "layer": layer, "unit": unit, "task": t, "role": role,
                             "kind": kind, "image": bank.add_image(_img(value)), "source": f"val/c/{value}.png",
                             "activation": float(value), "rank": r + 1})
    return rows


def test_images_are_content_addressed_and_stored_once(tmp_path):
    bank = StimulusBank(tmp_path)
    a, b, c = bank.add_image(_img(10)), bank.add_image(_img(10)), bank.add_image(_img(11))
    assert a == b != c
    data = (tmp_path / a).read_bytes()
    assert a == f"images/{hashlib.sha256(data).hexdigest()}.png"
    assert Image.open(tmp_path / a).getpixel((0, 0)) == (10, 10, 10)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == sorted({a.split("/")[1], c.split("/")[1]})


def test_assembled_manifest_meets_the_contract_and_names_reveal_nothing(tmp_path):
    bank = StimulusBank(tmp_path)
    bank.write_unit("m", "natural", "l", 0, _task_rows(bank))
    bank.write_unit("m", "natural", "l", 1, [])  # a skipped (dead) unit leaves no rows
    bank.write_status("m", [{"model_id": "m", "kind": "natural", "layer": "l", "unit": 1, "status": "dead",
                             "reason": "constant activation 0"}])
    manifest_path, units_csv = bank.assemble()
    manifest = pd.read_parquet(manifest_path)
    assert list(manifest.columns) == MANIFEST_COLUMNS + EXTRA_COLUMNS and len(manifest) == 2 * (2 + 6)
    validate_manifest(manifest, tmp_path)
    assert pd.read_csv(units_csv).status.tolist() == ["dead"]
    for name in manifest.image:
        stem = name.split("/")[1].removesuffix(".png")
        assert all(word not in name for word in ("max", "min", "rank", "query", "ref"))
        assert set(stem) <= set("0123456789abcdef") and len(stem) == 64
    assert bank.is_done("m", "natural", "l", 0) and not bank.is_done("m", "synthetic", "l", 0)


@pytest.mark.parametrize("breakage, message", [
    (lambda df: df.drop(columns=["rank"]), "lacks columns"),
    (lambda df: df.assign(role=df.role.replace("ref_min", "reference")), "unknown roles"),
    (lambda df: df[~((df.role == "query_max") & (df.task == 1))], "exactly one max query"),
    (lambda df: df.drop(index=df[df.role == "ref_min"].index[:1]), "same positive number"),
    (lambda df: df.assign(image=df.image.str.replace("images/", "images/max_", n=1)), "not content-addressed"),
])
def test_manifest_validation_rejects_broken_contracts(tmp_path, breakage, message):
    bank = StimulusBank(tmp_path)
    df = pd.DataFrame(_task_rows(bank), columns=MANIFEST_COLUMNS)
    validate_manifest(df, tmp_path)
    with pytest.raises(ValueError, match=message):
        validate_manifest(breakage(df))


def test_preview_lays_out_min_left_queries_centre_max_right(tmp_path):
    bank = StimulusBank(tmp_path)
    rows = _task_rows(bank, k=9)
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    sheet, order = task_sheet(manifest, tmp_path, model_id="m", layer="l", unit=0, task=1)
    assert sorted(order) == ["query_max", "query_min"]
    assert sheet.width > 7 * 96 and sheet.height > 3 * 96
    left = sheet.getpixel((MARGIN + 5, MARGIN + HEADER + TITLE + 5))
    title_band = sheet.crop((MARGIN, 0, sheet.width // 2, MARGIN // 2 + TITLE)).convert("L")
    assert np.asarray(title_band).min() < 128                 # the sheet names what it shows
    first_min = manifest[(manifest.task == 1) & (manifest.role == "ref_min") & (manifest["rank"] == 1)].activation
    assert left == (int(first_min.iloc[0]),) * 3
    with pytest.raises(ValueError, match=r"units of l with natural stimuli: 0$"):
        task_sheet(manifest, tmp_path, model_id="m", layer="l", unit=5)
    # a unit the bank recorded as pruned says so
    pd.DataFrame([{"model_id": "m", "kind": "natural", "layer": "l", "unit": 5, "status": "pruned",
                   "reason": "every weight is masked"}]).to_csv(tmp_path / "units.csv", index=False)
    with pytest.raises(ValueError, match=r"m l:5: the unit is pruned in this model \(every weight is masked\)$"):
        task_sheet(manifest, tmp_path, model_id="m", layer="l", unit=5)


def test_preview_rows_hold_as_many_references_as_the_trial_pages_rows():
    """4 references per side: the trial page shows 3 and 1 (``survey.css``, ``GRID_COLUMNS``); so does the
    preview (a square layout would show 2 and 2)."""
    import tempfile
    from pathlib import Path

    from stimuli.preview import GAP, TILE, TRIAL_COLUMNS
    from survey_app.screen import GRID_COLUMNS

    assert TRIAL_COLUMNS == GRID_COLUMNS == 3
    with tempfile.TemporaryDirectory() as tmp:
        bank = StimulusBank(Path(tmp))
        manifest = pd.DataFrame(_task_rows(bank, k=4), columns=MANIFEST_COLUMNS)
        sheet, _ = task_sheet(manifest, Path(tmp), model_id="m", layer="l", unit=0, task=0)
    grid = 3 * TILE + 2 * GAP
    assert sheet.width == 2 * grid + TILE + 4 * MARGIN
    assert sheet.height == 2 * MARGIN + HEADER + TITLE + 2 * TILE + GAP


@pytest.mark.parametrize("where, message", [
    ({"model_id": "n"}, r"model 'n' has none; models with natural stimuli: \['m'\]$"),
    ({"layer": "k"}, r"layer 'k' has none; layers with natural stimuli: \['l'\]$"),
    ({"layer": "l2"}, r"layers with natural stimuli: \['l'\]; did you mean 'l'\?$"),
    ({"task": 9}, r"tasks of this unit: 0-1$"),
    ({"kind": "synthetic"}, r"model 'm' has none; models with synthetic stimuli: \[\]$"),
])
def test_preview_of_a_missing_task_says_what_exists_instead(tmp_path, where, message):
    manifest = pd.DataFrame(_task_rows(StimulusBank(tmp_path), k=3), columns=MANIFEST_COLUMNS)
    wanted = {"model_id": "m", "layer": "l", "unit": 0, "task": 0, "kind": "natural", **where}
    with pytest.raises(ValueError, match=message):
        task_sheet(manifest, tmp_path, **wanted)


def test_several_units_in_one_part_behave_like_one_part_each(tmp_path):
    """write_units (one file for a layer's units, a skipped unit included) against write_unit per unit."""
    one, many = StimulusBank(tmp_path / "one"), StimulusBank(tmp_path / "many")
    rows = {u: _task_rows(one, unit=u) for u in (0, 2, 5)} | {7: []}
    for u, r in rows.items():
        one.write_unit("m", "natural", "l", u, r)
    _task_rows(many)      # the same images in the second bank
    many.write_units("m", "natural", "l", rows)
    assert len(list((tmp_path / "many" / "parts" / "m" / "natural").glob("*.parquet"))) == 1
    fresh = StimulusBank(tmp_path / "many")       # a new process reads the units from the file
    for u in (0, 2, 5, 7):
        assert fresh.is_done("m", "natural", "l", u)
        pd.testing.assert_frame_equal(fresh.read_unit("m", "natural", "l", u), one.read_unit("m", "natural", "l", u),
                                      check_dtype=False)
    assert not fresh.is_done("m", "natural", "l", 1) and not fresh.is_done("m", "synthetic", "l", 0)
    fresh.drop_units("m", [Unit("l", 2)], ("natural",))
    one.drop_units("m", [Unit("l", 2)], ("natural",))
    assert not fresh.is_done("m", "natural", "l", 2) and StimulusBank(tmp_path / "many").is_done("m", "natural", "l", 5)
    fresh.keep_only("m", {"natural": [Unit("l", 0), Unit("l", 7)]})
    one.keep_only("m", {"natural": [Unit("l", 0), Unit("l", 7)]})
    again = StimulusBank(tmp_path / "many")
    assert [again.is_done("m", "natural", "l", u) for u in (0, 2, 5, 7)] == [True, False, False, True]
    a, b = (pd.read_parquet(bank.assemble()[0]) for bank in (one, again))
    pd.testing.assert_frame_equal(a, b)
    assert set(a.unit) == {0}


def test_a_sample_among_units_spreads_over_layers_as_they_allow():
    units = [Unit("a", u) for u in range(2)] + [Unit("b", u) for u in range(10)] + [Unit("c", u) for u in range(10)]
    chosen = sample_among(units, 12, seed=3)
    counts = {layer: sum(u.layer == layer for u in chosen) for layer in "abc"}
    assert counts == {"a": 2, "b": 5, "c": 5} and set(chosen) <= set(units) and chosen == sorted(set(chosen))
    assert sample_among(units, 12, seed=3) == chosen and sample_among(units, 12, seed=4) != chosen
    assert sample_among(units, 100, seed=0) == sorted(units)
    assert set(sample_among(units, 6, seed=3)) <= set(chosen)      # a smaller sample is a prefix of the turns


def test_a_channel_map_renumbers_study_units_in_a_physically_pruned_model():
    """Layer l kept the parent's channels 0, 2 and 5: unit 5 is now channel 2, unit 1 is gone; other layers keep
    their numbers."""
    from stimuli.units import ChannelMap, Unit

    channel = ChannelMap({"l": [0, 2, 5]})
    assert [channel(Unit("l", u)) for u in (0, 1, 2, 5)] == [0, None, 1, 2]
    assert channel(Unit("m", 3)) == 3
    assert channel.for_layers(["m"]) is None and channel.for_layers(["l"]) == {"l": [0, 2, 5]}
