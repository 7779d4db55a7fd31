"""Physical removal of structurally pruned filters: same function, fewer parameters and FLOPs."""
import copy

import pytest
import torch
from torch import nn

from pruning.masks import masked
from pruning.methods import PruningError, create_method
from pruning.models import WeightsError, create_model, get_spec, load_checkpoint, save_checkpoint
from pruning.models.checkpoint import count_flops, count_params
from pruning.physical import ieee_fp32, remove_pruned_filters
from tiny_models import TwoConvNet, archs

SIZE = 64


def _randomize_batchnorms(model: nn.Module) -> None:
    """Non-trivial running stats and affine parameters, so an unmasked BN would leak a constant."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)


def _inputs() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _outputs(model, masks, x=None):
    model.eval()
    x = _inputs() if x is None else x
    with torch.no_grad(), masked(model, masks):
        return model(x.to(next(model.parameters()).dtype))


@pytest.fixture(scope="module", params=archs("inception-small", "googlenet", "resnet50"))
def pruned(request):
    arch = request.param
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10).double()
    with torch.no_grad():
        _randomize_batchnorms(model)
    masks = create_method("structured").masks(model, 0.5, exclude=get_spec(arch).stem)
    if arch == "inception-small":  # unstructured parts on top: they must be re-indexed exactly
        extra = create_method("random", seed=1).masks(model, 0.3, exclude=get_spec(arch).stem)
        for k, m in extra.items():
            masks[k] = masks[k] & m if k in masks else m
    reference = _outputs(model, masks)
    model.train()
    result = remove_pruned_filters(model, masks, input_size=SIZE)
    return arch, model, masks, reference, result


def test_physical_model_computes_what_the_masked_model_computed(pruned):
    arch, model, _, reference, result = pruned
    assert model.training  # the training flag is restored
    assert result.removed_total > 0
    out = _outputs(model, result.masks)
    assert out.shape == reference.shape
    assert torch.allclose(out, reference, rtol=1e-10, atol=1e-12), float((out - reference).abs().max())
    assert result.params_after < result.params_before and result.flops_after < result.flops_before
    assert result.params_after == count_params(model)[0]
    assert result.flops_after == count_flops(model, SIZE)
    for key, mask in result.masks.items():  # masks fit the new shapes; all-True ones are dropped
        assert mask.shape == dict(model.named_parameters())[key].shape and not mask.all()


def test_coupled_filters_are_kept_masked_only_where_needed(pruned):
    arch, model, masks, _, result = pruned
    if arch == "resnet50":  # conv3 / downsample feed residual adds: left as masked zeros
        assert {"layer1.0.conv3", "layer1.0.downsample.0", "layer4.2.conv3"} <= set(result.kept_masked)
        assert all(n.endswith(("conv3", "downsample.0")) for n in result.kept_masked)
        assert "layer1.0.conv1" in result.removed and "layer4.2.conv2" in result.removed
        assert model.layer1[0].conv3.out_channels == 256 and model.layer1[0].conv1.out_channels == 32
        assert "coupled" in result.reasons["layer1.0.conv3"]
        kept = result.masks["layer1.0.conv3.weight"]
        assert (~kept.reshape(256, -1).any(1)).sum() == result.kept_masked["layer1.0.conv3"]
    else:  # inception branches are concatenated: every fully masked filter goes
        assert result.kept_masked == {}
        convs = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
        assert not any(k in convs and not m.reshape(m.shape[0], -1).any(1).all() for k, m in result.masks.items())
    if arch == "googlenet":
        assert model.inception3a.branch1.conv.out_channels == 32  # 64 filters, half removed
        assert model.fc.in_features < 1024


def test_physical_checkpoint_round_trip(pruned, tmp_path):
    arch, model, _, _, result = pruned
    save_checkpoint(tmp_path / "model.pt", model, num_classes=10, masks=result.masks)
    raw = torch.load(tmp_path / "model.pt", map_location="cpu", weights_only=True)
    assert raw["physical"] is True
    loaded = load_checkpoint(tmp_path)
    assert loaded.model.fc.in_features == model.fc.in_features
    assert count_params(loaded.model)[0] == result.params_after
    # load_checkpoint rebuilds a float32 model and bakes the masks in: compare with the same in float32
    expected = _outputs(copy.deepcopy(model).float(), result.masks)
    got = _outputs(loaded.model, {})
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    if arch == "resnet50":
        assert set(loaded.masks) == set(result.masks)
    if arch == "inception-small":  # a reloaded physical model is saved as physical again
        save_checkpoint(tmp_path / "again.pt", loaded.model, num_classes=10)
        again = load_checkpoint(tmp_path / "again.pt")
        assert torch.equal(_outputs(again.model, {}), got)


def test_plain_checkpoint_with_removed_channels_fails_clearly(tmp_path):
    torch.manual_seed(0)
    model = create_model("inception-small", num_classes=10)
    masks = create_method("structured").masks(model, 0.5, exclude=get_spec("inception-small").stem)
    remove_pruned_filters(model, masks)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, num_classes=10, physical=False)
    with pytest.raises(WeightsError, match="shape mismatch") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def test_refuses_to_remove_every_filter_of_a_layer():
    torch.manual_seed(0)
    model = create_model("inception-small", num_classes=10)
    masks = create_method("structured").masks(model, 0.5, exclude=get_spec("inception-small").stem)
    masks["inception3a.branch1.conv.weight"][:] = False
    before = count_params(model)[0]
    with pytest.raises(PruningError, match="inception3a.branch1.*all 16 of its filters"):
        remove_pruned_filters(model, masks)
    assert count_params(model)[0] == before  # refused before anything changed


def _filter_masks(model, biases: bool) -> dict:
    """Half the filters of each conv masked by hand, with or without their biases."""
    masks = {}
    for name in ("conv1", "conv2"):
        keep = torch.arange(getattr(model, name).out_channels) % 2 == 0
        masks[f"{name}.weight"] = keep.view(-1, 1, 1, 1).expand_as(getattr(model, name).weight).clone()
        if biases:
            masks[f"{name}.bias"] = keep.clone()
    return masks


def test_filter_whose_bias_is_not_masked_stays():
    torch.manual_seed(0)
    model = TwoConvNet().double()
    with torch.no_grad():
        model.conv1.bias.uniform_(0.1, 0.5)
    masks = _filter_masks(model, biases=False)
    reference = _outputs(model, masks)
    result = remove_pruned_filters(model, masks, input_size=16)
    assert result.removed == {} and result.kept_masked == {"conv1": 4, "conv2": 6}
    assert "not exactly zero" in result.reasons["conv1"]
    assert torch.equal(_outputs(model, result.masks), reference)

    model = TwoConvNet().double()
    masks = _filter_masks(model, biases=True)
    reference = _outputs(model, masks)
    result = remove_pruned_filters(model, masks, input_size=16)
    assert result.removed == {"conv1": 4, "conv2": 6} and result.masks == {}
    assert model.conv2.in_channels == 4 and model.fc.in_features == 6
    assert torch.allclose(_outputs(model, {}), reference, rtol=1e-12, atol=1e-14)


class WithAux(nn.Module):
    """An auxiliary head that runs only in training (as GoogLeNet's aux1/aux2) reads a pruned conv."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.aux = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        out = self.fc(torch.relu(self.bn2(self.conv2(x))).mean((2, 3)))
        return (out, self.aux(x).mean((2, 3))) if self.training else out


def test_training_only_branches_are_pruned_too():
    torch.manual_seed(0)
    model = WithAux().double()
    with torch.no_grad():
        _randomize_batchnorms(model)
    masks = create_method("structured").masks(model, 0.5, exclude=("fc", "aux"))
    x = _inputs()[:, :, :8, :8]

    def aux_mode():  # the training path, with BatchNorm statistics frozen
        model.train()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()

    aux_mode()
    with torch.no_grad(), masked(model, masks):
        reference = model(x)
    result = remove_pruned_filters(model, masks, input_size=8)
    assert result.removed == {"conv1": 4, "conv2": 3}
    assert model.aux.in_channels == 4 and model.training
    aux_mode()
    with torch.no_grad(), masked(model, result.masks):
        out = model(x)
    assert all(torch.allclose(o, r, rtol=1e-12, atol=1e-14) for o, r in zip(out, reference))


def test_channel_map_names_each_kept_channel_by_its_parent_index(pruned):
    arch, model, masks, _, result = pruned
    assert result.channel_map, "a model that lost channels maps them"
    convs = 0
    for name, mapping in result.channel_map.items():
        assert mapping == sorted(set(mapping))            # channels are removed, never reordered
        module = dict(model.named_modules())[name]
        mask = masks.get(f"{name}.weight")
        if isinstance(module, nn.Conv2d) and mask is not None:
            convs += 1                                    # a conv keeps every filter its mask left alive ...
            alive = [i for i in range(mask.shape[0]) if mask[i].any()]
            assert set(alive) <= set(mapping)
            assert mask.shape[0] - len(mapping) == result.removed.get(name, 0)   # ... and loses the removed ones
    assert convs > 0


def test_a_physically_pruned_unit_has_the_masked_models_exemplars(tiny_data, tmp_path):
    """Stimuli of a renumbered model are filed under the parent's unit index and equal the masked model's."""
    import pandas as pd

    from pruning.masks import apply_masks
    from stimuli.bank import StimulusBank
    from stimuli.pipeline import StimuliSettings, make_stimuli
    from stimuli.units import Unit

    torch.manual_seed(0)
    model = create_model("inception-small", num_classes=10, width=0.5).eval()
    _randomize_batchnorms(model)
    masks = create_method("structured").masks(model, 0.5, exclude=("conv1",))
    masked_model = copy.deepcopy(model)
    apply_masks(masked_model, masks)
    physical = copy.deepcopy(masked_model)
    result = remove_pruned_filters(physical, masks, input_size=32)
    apply_masks(physical, result.masks)
    layer = "inception4a"
    mapping = result.channel_map[layer]
    removed = sorted(set(range(create_model("inception-small", num_classes=10, width=0.5).inception4a.out_channels))
                     - set(mapping))
    units = [Unit(layer, u) for u in (mapping[0], mapping[3], mapping[-1], removed[0])]
    settings = StimuliSettings(kinds=("natural",), n_tasks=2, n_references=2, image_size=32, batch_size=16)
    banks = {}
    for name, net, cmap in (("masked", masked_model, None), ("physical", physical, result.channel_map)):
        bank = StimulusBank(tmp_path / name)
        status = make_stimuli(net, "m", units, tiny_data, bank, settings, pruned_model=True, channel_map=cmap)
        bank.write_status("m", status)
        banks[name] = (pd.read_parquet(bank.assemble(["m"])[0]), pd.DataFrame(status))
    (masked_rows, masked_status), (physical_rows, physical_status) = banks["masked"], banks["physical"]
    keys = ["layer", "unit", "task", "role", "rank"]
    pd.testing.assert_frame_equal(physical_rows.sort_values(keys, ignore_index=True),
                                  masked_rows.sort_values(keys, ignore_index=True))
    assert len(physical_rows) and set(physical_rows["unit"]) <= {u.unit for u in units[:3]}
    verdicts = physical_status.merge(masked_status, on=["layer", "unit", "kind"], suffixes=("", "_masked"))
    assert len(verdicts) == len(units) and (verdicts["status"] == verdicts["status_masked"]).all()
    gone = physical_status[physical_status["unit"] == removed[0]].iloc[0]
    assert gone["status"] == "pruned" and "physical" in gone["reason"]
    assert masked_status[masked_status["unit"] == removed[0]].iloc[0]["status"] == "pruned"


def test_a_masked_structured_model_reports_the_effective_sparsity_of_its_physically_pruned_twin():
    """The weights that read a removed filter's channel are non-zero in the masked model but gone in the
    physical one: ``effective`` counts them as zero in both, so one job reports one sparsity whichever way
    its filters are removed; an unstructured model's effective sparsity is its measured one."""
    from types import SimpleNamespace

    from pruning.masks import apply_masks
    from pruning.models.counting import layer_sizes, measure_sparsity
    from pruning.schedule import PruneJob
    from pruning.workflows import effective_sparsity

    torch.manual_seed(0)
    model = create_model("inception-small", num_classes=10)
    sizes = layer_sizes(model)
    stem = get_spec("inception-small").stem
    scope = [n for n in sizes if not any(n == s or n.startswith(s + ".") for s in stem) and n != "fc"]
    masks = create_method("structured").masks(model, 0.5, exclude=stem)
    apply_masks(model, masks)
    job = PruneJob("structured", 0.5, exclude=stem)
    effective = effective_sparsity(model, SimpleNamespace(masks=masks), job, scope, sizes, SIZE)
    nominal = measure_sparsity(model, scope=scope, reference=sizes)["total"]
    twin = copy.deepcopy(model)
    remove_pruned_filters(twin, masks, input_size=SIZE)
    assert effective == measure_sparsity(twin, scope=scope, reference=sizes)["total"]
    assert nominal == pytest.approx(0.5, abs=0.01) and effective > nominal + 0.1
    assert layer_sizes(model) == sizes          # the masked model itself keeps its shapes

    unstructured = create_model("inception-small", num_classes=10)
    apply_masks(unstructured, create_method("unstructured-global").masks(unstructured, 0.5, exclude=stem))
    job = PruneJob("unstructured-global", 0.5, exclude=stem)
    assert effective_sparsity(unstructured, None, job, scope, sizes, SIZE) == measure_sparsity(
        unstructured, scope=scope, reference=sizes)["total"]


def test_the_two_models_are_compared_in_full_fp32_and_tf32_is_left_as_it_was():
    """On a GPU cuDNN convolutions default to TF32, which rounds the masked and the smaller model apart
    by more than the check allows: the comparison forwards run without it, and the flags come back."""
    torch.manual_seed(0)
    model = create_model("inception-small", num_classes=10)
    masks = create_method("structured").masks(model, 0.5, exclude=get_spec("inception-small").stem)
    seen = []
    model.fc.register_forward_hook(lambda m, i, o: seen.append((torch.backends.cudnn.allow_tf32,
                                                                torch.backends.cuda.matmul.allow_tf32)))
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        remove_pruned_filters(model, masks, input_size=SIZE)
        assert seen.count((False, False)) == 4       # masked, smaller, and their tagged copies (tracing may use TF32)
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (before[0], True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before[1]


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["googlenet", "resnet50"])
def test_physical_pruning_of_an_fp32_model_on_the_gpu_verifies(arch):
    """As a study runs it on a GPU: fp32 weights on CUDA, TF32 at its default; the smaller model computes
    what the masked one computed (the in-function check passes) and the channel map is complete."""
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10).cuda()
    with torch.no_grad():
        _randomize_batchnorms(model)
    masks = {k: v.cuda() for k, v in create_method("structured").masks(model, 0.5, exclude=get_spec(arch).stem).items()}
    x = _inputs().float().cuda()
    with ieee_fp32():
        reference = _outputs(model, masks, x).double()
    model.train()
    result = remove_pruned_filters(model, masks, input_size=SIZE)
    assert result.removed_total > 0 and result.channel_map
    with ieee_fp32():
        out = _outputs(model, result.masks, x).double()
    assert torch.allclose(out, reference, rtol=1e-3, atol=1e-4 * float(reference.abs().max()))


