"""Natural-exemplar tasks of one unit (IMI / MIS protocol, DESIGN §6): references and queries.

N tasks (default 20) with K references per side (default 9) use the N·(K+1) most extreme images
of each end of a unit's activations, ranks 1..N·(K+1), most extreme first.  "Fair batches": the
ranks are cut into K+1 bins of N consecutive ranks, each bin is shuffled with a seeded generator,
and task j takes the j-th item of every bin — bins 1..K give its K references, the last (least
extreme) bin its query.  The min side does the same with the bottom list.

With ``query_percentile=p > 0`` (IMI's harder variants, e.g. 99, 95, 85) the queries come instead
from the N images around the p-th percentile of the unit's full activation distribution (max
queries) and around the (100−p)-th (min queries); the references are the top / bottom N·K ranks
in K bins as before.  This needs the unit's recorded activations (``mine(..., record=...)``).  Tied
activations (a block of zeros after a ReLU) are ordered by a seeded random permutation of the unit,
never by dataset order, and an image that is already one of the unit's references is never a query.

The shuffles of a unit are seeded from ``(seed, layer, unit)`` only, so a unit's tasks do not
depend on which other units are selected.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparsight.files import stable_int

from .mining import LayerMining


@dataclass
class Task:
    """One 2-AFC task: dataset indices of the queries and references, with their ranks and activations.

    Ranks are 1-based and count from the extreme end of their side: rank 1 of the max side is the
    most activating image, rank 1 of the min side the least activating one.
    """
    task: int
    max_query: int
    min_query: int
    max_refs: list[int]
    min_refs: list[int]
    max_query_rank: int
    min_query_rank: int
    max_ref_ranks: list[int]
    min_ref_ranks: list[int]
    max_query_activation: float
    min_query_activation: float
    max_ref_activations: list[float]
    min_ref_activations: list[float]

    def items(self):
        """``(role, dataset index, rank, activation)`` for every image of the task (manifest roles)."""
        yield "query_max", self.max_query, self.max_query_rank, self.max_query_activation
        yield "query_min", self.min_query, self.min_query_rank, self.min_query_activation
        yield from (("ref_max", *item) for item in zip(self.max_refs, self.max_ref_ranks, self.max_ref_activations))
        yield from (("ref_min", *item) for item in zip(self.min_refs, self.min_ref_ranks, self.min_ref_activations))

    def indices(self) -> list[int]:
        return [idx for _, idx, _, _ in self.items()]


def unit_generator(seed: int, layer: str, unit: int, purpose: str = "exemplars") -> torch.Generator:
    """A CPU generator seeded from ``(purpose, seed, layer, unit)`` alone."""
    return torch.Generator().manual_seed(stable_int(f"{purpose}:{seed}:{layer}:{unit}") & (2 ** 63 - 1))


# an item is (dataset index, rank, activation)
Item = tuple[int, int, float]


def _items(indices: torch.Tensor, values: torch.Tensor, first_rank: int = 1) -> list[Item]:
    return [(int(i), first_rank + r, float(v)) for r, (i, v) in enumerate(zip(indices.tolist(), values.tolist()))]


def _fair_bins(items: list[Item], n: int, generator: torch.Generator) -> list[list[Item]]:
    """Cut ``items`` into bins of ``n`` consecutive ranks and shuffle each: ``bins[b][j]`` goes to task j."""
    bins = []
    for start in range(0, len(items), n):
        perm = torch.randperm(n, generator=generator).tolist()
        chunk = items[start:start + n]
        bins.append([chunk[p] for p in perm])
    return bins


def _percentile_window(values: torch.Tensor, percentile: float, n: int, descending: bool,
                       generator: torch.Generator, exclude: torch.Tensor) -> tuple[list[Item], int, int]:
    """The ``n`` images ranked around ``percentile`` (from the top when ``descending``); also the count
    and the first rank of the ``n`` ranks around the percentile.

    Ties are ordered by a random permutation from ``generator``; the dataset indices in ``exclude``
    keep their rank but are never chosen."""
    valid = (~values.isnan()).nonzero().flatten()
    valid = valid[torch.randperm(len(valid), generator=generator)]         # ties: seeded random order
    vals = values[valid]
    order = torch.sort(vals, descending=descending, stable=True).indices
    count = len(valid)
    centre = round((1 - percentile / 100) * (count - 1))    # 0-based rank of the percentile
    first = min(max(centre - n // 2, 0), max(count - n, 0))
    ranked, ranked_vals = valid[order], vals[order]
    positions = torch.arange(count)
    free = ~torch.isin(ranked, exclude)
    ranked, ranked_vals, positions = ranked[free], ranked_vals[free], positions[free]
    at = int(torch.searchsorted(positions, centre))          # the percentile among the free images
    start = min(max(at - n // 2, 0), max(len(ranked) - n, 0))
    chosen = slice(start, start + n)
    return [(int(i), int(r) + 1, float(v)) for i, r, v in
            zip(ranked[chosen].tolist(), positions[chosen].tolist(), ranked_vals[chosen].tolist())], count, first + 1


class OverlappingExemplars(ValueError):
    """A unit's maximally and minimally activating images share images: it cannot form tasks."""


