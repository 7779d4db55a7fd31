"""Network Dissection against a brute-force reference (Python loops over images and pixels), on
constructed units (a colour detector, a concept-blind control, constant units), the probe-set
layouts, hook hygiene, and the command / study stage on a tiny study."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from pruning.data.concept_shapes import COLOURS, MASK_LAYERS
from pruning.data.folders import IMAGENET_MEAN, IMAGENET_STD
from sparsight.cli import main
from sparsight.config import ConfigError, load_study
from stimuli.dissection import MODEL_COLUMNS, UNIT_COLUMNS, ProbeLoader, dissect, resolve_targets, summarize
from stimuli.probes import ProbeError, ProbeSet
from stimuli.units import Unit
from tiny_models import assert_no_hooks

SIZE = 12                                    # input size of the tiny probe set
CONCEPTS = {"object": ["a", "b", "c"], "material": ["m1", "m2"]}
MASK_SHAPES = [(12, 12), (8, 8), (18, 18), (5, 7), (12, 12), (9, 4)]   # (h, w); masks need not match images


pytestmark = pytest.mark.usefixtures("one_thread")


class TinyNet(nn.Module):
    """Two small convs (12 px → 6 × 6 → 3 × 3 maps) and a classifier; float64, seeded."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 5, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.conv2(self.act1(self.conv1(x)))), 1))


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return TinyNet().double().eval()


def write_label_map(path: Path, labels: np.ndarray, mode: str) -> None:
    """``labels [L, h, w]`` (L = 2) as a PNG of ``mode``; RGB gets a third channel of junk to be ignored."""
    path.parent.mkdir(parents=True, exist_ok=True)
    hwc = labels.transpose(1, 2, 0)
    if mode == "RGB":
        hwc = np.concatenate([hwc, np.full(hwc.shape[:2] + (1,), 200, np.uint8)], axis=2)
    Image.fromarray(np.ascontiguousarray(hwc), mode).save(path)


@pytest.fixture
def probe_dir(tmp_path):
    """A folder probe: 6 random images (one JPEG), label maps of several sizes and modes."""
    rng = np.random.default_rng(0)
    root = tmp_path / "probe"
    (root / "images" / "sub").mkdir(parents=True)
    (root / "concepts.json").write_text(json.dumps({"mask_layers": list(CONCEPTS), "concepts": CONCEPTS}))
    for i, (h, w) in enumerate(MASK_SHAPES):
        rel = Path("sub" if i % 2 else ".") / f"img{i}"
        suffix = ".jpg" if i == 3 else ".png"
        pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(root / "images" / rel.with_suffix(suffix))
        labels = np.stack([rng.integers(0, len(CONCEPTS["object"]) + 1, (h, w)),
                           rng.integers(0, len(CONCEPTS["material"]) + 1, (h, w))]).astype(np.uint8)
        if i == 4:
            labels[1] = 0      # an image without any material label
        write_label_map(root / "masks" / rel.with_suffix(".png"), labels, "LA" if i % 2 else "RGB")
    return root


