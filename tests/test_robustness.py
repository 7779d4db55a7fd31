import colorsys
import io
import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision import transforms

from pruning import robustness as rb
from pruning.data.folders import IMAGENET_MEAN, IMAGENET_STD, make_loader
from pruning.models import create_model
from pruning.training import evaluate
from sparsight import config as sconfig


pytestmark = pytest.mark.usefixtures("one_thread")


def smooth_images(n=3, size=64, seed=0):
    """Smooth random sinusoid mixtures in [0, 1], quantized to uint8 levels (natural-ish images)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = torch.zeros(n, 3, size, size)
    for _ in range(4):
        f = torch.rand(n, 3, 2, generator=g) * 8
        phase = torch.rand(n, 3, 1, 1, generator=g) * 6.28
        out += torch.sin(f[..., 0, None, None] * xx * 3.14 + f[..., 1, None, None] * yy * 3 + phase)
    return rb.to_uint8(out / 8 + 0.5).float() / 255


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def val_loader(root, batch_size=16):
    return make_loader(root, "val", image_size=32, batch_size=batch_size, train=False)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return create_model("inception-small", num_classes=10, width=0.5).eval()


# ---- corruptions -----------------------------------------------------------------------
def test_registry_covers_the_config_names():
    assert set(rb.CORRUPTIONS) == set(sconfig.CORRUPTIONS)


@pytest.mark.parametrize("name", sorted(rb.CORRUPTIONS))
def test_corruption_keeps_shape_and_range_and_is_seeded(name):
    x = torch.rand(2, 3, 20, 24, generator=gen(5))
    before = x.clone()
    for severity in rb.SEVERITIES:
        a = rb.corrupt(x, name, severity, gen(1))
        b = rb.corrupt(x, name, severity, gen(1))
        assert a.shape == x.shape and a.dtype == x.dtype
        assert float(a.min()) >= 0 and float(a.max()) <= 1
        assert torch.equal(a, b)
    assert not torch.equal(a, x)  # severity 5 changes the image
    assert torch.equal(x, before)  # input untouched
    if name in ("gaussian_noise", "shot_noise"):
        assert not torch.equal(rb.corrupt(x, name, 3, gen(1)), rb.corrupt(x, name, 3, gen(2)))
    assert torch.equal(rb.corrupt(x, name, 2), rb.corrupt(x, name, 2))  # default generator is seeded


@pytest.mark.parametrize("name", sorted(rb.CORRUPTIONS))
def test_distortion_grows_with_severity(name):
    x = smooth_images(size=96)
    diffs = [float((rb.corrupt(x, name, s, gen(0)) - x).abs().mean()) for s in rb.SEVERITIES]
    assert diffs[0] > 0
    assert all(a < b for a, b in zip(diffs, diffs[1:])), diffs


def test_unknown_corruption_and_bad_severity_are_explained():
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="unknown corruption 'fog'; choose from") as err:
        rb.corrupt(x, "fog", 1)
    assert all(name in str(err.value) for name in sconfig.CORRUPTIONS)
    for bad in (0, 6, "3", 2.0, True):
        with pytest.raises(ValueError, match=r"choose from \[1, 2, 3, 4, 5\]"):
            rb.corrupt(x, "contrast", bad)
    with pytest.raises(ValueError, match="N×3×H×W"):
        rb.corrupt(torch.rand(3, 8, 8), "contrast", 1)
    loader = [type("B", (), {"images": torch.zeros(1, 3, 8, 8), "targets": torch.zeros(1, dtype=torch.long)})]
    with pytest.raises(ValueError, match="unknown corruption 'snow'"):
        rb.corruption_accuracy(torch.nn.Conv2d(3, 2, 8), loader, ["snow"], [1], device="cpu")


def test_jpeg_matches_an_independent_encoder_and_compresses_harder_with_severity():
    """Reference: torchvision's own libjpeg-turbo build (deprecated API, hence skipped once removed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        tvio = pytest.importorskip("torchvision.io")
        if not hasattr(tvio, "encode_jpeg"):
            pytest.skip("torchvision.io.encode_jpeg is gone")
        x = torch.cat([smooth_images(2, 40), torch.rand(1, 3, 40, 40, generator=gen(3))])
        for severity in (1, 5):
            quality = rb.JPEG_QUALITY[severity - 1]
            ref = torch.stack([tvio.decode_jpeg(tvio.encode_jpeg(img, quality=quality)) for img in rb.to_uint8(x)])
            out = rb.corrupt(x, "jpeg", severity)
            assert float((out - ref.float() / 255).abs().mean()) < 0.5 / 255
            assert float((out - ref.float() / 255).abs().max()) <= 8 / 255
    sizes = []
    for quality in rb.JPEG_QUALITY:
        buf = io.BytesIO()
        Image.fromarray(rb.to_uint8(x[0]).permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=quality)
        sizes.append(len(buf.getvalue()))
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 5