def select_tasks(mining: LayerMining, unit: int, *, n_tasks: int = 20, n_references: int = 9, seed: int = 0,
                 query_percentile: float = 0.0, recorded: torch.Tensor | None = None,
                 identity: int | None = None) -> list[Task]:
    """The ``n_tasks`` fair-batch tasks of ``unit`` (see the module docstring).

    ``recorded`` is the unit's activation per dataset index (``NaN`` = not seen); by default
    ``mining.recorded[unit]``.  ``identity``: the unit's index in its parent model when ``unit`` is
    a physically pruned model's renumbered channel (it seeds the shuffle, so tasks match the masked model).  It is needed only for ``query_percentile > 0``.
    """
    n, k = int(n_tasks), int(n_references)
    identity = unit if identity is None else identity      # the unit's own index (its parent's, once renumbered)
    name = f"{mining.layer}:{identity}"
    if n < 1 or k < 1:
        raise ValueError(f"n_tasks and n_references must be at least 1, got {n_tasks} and {n_references}")
    if not 0 <= unit < mining.num_channels:
        raise ValueError(f"unit {unit} is out of range: {mining.layer} has {mining.num_channels} channels")
    if not 0 <= query_percentile < 100:
        raise ValueError(f"query_percentile must be in [0, 100), got {query_percentile}")
    if bool(mining.dead[unit]):
        raise ValueError(f"unit {name} is dead (constant activation {float(mining.max[unit]):.4g}); it has no "
                         f"maximally or minimally activating images")
    per_side = n * (k + 1) if query_percentile == 0 else n * k
    if mining.k < per_side:
        raise ValueError(f"unit {name}: {mining.k} top/bottom images were mined (over {int(mining.count[unit])} "
                         f"images) but {n} tasks × {k} references need {per_side} per side; mine with "
                         f"k >= {per_side} over at least {2 * n * (k + 1)} images, or use fewer tasks/references")
    top = _items(mining.top_indices[unit, :per_side], mining.top_values[unit, :per_side])
    bottom = _items(mining.bottom_indices[unit, :per_side], mining.bottom_values[unit, :per_side])
    if query_percentile > 0:
        recorded = mining.recorded.get(unit) if recorded is None else recorded
        if recorded is None:
            raise ValueError(f"query_percentile={query_percentile} needs the full activations of unit {name}: "
                             f"mine with record={{{mining.layer!r}: [{unit}, ...]}}")
        references = torch.tensor([i for i, _, _ in top + bottom], dtype=torch.long)
        ties = unit_generator(seed, mining.layer, identity, purpose="percentile-ties")
        top += _percentile_query(recorded, query_percentile, n, k, name, True, ties, references)
        bottom += _percentile_query(recorded, query_percentile, n, k, name, False, ties, references)
    overlap = {i for i, _, _ in top} & {i for i, _, _ in bottom}
    if overlap:
        raise OverlappingExemplars(
            f"unit {name}: the max and min images overlap ({len(overlap)} shared, e.g. dataset index "
            f"{min(overlap)}): among its {int(mining.count[unit])} images fewer than {per_side} activate it above "
            f"its lowest value (ties), too few for {n} tasks × ({k} references + 1 query) per side")
    generator = unit_generator(seed, mining.layer, identity)
    max_bins, min_bins = _fair_bins(top, n, generator), _fair_bins(bottom, n, generator)
    return [_task(j, [b[j] for b in max_bins], [b[j] for b in min_bins]) for j in range(n)]


def _percentile_query(recorded: torch.Tensor, percentile: float, n: int, k: int, name: str,
                      descending: bool, generator: torch.Generator, references: torch.Tensor) -> list[Item]:
    window, count, first_rank = _percentile_window(recorded.detach().cpu().float(), percentile, n, descending,
                                                   generator, references)
    if count < n or first_rank <= n * k or len(window) < n:
        side, p = ("max", percentile) if descending else ("min", 100 - percentile)
        raise ValueError(f"unit {name}: the {side} queries around the {p:g}th percentile (ranks {first_rank}–"
                         f"{first_rank + n - 1} of {count}) would overlap the {n * k} reference ranks; the dataset is "
                         f"too small for query_percentile={percentile:g} (it needs at least "
                         f"{math.ceil((n * k + n // 2) / (1 - percentile / 100)) + 1} images)")
    return window


def _task(j: int, max_items: list[Item], min_items: list[Item]) -> Task:
    """Task ``j`` from its per-bin items; the last item of each side is the query."""
    *max_refs, max_q = max_items
    *min_refs, min_q = min_items
    return Task(task=j, max_query=max_q[0], min_query=min_q[0],
                max_refs=[i for i, _, _ in max_refs], min_refs=[i for i, _, _ in min_refs],
                max_query_rank=max_q[1], min_query_rank=min_q[1],
                max_ref_ranks=[r for _, r, _ in max_refs], min_ref_ranks=[r for _, r, _ in min_refs],
                max_query_activation=max_q[2], min_query_activation=min_q[2],
                max_ref_activations=[a for _, _, a in max_refs], min_ref_activations=[a for _, _, a in min_refs])
