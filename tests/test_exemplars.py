"""Fair-batch exemplar tasks (IMI / MIS protocol): bins, queries, distinctness, seeding, percentiles."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from stimuli.exemplars import select_tasks
from stimuli.mining import ActivationMiner, LayerMining

N, K = 20, 9


def mined(acts: torch.Tensor, k: int, record: list[int] | None = None, layer_name: str = "0") -> LayerMining:
    """Mine a known activation matrix [images, units]: a layer that returns its input as 1x1 maps."""
    model = nn.Sequential(nn.Identity())
    with ActivationMiner(model, ["0"], k, record={"0": record} if record else None) as miner:
        miner.update(acts[:, :, None, None], torch.arange(len(acts)))
    return dataclasses.replace(miner.result()["0"], layer=layer_name)


@pytest.fixture(scope="module")
def acts():
    return torch.randn(500, 4, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def lm(acts):
    return mined(acts, N * (K + 1))


def side(task, which):
    return ((getattr(task, f"{which}_query"), getattr(task, f"{which}_query_rank"),
             getattr(task, f"{which}_query_activation")),
            list(zip(getattr(task, f"{which}_refs"), getattr(task, f"{which}_ref_ranks"),
                     getattr(task, f"{which}_ref_activations"))))


@pytest.mark.parametrize("unit", [0, 3])
def test_fair_batches_take_one_item_from_every_rank_bin(lm, unit):
    tasks = select_tasks(lm, unit)
    assert [t.task for t in tasks] == list(range(N))
    for which, indices, values in (("max", lm.top_indices, lm.top_values), ("min", lm.bottom_indices,
                                                                           lm.bottom_values)):
        used = []
        for t in tasks:
            query, refs = side(t, which)
            assert len(refs) == K
            assert [(r - 1) // N for _, r, _ in refs] == list(range(K))      # bin b holds ranks (bN, (b+1)N]
            assert (query[1] - 1) // N == K                                  # query: least extreme bin
            for idx, rank, act in [query, *refs]:
                assert idx == indices[unit, rank - 1] and act == values[unit, rank - 1]
            used += [query[1]] + [r for _, r, _ in refs]
        assert sorted(used) == list(range(1, N * (K + 1) + 1))
        assert sorted(side(t, which)[0][1] for t in tasks) == list(range(N * K + 1, N * (K + 1) + 1))
        assert [side(t, which)[0][1] for t in tasks] != list(range(N * K + 1, N * (K + 1) + 1))  # shuffled


def test_items_are_distinct_and_sides_disjoint(lm, acts):
    tasks = select_tasks(lm, 2)
    for t in tasks:
        items = list(t.items())
        assert [role for role, *_ in items].count("ref_max") == K and len(items) == 2 * K + 2
        assert len(set(t.indices())) == 2 * K + 2
        for role, idx, _, act in items:
            assert act == acts[idx, 2]
    top = {i for t in tasks for i in [t.max_query, *t.max_refs]}
    bottom = {i for t in tasks for i in [t.min_query, *t.min_refs]}
    assert not top & bottom
    assert min(acts[i, 2] for i in top) > max(acts[i, 2] for i in bottom)


def test_seeded_and_independent_of_other_units(lm):
    rng_state = torch.random.get_rng_state()
    alone = select_tasks(lm, 3, seed=5)
    select_tasks(lm, 0, seed=5)
    after_other = select_tasks(lm, 3, seed=5)
    assert alone == after_other
    assert torch.equal(rng_state, torch.random.get_rng_state())          # global RNG untouched
    assert select_tasks(lm, 3, seed=6) != alone
    assert select_tasks(dataclasses.replace(lm, layer="other"), 3, seed=5) != alone


def test_percentile_queries_sit_near_the_percentile():
    acts = torch.randn(2000, 3, generator=torch.Generator().manual_seed(1))
    n, k = 5, 3
    lm = mined(acts, n * k, record=[1])
    for p in (99, 95, 85):
        tasks = select_tasks(lm, 1, n_tasks=n, n_references=k, query_percentile=p)
        column = acts[:, 1]
        for t in tasks:
            above = int((column > acts[t.max_query, 1]).sum())     # images ranked before the max query
            below = int((column < acts[t.min_query, 1]).sum())
            target = (1 - p / 100) * (len(column) - 1)              # 0-based rank of the p-th percentile
            assert abs(above - target) <= n // 2 + 1 and abs(below - target) <= n // 2 + 1
            assert (t.max_query_rank, t.min_query_rank) == (above + 1, below + 1)
            assert sorted((r - 1) // n for r in t.max_ref_ranks) == list(range(k))
            assert len(set(t.indices())) == 2 * k + 2
        assert sorted(i for t in tasks for i in t.max_refs) == sorted(lm.top_indices[1, :n * k].tolist())
        assert len({t.max_query for t in tasks}) == n


def test_percentile_needs_recorded_activations_and_enough_images(lm):
    with pytest.raises(ValueError, match=r"record=\{'0': \[1"):
        select_tasks(lm, 1, query_percentile=95)
    small = mined(torch.randn(500, 2, generator=torch.Generator().manual_seed(2)), N * K, record=[0])
    with pytest.raises(ValueError, match="too small for query_percentile=95"):
        select_tasks(small, 0, query_percentile=95)


def test_too_little_data_is_a_clear_error(acts):
    with pytest.raises(ValueError, match=r"50 top/bottom images were mined .* need 200 per side"):
        select_tasks(mined(acts, 50), 0)
    with pytest.raises(ValueError, match="overlap"):
        select_tasks(mined(acts[:300], N * (K + 1)), 0)
    constant = torch.cat([torch.randn(500, 1), torch.full((500, 1), 2.0)], 1)
    with pytest.raises(ValueError, match="dead"):
        select_tasks(mined(constant, N * (K + 1)), 1)
    with pytest.raises(ValueError, match="out of range"):
        select_tasks(mined(acts, N * (K + 1)), 4)


@pytest.mark.parametrize("size", [64, 224])
def test_an_exemplar_shows_exactly_the_crop_the_network_was_shown(tmp_path, size):
    """At ImageNet size the network sees a 256 → 224 centre crop; the exemplar shown must be that crop."""
    import numpy as np
    from PIL import Image
    from torchvision import transforms

    from pruning.data.common import IMAGENET_MEAN, IMAGENET_STD
    from pruning.data.folders import build_transform
    from stimuli.bank import StimulusBank
    from stimuli.pipeline import ExemplarImages

    path = tmp_path / "wide.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(path)
    bank = StimulusBank(tmp_path / "bank")
    shown = Image.open(bank.root / ExemplarImages([str(path)], bank, size).name(0)).convert("RGB")
    as_input = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)(transforms.functional.to_tensor(shown))
    seen = build_transform(size, train=False)(Image.open(path).convert("RGB"))
    assert shown.size == (size, size) and torch.allclose(as_input, seen, atol=1e-6)


def test_percentile_queries_in_a_block_of_ties_are_seeded_and_never_a_reference():
    """After a ReLU, 40 % of the images tie at exactly 0 and the min queries' window falls inside that
    block: the queries are drawn from it in a seeded random order (not dataset order) and none of them is
    one of the unit's references."""
    gen = torch.Generator().manual_seed(3)
    acts = torch.randn(2000, 2, generator=gen).clamp_min(0) * (torch.rand(2000, 2, generator=gen) > 0.2)
    n, k = 5, 3
    lm = mined(acts, n * k, record=[1])
    zeros = (acts[:, 1] == 0).nonzero().flatten().tolist()
    assert len(zeros) > 0.4 * len(acts)
    tasks = select_tasks(lm, 1, n_tasks=n, n_references=k, query_percentile=85, seed=0)
    references = {i for t in tasks for i in [*t.max_refs, *t.min_refs]}
    queries = [t.min_query for t in tasks]
    assert all(acts[q, 1] == 0 for q in queries)
    assert not references & set(queries) and not references & {t.max_query for t in tasks}
    in_dataset_order = [i for i in zeros if i not in references][:n]
    assert sorted(queries) != in_dataset_order
    assert {t.min_query for t in select_tasks(lm, 1, n_tasks=n, n_references=k, query_percentile=85,
                                              seed=0)} == set(queries)
    assert {t.min_query for t in select_tasks(lm, 1, n_tasks=n, n_references=k, query_percentile=85,
                                              seed=1)} != set(queries)
