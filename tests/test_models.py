import hashlib
import os

import pytest
import torch
from torch import nn

from pruning.models import (MODELS, WeightsError, count_flops, create_model, load_checkpoint, measure_sparsity,
                            save_checkpoint)
from pruning.models.weights import torchvision_weights
from tiny_models import archs

ROUND_TRIP = archs("inception-small", "observer-small", "googlenet", "resnet18", "resnet50")


@pytest.mark.parametrize("arch", ROUND_TRIP)
def test_save_load_round_trip_gives_identical_outputs(arch, tmp_path, seeded):
    model = create_model(arch, num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    save_checkpoint(tmp_path / "model.pt", model, num_classes=7)
    raw = torch.load(tmp_path / "model.pt", weights_only=True)  # the DESIGN §3 contract
    assert raw["arch"] == arch
    loaded = load_checkpoint(tmp_path).model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    # the same weights through the factory
    again = create_model(arch, num_classes=7, weights=tmp_path / "model.pt").eval()
    with torch.no_grad():
        assert torch.equal(again(x), expected)


@pytest.mark.parametrize("arch", archs("vgg16", "alexnet"))
def test_large_torchvision_models_build_and_run(arch):
    model = create_model(arch, num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError, match=r"unknown model 'vit'; choose from \['alexnet', 'googlenet'"):
        create_model("vit")


def test_missing_and_corrupt_weights_name_the_file(tmp_path):
    with pytest.raises(WeightsError, match=r"weights file .*nope\.pt does not exist \(model resnet18\)"):
        create_model("resnet18", weights=tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match=r"cannot read weights file .*junk\.pt"):
        create_model("resnet18", weights=junk)
    with pytest.raises(WeightsError, match=r"cannot read checkpoint .*junk\.pt"):
        load_checkpoint(junk)


def test_shape_mismatch_and_wrong_arch_are_explained(tmp_path):
    save_checkpoint(tmp_path / "m.pt", create_model("inception-small", num_classes=10), num_classes=10)
    with pytest.raises(WeightsError, match=r"holds a 'inception-small' checkpoint, but model 'observer-small'"):
        create_model("observer-small", num_classes=10, weights=tmp_path / "m.pt")
    torch.save(create_model("resnet18", num_classes=10).state_dict(), tmp_path / "plain.pt")
    with pytest.raises(WeightsError, match=r"plain\.pt does not fit model 'resnet18' with num_classes=1000: "
                                           r"shape mismatch fc\.weight: file \(10, 512\) vs model \(1000, 512\)"):
        create_model("resnet18", num_classes=1000, weights=tmp_path / "plain.pt")
    with pytest.raises(WeightsError, match=r"only the classifier differs: the file's has 10 classes, the model's 5 .*"
                                           r"model\.new_classifier = true"):
        create_model("resnet18", num_classes=5, weights=tmp_path / "plain.pt")


@pytest.mark.parametrize("arch, head", [("resnet18", ["fc.weight", "fc.bias"]),
                                        pytest.param("googlenet", ["fc.weight", "fc.bias", "aux1.fc2.weight",
                                                                   "aux1.fc2.bias", "aux2.fc2.weight", "aux2.fc2.bias"],
                                                     marks=pytest.mark.slow)])
def test_new_classifier_loads_every_tensor_but_the_classifier(tmp_path, arch, head):
    """Weights for 10 classes on a 5-class model with ``new_classifier``: every tensor equals the file's except the
    classifier (and GoogLeNet's auxiliary ones), which keep the seeded fresh initialization of a model built
    without weights; weights of another architecture still fail."""
    kwargs = {"aux_logits": True} if arch == "googlenet" else {}
    torch.manual_seed(1)
    torch.save(create_model(arch, num_classes=10, **kwargs).state_dict(), tmp_path / "ten.pt")
    file_state = torch.load(tmp_path / "ten.pt")
    torch.manual_seed(2)
    fresh = create_model(arch, num_classes=5, **kwargs).state_dict()
    torch.manual_seed(2)
    loaded = create_model(arch, num_classes=5, weights=tmp_path / "ten.pt", new_classifier=True, **kwargs).state_dict()
    assert sorted(k for k in loaded if loaded[k].shape != file_state[k].shape) == sorted(head)
    for key, value in loaded.items():
        assert torch.equal(value, fresh[key] if key in head else file_state[key]), key
    with pytest.raises(WeightsError, match="does not fit model 'observer-small'"):
        create_model("observer-small", num_classes=5, weights=tmp_path / "ten.pt", new_classifier=True)


@pytest.mark.slow
def test_weights_of_another_architecture_list_the_missing_keys(tmp_path):
    torch.save(create_model("resnet18", num_classes=10).state_dict(), tmp_path / "plain.pt")
    with pytest.raises(WeightsError, match=r"does not fit model 'resnet50'.*missing keys"):
        create_model("resnet50", num_classes=10, weights=tmp_path / "plain.pt")


def test_torchvision_weights_come_only_from_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    member = torchvision_weights("resnet18", "IMAGENET1K_V1")
    expected = tmp_path / "hub" / "checkpoints" / os.path.basename(member.url)
    with pytest.raises(WeightsError, match=f"not in the local cache: expected {expected}"):
        create_model("resnet18", weights="IMAGENET1K_V1")
    reference = create_model("resnet18").eval()
    expected.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), expected)
    model = create_model("resnet18", weights="ResNet18_Weights.DEFAULT").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    with pytest.raises(WeightsError, match=r"unknown weights 'IMAGENET9K' for resnet18; choose from \['DEFAULT'"):
        create_model("resnet18", weights="IMAGENET9K")


