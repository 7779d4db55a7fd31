"""The study's self-checks (analysis.validity) on tables with known answers."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from analysis import validity as v


def _manifest(fv_max, fv_min, natural_max, units=("a",)):
    rows = []
    for i, u in enumerate(units):
        for kind, role, acts in (("synthetic", "ref_max", fv_max[i]), ("synthetic", "ref_min", fv_min[i]),
                                 ("natural", "ref_max", natural_max[i])):
            for j, act in enumerate(acts):
                rows.append(dict(model_id="m", layer="l", unit=i, task=0, role=role, kind=kind,
                                 image=f"images/{u}{kind}{role}{j}.png", source=f"c/{j}.png", activation=act, rank=j))
    return pd.DataFrame(rows)


def _status(n, kinds=("natural", "synthetic"), status="ok"):
    return pd.DataFrame([dict(model_id="m", kind=k, layer="l", unit=i, status=status, reason="")
                         for i in range(n) for k in kinds])


def test_visualization_checks_count_zero_images_reach_and_max_over_min():
    manifest = _manifest(fv_max=[[2.0, 3.0], [0.0, 0.0], [5.0, 0.0]], fv_min=[[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]],
                         natural_max=[[1.0, 2.0], [1.0, 1.0], [3.0, 3.0]], units=("a", "b", "c"))
    zero, reach, beats = v.visualization_checks(manifest, _status(3))
    assert zero["value"] == pytest.approx(3 / 6) and zero["passed"] is False
    assert reach["value"] == pytest.approx(1 / 3)     # a: 2.5 ≥ 1.5; b: 0 < 1; c: 2.5 < 3
    assert beats["value"] == pytest.approx(2 / 3) and beats["passed"] is False
    fine = _manifest(fv_max=[[4.0, 5.0]], fv_min=[[0.0, 0.0]], natural_max=[[1.0, 2.0]])
    assert all(c["passed"] for c in v.visualization_checks(fine, _status(1)))
    dead = v.visualization_checks(fine, _status(1, status="dead"))        # only live units count
    assert dead[1]["passed"] is not True


def test_tied_minima_in_dataset_order_fail_and_spread_ones_pass(tmp_path):
    root = tmp_path / "data"
    for c in range(10):
        (root / "val" / f"c{c}").mkdir(parents=True)
        for i in range(10):
            (root / "val" / f"c{c}" / f"{i:02d}.png").write_bytes(b"")
    files = sorted(p.relative_to(root / "val").as_posix() for p in (root / "val").rglob("*.png"))

    def manifest(sources):
        return pd.DataFrame([dict(model_id="m", layer="l", unit=0, task=0, role="ref_min", kind="natural",
                                  image=f"images/{s}.png", source=s, activation=0.0, rank=1) for s in sources])
    first = v.tie_order_check(manifest(files[:10]), root, "val")
    assert first["value"] == pytest.approx(sum(range(10)) / 10 / 99) and first["passed"] is False
    spread = v.tie_order_check(manifest(files[::10]), root, "val")
    assert 0.4 <= spread["value"] <= 0.6 and spread["passed"] is True
    # two tied images late in the folder: as likely as 1 in 20 under a random choice, no evidence of an order;
    # the range is three standard errors of the mean of two uniform positions, √(1/24) each
    two = v.tie_order_check(manifest([files[80], files[88]]), root, "val")
    assert two["value"] == pytest.approx(168 / 2 / 99) and two["passed"] is True and two["threshold"] == "0–1"


def test_robustness_balance_reads_images_per_class_from_every_model(tmp_path):
    for name, counts in (("base", {"a": 10, "b": 10}), ("p", {"a": 10, "b": 6})):
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "meta.json").write_text(json.dumps({"robustness": {"images_per_class": counts}}))
    result = v.robustness_balance_check(tmp_path)
    assert result["value"] == pytest.approx(0.6) and result["passed"] is False and "p" in result["detail"]


def test_fit_checks_flag_non_finite_and_absurd_standard_errors():
    good = {"id": "a", "status": "ok", "table": pd.DataFrame({"se": [0.1, 0.2]}), "result": {"method": "lbfgs"}}
    huge = {"id": "b", "status": "ok", "table": pd.DataFrame({"se": [7.9e5, 0.1]}), "result": {"method": "lbfgs"}}
    nan = {"id": "c", "status": "ok", "table": pd.DataFrame({"se": [float("nan")]}), "result": {}}
    assert v.fit_checks([good])[0]["passed"] is True
    assert v.fit_checks([good, huge])[0]["passed"] is False
    assert v.fit_checks([good, nan])[0]["passed"] is False and "c" in v.fit_checks([good, nan])[0]["detail"]


def test_machine_agreement_and_practice_leaks():
    tasks = pd.DataFrame(dict(model_id="m", kind="natural", layer="l", unit=0, task=[0, 1, 2], delta=[0.3, -0.2, 0.1]))
    trials = pd.DataFrame(dict(participant=["p"] * 4, is_machine=True, trial_type=["main", "main", "main", "practice"],
                               model_id="m", kind="natural", layer="l", unit=0, task=[0, 1, 2, 0],
                               correct=[True, False, False, True]))
    agree = v.machine_agreement_check(trials, tasks)
    assert agree["value"] == pytest.approx(2 / 3) and agree["passed"] is False
    leak = v.practice_leak_check(trials)
    assert leak["value"] == 1 and leak["passed"] is False
    clean = trials.assign(task=[0, 1, 2, 7])
    assert v.practice_leak_check(clean)["passed"] is True


def test_machine_agreement_compares_only_the_observer_the_mis_used():
    """A pixels observer answering its own way does not count against the offline MIS of the observer network:
    the check compares the study's embedding only, says what it left out, and its failure line is short."""
    tasks = pd.DataFrame(dict(model_id="m", kind="natural", layer="l", unit=0, task=[0, 1, 2], delta=[0.3, -0.2, 0.1]))
    same = pd.DataFrame(dict(participant="a", is_machine=True, trial_type="main", observer="study:observer",
                             model_id="m", kind="natural", layer="l", unit=0, task=[0, 1, 2],
                             correct=[True, False, True]))
    pixels = same.assign(participant="b", observer="pixels", correct=[False, True, True])
    trials = pd.concat([same, pixels, same.assign(participant="c", observer="observer")], ignore_index=True)
    assert v.machine_agreement_check(trials, tasks)["passed"] is False
    scoped = v.machine_agreement_check(trials, tasks, "observer")
    assert scoped["value"] == 1.0 and scoped["passed"] is True
    assert "6 machine answers of the 'observer' embedding" in scoped["detail"] and "pixels" in scoped["detail"]
    none = v.machine_agreement_check(pixels, tasks, "observer")
    assert none["passed"] is None and "pixels" in none["detail"]
    line = v.failed_line(v.machine_agreement_check(trials, tasks))
    assert line.startswith("machine participants agree with offline mis_hard: 0.778 (needs ≥ 0.99; 9 machine")


def test_base_accuracy_check_flags_a_base_model_at_chance(tmp_path):
    """A base model at chance (3 classes, 0.36 over 300 images) fails; one well above passes; the p-value is the
    exact one-sided binomial tail, recomputed here from the binomial pmf."""
    from math import comb

    def write(top1, classes=3, n=300):
        folder = tmp_path / "models" / "base"
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"top1": {"after": top1}, "classes": [f"c{i}" for i in range(classes)],
                "history": [{"val": {"top1": top1, "n": n}}]}
        (folder / "meta.json").write_text(json.dumps(meta))
    write(0.36)
    at_chance = v.base_accuracy_check(tmp_path)
    tail = sum(comb(300, k) * (1 / 3) ** k * (2 / 3) ** (300 - k) for k in range(108, 301))
    assert at_chance["passed"] is False and f"p = {tail:.2g}" in at_chance["detail"]
    write(0.5)
    assert v.base_accuracy_check(tmp_path)["passed"] is True
    assert v.base_accuracy_check(tmp_path / "nowhere")["passed"] is None
