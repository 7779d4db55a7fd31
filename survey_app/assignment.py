"""Which trials a participant gets: a pure function of the material, the balance counts and a seed.

The condition (e.g. one model and one reference kind, as in IMI) with the fewest counted
participants is chosen; within it the items (units) and then the tasks with the fewest counted
assignments come first.  Ties, the trial order, the query positions (exactly balanced) and the
catch and practice material are decided by a random generator seeded from (study, bank hash,
participant seed), so a trial list can be re-derived from what is stored.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from .material import Item, Material


@dataclass(frozen=True)
class TrialSpec:
    block: str          # practice | main
    attempt: int        # practice attempt (1..); 0 in the main block
    position: int
    trial_type: str     # practice | main | catch
    item: Item
    task: int
    max_position: str   # upper | lower
    catch_ref: int | None = None


@dataclass
class BalanceCounts:
    """Counted assignments of the participants that hold or filled a slot."""
    conditions: Counter
    items: Counter      # Item -> main trials assigned
    tasks: Counter      # (Item, task) -> main trials assigned


def make_rng(study: str, bank_hash: str, seed: int, purpose: str) -> random.Random:
    return random.Random(f"{study}:{bank_hash}:{seed}:{purpose}")


def balanced_positions(n: int, rng: random.Random) -> list[str]:
    """``n`` query positions, half upper and half lower (a coin decides an odd one), shuffled."""
    positions = ["upper", "lower"] * (n // 2) + ([rng.choice(["upper", "lower"])] if n % 2 else [])
    rng.shuffle(positions)
    return positions


def least_used(keys: list, counts, rng: random.Random) -> list:
    """``keys`` ordered by ascending count (any comparable value; missing = 0), ties in a seeded random order."""
    rank = {k: i for i, k in enumerate(rng.sample(keys, len(keys)))}
    return sorted(keys, key=lambda k: (counts.get(k, 0), rank[k]))


def choose_condition(conditions: list[str], counts: BalanceCounts, rng: random.Random) -> str:
    return least_used(sorted(conditions), counts.conditions, rng)[0]


def main_tasks(material: Material, item: Item, reserved: int) -> list[int]:
    """The tasks of ``item`` that main trials may use: all but the last ``reserved``."""
    return list(range(len(material.tasks[item]) - reserved))


def reserved_tasks(material: Material, item: Item, reserved: int) -> list[int]:
    """The last ``reserved`` tasks of ``item``: practice and catch material, never a main trial."""
    n = len(material.tasks[item])
    return list(range(n - reserved, n))


def check_reserve(material: Material, reserved: int) -> None:
    """Every item needs a main task once ``reserved`` tasks are set aside."""
    fewest = min((len(t) for t in material.tasks.values()), default=0)
    if reserved and fewest <= reserved:
        raise ValueError(f"survey.reserved_tasks = {reserved} leaves no main task: some units have only {fewest} "
                         f"task(s); make more tasks (stimuli.n_tasks) or reserve fewer")


def queries(material: Material, item: Item, task: int) -> set[str]:
    """The two query images of a task (content ids)."""
    t = material.task(item, task)
    return {t.query_max, t.query_min}


def choose_main(material: Material, items: list[Item], n: int, counts: BalanceCounts,
                rng: random.Random, reserved: int = 0) -> list[tuple[Item, int]]:
    """``n`` (item, task) pairs: least-assigned items first; within an item the task whose queries this
    participant has not seen yet, then the task this participant has used least, then the least-assigned
    one.  Every pick is counted at once, so an item repeats only after every item of the condition was
    used, and its tasks rotate.  The last ``reserved`` tasks of each item are never chosen.

    A query image seen twice is an answer given away: the feedback on the first trial says whether it was
    the unit's max or min query.  The kinds of one unit share their query pairs (task j of the natural and
    of the synthetic references show the same two queries), and so may models whose unit kept its
    exemplars, so a condition that holds several of them (``condition_by`` ``model`` or ``kind``) would
    otherwise repeat a pair."""
    chosen: list[tuple[Item, int]] = []
    mine: Counter = Counter()
    seen: set[str] = set()
    item_counts, task_counts = Counter(counts.items), Counter(counts.tasks)
    while len(chosen) < n:
        for item in least_used(items, item_counts, rng):
            if len(chosen) == n:
                break
            tasks = main_tasks(material, item, reserved)
            score = {t: (len(queries(material, item, t) & seen), mine[(item, t)], task_counts[(item, t)])
                     for t in tasks}
            task = least_used(tasks, score, rng)[0]
            chosen.append((item, task))
            seen |= queries(material, item, task)
            mine[(item, task)] += 1
            task_counts[(item, task)] += 1
            item_counts[item] += 1
    return chosen


def _spare(items: list[Item], used: set[Item], n: int, rng: random.Random) -> list[Item]:
    """``n`` items preferring those not in ``used``, seeded; cycles when there are too few."""
    fresh = [i for i in rng.sample(items, len(items)) if i not in used]
    pool = fresh + [i for i in rng.sample(items, len(items)) if i in used]
    return [pool[k % len(pool)] for k in range(n)]


def shown_queries(material: Material, pairs) -> set[str]:
    """The query images of (item, task) pairs, and those every participant has seen before any trial: the
    instructions' example (:func:`example_task`)."""
    return set().union(queries(material, *example_task(material)),
                       *(queries(material, item, task) for item, task in pairs))