def test_pixelate_equals_pillow_box_resize():
    x = torch.cat([smooth_images(2, 37), torch.rand(1, 3, 37, 37, generator=gen(4))])
    for severity in rb.SEVERITIES:
        factor = rb.PIXELATE_FACTOR[severity - 1]
        ref = []
        for img in rb.to_uint8(x):
            im = Image.fromarray(img.permute(1, 2, 0).numpy())
            small = im.resize((int(37 * factor), int(37 * factor)), Image.BOX)
            ref.append(torch.from_numpy(np.array(small.resize((37, 37), Image.BOX))).permute(2, 0, 1))
        ref = torch.stack(ref).float() / 255
        # Pillow rounds to uint8 after each pass; we stay in float
        assert float((rb.corrupt(x, "pixelate", severity) - ref).abs().max()) <= 1.5 / 255


@pytest.mark.parametrize("size,severity", [(40, 5), (30, 3), (224, 1)])
def test_gaussian_blur_equals_direct_2d_convolution(size, severity):
    x = torch.rand(2, 3, size, size, generator=gen(size), dtype=torch.float64)
    sigma = rb.BLUR_SIGMA_AT_224[severity - 1] * size / 224
    r = max(1, math.ceil(4 * sigma))
    t = np.arange(-r, r + 1)
    k1 = np.exp(-t ** 2 / (2 * sigma ** 2))
    k2 = np.outer(k1, k1) / np.outer(k1, k1).sum()
    img = x.numpy()
    padded = np.pad(img, ((0, 0), (0, 0), (r, r), (r, r)), mode="edge")      # skimage's mode='nearest'
    ref = np.zeros_like(img)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            ref += k2[dy, dx] * padded[:, :, dy:dy + size, dx:dx + size]
    out = rb.corrupt(x, "gaussian_blur", severity)
    np.testing.assert_allclose(out.numpy(), np.clip(ref, 0, 1), atol=1e-9)


def test_gaussian_blur_equals_imagenet_c_s_skimage_filter_at_its_edges():
    """ImageNet-C blurs with ``skimage.filters.gaussian`` (scipy's ``gaussian_filter``, mode 'nearest',
    truncate 4): the same values, borders included, at 224 px and severity 1 (σ = 1)."""
    from scipy.ndimage import gaussian_filter

    x = torch.rand(1, 3, 224, 224, generator=gen(11), dtype=torch.float64)
    ref = np.stack([gaussian_filter(x[0, c].numpy(), sigma=1.0, mode="nearest", truncate=4.0) for c in range(3)])
    np.testing.assert_allclose(rb.corrupt(x, "gaussian_blur", 1)[0].numpy(), np.clip(ref, 0, 1), atol=1e-9)


def test_brightness_equals_an_hsv_round_trip():
    x = torch.rand(2, 3, 5, 6, generator=gen(7))
    x[0, :, 0, 0] = 0.0  # black
    x[0, :, 0, 1] = 0.4  # grey
    x[1, :, 2, 3] = torch.tensor([0.95, 0.2, 0.1])  # saturates
    for severity in (1, 4):
        out = rb.corrupt(x, "brightness", severity)
        shift = rb.BRIGHTNESS_SHIFT[severity - 1]
        for n in range(2):
            for i in range(5):
                for j in range(6):
                    h, s, v = colorsys.rgb_to_hsv(*x[n, :, i, j].tolist())
                    expected = colorsys.hsv_to_rgb(h, s, min(v + shift, 1.0))
                    assert out[n, :, i, j].tolist() == pytest.approx(expected, abs=1e-6)


