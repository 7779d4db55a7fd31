"""Pruning methods against torch.nn.utils.prune, and the mask mechanism."""
import functools

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from pruning.data.folders import Batch
from pruning.masks import MaskEnforcer, apply_masks, mask_sparsity, masked
from pruning.methods import METHODS, PruningError, create_method, prunable_layers
from pruning.models import create_model, get_spec
from tiny_models import TwoConvNet, archs, assert_no_hooks


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return TwoConvNet().double()


def _reference(model, fn):
    """Masks produced by torch.nn.utils.prune on a copy of ``model``."""
    ref = TwoConvNet().double()
    ref.load_state_dict(model.state_dict())
    fn(ref)
    return {f"{n}.weight": m.weight_mask.bool() for n, m in ref.named_modules() if hasattr(m, "weight_mask")}


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.75])
def test_local_magnitude_equals_l1_unstructured(tiny, rate):
    ours = create_method("unstructured-local").masks(tiny, rate)
    ref = _reference(tiny, lambda m: [prune.l1_unstructured(mod, "weight", amount=rate)
                                      for mod in (m.conv1, m.conv2, m.fc)])
    assert ours.keys() == ref.keys()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


@pytest.mark.parametrize("rate", [0.2, 0.6])
def test_global_magnitude_equals_global_unstructured(tiny, rate):
    ours = create_method("unstructured-global").masks(tiny, rate)
    ref = _reference(tiny, lambda m: prune.global_unstructured(
        [(m.conv1, "weight"), (m.conv2, "weight"), (m.fc, "weight")], prune.L1Unstructured, amount=rate))
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    assert mask_sparsity(ours) == pytest.approx(rate, abs=1 / 1000)


@pytest.mark.parametrize("norm, n", [("l1", 1), ("l2", 2)])
def test_filter_norm_equals_ln_structured(tiny, norm, n):
    ours = create_method("structured", norm=norm, input_size=8).masks(tiny, 0.5)
    ref = _reference(tiny, lambda m: [prune.ln_structured(mod, "weight", amount=0.5, n=n, dim=0)
                                      for mod in (m.conv1, m.conv2)])
    assert {k for k in ours if k.endswith(".weight")} == ref.keys()  # convs only; no BatchNorm here
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    for name in ("conv1", "conv2"):  # a removed filter's bias goes with it
        assert torch.equal(ours[f"{name}.bias"], ref[f"{name}.weight"][:, 0, 0, 0])


def test_structured_masks_the_following_batchnorm_and_silences_the_channel():
    torch.manual_seed(0)
    model = create_model("inception-small", num_classes=10).eval()
    for m in model.modules():  # make β non-zero so an unmasked BN would leak a constant
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.bias, 0.5, 1.0)
    masks = create_method("structured").masks(model, 0.5, exclude=("conv1",))
    assert "inception3a.branch2.1.bn.weight" in masks and "conv1.bn.bias" not in masks
    keep = masks["inception3a.branch1.bn.weight"]
    assert torch.equal(keep, masks["inception3a.branch1.conv.weight"][:, 0, 0, 0])
    seen = {}
    hook = model.inception3a.branch1.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    with masked(model, masks):
        model(torch.randn(2, 3, 64, 64))
    hook.remove()
    assert torch.all(seen["out"][:, ~keep] == 0) and torch.any(seen["out"][:, keep] != 0)


def test_connection_sparsity_zeroes_exactly_the_lowest_l1_input_slices(tiny):
    masks = create_method("connection").masks(tiny, 0.5)
    for name in ("conv1", "conv2"):
        w = getattr(tiny, name).weight.detach()
        norms = [float(w[:, c].abs().sum()) for c in range(w.shape[1])]
        k = round(0.5 * w.shape[1])
        lowest = sorted(range(len(norms)), key=norms.__getitem__)[:k]
        for c in range(w.shape[1]):
            assert bool(masks[f"{name}.weight"][:, c].any()) == (c not in lowest)
        ref = _reference(tiny, lambda m: prune.ln_structured(getattr(m, name), "weight", amount=0.5, n=1, dim=1))
        assert torch.equal(masks[f"{name}.weight"], ref[f"{name}.weight"])


def test_random_control_prunes_the_exact_count_and_depends_on_seed(tiny):
    a = create_method("random", seed=1).masks(tiny, 0.4)
    b = create_method("random", seed=2).masks(tiny, 0.4)
    for k, m in a.items():
        assert int((~m).sum()) == round(0.4 * m.numel())
    assert any(not torch.equal(a[k], b[k]) for k in a)


