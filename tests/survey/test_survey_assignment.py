"""Trial assignment: seeded derivation, balance across participants (also when they arrive at once),
machine sessions outside the human counts."""
from __future__ import annotations

import threading
from collections import Counter

import pytest
from sqlalchemy import select

from survey_app import assignment
from survey_app.material import Item
from survey_app.models import Participant, Trial


def stored_main_trials(app, human: bool = True) -> list[Trial]:
    with app.config["SESSIONS"]() as s:
        return list(s.scalars(select(Trial).join(Participant).where(Participant.is_machine.is_(not human),
                                                                    Trial.trial_type == "main")))


def spread(counter: Counter, keys) -> int:
    values = [counter.get(k, 0) for k in keys]
    return max(values) - min(values)


def test_the_stored_trial_list_is_the_seeded_derivation(app):
    service = app.extensions["survey"]
    public_id, _ = service.create_participant()
    with app.config["SESSIONS"]() as s:
        p = s.scalars(select(Participant).where(Participant.public_id == public_id)).one()
        stored = [(t.block, t.attempt, t.position, t.trial_type, Item(t.model_id, t.kind, t.layer, t.unit), t.task,
                   t.max_position, t.catch_ref) for t in s.scalars(select(Trial).order_by(Trial.id))]
        seed, condition = p.seed, p.condition

    def rng_of(purpose):
        return assignment.make_rng(service.study_name, service.material.bank_hash, seed, purpose)
    empty = assignment.BalanceCounts(Counter(), Counter(), Counter())
    assert condition == assignment.choose_condition(list(service.conditions), empty, rng_of("condition"))
    items = service.conditions[condition]
    specs = assignment.main_block(service.material, items, 6, 2, empty, rng_of)
    specs += assignment.practice_block(service.material, items, {sp.item for sp in specs}, 2, 1, rng_of,
                                       shown=assignment.shown_queries(service.material,
                                                                      [(sp.item, sp.task) for sp in specs]))
    assert stored == [(sp.block, sp.attempt, sp.position, sp.trial_type, sp.item, sp.task, sp.max_position,
                       sp.catch_ref) for sp in specs]
    main = [sp for sp in specs if sp.block == "main"]
    assert Counter(sp.max_position for sp in main) == {"upper": 4, "lower": 4}
    assert Counter(sp.trial_type for sp in main) == {"main": 6, "catch": 2}


def test_query_positions_are_balanced_among_the_analysed_main_trials_of_every_participant(app):
    """The main trials alone (the ones analysed) have as many max queries above as below, in every
    session, and so do the catch trials; 40 main + 5 catch as the protocol."""
    service = app.extensions["survey"]
    empty = assignment.BalanceCounts(Counter(), Counter(), Counter())
    items = next(iter(service.conditions.values()))
    for seed in range(60):
        def rng_of(purpose, seed=seed):
            return assignment.make_rng(service.study_name, service.material.bank_hash, seed, purpose)
        specs = assignment.main_block(service.material, items, 40, 5, empty, rng_of)
        main = Counter(sp.max_position for sp in specs if sp.trial_type == "main")
        catch = Counter(sp.max_position for sp in specs if sp.trial_type == "catch")
        assert main == {"upper": 20, "lower": 20}, seed
        assert abs(catch["upper"] - catch["lower"]) == 1, seed