def test_contrast_noise_and_shot_noise_follow_their_tables():
    x = smooth_images(2, 48)
    out = rb.corrupt(x, "contrast", 2)
    for n in range(len(x)):   # ImageNet-C's formula on an HWC array: each channel blends towards its own mean
        img = x[n].permute(1, 2, 0).double().numpy()
        means = np.mean(img, axis=(0, 1), keepdims=True)
        expected = np.clip((img - means) * rb.CONTRAST_FACTOR[1] + means, 0, 1)
        np.testing.assert_allclose(out[n].permute(1, 2, 0).numpy(), expected, atol=1e-6)
    grey = torch.full((4, 3, 64, 64), 0.5)
    noisy = rb.corrupt(grey, "gaussian_noise", 2, gen(0))
    assert float((noisy - grey).std()) == pytest.approx(rb.GAUSSIAN_NOISE_SIGMA[1], rel=0.03)
    assert float(noisy.mean()) == pytest.approx(0.5, abs=0.005)
    lam = rb.SHOT_NOISE_PHOTONS[0]
    shot = rb.corrupt(torch.full((4, 3, 64, 64), 0.3), "shot_noise", 1, gen(0))
    assert float(shot.mean()) == pytest.approx(0.3, abs=0.005)
    assert float(shot.var()) == pytest.approx(0.3 / lam, rel=0.05)  # Poisson: var = mean


def test_normalize_matches_torchvision_and_round_trips():
    x = torch.rand(2, 3, 8, 8, generator=gen(0))
    torch.testing.assert_close(rb.normalize(x), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)(x))
    torch.testing.assert_close(rb.denormalize(rb.normalize(x)), x)


# ---- accuracy and noise similarity on a model -------------------------------------------
def test_clean_accuracy_equals_evaluate_and_corruptions_are_computed_as_stated(tiny_data):
    loader = val_loader(tiny_data)
    model = tiny_model().train()
    result = rb.corruption_accuracy(model, loader, ["contrast", "gaussian_noise"], [1, 4], device="cpu")
    assert model.training  # restored
    reference = evaluate(model, loader)
    assert result["n"] == reference["n"] == 60
    assert result["clean"] == pytest.approx(reference["top1"])
    assert set(result["corruptions"]) == {"contrast", "gaussian_noise"}
    assert set(result["corruptions"]["contrast"]) == {"1", "4"}
    assert sorted(result["correct"]) == ["clean", "contrast:1", "contrast:4", "gaussian_noise:1", "gaussian_noise:4"]
    for key, flags in result["correct"].items():
        assert len(flags) == 60 and rb.unpack_bits(rb.pack_bits(flags), 60).tolist() == flags.tolist()
    # contrast is deterministic: recompute directly over the whole set
    model.eval()
    xs = torch.cat([b.images for b in loader])
    ys = torch.cat([b.targets for b in loader])
    with torch.no_grad():
        direct = rb.normalize(rb.corrupt(rb.denormalize(xs).clamp(0, 1), "contrast", 4))
        per_image = (model(direct).argmax(1) == ys).numpy()
    assert result["corruptions"]["contrast"]["4"] == pytest.approx(per_image.mean())
    assert result["correct"]["contrast:4"].tolist() == per_image.tolist()   # image by image, in loader order


def test_corruption_accuracy_is_seeded_independent_of_other_corruptions_and_respects_max_images(tiny_data):
    loader = val_loader(tiny_data)
    model = tiny_model()
    both = rb.corruption_accuracy(model, loader, ["gaussian_noise", "shot_noise"], [5], device="cpu", seed=3)
    alone = rb.corruption_accuracy(model, loader, ["shot_noise"], [5], device="cpu", seed=3)
    assert alone["corruptions"]["shot_noise"] == both["corruptions"]["shot_noise"]
    few = rb.corruption_accuracy(model, loader, [], [], device="cpu", max_images=25)
    assert few["n"] == 25 and few["corruptions"] == {}
    xs = torch.cat([b.images for b in loader])[:25]
    ys = torch.cat([b.targets for b in loader])[:25]
    with torch.no_grad():
        assert few["clean"] == pytest.approx(float((model(xs).argmax(1) == ys).float().mean()))