def example_task(material: Material) -> tuple[Item, int]:
    """The (item, task) the instructions' example shows, its answer framed: the last natural item's last task (a
    reserved one, so no main trial uses it; practice and catch trials skip its queries as already seen)."""
    natural = [i for i in material.items if i.kind == "natural"] or material.items
    return natural[-1], len(material.tasks[natural[-1]]) - 1


def reserved_material(material: Material, items: list[Item], avoid: set[Item], n: int, reserved: int,
                      shown: set[str], rng: random.Random) -> list[tuple[Item, int]]:
    """``n`` (item, task) pairs from the reserved tasks: items not in ``avoid`` first, one task per item per
    round, skipping tasks whose queries are in ``shown``; the rest (cycling) only when too few are fresh."""
    order = _spare(items, avoid, len(items), rng)
    tasks = {i: rng.sample(t := reserved_tasks(material, i, reserved) or main_tasks(material, i, 0), len(t))
             for i in order}
    rounds = max(len(t) for t in tasks.values())
    candidates = [(i, tasks[i][r]) for r in range(rounds) for i in order if r < len(tasks[i])]
    picks = []
    for item, task in candidates:
        if len(picks) < n and not queries(material, item, task) & shown:
            picks.append((item, task))
            shown |= queries(material, item, task)
    rest = [c for c in candidates if c not in picks] or candidates
    return picks + [rest[k % len(rest)] for k in range(n - len(picks))]


def practice_block(material: Material, items: list[Item], avoid: set[Item], n: int, attempt: int,
                   rng_of, reserved: int = 1, shown: set[str] | None = None) -> list[TrialSpec]:
    """Practice trials of one attempt: the same material every attempt, fresh query positions.  Items not
    in ``avoid`` come first; the tasks are reserved ones whose queries are not in ``shown`` (the main block's,
    catch trials included) wherever the bank has enough, so practice feedback never shows the answer of a
    main trial."""
    picks = reserved_material(material, items, avoid, n, reserved, set(shown or ()), rng_of("practice"))
    positions = balanced_positions(n, rng_of(f"practice-positions-{attempt}"))
    order = list(range(n))
    rng_of(f"practice-order-{attempt}").shuffle(order)
    return [TrialSpec("practice", attempt, pos, "practice", picks[k][0], picks[k][1], positions[pos])
            for pos, k in enumerate(order)]


def main_block(material: Material, items: list[Item], n_main: int, n_catch: int, counts: BalanceCounts,
               rng_of, reserved: int = 1) -> list[TrialSpec]:
    """Main trials (balanced items and tasks) with catch trials mixed in at seeded positions.  Main trials
    use all but the last ``reserved`` tasks of each item; catch trials use only those, so no catch trial
    shows images that make a main trial solvable by elimination."""
    main = choose_main(material, items, n_main, counts, rng_of("main"), reserved)
    rng = rng_of("catch")
    shown = shown_queries(material, main)
    catch = [(item, task, rng.randrange(len(material.task(item, task).ref_max)))
             for item, task in reserved_material(material, items, {i for i, _ in main}, n_catch, reserved, shown, rng)]
    # query positions balanced among the main trials themselves (the analysed ones) and among the catch trials
    main_positions = balanced_positions(len(main), rng_of("positions"))
    catch_positions = balanced_positions(len(catch), rng_of("catch-positions"))
    kinds = ([("main", i, t, None, q) for (i, t), q in zip(main, main_positions)]
             + [("catch", i, t, r, q) for (i, t, r), q in zip(catch, catch_positions)])
    rng_of("order").shuffle(kinds)
    return [TrialSpec("main", 0, pos, ttype, item, task, query, ref)
            for pos, (ttype, item, task, ref, query) in enumerate(kinds)]


def exhaustive_block(material: Material, items: list[Item], rng_of) -> list[TrialSpec]:
    """Every task of every item once (machine observers measuring a whole bank), seeded positions."""
    pairs = [(item, t) for item in items for t in range(len(material.tasks[item]))]
    positions = balanced_positions(len(pairs), rng_of("positions"))
    return [TrialSpec("main", 0, pos, "main", item, task, positions[pos]) for pos, (item, task) in enumerate(pairs)]