# ---- the brute-force reference -----------------------------------------------------------------
def bilinear(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """Upsample one map to (h, w): bilinear, align_corners=False, written out pixel by pixel."""
    H, W = a.shape
    out = np.empty((h, w))
    for y in range(h):
        sy = max((y + 0.5) * H / h - 0.5, 0.0)
        y0 = min(int(sy), H - 1)
        y1, ly = min(y0 + 1, H - 1), sy - y0
        for x in range(w):
            sx = max((x + 0.5) * W / w - 0.5, 0.0)
            x0 = min(int(sx), W - 1)
            x1, lx = min(x0 + 1, W - 1), sx - x0
            out[y, x] = ((1 - ly) * ((1 - lx) * a[y0, x0] + lx * a[y0, x1])
                         + ly * ((1 - lx) * a[y1, x0] + lx * a[y1, x1]))
    return out


def reference_dissection(model, root: Path, layers: list[str], quantile: float):
    """Thresholds, Σ|M ∩ L| and Σ|M ∪ L| per layer by loops over images, units, concepts and pixels; a
    concept's sums run over the images with at least one label of its mask layer (Bau et al. 2017)."""
    images = sorted((p for p in (root / "images").rglob("*") if p.is_file()),
                    key=lambda p: p.relative_to(root / "images").as_posix())
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    modules, acts = dict(model.named_modules()), {layer: [] for layer in layers}
    maps = []
    for path in images:
        x = (np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255 - mean) / std
        outs = {}
        handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: outs.__setitem__(n, o)) for n in layers]
        with torch.no_grad():
            model(torch.from_numpy(x.transpose(2, 0, 1).copy())[None])
        for h in handles:
            h.remove()
        for layer in layers:
            acts[layer].append(outs[layer][0].numpy())
        mask = root / "masks" / path.relative_to(root / "images").with_suffix(".png")
        maps.append(np.asarray(Image.open(mask)))
    concepts = [(i, j) for i, layer in enumerate(CONCEPTS) for j in range(len(CONCEPTS[layer]))]
    result = {}
    for layer in layers:
        units = acts[layer][0].shape[0]
        thresholds = np.array([np.quantile(np.concatenate([a[u].ravel() for a in acts[layer]]), quantile)
                               for u in range(units)])
        inter = np.zeros((units, len(concepts)), dtype=np.int64)
        union = np.zeros((units, len(concepts)), dtype=np.int64)
        for a, lab in zip(acts[layer], maps):
            h, w = lab.shape[:2]
            for u in range(units):
                m = bilinear(a[u], h, w) > thresholds[u]
                for c, (i, j) in enumerate(concepts):
                    if not lab[..., i].any():
                        continue                     # the image has no label of this layer
                    concept = lab[..., i] == j + 1
                    inter[u, c] += int(np.sum(m & concept))
                    union[u, c] += int(np.sum(m | concept))
        result[layer] = (thresholds, inter, union)
    return result


@pytest.mark.parametrize("quantile, batch_size, chunk", [(0.995, 64, 2 ** 24), (0.9, 2, 50), (0.5, 4, 7)])
def test_thresholds_and_iou_equal_a_brute_force_reference(tiny_net, probe_dir, quantile, batch_size, chunk):
    layers = ["act1", "conv2"]
    probe = ProbeSet.from_folder(probe_dir)
    result = dissect(tiny_net, probe, layers, image_size=SIZE, quantile=quantile, batch_size=batch_size,
                     chunk_elements=chunk)
    reference = reference_dissection(tiny_net, probe_dir, layers, quantile)
    for layer in layers:
        thresholds, inter, union = reference[layer]
        ld = result.layers[layer]
        assert ld.units == list(range(len(thresholds)))
        assert torch.allclose(ld.threshold, torch.from_numpy(thresholds), rtol=1e-12, atol=1e-12)
        assert inter.sum() > 0
        assert torch.equal(ld.intersection, torch.from_numpy(inter))
        assert torch.equal(result.union(layer), torch.from_numpy(union))
        iou = torch.from_numpy(inter / union)
        assert torch.allclose(result.iou(layer), iou, rtol=1e-12, atol=0)
    table = result.unit_table("m")
    assert list(table.columns) == UNIT_COLUMNS and len(table) == 4 + 5
    best = result.iou("conv2").max(dim=1)
    got = table[table.layer == "conv2"]
    assert np.allclose(got.iou, best.values.numpy()) and (got.interpretable == (got.iou > 0.04)).all()