@pytest.mark.parametrize("arch", archs("inception-small", "googlenet"))
def test_a_kept_channel_silent_on_the_probe_keeps_its_own_index(arch):
    """The channel map is exact where activations cannot tell channels apart: a kept unit that is zero on
    every probe input (here a BatchNorm bias far below zero) next to a removed one (also zero) is named by
    its own parent index, not by the removed neighbour's. Every block's map equals the concatenation of its
    branches' surviving filters."""
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10).double().eval()
    with torch.no_grad():
        _randomize_batchnorms(model)
    masks = create_method("structured").masks(model, 0.5, exclude=get_spec(arch).stem)
    alive = {name: [i for i in range(m.shape[0]) if m[i].any()] for name, m in
             ((k.rpartition(".")[0], m) for k, m in masks.items() if k.endswith("conv.weight"))}
    branch = "inception4a.branch1.conv"
    silent = next(i for i in alive[branch] if i > 0 and i - 1 not in alive[branch])   # a removed filter just before
    with torch.no_grad():
        model.inception4a.branch1.bn.bias[silent] = -1e4
    result = remove_pruned_filters(model, masks, input_size=SIZE)
    assert result.kept_masked_total == 0
    for block in ("inception3a", "inception3b", "inception4a", "inception4b", "inception5a"):   # in both
        ends = [f"{block}.{branch}.conv" for branch in ("branch1", "branch2.1", "branch3.1", "branch4.1")]
        expected, offset = [], 0
        for end in ends:
            expected += [offset + i for i in alive[end]]
            offset += masks[f"{end}.weight"].shape[0]
        assert result.channel_map[block] == expected, block
    assert silent in result.channel_map["inception4a"] and silent - 1 not in result.channel_map["inception4a"]
    assert not [note for note in result.notes if "matched by their activations" in note]