def test_noise_similarity_with_itself_is_one_and_at_zero_equals_plain_agreement(tiny_data):
    loader = val_loader(tiny_data)
    model, other = tiny_model(0), tiny_model(1)
    same = rb.noise_similarity(model, model, loader, levels=4, eps_max=0.6, device="cpu")
    assert same["eps"] == pytest.approx([0.0, 0.2, 0.4, 0.6])
    assert same["agreement"] == [1.0] * 4 and same["n"] == 60
    diff = rb.noise_similarity(other, model, loader, levels=3, eps_max=0.7, device="cpu", max_images=40)
    xs = torch.cat([b.images for b in loader])[:40]
    with torch.no_grad():
        plain = float((other(xs).argmax(1) == model(xs).argmax(1)).float().mean())
    assert diff["n"] == 40
    assert diff["agreement"][0] == pytest.approx(plain)
    assert diff["eps"] == pytest.approx(torch.linspace(0, 0.7, 3).tolist())


def test_robustness_shared_out_over_ranks_equals_one_process(tiny_data):
    """Three ranks each take every third batch (noise seeded by the batch's index in the whole pass) and
    sum their counts: the report equals the single-process one, ``max_images`` cutting a batch included."""
    import copy

    from thread_ranks import ThreadRanks

    loader = val_loader(tiny_data, batch_size=8)
    model, parent = tiny_model(0), tiny_model(1)
    section = {"corruptions": ["gaussian_noise", "contrast"], "severities": [1, 5], "max_images": 45,
               "noise_levels": 3, "noise_eps_max": 0.5}
    alone = rb.robustness_report(model, parent, loader, section, device="cpu", seed=4)
    reports, errors = ThreadRanks(3).run(lambda ctx: rb.robustness_report(
        copy.deepcopy(model), copy.deepcopy(parent), loader, section, device="cpu", seed=4,
        shard=(ctx.rank, ctx.world_size), reduce=ctx.all_reduce_sum))
    assert errors == [None] * 3
    assert alone["n"] == 45 and sum(alone["images_per_class"].values()) == 45
    for report in reports:
        assert report["n"] == alone["n"] and report["images_per_class"] == alone["images_per_class"]
        # the same counts over the same n: the same floats
        assert (report["clean"], report["corruptions"]) == (alone["clean"], alone["corruptions"])
        assert report["noise_similarity"] == alone["noise_similarity"]
        assert report["correct"] == alone["correct"]        # every image's result, in one order
    assert len(rb.unpack_bits(alone["correct"]["contrast:5"], 45)) == 45


class Recorder(torch.nn.Module):
    """Logits = per-channel means; remembers every input it saw."""

    def __init__(self):
        super().__init__()
        self.seen = []
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        self.seen.append(x.clone())
        return x.mean(dim=(2, 3))


def test_noise_similarity_feeds_both_models_the_same_bounded_noise():
    x = torch.randn(64, 3, 6, 6, generator=gen(0))
    loader = [rb_batch(x[:40]), rb_batch(x[:0]), rb_batch(x[40:])]
    a, b = Recorder(), Recorder()
    out = rb.noise_similarity(a, b, loader, levels=3, eps_max=0.5, device="cpu")
    assert out["agreement"] == [1.0, 1.0, 1.0] and out["n"] == 64
    assert len(a.seen) == 6  # 2 non-empty batches × 3 levels
    for seen_a, seen_b in zip(a.seen, b.seen):
        assert torch.equal(seen_a, seen_b)
    clean = torch.cat([a.seen[0], a.seen[3]])
    for level, eps in enumerate(out["eps"]):
        noisy = torch.cat([a.seen[level], a.seen[3 + level]])
        delta = (noisy - clean).abs()
        assert float(delta.max()) <= eps + 1e-6
        if eps > 0:
            assert float(delta.max()) > 0.95 * eps
            assert float(delta.mean()) == pytest.approx(eps / 2, rel=0.1)  # |2ε(U − ½)| has mean ε/2


def rb_batch(images):
    from pruning.data.folders import Batch

    return Batch(images, torch.zeros(len(images), dtype=torch.long))


def test_robustness_report_is_json_ready_and_records_its_settings(tiny_data):
    loader = val_loader(tiny_data, batch_size=32)
    section = sconfig.EvaluateSection(corruptions=["pixelate", "jpeg"], severities=[2], noise_levels=3,
                                      noise_eps_max=0.4, max_images=20)
    model, parent = tiny_model(0), tiny_model(1)
    report = rb.robustness_report(model, parent, loader, section, device="cpu", seed=1)
    assert json.loads(json.dumps(report)) == report
    assert report["n"] == 20 and report["noise_similarity"]["n"] == 20
    assert report["settings"] == {"corruptions": ["pixelate", "jpeg"], "severities": [2], "max_images": 20,
                                  "seed": 1, "noise_levels": 3, "noise_eps_max": 0.4}
    assert report["noise_similarity"]["eps"] == pytest.approx([0.0, 0.2, 0.4])
    assert set(report["corruptions"]) == {"pixelate", "jpeg"}
    alone = rb.robustness_report(parent, None, loader, section, device="cpu")
    assert "noise_similarity" not in alone


