"""Streamed activation mining against a brute-force reference (all activations stored, sorted with
an explicit index tie-break), plus ties, dead units, resuming, recording and hook hygiene."""
from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from pruning.data.folders import ImageFolderDataset, build_transform, split_dir
from pruning.models import create_model
from stimuli.mining import ActivationMiner, LayerMining, MiningResult, mine, scramble, tie_keys, tie_ranks, unscramble
from tiny_models import assert_no_hooks

LAYERS = ["inception3a", "inception4a", "inception5a"]
K = 8
SIZE = 32


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def net():
    """inception-small in float64 (so activations do not depend on the batch size), seeded."""
    torch.manual_seed(0)
    return create_model("inception-small", num_classes=10).double().eval()


def dataset_images(root, split):
    ds = ImageFolderDataset(split_dir(root, split), transform=build_transform(SIZE, train=False))
    return torch.stack([ds[i][0] for i in range(len(ds))])


def reference_activations(model, images, layers):
    """Every unit's activation for every image: [N, C] per layer (float32, like the miner ranks)."""
    modules, outs = dict(model.named_modules()), {}
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: outs.__setitem__(n, o)) for n in layers]
    with torch.no_grad():
        model(images.to(next(model.parameters()).dtype))
    for h in handles:
        h.remove()
    return {n: outs[n].mean(dim=(2, 3)).float() for n in layers}


def reference_ranking(column: torch.Tensor, k: int, descending: bool, tie_rank: list[int]) -> list[int]:
    """Sort by value, ties by the unit's tie rank (a permutation of the images)."""
    values = column.tolist()
    sign = -1 if descending else 1
    return sorted(range(len(values)), key=lambda i: (sign * values[i], tie_rank[i]))[:k]


def assert_matches_reference(lm: LayerMining, acts: torch.Tensor, k: int, tie_seed: int = 0):
    n, channels = acts.shape
    assert lm.top_indices.shape == lm.bottom_indices.shape == (channels, min(k, n))
    ranks = tie_ranks(torch.arange(n), tie_keys(lm.layer, channels, tie_seed))
    for c in range(channels):
        top = reference_ranking(acts[:, c], k, descending=True, tie_rank=ranks[:, c].tolist())
        bottom = reference_ranking(acts[:, c], k, descending=False, tie_rank=ranks[:, c].tolist())
        assert lm.top_indices[c].tolist() == top, c
        assert lm.bottom_indices[c].tolist() == bottom, c
        assert torch.equal(lm.top_values[c], acts[top, c])
        assert torch.equal(lm.bottom_values[c], acts[bottom, c])
    a64 = acts.double()
    assert torch.equal(lm.count, torch.full((channels,), n))
    assert torch.equal(lm.min, acts.min(0).values) and torch.equal(lm.max, acts.max(0).values)
    assert torch.allclose(lm.mean, a64.mean(0)) and torch.allclose(lm.std, a64.std(0, unbiased=False), atol=1e-9)
    assert torch.equal(lm.dead, acts.max(0).values == acts.min(0).values)


def assert_same_result(a: MiningResult, b: MiningResult):
    assert (a.n_images, a.skipped, a.files) == (b.n_images, b.skipped, b.files)
    assert a.layers.keys() == b.layers.keys()
    for name in a.layers:
        da, db = a.layers[name].to_dict(), b.layers[name].to_dict()
        for key in ("top_values", "top_indices", "bottom_values", "bottom_indices", "count", "min", "max", "dead"):
            assert torch.equal(da[key], db[key]), (name, key)
        assert torch.allclose(da["mean"], db["mean"]) and torch.allclose(da["std"], db["std"])
        assert da["recorded"].keys() == db["recorded"].keys()
        for u in da["recorded"]:
            assert torch.equal(da["recorded"][u], db["recorded"][u])


