import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lucent.optvis import objectives, param, render, transform
from lucent.optvis.param import color, spatial
from torch import nn

from pruning.models import create_model
from stimuli.featurevis import (JITTER1, JITTER2, PAD, FeatureVisSettings, _diversity, _hooked, _LayerForward,
                                _decorrelated, _lucent_image, _pack, _plan, _random_views, find_layer, render_units)
from tiny_models import TinyGoogLeNetBlock, assert_no_hooks

LAYER, UNITS, SIZE, STEPS = "inception4a", [5, 40, 100], 64, 48


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("inception-small", num_classes=10).eval()


@pytest.fixture(scope="module")
def rendered(model):
    settings = FeatureVisSettings(steps=STEPS, image_size=SIZE, batch_size=9, n_plain=1, n_diverse=2)
    return render_units(model, LAYER, UNITS, settings)


def unit_means(model, images, units):
    with _hooked(find_layer(model, LAYER)) as store, torch.no_grad():
        acts = _LayerForward(model, store, LAYER, torch.float32)(images)
    return acts[torch.arange(len(units)), torch.tensor(units)].mean((-2, -1))


def gram_similarity(model, images):
    """Mean cosine similarity of the layer's Gram matrices over pairs of distinct images."""
    with _hooked(find_layer(model, LAYER)) as store, torch.no_grad():
        flat = _LayerForward(model, store, LAYER, torch.float32)(images).flatten(2)
    grams = F.normalize((flat @ flat.transpose(1, 2)).flatten(1), dim=1)
    n = len(images)
    return ((grams @ grams.T).sum() - n) / (n * (n - 1))


def test_shapes_ranges_and_order(rendered):
    assert [(r.unit, r.direction) for r in rendered] == [(u, d) for u in UNITS for d in ("max", "min")]
    for r in rendered:
        assert r.layer == LAYER and r.images.shape == (3, 3, SIZE, SIZE) and r.activations.shape == (3,)
        assert r.images.device.type == "cpu" and 0 <= r.images.min() and r.images.max() <= 1
        assert len(set(r.seeds)) == 3
    assert len({s for r in rendered for s in r.seeds}) == 18


def test_max_images_activate_more_than_min_images(rendered):
    for mx, mn in zip(rendered[::2], rendered[1::2]):
        assert mx.activations.min() > mn.activations.max(), mx.unit


def test_reported_activations_are_those_of_the_returned_images(model, rendered):
    images = torch.stack([r.images[0] for r in rendered])
    expected = torch.stack([r.activations[0] for r in rendered])
    assert torch.allclose(unit_means(model, images, [r.unit for r in rendered]), expected, atol=1e-4)


def test_reaches_at_least_lucents_render_vis(model, rendered):
    r = SIZE / 224   # lucent's transforms at the same pixel scale as the renderer's
    transforms = [transform.pad(round(PAD * r), mode="reflect"), transform.jitter(round(JITTER1 * r)),
                  transform.random_scale([1, .975, 1.025, .95, 1.05]), transform.random_rotate(list(range(-5, 6))),
                  transform.jitter(max(2, round(JITTER2 * r)))]
    reference = []
    for unit in UNITS:
        lucent_model = copy.deepcopy(model).to(spatial.device).requires_grad_(False)  # render_vis leaves hooks
        np.random.seed(0)
        torch.manual_seed(0)
        out = render.render_vis(lucent_model, f"{LAYER}:{unit}", lambda: param.image(SIZE, fft=True, decorrelate=True),
                                transforms=transforms, thresholds=(STEPS,), show_image=False, progress=False,
                                fixed_image_size=SIZE)
        reference.append(torch.from_numpy(out[-1]).permute(0, 3, 1, 2))
    lucent = unit_means(model, torch.cat(reference), UNITS)
    ours = unit_means(model, torch.stack([r.images[0] for r in rendered if r.direction == "max"]), UNITS)
    assert lucent.mean() > 0.5          # the reference did optimize
    assert ours.mean() >= 0.95 * lucent.mean(), (ours, lucent)