@functools.lru_cache(maxsize=None)
def _model(arch):
    torch.manual_seed(0)
    return create_model(arch, num_classes=10)


@pytest.mark.parametrize("method", sorted(m for m in METHODS if METHODS[m].prunes))
@pytest.mark.parametrize("arch", archs("inception-small", "googlenet", "resnet50"))
def test_every_method_prunes_every_architecture(method, arch):
    model = _model(arch)  # shared: masked() leaves it unchanged
    torch.manual_seed(1)
    data = [Batch(torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,)))] if METHODS[method].needs_data else None
    masks = create_method(method).masks(model, 0.5, exclude=get_spec(arch).stem, data=data)
    assert masks and all(not k.startswith(get_spec(arch).stem) for k in masks)
    assert 0.4 < mask_sparsity(masks) < 0.6
    x = torch.randn(1, 3, 64, 64)
    model.eval()
    with masked(model, masks):
        out = model(x)
    assert torch.isfinite(out).all()


def test_masked_context_restores_weights_and_leaves_no_hooks(tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    masks = create_method("unstructured-local").masks(tiny, 0.5)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with masked(tiny, masks):
        assert int((tiny.conv1.weight == 0).sum()) == round(0.5 * tiny.conv1.weight.numel())
        inside = tiny(x)
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    assert_no_hooks(tiny)
    manual = TwoConvNet().double()
    manual.load_state_dict(before)
    apply_masks(manual, masks)
    assert torch.equal(manual(x), inside)


def test_mask_enforcer_keeps_pruned_weights_at_zero_through_sgd(tiny):
    masks = create_method("connection").masks(tiny, 0.5)
    apply_masks(tiny, masks)
    enforce = MaskEnforcer(tiny, masks)
    opt = torch.optim.SGD(tiny.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for _ in range(5):
        loss = tiny(torch.randn(4, 3, 8, 8, dtype=torch.float64)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        enforce()
    for name, m in masks.items():
        w = dict(tiny.named_parameters())[name]
        assert torch.all(w[~m] == 0) and torch.any(w[m] != 0)


def test_mask_enforcer_masks_take_the_channels_last_layout_of_their_weights(tiny):
    masks = create_method("connection").masks(tiny, 0.5)
    tiny = tiny.to(memory_format=torch.channels_last)
    enforce = MaskEnforcer(tiny, masks)
    for p, m in zip(enforce.params, enforce.masks):
        assert m.stride() == p.stride() and m.dtype == p.dtype
    assert any(p.dim() == 4 and not p.is_contiguous() for p in enforce.params)     # channels_last was in play
    enforce()
    for name, m in masks.items():
        assert torch.all(dict(tiny.named_parameters())[name][~m] == 0)


def test_mask_enforcer_follows_a_model_moved_after_it_was_built(tiny):
    """Built first, then the model is cast and re-laid out (as ``.cuda()`` would move it): masks follow."""
    masks = create_method("connection").masks(tiny, 0.5)
    enforce = MaskEnforcer(tiny, masks)
    tiny = tiny.to(torch.float32).to(memory_format=torch.channels_last)
    with torch.no_grad():
        for p in tiny.parameters():
            p.add_(1.0)                              # every pruned entry is now non-zero
    enforce()
    for p, m in zip(enforce.params, enforce.masks):
        assert m.stride() == p.stride() and m.dtype == p.dtype == torch.float32
    for name, m in masks.items():
        w = dict(tiny.named_parameters())[name]
        assert torch.all(w[~m] == 0) and torch.all(w[m] != 0)


@pytest.mark.parametrize("call, fragment", [
    (lambda m: create_method("magic"), "unknown method 'magic'; choose from ['connection', 'control', 'gradient'"),
    (lambda m: create_method("unstructured-local").masks(m, 1.0), "rate 1.0 is outside [0, 1)"),
    (lambda m: create_method("unstructured-local").masks(m, -0.1), "rate -0.1 is outside [0, 1)"),
    (lambda m: prunable_layers(m, ["conv9"]), "layer 'conv9' does not exist; valid layers: ['conv1', 'conv2', 'fc']"),
    (lambda m: prunable_layers(m, ["conv1", "conv2", "fc"]), "leaves no layer to prune"),
    (lambda m: create_method("structured", norm="l3"), "unknown norm 'l3'; choose from ['l1', 'l2']"),
])
def test_bad_input_lists_valid_choices(tiny, call, fragment):
    with pytest.raises(PruningError) as err:
        call(tiny)
    assert fragment in str(err.value)