def test_top_and_bottom_k_equal_brute_force_for_every_batch_size(net, tiny_data):
    acts = reference_activations(net, dataset_images(tiny_data, "val"), LAYERS)
    results = {bs: mine(net, tiny_data, "val", LAYERS, K, image_size=SIZE, batch_size=bs) for bs in (1, 7, 64)}
    for result in results.values():
        assert result.n_images == 60 and result.skipped == 0 and len(result.files) == 60
        for name in LAYERS:
            assert_matches_reference(result.layers[name], acts[name], K)
    assert_same_result(results[1], results[7])
    assert_same_result(results[1], results[64])
    assert_no_hooks(net)


def test_batch_order_does_not_change_the_result(net, tiny_data):
    images = dataset_images(tiny_data, "val")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(1))
    runs = []
    for perm, bs in ((torch.arange(len(images)), 60), (order, 9), (order.flip(0), 5)):
        with ActivationMiner(net, LAYERS, K) as miner:
            for start in range(0, len(perm), bs):
                idx = perm[start:start + bs]
                miner.update(images[idx], idx)
        runs.append(miner.result())
    for other in runs[1:]:
        for name in LAYERS:
            for key in ("top_values", "top_indices", "bottom_values", "bottom_indices", "min", "max", "dead"):
                assert torch.equal(getattr(runs[0][name], key), getattr(other[name], key)), (name, key)