def test_model_left_as_it_was(model):
    model = copy.deepcopy(model).train()
    model.fc.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    strides = {n: p.stride() for n, p in model.named_parameters()}
    assert any(p.dim() == 4 and p.shape[-2:] == (1, 1) for p in model.parameters())   # "contiguous" either way
    render_units(model, LAYER, [5], FeatureVisSettings(steps=3, image_size=SIZE, n_plain=1, n_diverse=2))
    assert {n: p.stride() for n, p in model.named_parameters()} == strides     # the layout too, 1×1 kernels included
    assert_no_hooks(model)
    assert all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == [n != "fc.weight" for n, _ in model.named_parameters()]
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def test_no_hooks_or_flags_left_when_rendering_fails(model):
    broken = nn.Sequential(nn.Conv2d(3, 4, 3), Boom(), nn.Conv2d(4, 4, 3)).train()
    with pytest.raises(RuntimeError, match="boom"):
        render_units(broken, "2", [0], FeatureVisSettings(steps=2, image_size=16))
    assert_no_hooks(broken)
    assert broken.training and all(p.requires_grad for p in broken.parameters())
    model = copy.deepcopy(model).train()
    with pytest.raises(ValueError, match="unit 999 out of range"):
        render_units(model, LAYER, [999], FeatureVisSettings(steps=2, image_size=SIZE))
    for steps, rescue in ((0, 3), (0, 0)):          # no main step runs: the check must not rely on one
        with pytest.raises(ValueError, match=rf"unit 999 out of range: '{LAYER}' has \d+ channels \(units 0–"):
            render_units(model, LAYER, [999], FeatureVisSettings(steps=steps, rescue_steps=rescue, image_size=SIZE))
    assert_no_hooks(model)
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_unknown_layer_lists_valid_names(model):
    with pytest.raises(ValueError, match=r"layer 'inception9' does not exist; valid layers: \['conv1', .*'inception4a'"):
        render_units(model, "inception9", [0], FeatureVisSettings(steps=1, image_size=SIZE))


def test_seeded_determinism_and_batch_independence(model):
    settings = FeatureVisSettings(steps=8, image_size=SIZE, n_plain=1, n_diverse=2, diversity=5.0)
    rng = torch.random.get_rng_state()
    alone = render_units(model, LAYER, [40], settings, directions=("max",))[0]
    assert torch.equal(torch.random.get_rng_state(), rng)   # the global RNG is not used
    again = render_units(model, LAYER, [40], settings, directions=("max",))[0]
    assert torch.equal(alone.images, again.images) and alone.seeds == again.seeds
    other = render_units(model, LAYER, [40], FeatureVisSettings(**{**vars(settings), "seed": 1}), directions=("max",))
    assert (other[0].images - alone.images).abs().amax((1, 2, 3)).min() > 0.1
    # the same unit among others, in a smaller batch: the same images
    crowd = render_units(model, LAYER, [5, 40], FeatureVisSettings(**{**vars(settings), "batch_size": 4}))
    assert crowd[2].unit == 40 and crowd[2].direction == "max" and crowd[2].seeds == alone.seeds
    assert torch.allclose(crowd[2].images, alone.images, atol=1e-4)


def test_diversity_makes_diverse_images_less_similar(model):
    def diverse_images(weight):
        settings = FeatureVisSettings(steps=32, image_size=SIZE, n_plain=1, n_diverse=4, diversity=weight)
        r = render_units(model, LAYER, [40], settings, directions=("max",))[0]
        return r.images
    plain, diverse = diverse_images(0.0), diverse_images(10.0)
    assert torch.equal(plain[0], diverse[0])            # the plain slot has no diversity term
    assert gram_similarity(model, diverse[1:]) < gram_similarity(model, plain[1:]) - 0.05


def test_diversity_matches_lucents_objective():
    torch.manual_seed(0)
    acts = torch.rand(7, 5, 3, 3)
    groups = torch.tensor([-1, 0, 0, 0, 1, 1, 1])
    lucent = sum(objectives.diversity("x")(lambda _, a=acts[i:i + 3]: a) for i in (1, 4))   # −Σcos / n per group
    assert torch.allclose(_diversity(acts, groups), -3 * lucent)


def test_groups_are_not_split_across_batches():
    settings = FeatureVisSettings(batch_size=10, n_plain=1, n_diverse=3, diversity=1.0)
    batches = _pack(_plan(LAYER, [0, 1, 2], ("max", "min"), settings), settings)
    assert [len(b) for b in batches] == [8, 8, 8]
    assert all(len({s.group for s in b}) == 2 for b in batches)
    flat = _pack(_plan(LAYER, [0, 1, 2], ("max", "min"), settings), FeatureVisSettings(batch_size=10, diversity=0))
    assert [len(b) for b in flat] == [10, 10, 4]