def test_an_empty_loader_gives_json_nulls_that_the_tables_skip():
    empty = [rb_batch(torch.zeros(0, 3, 8, 8))]
    section = {"corruptions": ["contrast"], "severities": [np.int64(3)], "max_images": 0, "noise_levels": 2,
               "noise_eps_max": 0.1}
    report = rb.robustness_report(Recorder(), Recorder(), empty, section, device="cpu")
    assert report["clean"] is None and report["corruptions"] == {"contrast": {"3": None}} and report["n"] == 0
    assert report["noise_similarity"]["agreement"] == [None, None]
    json.dumps(report, allow_nan=False)
    m = meta("w", "weight", "oneshot", 0.5, 0.0, {})
    m["robustness"] = report
    base = meta("base", None, None, 0.0, 0.9, {"contrast": {"3": 0.5}})
    assert rb.accuracy_table([base, m]).model_id.tolist() == ["base", "base"]
    assert rb.prune_potential([base, m]).empty
    assert rb.noise_table([base, m]).agreement.isna().all()


# ---- study tables ----------------------------------------------------------------------
def meta(model_id, method, schedule, rate, clean, corruptions, noise=None):
    rob = {"clean": clean, "corruptions": corruptions, "n": 100}
    if noise:
        rob["noise_similarity"] = noise
    return {"model_id": model_id, "arch": "inception-small", "parent": None if not method else "abc",
            "method": method, "schedule": schedule, "rate_requested": rate, "sparsity": {"total": rate * 0.9},
            "top1": {"before": None, "after": clean}, "robustness": rob}


@pytest.fixture
def metas():
    noise = {"eps": [0.0, 0.35, 0.7], "agreement": [0.9, 0.8, 0.5], "n": 100}
    return [
        meta("base", None, None, 0.0, 0.90, {"gaussian_noise": {"1": 0.70, "3": 0.50}, "contrast": {"1": 0.80}}),
        meta("w30", "weight", "oneshot", 0.3, 0.90, {"gaussian_noise": {"1": 0.69, "3": 0.50},
                                                    "contrast": {"1": 0.80}}, noise),
        meta("w60", "weight", "oneshot", 0.6, 0.897, {"gaussian_noise": {"1": 0.66, "3": 0.48},
                                                     "contrast": {"1": 0.797}}, noise),
        meta("w90", "weight", "oneshot", 0.9, 0.80, {"gaussian_noise": {"1": 0.60, "3": 0.40},
                                                    "contrast": {"1": 0.79}}),
        meta("r30", "random", "iterative", 0.3, 0.85, {"gaussian_noise": {"1": 0.70, "3": 0.50},
                                                      "contrast": {"1": 0.80}}),
        {**meta("w95", "weight", "oneshot", 0.95, 0.1, {}), "robustness": {}},  # not evaluated: skipped
    ]


def test_accuracy_table_excess_error(metas):
    table = rb.accuracy_table(metas)
    assert set(table["model_id"]) == {"base", "w30", "w60", "w90", "r30"}
    assert len(table) == 5 * 4
    row = table[(table.model_id == "w60") & (table.distribution == "gaussian_noise") & (table.severity == 3)].iloc[0]
    # (0.52 − 0.50) − (0.103 − 0.100)
    assert row.excess_error == pytest.approx(0.017)
    assert row.error == pytest.approx(0.52) and row.sparsity == pytest.approx(0.54)
    row = table[(table.model_id == "r30") & (table.distribution == "contrast")].iloc[0]
    assert row.excess_error == pytest.approx(-0.05)  # same shifted error, worse clean error
    clean = table[table.distribution == "clean"]
    assert (clean.severity == 0).all() and np.allclose(clean.excess_error, 0)
    assert np.allclose(table[table.model_id == "base"].excess_error, 0)