def test_the_weights_digest_follows_the_file_content_and_the_cache_file(tmp_path, monkeypatch):
    """What a study fingerprints its starting weights by: a local file's content (the same path with other
    weights reruns training), a torchvision name's cache file; a missing one says why."""
    from pruning.models.weights import weights_digest

    path = tmp_path / "w.pt"
    torch.manual_seed(0)
    torch.save(create_model("resnet18", num_classes=5).state_dict(), path)
    first = weights_digest("resnet18", str(path))
    torch.manual_seed(1)
    torch.save(create_model("resnet18", num_classes=5).state_dict(), path)
    assert weights_digest("resnet18", str(path)) not in (first, "") and weights_digest("resnet18", "") == ""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert weights_digest("resnet18", "IMAGENET1K_V1").startswith("unavailable: torchvision weights")
    cached = tmp_path / "hub" / "checkpoints" / os.path.basename(torchvision_weights("resnet18", "IMAGENET1K_V1").url)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x" * 7)
    assert weights_digest("resnet18", "IMAGENET1K_V1") == hashlib.sha256(b"x" * 7).hexdigest()
    cached.write_bytes(b"y" * 7)        # other weights of the same size under the torchvision name, written later
    later = cached.stat().st_mtime_ns + 10**9
    os.utime(cached, ns=(later, later))
    assert weights_digest("resnet18", "IMAGENET1K_V1") == hashlib.sha256(b"y" * 7).hexdigest()


@pytest.mark.slow
def test_googlenet_imagenet_state_dict_with_aux_heads_loads_into_aux_free_model(tmp_path):
    with_aux = create_model("googlenet", num_classes=10, aux_logits=True)
    assert any(k.startswith("aux1.") for k in with_aux.state_dict())
    torch.save(with_aux.state_dict(), tmp_path / "g.pt")
    plain = create_model("googlenet", num_classes=10, weights=tmp_path / "g.pt").eval()
    assert plain.aux1 is None
    with_aux.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(plain(x), with_aux(x))


def test_flops_and_sparsity_measurements():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
    model.arch = "custom"
    assert count_flops(model, 8) == 2 * (3 * 4 * 9 * 64) + 2 * (256 * 2)
    with torch.no_grad():
        model[0].weight[:2] = 0  # 54 of 108 conv weights
        model[2].weight[0, :128] = 0  # 128 of 512
    s = measure_sparsity(model)
    assert s["per_layer"] == {"0": 0.5, "2": 0.25}
    assert s["total"] == pytest.approx((54 + 128) / (108 + 512), abs=1e-6)


