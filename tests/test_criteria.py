"""Filter-relevance criteria: LRP against a hand-computed z⁺/ε relevance, baselines, global selection."""
import pytest
import torch
from torch import nn

from pruning.criteria import select_filters_globally
from pruning.data.folders import Batch
from pruning.methods import PruningError, create_method
from pruning.models import create_model
from tiny_models import assert_no_hooks

EPS = 1e-6


class ConvConvLinear(nn.Module):
    """conv1 → ReLU → conv2 → ReLU → linear: conv2 gets z⁺, the classifier ε (EpsilonPlusFlat)."""

    def __init__(self, size=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(5 * size * size, 3)

    def forward(self, x):
        return self.fc(self.relu2(self.conv2(self.relu1(self.conv1(x)))).flatten(1))


def _stab(z):
    return z + EPS * torch.where(z >= 0, 1.0, -1.0).to(z)


def hand_lrp_scores(model, x, y):
    """Σ_images Σ_hw |R| at the outputs of conv2 (ε rule at fc) and conv1 (z⁺ rule at conv2), by loops."""
    a1 = torch.relu(model.conv1(x)).detach()
    a2 = torch.relu(model.conv2(a1)).detach()
    f = a2.flatten(1)
    W, b = model.fc.weight.detach(), model.fc.bias.detach()
    n_img, _, H, Wd = a1.shape
    R2 = torch.zeros_like(a2)
    for n in range(n_img):
        c = int(y[n])
        z = float(f[n] @ W[c] + b[c])
        R2[n] = (f[n] * W[c] / float(_stab(torch.tensor(z)))).view_as(a2[n])
    w2, b2 = model.conv2.weight.detach(), model.conv2.bias.detach()
    wp, bp = w2.clamp(min=0), b2.clamp(min=0)
    R1 = torch.zeros(n_img, a1.shape[1], H + 2, Wd + 2, dtype=a1.dtype)
    pad = torch.nn.functional.pad(a1, (1, 1, 1, 1))
    for n in range(n_img):
        for k in range(w2.shape[0]):
            for i in range(H):
                for j in range(Wd):
                    patch = pad[n, :, i:i + 3, j:j + 3]
                    contrib = patch * wp[k]
                    zp = float(contrib.sum() + bp[k])
                    R1[n, :, i:i + 3, j:j + 3] += contrib * float(R2[n, k, i, j]) / float(_stab(torch.tensor(zp)))
    R1 = R1[:, :, 1:-1, 1:-1]  # the zero padding carries no relevance
    return {"conv2": R2.abs().sum((0, 2, 3)), "conv1": R1.abs().sum((0, 2, 3))}


def _scores(method, model, batch):
    crit = create_method(method, input_size=5)
    layers = {"conv1": model.conv1, "conv2": model.conv2}
    return crit.filter_scores(model, layers, [batch])


def test_lrp_relevance_equals_hand_computed_zplus_epsilon():
    torch.manual_seed(0)
    model = ConvConvLinear().double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    y = torch.tensor([0, 2])
    ours = _scores("lrp", model, Batch(x, y))
    ref = hand_lrp_scores(model, x, y)
    for name in ("conv1", "conv2"):
        assert torch.allclose(ours[name], ref[name], rtol=1e-6, atol=1e-12), name  # ε-order differences
    assert_no_hooks(model)


def test_taylor_and_gradient_equal_a_direct_autograd_computation():
    torch.manual_seed(1)
    model = ConvConvLinear().double()
    x = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    y = torch.tensor([1, 0, 2])
    taylor, gradient = _scores("taylor", model, Batch(x, y)), _scores("gradient", model, Batch(x, y))
    for n in range(3):  # one image at a time, straight from the definitions
        z1 = model.conv1(x[n:n + 1])
        z2 = model.conv2(torch.relu(z1))
        out = model.fc(torch.relu(z2).flatten(1))[0, y[n]]
        g1, g2 = torch.autograd.grad(out, (z1, z2))
        for name, z, g in (("conv1", z1, g1), ("conv2", z2, g2)):
            taylor[name] -= (z * g).sum((2, 3)).abs()[0]
            gradient[name] -= g.abs().sum((2, 3))[0]
    for name in ("conv1", "conv2"):
        assert torch.allclose(taylor[name], torch.zeros(taylor[name].shape, dtype=torch.float64), atol=1e-10)
        assert torch.allclose(gradient[name], torch.zeros(gradient[name].shape, dtype=torch.float64), atol=1e-10)


def test_lrp_on_a_batchnorm_net_leaves_weights_unchanged_and_scores_the_bn_site():
    torch.manual_seed(0)
    model = create_model("inception-small", num_classes=10).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = Batch(torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,)))
    masks = create_method("lrp").masks(model, 0.4, exclude=("conv1", "conv2", "conv3"), data=[batch])
    assert set(model.state_dict()) == set(before)            # no bias left behind by BatchNorm merging
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "inception3a.branch1.bn.weight" in masks