def test_prune_potential_is_the_largest_rate_within_delta(metas):
    table = rb.prune_potential(metas, delta=0.005)
    got = {(r.method, r.distribution): (r.potential, r.potential_drop) for r in table.itertuples()}
    # weight/oneshot: clean errors 0.100, 0.103, 0.200 vs 0.100 → 0.6 (largest within δ)
    # gaussian_noise mean errors 0.405, 0.430, 0.500 vs 0.400 → 0.3; contrast 0.200, 0.203, 0.210 vs 0.200 → 0.6
    assert got["weight", "clean"] == pytest.approx((0.6, 0.0))
    assert got["weight", "gaussian_noise"] == pytest.approx((0.3, 0.3))
    assert got["weight", "contrast"] == pytest.approx((0.6, 0.0))
    assert got["random", "clean"] == (0.0, 0.0)  # no rate within δ
    assert got["random", "gaussian_noise"] == (0.3, -0.3)
    assert len(table) == 6
    base_row = table[(table.method == "weight") & (table.distribution == "gaussian_noise")].iloc[0]
    assert base_row.parent_error == pytest.approx(0.4) and base_row.n_rates == 3
    strict = rb.prune_potential(metas, delta=0.0)
    assert strict[(strict.method == "weight") & (strict.distribution == "clean")].potential.item() == 0.3


def test_noise_table_and_written_study_tables(metas, tmp_path):
    noise = rb.noise_table(metas)
    assert list(noise.model_id.unique()) == ["w30", "w60"]
    assert noise[noise.model_id == "w60"].agreement.tolist() == [0.9, 0.8, 0.5]
    paths = rb.write_study_tables(tmp_path, metas, delta=0.005)
    assert [p.name for p in paths] == ["accuracy.csv", "noise_similarity.csv", "prune_potential.csv"]
    assert all(p.parent == tmp_path / "robustness" for p in paths)
    assert not list((tmp_path / "robustness").glob("*.tmp"))
    back = pd.read_csv(paths[0])
    assert list(back.columns) == rb.ACCURACY_COLUMNS and len(back) == 20
    assert len(pd.read_csv(paths[2])) == 6
    empty = rb.write_study_tables(tmp_path / "empty", [], delta=0.005)
    assert list(pd.read_csv(empty[1]).columns) == rb.NOISE_COLUMNS


def test_several_bases_of_one_arch_are_an_error(metas):
    with pytest.raises(ValueError, match="several base models"):
        rb.accuracy_table(metas + [{**metas[0], "model_id": "base2"}])


def test_stratified_subset_is_seeded_balanced_and_never_the_first_classes():
    from pruning.data.folders import stratified_subset

    targets = [c for c in range(10) for _ in range(30)]          # class-sorted, as ImageFolder orders them
    chosen = stratified_subset(targets, 100, seed=4)
    assert chosen == sorted(set(chosen)) and len(chosen) == 100
    counts = np.bincount([targets[i] for i in chosen], minlength=10)
    assert counts.min() == counts.max() == 10
    assert stratified_subset(targets, 100, seed=4) == chosen and stratified_subset(targets, 100, seed=5) != chosen
    odd = stratified_subset(targets, 23, seed=0)                  # remainder: counts differ by at most one
    counts = np.bincount([targets[i] for i in odd], minlength=10)
    assert len(odd) == 23 and counts.max() - counts.min() <= 1
    uneven = [0] * 3 + [1] * 50                                   # a class with too few images gives all it has
    counts = np.bincount([uneven[i] for i in stratified_subset(uneven, 20, seed=0)])
    assert counts.tolist() == [3, 17]
    assert stratified_subset(targets, 0) == list(range(300)) == stratified_subset(targets, 1000)


def test_robustness_of_a_study_uses_a_balanced_subset_and_records_it(tiny_data):
    from pruning.training import DistContext
    from pruning.workflows import robustness_loader
    from sparsight.config import load_study

    cfg = load_study(overrides=["evaluate.max_images=20", "data.image_size=32", "evaluate.severities=[1]",
                                'evaluate.corruptions=["contrast"]'])
    loader = robustness_loader(cfg, tiny_data, DistContext())
    report = rb.robustness_report(tiny_model(), None, loader, cfg.evaluate, device="cpu")
    per_class = report["images_per_class"]
    assert sorted(per_class) == sorted(loader.classes) and sum(per_class.values()) == report["n"] == 20
    assert min(per_class.values()) >= 0.8 * max(per_class.values())