def test_units_and_tasks_stay_balanced_when_participants_arrive_at_once(app):
    service = app.extensions["survey"]
    n_threads, errors = 16, []
    barrier = threading.Barrier(n_threads)

    def arrive():
        try:
            barrier.wait()
            service.create_participant()
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)
    threads = [threading.Thread(target=arrive) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with app.config["SESSIONS"]() as s:
        conditions = Counter(s.scalars(select(Participant.condition)))
    assert set(conditions) == set(service.conditions) and set(conditions.values()) == {4}   # 16 over 4 conditions
    trials = stored_main_trials(app)
    assert len(trials) == 16 * 6
    for condition, items in service.conditions.items():
        mine = [t for t in trials if Item(t.model_id, t.kind, t.layer, t.unit).condition("model-kind") == condition]
        per_item = Counter(Item(t.model_id, t.kind, t.layer, t.unit) for t in mine)
        per_task = Counter((Item(t.model_id, t.kind, t.layer, t.unit), t.task) for t in mine)
        assert spread(per_item, items) == 0                                        # 24 trials over 4 units
        assert spread(per_task, [(i, k) for i in items for k in range(4 - service.settings.reserved_tasks)]) <= 1
    by_participant = Counter((t.participant_id, t.model_id, t.kind, t.layer, t.unit, t.task) for t in trials)
    assert max(by_participant.values()) == 1                                       # no task twice for one person


def test_machine_sessions_do_not_count_towards_the_human_balance(app):
    service = app.extensions["survey"]
    for _ in range(5):
        service.create_participant(is_machine=True, observer="m")
    with app.config["SESSIONS"]() as s:
        counts = service.balance_counts(s)
    assert sum(counts.conditions.values()) == 0 and sum(counts.items.values()) == 0
    service.create_participant()
    with app.config["SESSIONS"]() as s:
        counts = service.balance_counts(s)
    assert sum(counts.conditions.values()) == 1 and sum(counts.items.values()) == 6


def test_least_used_and_balanced_positions_are_seeded():
    rng = assignment.make_rng("s", "h", 1, "x")
    order = assignment.least_used(list("abcd"), Counter({"a": 2, "b": 0, "c": 1, "d": 0}), rng)
    assert set(order[:2]) == {"b", "d"} and order[2:] == ["c", "a"]
    for n in range(1, 12):
        pos = assignment.balanced_positions(n, assignment.make_rng("s", "h", n, "p"))
        assert len(pos) == n and abs(pos.count("upper") - pos.count("lower")) <= 1
    assert (assignment.balanced_positions(10, assignment.make_rng("s", "h", 3, "p"))
            == assignment.balanced_positions(10, assignment.make_rng("s", "h", 3, "p")))


def test_long_sessions_rotate_tasks_and_keep_task_counts_balanced(make_app):
    app = make_app(main_trials=40, catch_trials=0)
    service = app.extensions["survey"]
    for _ in range(8):
        service.create_participant(condition="base|natural")
    trials = stored_main_trials(app)
    per_person = Counter((t.participant_id, t.layer, t.unit, t.task) for t in trials)
    assert max(per_person.values()) == 4      # 40 trials over 4 units × 3 main tasks (one reserved): ⌈40/12⌉
    per_task = Counter((t.layer, t.unit, t.task) for t in trials)
    assert max(per_task.values()) - min(per_task.values()) <= 1 and sum(per_task.values()) == 320


def test_practice_and_catch_trials_never_reuse_a_main_task(app):
    """30 participants: no practice or catch trial shows a (model, kind, unit, task) of that participant's
    main trials, and both come from the reserved tasks only."""
    service = app.extensions["survey"]
    for _ in range(30):
        service.create_participant()
    reserved = service.settings.reserved_tasks
    with app.config["SESSIONS"]() as s:
        trials = list(s.scalars(select(Trial)))
    by_person: dict = {}
    for t in trials:
        by_person.setdefault(t.participant_id, []).append(t)
    assert len(by_person) == 30
    for rows in by_person.values():
        key = lambda t: (t.model_id, t.kind, t.layer, t.unit, t.task)  # noqa: E731
        main = {key(t) for t in rows if t.trial_type == "main"}
        other = [t for t in rows if t.trial_type in ("practice", "catch")]
        assert main and other and not main & {key(t) for t in other}
        for t in other:
            n = len(service.material.tasks[Item(t.model_id, t.kind, t.layer, t.unit)])
            assert t.task >= n - reserved
        assert all(t.task < len(service.material.tasks[Item(t.model_id, t.kind, t.layer, t.unit)]) - reserved
                   for t in rows if t.trial_type == "main")


def test_too_few_tasks_for_the_reserve_is_a_clear_error(make_app):
    import pytest
    with pytest.raises(ValueError, match="reserved_tasks = 4 leaves no main task"):
        make_app(reserved_tasks=4)


@pytest.mark.parametrize("condition_by", ["model", "kind", "none"])
def test_no_participant_sees_a_query_image_twice_when_a_condition_holds_several_kinds_or_models(make_app,
                                                                                                   condition_by):
    """The kinds of a unit share their query pairs (as in a pipeline-built bank), so a condition holding both
    kinds could show one pair twice, and the feedback on the first trial would answer the second.  Main,
    catch and practice trials of every participant show each query image once, none of them the instructions'
    example's (whose answer the example frames), and the study's validity check, which reads the stimulus
    manifest, agrees; it flags a session that repeats a pair."""
    import pandas as pd

    from analysis.validity import practice_leak_check

    units = (("inception3a", 0), ("inception3a", 1), ("inception4a", 2), ("inception4a", 5), ("inception4a", 7))
    app = make_app(bank={"shared_queries": True, "n_tasks": 6, "units": units}, condition_by=condition_by,
                   main_trials=8, catch_trials=2, practice_trials=2)
    service = app.extensions["survey"]
    manifest = service.material.manifest
    for _ in range(12):
        service.create_participant()
    with app.config["SESSIONS"]() as s:
        rows = s.execute(select(Participant.public_id, Participant.is_machine, Trial.trial_type, Trial.model_id,
                                Trial.kind, Trial.layer, Trial.unit, Trial.task)
                         .join(Trial, Trial.participant_id == Participant.id)).all()
    trials = pd.DataFrame(rows, columns=["participant", "is_machine", "trial_type", "model_id", "kind", "layer",
                                         "unit", "task"])
    for _, g in trials.groupby("participant"):
        shown = [q for key in dict.fromkeys(g[["model_id", "kind", "layer", "unit", "task"]].itertuples(index=False))
                 for q in assignment.queries(service.material, Item(key[0], key[1], key[2], int(key[3])), key[4])]
        assert len(shown) == len(set(shown))
        assert not set(shown) & assignment.queries(service.material, *assignment.example_task(service.material))
    assert practice_leak_check(trials, manifest)["value"] == 0
    main = trials[trials["trial_type"] == "main"]
    first = main.iloc[0]
    other_kind = "synthetic" if first["kind"] == "natural" else "natural"
    repeat = first.to_frame().T.assign(kind=other_kind)     # the same unit and task under the other kind
    leaked = pd.concat([trials, repeat], ignore_index=True)
    assert practice_leak_check(leaked, manifest)["value"] == 1