class Tied(nn.Module):
    """Channel 0 = +pixel, channel 1 = −pixel, channel 2 = 0: exact ties everywhere."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(1, 3, 1, bias=False)
        with torch.no_grad():
            self.body.weight.copy_(torch.tensor([1.0, -1.0, 0.0]).view(3, 1, 1, 1))

    def forward(self, x):
        return self.body(x)


def test_ties_follow_each_units_seeded_random_order_not_dataset_order():
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 4, (30,), generator=g).float()
    images = values.view(30, 1, 1, 1).expand(30, 1, 3, 3).contiguous()
    model = Tied()
    perm = torch.randperm(30, generator=g)
    results = {}
    for seed in (0, 1):
        with ActivationMiner(model, ["body"], 6, tie_seed=seed) as miner:
            for start in range(0, 30, 4):
                idx = perm[start:start + 4]
                miner.update(images[idx], idx)
        results[seed] = lm = miner.result()["body"]
        acts = torch.stack([values, -values, torch.zeros(30)], 1)
        assert_matches_reference(lm, acts, 6, tie_seed=seed)
        assert lm.top_indices[2].tolist() != [0, 1, 2, 3, 4, 5]          # the all-tied unit: not dataset order
        assert lm.dead.tolist() == [False, False, True]
        assert (lm.bottom_values[1] == -3).any() and torch.all(lm.bottom_values[1].diff() >= 0)
    assert results[0].top_indices[2].tolist() != results[1].top_indices[2].tolist()   # the seed decides


def test_tie_scramble_is_a_bijection_and_spreads_tied_choices_over_the_dataset():
    keys = tie_keys("layer", 64, seed=3)
    x = torch.cat([torch.tensor([0, 1, 2 ** 32 - 1, 2 ** 31]), torch.randint(0, 2 ** 32, (2000,))])
    for key in keys[:8]:
        y = scramble(x, key)
        assert (y >= 0).all() and (y < 2 ** 32).all() and torch.equal(unscramble(y, key), x)
    small = scramble(torch.arange(4096), keys[0])
    assert len(set(small.tolist())) == 4096                          # no two images share a tie rank
    # every unit of a layer where all 1000 images tie picks its 20 minima spread over the dataset
    ranks = tie_ranks(torch.arange(1000), keys)                       # [1000, 64]
    chosen = ranks.argsort(dim=0)[:20].double() / 999
    assert 0.45 < float(chosen.mean()) < 0.55
    assert not torch.equal(tie_keys("layer", 64, seed=3), tie_keys("layer", 64, seed=4))
    assert not torch.equal(tie_keys("layer", 64, seed=3), tie_keys("other", 64, seed=3))


def test_dead_unit_is_detected(net, tiny_data):
    block = net.inception4a.branch1
    with torch.no_grad():
        block.conv.weight[3].zero_()
        block.bn.weight[3] = 0.0
        block.bn.bias[3] = 0.5     # constant 0.5 after ReLU, not just zero
    lm = mine(net, tiny_data, "val", ["inception4a"], K, image_size=SIZE, batch_size=16).layers["inception4a"]
    acts = reference_activations(net, dataset_images(tiny_data, "val"), ["inception4a"])["inception4a"]
    assert lm.dead[3] and lm.min[3] == lm.max[3] == 0.5 and lm.std[3] == 0
    assert torch.equal(lm.dead, acts.max(0).values == acts.min(0).values)
    assert not lm.dead.all()


class Interrupt(RuntimeError):
    pass


def count_forwards(model, fail_at: int | None = None):
    """A forward pre-hook counting calls and raising at call ``fail_at``; returns (counter, handle)."""
    calls = [0]

    def hook(module, inputs):
        calls[0] += 1
        if fail_at is not None and calls[0] == fail_at:
            raise Interrupt("stop")
    return calls, model.register_forward_pre_hook(hook)


def test_interrupted_run_resumes_to_the_same_result(net, tiny_data, tmp_path):
    kw = dict(image_size=SIZE, batch_size=16, record={"inception4a": [2]})
    full = mine(net, tiny_data, "train", LAYERS, K, **kw)
    state = tmp_path / "state.pt"
    _, handle = count_forwards(net, fail_at=6)
    with pytest.raises(Interrupt):
        mine(net, tiny_data, "train", LAYERS, K, state_path=state, save_every=2, **kw)
    handle.remove()
    assert_no_hooks(net)
    saved = torch.load(state, weights_only=True)
    assert saved["position"] == 64 and saved["miner"]["n_seen"] == 64
    calls, handle = count_forwards(net)
    resumed = mine(net, tiny_data, "train", LAYERS, K, state_path=state, save_every=2, **kw)
    assert calls[0] == (160 - 64) // 16
    assert_same_result(full, resumed)
    again = mine(net, tiny_data, "train", LAYERS, K, state_path=state, **kw)     # finished state: no work
    assert calls[0] == (160 - 64) // 16
    assert_same_result(full, again)
    handle.remove()


def test_state_for_other_arguments_is_ignored(net, tiny_data, tmp_path):
    state = tmp_path / "state.pt"
    mine(net, tiny_data, "val", LAYERS, K, image_size=SIZE, batch_size=16, state_path=state)
    with pytest.warns(UserWarning, match="ignoring mining state"):
        other_k = mine(net, tiny_data, "val", LAYERS, 5, image_size=SIZE, batch_size=16, state_path=state)
    assert_same_result(other_k, mine(net, tiny_data, "val", LAYERS, 5, image_size=SIZE, batch_size=16))
    with torch.no_grad():
        net.conv1.conv.weight.mul_(1.5)
    with pytest.warns(UserWarning, match="ignoring mining state"):
        other_weights = mine(net, tiny_data, "val", LAYERS, 5, image_size=SIZE, batch_size=16, state_path=state)
    assert_same_result(other_weights, mine(net, tiny_data, "val", LAYERS, 5, image_size=SIZE, batch_size=16))
    state.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable mining state"):
        mine(net, tiny_data, "val", LAYERS, 5, image_size=SIZE, batch_size=16, state_path=state)


def test_state_dict_continues_in_a_new_miner(net, tiny_data):
    images = dataset_images(tiny_data, "val")
    idx = torch.arange(len(images))
    with ActivationMiner(net, LAYERS, K, record={"inception3a": [1]}) as whole:
        whole.update(images, idx)
    with ActivationMiner(net, LAYERS, K, record={"inception3a": [1]}) as first:
        first.update(images[:25], idx[:25])
        state = first.state_dict()
    with ActivationMiner(net, LAYERS, K, record={"inception3a": [1]}) as second:
        second.load_state_dict(state)
        second.update(images[25:], idx[25:])
    a, b = whole.result(), second.result()
    for name in LAYERS:
        for key in ("top_values", "top_indices", "bottom_values", "bottom_indices", "min", "max", "dead"):
            assert torch.equal(getattr(a[name], key), getattr(b[name], key))
    assert torch.equal(a["inception3a"].recorded[1], b["inception3a"].recorded[1])
    with ActivationMiner(net, LAYERS, K + 1) as wrong, pytest.raises(ValueError, match="mining state is for"):
        wrong.load_state_dict(state)


def test_recorded_activations_equal_brute_force(net, tiny_data):
    result = mine(net, tiny_data, "val", LAYERS, K, image_size=SIZE, batch_size=7,
                  record={"inception4a": [0, 7], "inception5a": [3]})
    acts = reference_activations(net, dataset_images(tiny_data, "val"), LAYERS)
    assert sorted(result.layers["inception4a"].recorded) == [0, 7]
    assert torch.equal(result.layers["inception4a"].recorded[7], acts["inception4a"][:, 7])
    assert torch.equal(result.layers["inception5a"].recorded[3], acts["inception5a"][:, 3])
    assert result.layers["inception3a"].recorded == {}


def test_hooks_are_removed_on_close_and_on_errors(net):
    x = torch.randn(4, 3, SIZE, SIZE)
    miner = ActivationMiner(net, LAYERS, K)
    assert sum(len(m._forward_hooks) for m in net.modules()) == len(LAYERS)
    net(x.double())                     # a forward pass outside update() is ignored
    assert miner.n_seen == 0
    miner.close()
    miner.close()
    assert_no_hooks(net)
    with pytest.raises(RuntimeError, match="closed"):
        miner.update(x, torch.arange(4))
    with pytest.raises(ZeroDivisionError):
        with ActivationMiner(net, LAYERS, K) as miner:
            miner.update(x, torch.arange(4))
            1 / 0
    assert_no_hooks(net)


def test_bad_arguments_are_clear_errors(net):
    with pytest.raises(ValueError, match=r"layer 'inception9z' does not exist; valid layers: .*'inception4a'"):
        ActivationMiner(net, ["inception9z"], K)
    with pytest.raises(ValueError, match="not mined"):
        ActivationMiner(net, ["inception3a"], K, record={"inception4a": [0]})
    with ActivationMiner(net, ["inception3a"], K) as miner, pytest.raises(ValueError, match="indices"):
        miner.update(torch.randn(3, 3, SIZE, SIZE), torch.arange(2))
    assert_no_hooks(net)


def test_k_shrinks_to_the_images_seen(net):
    with ActivationMiner(net, ["inception3a"], 10) as miner:
        miner.update(torch.randn(4, 3, SIZE, SIZE), torch.tensor([7, 3, 9, 1]))
    lm = miner.result()["inception3a"]
    assert lm.k == 4 and sorted(lm.top_indices[0].tolist()) == [1, 3, 7, 9]
    assert torch.equal(lm.top_indices.sort(1).values, lm.bottom_indices.sort(1).values)


def test_result_round_trips_through_a_weights_only_file(net, tiny_data, tmp_path):
    result = mine(net, tiny_data, "val", LAYERS, K, image_size=SIZE, batch_size=32, record={"inception3a": [0]})
    path = result.save(tmp_path / "mining.pt")
    torch.load(path, weights_only=True)
    loaded = MiningResult.load(path)
    assert_same_result(result, loaded)
    assert loaded.meta["layers"] == LAYERS and loaded.meta["arch"] == "inception-small"


def test_corrupt_images_are_skipped_and_counted(net, tiny_data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_data / "val", root / "val")
    bad = root / "val" / "circle" / "0000_broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    with pytest.warns(UserWarning, match="0000_broken.png"):
        result = mine(net, root, "val", LAYERS, K, image_size=SIZE, batch_size=16, record={"inception3a": [0]})
    assert (result.n_images, result.skipped, len(result.files)) == (60, 1, 61)
    broken = result.files.index(str(bad))
    for lm in result.layers.values():
        assert broken not in lm.top_indices.tolist() and broken not in lm.bottom_indices.tolist()
    assert result.layers["inception3a"].recorded[0][broken].isnan()


def test_training_flags_are_restored(net, tiny_data):
    net.train()
    net.inception3a.branch1.bn.eval()
    mine(net, tiny_data, "val", ["inception3a"], K, image_size=SIZE, batch_size=64)
    assert net.training and net.inception4a.training and not net.inception3a.branch1.bn.training


def test_shards_cover_whole_batches_once():
    from stimuli.mining import shard_positions

    for n, bs, world in [(60, 7, 2), (60, 7, 3), (5, 8, 2), (64, 16, 4)]:
        shares = [shard_positions(n, bs, r, world) for r in range(world)]
        assert sorted(p for s in shares for p in s) == list(range(n))
        for r, share in enumerate(shares):
            assert all((p // bs) % world == r for p in share)
    with pytest.raises(ValueError, match="outside a world of 2"):
        shard_positions(10, 2, 2, 2)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_mining_combines_to_the_single_pass(net, tiny_data, world):
    """Each rank mines its share; combining the shares (in rank order) gives the plain result."""
    record = {"inception4a": [0, 7]}
    plain = mine(net, tiny_data, "val", LAYERS, K, image_size=SIZE, batch_size=7, record=record)
    shares = []
    for rank in range(1, world):   # the other ranks' shares, collected as the collective would
        mine(net, tiny_data, "val", LAYERS, K, image_size=SIZE, batch_size=7, record=record, shard=(rank, world),
             gather=lambda share: shares.append(share) or [share] * world)
    sharded = mine(net, tiny_data, "val", LAYERS, K, image_size=SIZE, batch_size=7, record=record,
                   shard=(0, world), gather=lambda own: [own, *shares])
    assert_same_result(plain, sharded)
    with pytest.raises(ValueError, match="needs gather"):
        mine(net, tiny_data, "val", LAYERS, K, image_size=SIZE, batch_size=7, shard=(0, 2))


def test_bf16_mining_agrees_with_fp32_on_most_top_images(tiny_data):
    torch.manual_seed(0)
    model = create_model("inception-small", num_classes=10).eval()
    fp32 = mine(model, tiny_data, "val", LAYERS, K, image_size=SIZE, batch_size=16)
    bf16 = mine(model, tiny_data, "val", LAYERS, K, image_size=SIZE, batch_size=16, precision="bf16")
    for name in LAYERS:
        a, b = fp32.layers[name], bf16.layers[name]
        assert not torch.equal(a.top_values, b.top_values)          # it did run in bf16
        assert torch.allclose(a.top_values[:, 0], b.top_values[:, 0], rtol=0.05, atol=0.1)
        live = a.max > a.min
        overlap = [len(set(x.tolist()) & set(y.tolist())) / K
                   for x, y in zip(a.top_indices[live], b.top_indices[live])]
        assert sum(overlap) / len(overlap) >= 0.8
    with pytest.raises(ValueError, match=r"choose from \['fp32', 'bf16'\]"):
        mine(model, tiny_data, "val", LAYERS, K, image_size=SIZE, precision="fp16")


def test_a_pass_stopped_on_one_device_is_not_continued_on_another():
    """A CPU pass's saved state keeps its fingerprint; on a GPU the device and its decoder enter it (other
    pixels from nvJPEG, other arithmetic), so a state from elsewhere is ignored, not mixed in."""
    from stimuli.mining import _pass_fingerprint

    def fp(device, decode="auto"):
        return _pass_fingerprint("base", None, "fp32", (0, 1), 16, torch.device(device), decode)

    assert fp("cpu") == fp("cpu", "device") == _pass_fingerprint("base", None, "fp32", (0, 1), 16) == "base"
    assert len({fp("cpu"), fp("cuda"), fp("cuda", "cpu")}) == 3
    assert fp("cuda") == fp("cuda", "device") == fp("cuda:1")