def test_threshold_is_torch_quantile_of_all_positions(tiny_net, probe_dir):
    probe = ProbeSet.from_folder(probe_dir)
    result = dissect(tiny_net, probe, ["conv2"], image_size=SIZE, batch_size=4)
    loader = ProbeLoader(probe, SIZE, batch_size=64)
    images = loader.prepare(next(loader.batches(labels=False)).images, dtype=torch.float64)
    outs = {}
    handle = tiny_net.conv2.register_forward_hook(lambda m, i, o: outs.__setitem__("x", o))
    with torch.no_grad():
        tiny_net(images)
    handle.remove()
    values = outs["x"].transpose(0, 1).reshape(5, -1)
    assert torch.allclose(result.layers["conv2"].threshold, torch.quantile(values, 0.995, dim=1), rtol=1e-14)


def test_units_may_be_layers_unit_strings_or_units(tiny_net):
    targets = resolve_targets(tiny_net, ["act1", "conv2:1-2", Unit("conv2", 4)], SIZE)
    assert targets == {"act1": [0, 1, 2, 3], "conv2": [1, 2, 4]}
    with pytest.raises(ValueError, match="out of range: conv2 has 5 channels"):
        resolve_targets(tiny_net, ["conv2:5"], SIZE)


# ---- constructed units on concept-shapes -------------------------------------------------------
def colour_score_weights() -> torch.Tensor:
    """Weights on 0..255 RGB values whose score is positive for red pixels only: R − 2.2 G − 1.1 B
    (red against its neighbours orange and magenta, with room for the generator's ±18 colour jitter)."""
    return torch.tensor([1.0, -2.2, -1.1], dtype=torch.float64)