def test_a_distribution_the_parent_is_at_chance_on_has_no_prune_potential():
    """Contrast at chance for the parent (10 classes): the pruned model "keeps" its error by noise alone,
    so its potential is left empty; the binomial decision equals scipy's test on each severity's count."""
    from scipy.stats import binomtest

    classes = {f"c{i}": 20 for i in range(10)}
    models = [meta("base", None, None, 0.0, 0.90, {"contrast": {"2": 0.15, "4": 0.10}, "jpeg": {"2": 0.80}}),
              meta("w50", "weight", "oneshot", 0.5, 0.90, {"contrast": {"2": 0.10, "4": 0.10}, "jpeg": {"2": 0.70}}),
              meta("w75", "weight", "oneshot", 0.75, 0.80, {"contrast": {"2": 0.16, "4": 0.10}, "jpeg": {"2": 0.60}})]
    for m in models:
        m["robustness"].update(n=200, images_per_class=classes)
    assert binomtest(20, 200, 0.1, alternative="greater").pvalue > rb.CHANCE_ALPHA   # severity 4: at chance
    # pooled over its severities (56 of 400) a corruption at chance at severity 4 would pass: it does not
    milder = {**models[0]["robustness"], "corruptions": {"contrast": {"2": 0.18, "4": 0.10}}}
    assert binomtest(36 + 20, 400, 0.1, alternative="greater").pvalue < rb.CHANCE_ALPHA
    assert rb.above_chance(milder, "contrast", 0.1) is False
    assert rb.above_chance({**milder, "corruptions": {"contrast": {"2": 0.18, "4": 0.15}}}, "contrast", 0.1) is True
    table = rb.prune_potential(models).set_index("distribution")
    assert table.loc["contrast", "parent_above_chance"] == False  # noqa: E712 (numpy bool)
    assert np.isnan(table.loc["contrast", "potential"]) and np.isnan(table.loc["contrast", "potential_drop"])
    assert table.loc["jpeg", "parent_above_chance"] == True  # noqa: E712
    assert table.loc["clean", "potential"] == 0.5 and (table["n_images"] == 200).all()
    acc = rb.accuracy_table(models)
    assert set(acc[acc.distribution == "contrast"].base_above_chance) == {False}
    assert set(acc[acc.distribution != "contrast"].base_above_chance) == {True}
    assert np.allclose(acc.chance, 0.1)
    # without a class count the test cannot run: the potential stays the published definition
    bare = rb.prune_potential([{**m, "robustness": {k: v for k, v in m["robustness"].items()
                                                    if k != "images_per_class"}} for m in models])
    assert bare.set_index("distribution").loc["contrast", "potential"] == 0.75
    assert bare["parent_above_chance"].isna().all()