@pytest.mark.parametrize("name", archs(*MODELS))
def test_registry_metadata_is_consistent(name):
    spec = MODELS[name]
    model = create_model(name, num_classes=3)
    modules = dict(model.named_modules())
    assert all(layer in modules for layer in spec.stem + spec.unit_layers), name


def test_renamed_torchvision_googlenet_weights_keep_their_input_transform(tmp_path, monkeypatch):
    """torchvision's GoogLeNet weights need ``transform_input``; a copy under another name is recognised by its
    content (torchvision names its files after the first 8 hex digits of their sha256); other files are not."""
    from types import SimpleNamespace

    import torchvision

    from pruning.models.weights import resolve_weights
    from sparsight.files import sha256_file

    path = tmp_path / "my-googlenet.pth"
    torch.save(create_model("googlenet", num_classes=10).state_dict(), path)
    assert resolve_weights("googlenet", str(path))[1] == {}
    release = SimpleNamespace(url=f"https://download.pytorch.org/models/googlenet-{sha256_file(path)[:8]}.pth")
    monkeypatch.setattr(torchvision.models, "get_model_weights", lambda name: [release])
    assert resolve_weights("googlenet", str(path))[1] == {"transform_input": True}
    assert resolve_weights("resnet18", str(path))[1] == {}


def test_evaluating_counting_and_tracing_keep_every_modules_own_mode_even_after_an_error():
    """A BatchNorm frozen in eval mode inside a training model stays frozen, and a failing pass leaves the
    model in the mode it had (not the eval mode the pass asked for)."""
    import torch
    from torch import nn

    from pruning.models import count_flops
    from pruning.models.modes import eval_mode
    from pruning.models.layers import trace_blank
    from pruning.training import evaluate
    from pruning.data.common import Batch

    model = create_model("inception-small", num_classes=3)
    model.train()
    frozen = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    frozen.eval()
    expected = {name: m.training for name, m in model.named_modules()}
    modes = lambda: {name: m.training for name, m in model.named_modules()}  # noqa: E731
    evaluate(model, [Batch(torch.rand(2, 3, 64, 64), torch.tensor([0, 1]))], device="cpu")
    assert modes() == expected
    count_flops(model, 64)
    assert modes() == expected
    trace_blank(model, 64)
    assert modes() == expected
    with pytest.raises(RuntimeError):
        with eval_mode(model):
            assert not any(modes().values())
            raise RuntimeError("a failing pass")
    assert modes() == expected
    with pytest.raises(ValueError, match="too small"):
        trace_blank(model, 4)
    assert modes() == expected


def test_a_checkpoint_applies_its_masks_on_load_and_names_a_mask_that_does_not_fit(tmp_path):
    import torch

    model = create_model("inception-small", num_classes=3)
    name = "inception3a.branch1.conv.weight"
    weight = dict(model.named_parameters())[name]
    mask = (torch.rand_like(weight) > 0.5)
    save_checkpoint(tmp_path / "ok.pt", model, num_classes=3, masks={name: mask})
    loaded = dict(load_checkpoint(tmp_path / "ok.pt").model.named_parameters())[name]
    assert torch.equal(loaded, weight.detach() * mask)           # pruned entries are zero after loading
    save_checkpoint(tmp_path / "shape.pt", model, num_classes=3, masks={name: mask[:1]})
    with pytest.raises(WeightsError, match=rf"shape\.pt: its masks do not fit inception-small: mask '{name}' has shape"):
        load_checkpoint(tmp_path / "shape.pt")
    save_checkpoint(tmp_path / "name.pt", model, num_classes=3, masks={"conv9.weight": mask})
    with pytest.raises(WeightsError, match=r"its masks do not fit inception-small: mask for unknown parameter 'conv9"):
        load_checkpoint(tmp_path / "name.pt")