class ColourNet(nn.Module):
    """``features`` channel 0: a 1×1 conv scoring red pixels (concept-shapes colours, on the network's
    ImageNet-normalized input); channel 1: random 3×3 weights on a scrambled copy of the image
    (``sin(1000 x)``: per-pixel noise, so its activations carry no concept information)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        std = torch.tensor(IMAGENET_STD, dtype=torch.float64)
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64)
        w = colour_score_weights()
        self.colour = nn.Conv2d(3, 1, 1).double()
        self.control = nn.Conv2d(3, 1, 3, padding=1).double()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():   # pixel value v = 255 (x · std + mean)
            self.colour.weight.copy_((255 * w * std).view(1, 3, 1, 1))
            self.colour.bias.fill_(float(255 * (w * mean).sum()))
            self.control.weight.copy_(torch.randn(1, 3, 3, 3, generator=g, dtype=torch.float64))
            self.control.bias.zero_()
        self.features = nn.Identity()

    def forward(self, x):
        return self.features(torch.cat([self.colour(x), self.control(torch.sin(1000 * x))], 1))


def test_colour_score_separates_red_from_every_other_concept_shapes_colour():
    w = colour_score_weights().numpy()
    for name, rgb in COLOURS.items():
        for shade in (0.5, 1.0):   # textures scale the colour by 0.5 … 1
            score = w @ (np.array(rgb) * shade)
            assert (score > 40) if name == "red" else (score < -30), name


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_colour_detector_is_interpretable_as_red_and_the_control_unit_is_not(tiny_data, seed):
    probe = ProbeSet.from_concept_shapes(tiny_data, "val")
    result = dissect(ColourNet(seed), probe, ["features"], image_size=32, batch_size=32)
    table = result.unit_table("colour-net").set_index("unit")
    red, control = table.loc[0], table.loc[1]
    assert (red.concept, red.concept_layer, red.status) == ("red", "colour", "ok")
    assert red.interpretable and red.iou > 0.1
    assert control.status == "ok" and not control.interpretable and control.iou < 0.02
    # with the threshold at the share of red pixels, the unit's mask is nearly the red concept itself
    column = result.concepts.index(("colour", "red"))
    share = float(result.label_pixels[column]) / (len(probe) * 32 * 32)
    matched = dissect(ColourNet(seed), probe, ["features"], image_size=32, quantile=1 - share).iou("features")[0]
    runner_up = max(v for c, v in enumerate(matched.tolist()) if c != column)
    assert matched[column] > 0.7 and matched[column] > 3 * runner_up


def test_a_constant_unit_is_dead_or_pruned_and_never_interpretable(tiny_net, probe_dir):
    with torch.no_grad():
        tiny_net.conv2.weight[2].zero_()
        tiny_net.conv2.bias[2] = 0.0         # zeroed filter: constant 0
        tiny_net.conv2.weight[3].zero_()
        tiny_net.conv2.bias[3] = 0.37        # constant, not zero
    probe = ProbeSet.from_folder(probe_dir)
    for pruned, expected in ((False, "dead"), (True, "pruned")):
        result = dissect(tiny_net, probe, ["conv2"], image_size=SIZE, quantile=0.5, pruned_model=pruned)
        table = result.unit_table("m").set_index("unit")
        assert table.loc[2, "status"] == expected and table.loc[3, "status"] == "dead"
        for u in (2, 3):
            assert not table.loc[u, "interpretable"] and table.loc[u, "iou"] == 0 and table.loc[u, "concept"] == ""
            assert result.layers["conv2"].act_pixels[u] == 0
        assert table.loc[3, "threshold"] == pytest.approx(0.37)
        assert set(result.iou_table("m").unit) <= {0, 1, 4}
    summary = summarize(result.unit_table("m"))
    assert list(summary.columns) == MODEL_COLUMNS
    assert summary.loc[0, ["units", "alive", "dead", "pruned"]].tolist() == [5, 3, 1, 1]


def test_unknown_layer_lists_the_valid_ones_and_hooks_never_stay(tiny_net, probe_dir):
    probe = ProbeSet.from_folder(probe_dir)
    tiny_net.train()
    with pytest.raises(ValueError, match=r"layer 'conv9' does not exist; valid layers: \['conv1', 'act1'"):
        dissect(tiny_net, probe, ["conv9"], image_size=SIZE)
    with pytest.raises(ValueError, match=r"layer 'fc' puts out a 2-D tensor, not a map of channels"):   # in the trace
        dissect(tiny_net, probe, ["conv1", "fc"], image_size=SIZE)
    dissect(tiny_net, probe, ["conv1"], image_size=SIZE)
    assert_no_hooks(tiny_net)
    assert all(m.training for m in tiny_net.modules())


# ---- probe layouts -----------------------------------------------------------------------------
def broden_copy(data_root: Path, split: str, out: Path) -> Path:
    """The concept-shapes split rewritten as a folder probe."""
    shutil.copytree(data_root / split, out / "images")
    shutil.copytree(data_root / "masks" / split, out / "masks")
    shutil.copy(data_root / "concepts.json", out / "concepts.json")
    return out


def test_folder_probe_gives_the_same_result_as_the_concept_shapes_path(tiny_data, tmp_path):
    from pruning.models import create_model

    torch.manual_seed(0)
    model = create_model("inception-small", num_classes=10).double()
    shapes = ProbeSet.from_concept_shapes(tiny_data, "val")
    folder = ProbeSet.from_folder(broden_copy(tiny_data, "val", tmp_path / "probe"))
    assert folder.categories == MASK_LAYERS and len(folder) == len(shapes) == 60
    units = ["inception3a", "inception4a:0-15"]
    a = dissect(model, shapes, units, image_size=32, batch_size=25).unit_table("m")
    b = dissect(model, folder, units, image_size=32, batch_size=60).unit_table("m")
    pd.testing.assert_frame_equal(a, b)
    assert a.interpretable.any()


def test_probe_errors_name_the_file(tiny_data, tmp_path, tiny_net):
    root = broden_copy(tiny_data, "val", tmp_path / "probe")
    mask = next((root / "masks").rglob("*.png"))
    mask.unlink()
    with pytest.raises(ProbeError, match=str(mask)):
        ProbeSet.from_folder(root)
    with pytest.raises(ProbeError, match="does not exist"):
        ProbeSet.from_folder(tmp_path / "nowhere")
    image = root / "images" / mask.relative_to(root / "masks")
    image.unlink()                                             # the pair is gone: the set is consistent again
    broken = next((root / "images").rglob("*.png"))
    broken.write_bytes(b"not a png")
    with pytest.raises(ProbeError, match=f"cannot decode probe image {broken}"):
        dissect(tiny_net, ProbeSet.from_folder(root), ["conv1"], image_size=32)
    info = json.loads((root / "concepts.json").read_text())
    del info["concepts"]["colour"]
    (root / "concepts.json").write_text(json.dumps(info))
    with pytest.raises(ProbeError, match=f"{root / 'concepts.json'}.*'colour'"):
        ProbeSet.from_folder(root)


def test_label_values_beyond_the_concept_list_are_an_error(probe_dir, tiny_net):
    bad = probe_dir / "masks" / "img0.png"
    write_label_map(bad, np.full((2, 4, 4), 9, np.uint8), "RGB")
    with pytest.raises(ProbeError, match=f"{bad}: mask layer 'object' holds value 9"):
        dissect(tiny_net, ProbeSet.from_folder(probe_dir), ["conv1"], image_size=SIZE)


def test_max_images_takes_a_seeded_sample(tiny_data):
    probe = ProbeSet.from_concept_shapes(tiny_data, "val")
    a, b = probe.sample(10, seed=1), probe.sample(10, seed=1)
    assert len(a) == 10 and a.images == b.images and list(a.images) == sorted(a.images)
    assert probe.sample(0) is probe and probe.sample(10, seed=2).images != a.images


def test_dissection_settings_are_validated():
    cfg = load_study(overrides=["dissection.units=study", "dissection.max_images=50"])
    assert (cfg.dissection.units, cfg.dissection.max_images, cfg.dissection.split) == ("study", 50, "val")
    with pytest.raises(ConfigError, match=r"dissection.units: 'some' is not valid; choose from \['all', 'study'\]"):
        load_study(overrides=["dissection.units=some"])


# ---- the command and the study stage -----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_study(tiny_data, tmp_path_factory):
    """A base model (one epoch) and a structured-pruned child on the tiny concept-shapes data."""
    out = tmp_path_factory.mktemp("dissect")
    common = ["--set", f'study.output_dir="{out}"', "--set", 'study.name="s"', "--set", "data.image_size=32",
              "--set", "study.progress=false", "--set", 'data.source="folder"', "--set", f'data.path="{tiny_data}"',
              "--set", 'prune.methods=["structured"]', "--set", "prune.rates=[0.5]",
              "--set", 'prune.schedules=["oneshot"]', "--set", "prune.control=false", "--device", "cpu"]
    assert CliRunner().invoke(main, ["train", "--epochs", "1", *common]).exit_code == 0
    pruned = CliRunner().invoke(main, ["prune", "--method", "structured", "--rate", "0.5", "--epochs", "0",
                                       "--no-robustness", *common])
    assert pruned.exit_code == 0, pruned.output
    return out / "s", common


def test_stage_writes_tables_for_every_model_and_skips_when_current(tiny_study):
    from pruning.training import open_study
    from sparsight.study import run_study
    from stimuli.stages import DissectionStage

    run_dir, common = tiny_study
    overrides = [c for c in common[1::2] if "=" in c] + ['study.device="cpu"']
    cfg = load_study(overrides=overrides)
    logs = []
    with open_study(cfg) as study:
        run_study(study, [DissectionStage()], log=logs.append)
    units = pd.read_csv(run_dir / "dissection" / "units.csv", keep_default_na=False)
    assert list(units.columns) == UNIT_COLUMNS
    assert set(units.model_id) == {"base", "structured-oneshot-r0.50"}
    from pruning.models import create_model, get_spec
    from stimuli.units import layer_channels

    layers = get_spec("inception-small").unit_layers
    channels = layer_channels(create_model("inception-small", num_classes=10), list(layers), 32)
    assert (units.groupby("model_id").size() == sum(channels.values())).all()   # every channel of the unit layers
    assert units[units.model_id == "base"].layer.value_counts().to_dict() == channels
    assert set(units.status) <= {"ok", "dead", "pruned"} and "pruned" in set(units[units.model_id != "base"].status)
    models = pd.read_csv(run_dir / "dissection" / "models.csv").set_index("model_id")
    assert list(models.reset_index().columns) == MODEL_COLUMNS
    ok = units[units.interpretable]
    assert models.loc["base", "interpretable"] == (ok.model_id == "base").sum() > 0
    assert models.loc["base", "unique_concepts"] == ok[ok.model_id == "base"].concept.nunique()
    iou = pd.read_parquet(run_dir / "dissection" / "iou.parquet")
    assert set(iou.model_id) == {"base", "structured-oneshot-r0.50"} and (iou.iou <= 1).all()
    with open_study(cfg) as study:
        run_study(study, [DissectionStage()], log=logs.append)
    assert logs[-1] == "[dissection] up to date, skipped"


def test_dissecting_one_model_keeps_the_studys_other_models_in_the_tables(tiny_study):
    """`dissect --model base` redoes the base model; the pruned model's current part stays in the tables."""
    run_dir, common = tiny_study
    assert CliRunner().invoke(main, ["dissect", *common]).exit_code == 0
    tables = {name: run_dir / "dissection" / name for name in ("units.csv", "models.csv", "iou.parquet")}
    read = {name: (pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, keep_default_na=False))
            for name, path in tables.items()}
    assert set(read["units.csv"].model_id) == {"base", "structured-oneshot-r0.50"}
    result = CliRunner().invoke(main, ["dissect", "--model", "base", "--fresh", *common])
    assert result.exit_code == 0, result.output
    for name, path in tables.items():
        again = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, keep_default_na=False)
        pd.testing.assert_frame_equal(again, read[name])