def _measured(model_id, method, rate, flags: dict, classes=10):
    """A meta whose robustness report holds the given per-image results (``{"clean": bools, "contrast:2": …}``)."""
    n = len(flags["clean"])
    corruptions = {}
    for key, f in flags.items():
        if key != "clean":
            name, sev = key.split(":")
            corruptions.setdefault(name, {})[sev] = float(np.mean(f))
    m = meta(model_id, method, "oneshot" if method else None, rate, float(np.mean(flags["clean"])), corruptions)
    m["robustness"].update(n=n, images_per_class={f"c{i}": n // classes for i in range(classes)},
                           correct={k: rb.pack_bits(f) for k, f in flags.items()})
    return m


def test_the_prune_potential_interval_equals_a_slow_bootstrap_of_the_point_potential():
    """Every resample of the images recomputes the potential from the resampled errors, paired across the
    models; the interval equals such a loop over resampled reports, and a model whose errors are those of
    the base keeps its rate in every resample."""
    rng = np.random.default_rng(7)
    n = 200
    base = rng.random(n) < 0.85
    near = base.copy()
    near[np.flatnonzero(base)[:3]] = False           # 3 images lost: within δ in some resamples only
    far = base & (rng.random(n) < 0.8)               # many lost: never within δ
    metas = [_measured("base", None, 0.0, {"clean": base}), _measured("w25", "weight", 0.25, {"clean": base}),
             _measured("w50", "weight", 0.5, {"clean": near}), _measured("w75", "weight", 0.75, {"clean": far})]
    table = rb.prune_potential(metas, delta=0.005, bootstrap=300, seed=3)
    row = table.iloc[0]
    slow_rng, potentials = np.random.default_rng(3), []
    for _ in range(300):
        idx = slow_rng.integers(0, n, n)
        resampled = [_measured(m["model_id"], m["method"], m["rate_requested"],
                               {"clean": rb.unpack_bits(m["robustness"]["correct"]["clean"], n)[idx]}) for m in metas]
        potentials.append(rb.prune_potential(resampled, delta=0.005).iloc[0].potential)
    low, high = np.quantile(potentials, [0.025, 0.975], method="inverted_cdf")
    assert (row.potential_ci_low, row.potential_ci_high) == (low, high)
    assert row.potential == 0.25 and low == 0.25 and high == 0.5     # w50 keeps its error in some resamples
    assert 0 < np.mean(np.array(potentials) == 0.5) < 1
    stored = [dict(m, robustness={k: v for k, v in m["robustness"].items() if k != "correct"}) for m in metas]
    assert np.isnan(rb.prune_potential(stored, bootstrap=300).iloc[0].potential_ci_low)  # older reports: no interval


def test_a_potential_interval_needs_resamples_images_and_measured_models():
    base = _measured("base", None, 0.0, {"clean": np.ones(20, bool)})
    pruned = _measured("w50", "weight", 0.5, {"clean": np.ones(20, bool)})
    rng = np.random.default_rng(0)
    assert rb.potential_interval(base, [pruned], "clean", 0.005, 50, rng) == (0.5, 0.5)
    for members, bootstrap in (([], 50), ([pruned], 0)):
        assert np.isnan(rb.potential_interval(base, members, "clean", 0.005, bootstrap, rng)).all()


def test_every_corruption_names_the_parameter_its_severity_sets():
    """The methods text reads each corruption's severity table; a corruption without one, or a bad severity,
    is an error, not a silent gap."""
    from pruning.robustness import (BLUR_SIGMA_AT_224, CORRUPTIONS, JPEG_QUALITY, SEVERITY_PARAMETERS,
                                    corruption_parameters)

    assert set(SEVERITY_PARAMETERS) == set(CORRUPTIONS)
    assert corruption_parameters("jpeg", [2, 4]) == f"quality {JPEG_QUALITY[1]}, {JPEG_QUALITY[3]} at severities 2, 4"
    assert corruption_parameters("gaussian_blur", [5]) == f"σ at 224 px {BLUR_SIGMA_AT_224[4]:g} at severity 5"
    with pytest.raises(ValueError, match="gaussian_noise"):
        corruption_parameters("fog", [1])
    with pytest.raises(ValueError):
        corruption_parameters("jpeg", [6])


def test_retrained_copies_of_a_rate_are_averaged_before_the_potential_takes_it():
    """Two copies at rate 0.5, one within δ and one far off: their mean error is off, so 0.5 is not the
    potential (the better copy alone would have made it); the interval averages them the same way (slow loop)."""
    rng = np.random.default_rng(11)
    n = 200
    base = rng.random(n) < 0.85
    far = base & (rng.random(n) < 0.8)
    metas = [_measured("base", None, 0.0, {"clean": base}), _measured("w25", "weight", 0.25, {"clean": base}),
             _measured("w50", "weight", 0.5, {"clean": base}), _measured("w50-c2", "weight", 0.5, {"clean": far})]
    table = rb.prune_potential(metas, delta=0.005, bootstrap=200, seed=5)
    row = table.iloc[0]
    assert row.potential == 0.25 and row.n_rates == 2
    assert rb.prune_potential(metas[:3], delta=0.005).iloc[0].potential == 0.5      # one copy alone: 0.5
    slow_rng, potentials = np.random.default_rng(5), []
    for _ in range(200):
        idx = slow_rng.integers(0, n, n)
        flags = {m["model_id"]: rb.unpack_bits(m["robustness"]["correct"]["clean"], n)[idx] for m in metas}
        excess = {0.25: [1 - flags["w25"].mean() - (1 - flags["base"].mean())],
                  0.5: [1 - flags[k].mean() - (1 - flags["base"].mean()) for k in ("w50", "w50-c2")]}
        potentials.append(max([r for r, e in excess.items() if np.mean(e) <= 0.005 + 1e-12], default=0.0))
    low, high = np.quantile(potentials, [0.025, 0.975], method="inverted_cdf")
    assert (row.potential_ci_low, row.potential_ci_high) == (low, high)