def test_views_are_lucid_crops_at_224_px():
    torch.manual_seed(0)
    images = torch.rand(4, 3, 224, 224)
    draws = torch.tensor([[8, 8, 0, 5, 4, 4], [0, 15, 0, 5, 7, 0], [3, 11, 0, 5, 1, 6], [8, 8, 3, 0, 4, 4]])
    views = _random_views(images, draws)
    canvas = F.pad(images, [PAD] * 4, mode="reflect")
    for view, image, (x1, y1, _, _, x2, y2) in zip(views[:3], canvas, draws[:3].tolist()):
        top, left = PAD + y1 - JITTER1 // 2 + y2 - JITTER2 // 2, PAD + x1 - JITTER1 // 2 + x2 - JITTER2 // 2
        assert torch.allclose(view, image[:, top:top + 224, left:left + 224], atol=1e-4)
    assert not torch.allclose(views[3], images[3], atol=0.05)   # scaled 0.95 and rotated by -5°


def test_pixel_parameterization_without_decorrelation(model):
    settings = FeatureVisSettings(steps=2, image_size=SIZE, n_plain=2, n_diverse=0, fft=False, decorrelate=False)
    (r,) = render_units(model, LAYER, [40], settings, directions=("min",))
    assert r.images.shape == (2, 3, SIZE, SIZE) and r.direction == "min"


def test_colour_decorrelation_matches_lucent():
    # lucent copies its matrix to its own device at every step; the renderer applies the same matrix, made once
    image = torch.randn(2, 3, 5, 5)
    matrix = torch.tensor(color.color_correlation_normalized.T)
    assert torch.allclose(_decorrelated(lambda: image, matrix)(), color._linear_decorrelate_color(image.to(
        spatial.device)).cpu(), atol=1e-6)


@pytest.mark.parametrize("fft", [True, False])
def test_parameterization_gives_lucents_images(fft):
    """The renderer's image function equals lucent's ``param.image(..., decorrelate=True)`` from the same draw."""
    torch.manual_seed(3)
    param_ours, image_ours = _lucent_image(1, FeatureVisSettings(image_size=SIZE, fft=fft), torch.device("cpu"))
    torch.manual_seed(3)
    params_lucent, image_lucent = param.image(SIZE, fft=fft, decorrelate=True)
    assert torch.equal(param_ours.detach().cpu(), params_lucent[0].detach().cpu())
    assert torch.allclose(image_ours(), image_lucent().cpu(), atol=1e-6)


# ---- dead starts, pre-ReLU objective, redirected gradients, early stopping ------------------------------
def test_redirected_relu_gradient_follows_lucids_rule():
    from stimuli.featurevis import _RedirectedReLU

    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5)
    x[0] = -x[0].abs() - 0.1        # image 0: every input negative, so the plain ReLU gradient is all zero
    grad = torch.randn(4, 3, 5, 5)
    x.requires_grad_(True)
    y = _RedirectedReLU.apply(x)
    y.backward(grad)
    assert torch.equal(y, x.detach().clamp_min(0))
    xd = x.detach()
    for b in range(4):
        relu_grad = torch.where(xd[b] > 0, grad[b], torch.zeros_like(grad[b]))
        # lucid: where nothing passes the ReLU, pass the gradient unless it pushes a negative input lower
        redirected = torch.where((xd[b] < 0) & (grad[b] > 0), torch.zeros_like(grad[b]), grad[b])
        expected = relu_grad if relu_grad.norm() > 0 else redirected
        assert torch.equal(x.grad[b], expected), b
    assert x.grad[0].abs().sum() > 0