def test_command_dissects_chosen_models_and_skips_physically_pruned_ones(tiny_study):
    run_dir, common = tiny_study
    phys = run_dir / "models" / "phys"
    shutil.copytree(run_dir / "models" / "structured-oneshot-r0.50", phys, dirs_exist_ok=True)
    meta = json.loads((phys / "meta.json").read_text())
    (phys / "meta.json").write_text(json.dumps({**meta, "model_id": "phys", "physical": True}))
    args = ["dissect", "--model", "base", "--model", "phys", *common, "--set", "dissection.units=study",
            "--set", "dissection.max_images=20", "--set", "units.units_per_layer=8", "--set", 'units.sampling="per-layer"']
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    units = pd.read_csv(run_dir / "dissection" / "units.csv", keep_default_na=False)
    assert units.groupby("model_id").size().to_dict() == {"base": 5 * 8, "phys": 5 * 8}   # units_per_layer 8
    assert set(units[units.model_id == "phys"].status) == {"skipped"}
    assert "physically pruned" in units[units.model_id == "phys"].reason.iloc[0]
    models = pd.read_csv(run_dir / "dissection" / "models.csv").set_index("model_id")
    assert models.loc["phys", "status"] == "skipped" and models.loc["base", "n_images"] == 20
    assert "phys" in result.output and "skipped" in result.output
    bad = CliRunner().invoke(main, ["dissect", "--probe", str(run_dir / "nowhere"), *common])
    assert bad.exit_code == 2 and "nowhere" in bad.output
    bad = CliRunner().invoke(main, ["dissect", "--model", "nope", *common])
    assert bad.exit_code == 2 and "has no checkpoint" in bad.output


def test_stage_without_concept_masks_warns_and_skips(tmp_path):
    from sparsight.study import Study
    from stimuli.stages import DissectionStage

    (tmp_path / "images" / "train" / "a").mkdir(parents=True)
    cfg = load_study(overrides=[f'study.output_dir="{tmp_path}"', 'data.source="folder"',
                                f'data.path="{tmp_path / "images"}"'])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert DissectionStage().run(Study(cfg)) == []
    assert any("no concept masks" in str(w.message) and "dissection.probe" in str(w.message) for w in caught)