def test_an_explaining_composite_never_touches_the_model_being_pruned():
    """Whatever a composite does to the network it explains (zennit 1.0's canonizers leave merged weights
    and a new bias behind), the caller's model keeps its parameters; the scores come from the explained copy."""
    from pruning.criteria import LRPCriterion

    class Vandal:
        def register(self, model):
            with torch.no_grad():           # conv2 doubled, bias too: ReLU patterns stay, ∂y/∂a(conv1) doubles
                model.conv2.weight.mul_(2.0)
                model.conv2.bias.mul_(2.0)
            model.conv1.register_parameter("extra", nn.Parameter(torch.zeros(1)))

        def remove(self):
            pass

    class VandalLRP(LRPCriterion):
        def composite(self, model):
            return Vandal()

    torch.manual_seed(2)
    model = ConvConvLinear()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = Batch(torch.randn(3, 3, 5, 5), torch.tensor([0, 1, 2]))
    layers = {"conv1": model.conv1, "conv2": model.conv2}
    scores = VandalLRP(input_size=5).filter_scores(model, layers, [batch])
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert_no_hooks(model)
    # the copy was explained: conv1's scores see conv2 doubled
    plain = create_method("gradient", input_size=5).filter_scores(model, layers, [batch])
    assert torch.allclose(scores["conv1"], 2 * plain["conv1"], rtol=1e-6)


def _layers(*shapes):
    torch.manual_seed(0)
    return {f"c{i}": nn.Conv2d(cin, cout, 3) for i, (cin, cout) in enumerate(shapes)}


@pytest.mark.parametrize("layer_scale, divide", [("sum", lambda v: v.sum()), ("l2", lambda v: v.norm()),
                                                  ("none", lambda v: 1.0)])
def test_global_selection_removes_lowest_scaled_scores_until_the_weight_budget(layer_scale, divide):
    layers = _layers((2, 4), (4, 8))
    scores = {"c0": torch.tensor([1.0, 2.0, 3.0, 6.0]), "c1": torch.arange(1.0, 9.0)}
    keep = select_filters_globally(layers, scores, 0.5, layer_scale)
    removed = sum(int((~keep[n]).sum()) * layers[n].weight[0].numel() for n in layers)
    total = sum(m.weight.numel() for m in layers.values())
    assert removed >= 0.5 * total
    # scaled per layer, the removed set is a prefix of the joint order of all filters
    flat = sorted((float(s / divide(v)), n, i) for n, v in scores.items() for i, s in enumerate(v))
    cut = max(s for s, n, i in flat if not keep[n][i])
    assert all(not keep[n][i] for s, n, i in flat if s < cut)
    assert all(keep[n][i] for s, n, i in flat if s > cut)


def test_the_global_ranking_decides_how_much_of_each_layer_goes():
    """Two layers of equal cost, one scored uniformly low: scaled by the layer sum (LRP, as Yeom et al.),
    the bigger layer's filters carry less each and it loses more; per-layer-mean scaling would remove the
    same share of both."""
    layers = _layers((3, 4), (3, 16))
    torch.manual_seed(1)
    scores = {"c0": torch.rand(4) + 1, "c1": torch.rand(16) + 1}
    keep = select_filters_globally(layers, scores, 0.4, "sum")
    share = {n: 1 - float(k.float().mean()) for n, k in keep.items()}
    assert share["c1"] > 0.45 and share["c0"] == 0.0
    with pytest.raises(ValueError, match="unknown layer_scale 'mean'; choose from"):
        select_filters_globally(layers, scores, 0.4, "mean")


@pytest.mark.parametrize("name, layer_scale", [("lrp", "sum"), ("weight", "sum"), ("taylor", "l2"),
                                               ("gradient", "none")])
def test_each_filter_criterion_scales_its_layers_as_its_reference_code(name, layer_scale):
    assert create_method(name).layer_scale == layer_scale


def test_global_selection_keeps_one_filter_per_layer_and_prunes_dead_filters_first():
    layers = _layers((2, 3), (3, 3))
    with torch.no_grad():
        layers["c1"].weight[1] = 0
    scores = {"c0": torch.tensor([0.01, 0.02, 0.03]), "c1": torch.tensor([5.0, 0.0, 5.0])}
    keep = select_filters_globally(layers, scores, 0.95)
    assert int(keep["c0"].sum()) == 1 and int(keep["c1"].sum()) == 1
    assert not keep["c1"][1]
    light = select_filters_globally(layers, scores, 0.1)
    assert not light["c1"][1] and light["c0"].all()


def test_data_driven_criteria_require_reference_images():
    model = ConvConvLinear()
    with pytest.raises(PruningError, match="scores filters on reference images"):
        create_method("lrp", input_size=5).masks(model, 0.5)