def test_pre_relu_trace_is_the_concatenated_branches_before_their_relu(model):
    """The traced pre-activation of an inception block equals its branches' BatchNorm outputs, concatenated."""
    block = find_layer(model, LAYER)
    bns = [b.bn if hasattr(b, "bn") else b[-1].bn for b in (block.branch1, block.branch2, block.branch3,
                                                                  block.branch4)]
    seen = {}
    handles = [bn.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o)) for k, bn in enumerate(bns)]
    images = torch.rand(2, 3, SIZE, SIZE)
    try:
        with _hooked(block) as store, torch.no_grad():
            out, pre = _LayerForward(model, store, LAYER, torch.float32)(images, trace=True)
    finally:
        for h in handles:
            h.remove()
    expected = torch.cat([seen[k] for k in range(4)], 1)
    torch.testing.assert_close(pre, expected)
    torch.testing.assert_close(out, pre.clamp_min(0))
    assert (pre < 0).any()
    with _hooked(block) as store, torch.no_grad():      # the hooked taps the loop uses give the same values
        forward = _LayerForward(model, store, LAYER, torch.float32)
        forward.use_taps(images[:1])
        assert forward.taps is not None and len(forward.taps.modules) == 4
        out2, pre2 = forward(images, trace=True)
    torch.testing.assert_close(pre2, expected)
    torch.testing.assert_close(out2, out)
    assert_no_hooks(model)


def test_pre_relu_taps_survive_the_in_place_relu_of_torchvisions_googlenet_blocks():
    """torchvision's GoogLeNet ends each branch with ``F.relu(x, inplace=True)``, which overwrites the
    BatchNorm output the taps hold: the taps must still give the values before the ReLU (negative where
    a unit is silent) and a gradient for a silent unit, as the traced pass does."""
    torch.manual_seed(0)
    net = TinyGoogLeNetBlock().eval()
    images = torch.rand(3, 3, 16, 16)
    with _hooked(find_layer(net, "inception3a")) as store, torch.no_grad():
        forward = _LayerForward(net, store, "inception3a", torch.float32)
        out, traced = forward(images, trace=True)
        forward.use_taps(images[:1])
        assert forward.taps is not None and len(forward.taps.modules) == 4
        out_taps, tapped = forward(images, trace=True)
    assert (traced < 0).any()
    torch.testing.assert_close(tapped, traced)
    torch.testing.assert_close(out_taps, out)
    torch.testing.assert_close(out, traced.clamp_min(0))

    unit = int(traced.mean((0, 2, 3)).argmin())       # a unit mostly below zero: its ReLU passes little
    assert (traced[:, unit] < 0).float().mean() > 0.5

    def input_gradient(taps: bool) -> torch.Tensor:
        x = images.clone().requires_grad_(True)
        with _hooked(find_layer(net, "inception3a")) as store:
            forward = _LayerForward(net, store, "inception3a", torch.float32)
            if taps:
                forward.use_taps(images[:1])
            _, pre = forward(x, trace=True)
            pre[:, unit].mean().backward()
        return x.grad

    # a post-ReLU objective would drop the gradient of every position below zero
    torch.testing.assert_close(input_gradient(taps=True), input_gradient(taps=False))
    assert_no_hooks(net)


class DeadAtStart(nn.Module):
    """One unit whose pre-activation is about −2 on a grey image: the post-ReLU gradient is exactly zero."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.fill_(0.2)
            self.conv.bias.fill_(-3.0)
        self.head = nn.Identity()

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


def test_a_dead_start_escapes_with_the_pre_relu_objective_but_not_with_the_post_relu_one():
    model = DeadAtStart().eval()
    base = dict(steps=40, image_size=32, n_plain=1, n_diverse=0, fft=False, decorrelate=False, patience=0)
    stuck = render_units(model, "head", [0], FeatureVisSettings(**base, objective="post-relu", redirect_steps=0),
                         directions=("max",))[0]
    free = render_units(model, "head", [0], FeatureVisSettings(**base, objective="pre-relu", redirect_steps=0),
                        directions=("max",))[0]
    redirected = render_units(model, "head", [0], FeatureVisSettings(**base, objective="post-relu",
                                                                     redirect_steps=20), directions=("max",))[0]
    assert float(stuck.activations[0]) == 0.0            # the dead start never moves
    assert float(free.activations[0]) > 0.5 and float(redirected.activations[0]) > 0.5
    assert float(free.objectives[0]) > 0.5               # the optimized value itself: before the ReLU


def test_min_images_of_the_pre_relu_objective_push_the_unit_below_zero(model):
    settings = FeatureVisSettings(steps=24, image_size=SIZE, n_plain=1, n_diverse=0, patience=0)
    out = {r.direction: r for r in render_units(model, LAYER, [5], settings)}
    assert float(out["min"].objectives[0]) < 0 < float(out["max"].objectives[0])
    assert float(out["min"].activations[0]) <= float(out["max"].activations[0])


def test_images_stop_when_their_objective_plateaus_and_stay_as_they_were(model):
    settings = FeatureVisSettings(steps=200, image_size=SIZE, n_plain=1, n_diverse=2, patience=5, tolerance=0.05,
                                  redirect_steps=2, batch_size=12)
    rendered = render_units(model, LAYER, [5, 40], settings)
    steps = torch.cat([r.steps for r in rendered])
    stopped = steps < 200
    assert stopped.sum() >= len(steps) // 2 and (steps > 2).all()
    # images whose objective never rose above zero have not started: they are never stopped
    for r in rendered:
        signed = r.objectives * (1 if r.direction == "max" else -1)
        assert ((r.steps < 200) | (signed <= 0.05)).all()
    cap = int(steps[stopped].max()) + 1
    again = render_units(model, LAYER, [5, 40], FeatureVisSettings(**{**vars(settings), "steps": cap}))
    for a, b in zip(rendered, again):                    # an image's pixels are frozen from its stop onwards
        done = a.steps < cap
        torch.testing.assert_close(a.images[done], b.images[done])
        assert torch.equal(a.steps[done], b.steps[done])


def test_an_unknown_objective_lists_the_choices(model):
    with pytest.raises(ValueError, match=r"choose from \['pre-relu', 'post-relu'\]"):
        render_units(model, LAYER, [0], FeatureVisSettings(steps=1, image_size=SIZE, objective="pre"))


class SilentAndFiring(DeadAtStart):
    """Unit 0 as ``DeadAtStart``; unit 1 fires on any image (positive bias)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.fill_(0.2)
            self.conv.bias.copy_(torch.tensor([-3.0, 0.5]))


def test_a_silent_max_image_is_rescued_and_the_others_stay_exactly_as_they_were():
    model = SilentAndFiring().eval()
    base = dict(image_size=32, n_plain=1, n_diverse=0, fft=False, decorrelate=False, redirect_steps=0, lr=0.02)
    short = render_units(model, "head", [0], FeatureVisSettings(**base, steps=2), directions=("max",))[0]
    assert float(short.activations[0]) == 0.0             # two steps do not reach the threshold
    rescued = render_units(model, "head", [0], FeatureVisSettings(**base, steps=2, rescue_steps=400),
                           directions=("max",))[0]
    took = int(rescued.steps[0])
    assert float(rescued.activations[0]) > 0 and 2 < took < 402
    # it stops at the first step its unit fires, and is the image plain optimization gives at that step
    plain = render_units(model, "head", [0], FeatureVisSettings(**base, steps=took), directions=("max",))[0]
    torch.testing.assert_close(rescued.images, plain.images, rtol=0, atol=1e-6)
    before = render_units(model, "head", [0], FeatureVisSettings(**base, steps=took - 1), directions=("max",))[0]
    assert float(before.activations[0]) == 0.0
    # in a batch, the image of a unit that fires and every min image are untouched by the rescue
    mixed = dict(base, steps=2, n_diverse=2, diversity=1.0)
    without = render_units(model, "head", [0, 1], FeatureVisSettings(**mixed))
    with_rescue = render_units(model, "head", [0, 1], FeatureVisSettings(**mixed, rescue_steps=400))
    for a, b in zip(without, with_rescue):
        silent = (a.activations <= 0) & (a.direction == "max")
        assert silent.any() == (a.unit == 0 and a.direction == "max")
        assert torch.equal(a.images[~silent], b.images[~silent]) and torch.equal(a.steps[~silent], b.steps[~silent])
        assert (b.activations[silent] > 0).all() and (b.steps[silent] > 2).all()


def test_diversity_is_taken_on_the_layer_output_while_the_objective_is_pre_relu(model, monkeypatch):
    """lucent's ``objectives.diversity(layer)`` compares the Gram matrices of the layer's output; only the
    unit's objective is taken before the ReLU, so the diversity term sees the post-ReLU activations."""
    import stimuli.featurevis as fv

    seen = []

    def recording(acts, groups, pairs=None):
        seen.append(float(acts.detach().min()))
        return _diversity(acts, groups, pairs)
    monkeypatch.setattr(fv, "_diversity", recording)
    settings = FeatureVisSettings(steps=4, image_size=SIZE, n_plain=1, n_diverse=2, diversity=1.0,
                                  objective="pre-relu", redirect_steps=2)
    render_units(model, LAYER, [5, 40], settings, directions=("max",))
    assert len(seen) >= 4 and min(seen) >= 0.0
