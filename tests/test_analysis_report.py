"""The analysis report on a small fake study with known effects: files, figures, statistics, imports.

The study directory is built by hand (no training): a base model and two pruning methods at rates
.2/.4/.6/.8, per-unit MIS falling by a known 0.15 per unit rate, dissection counts, robustness
tables and a responses table of simulated humans whose accuracy falls with the rate.
"""
from __future__ import annotations

import json
import re
import math

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy import stats

from analysis import figures
from analysis.cli import analyze_cmd
from analysis.entries import fmt, slope_sentence
from analysis.load import IMPORT_NAMES, import_trials, load_models, load_study_data
from analysis.render import NO_RESPONSES, table_data
from analysis.report import analyze
from analysis.stages import AnalysisStage
from sparsight.config import load_study, write_study
from sparsight.study import Study
from survey_app.export import RESPONSE_COLUMNS

PNG = b"\x89PNG\r\n\x1a\n"
METHODS = ("unstructured-global", "structured")
RATES = (0.2, 0.4, 0.6, 0.8)
KINDS = ("natural", "synthetic")
UNITS = [("inception3a", i) for i in range(4)] + [("inception4a", i) for i in range(4)]
MIS_SLOPE = -0.15            # MIS per unit pruning rate, both kinds
FIGURES = ("interpretability", "top1", "layers", "mis_vs_human", "dissection", "robustness")


def _models() -> list[dict]:
    rows = [{"model_id": "base", "method": None, "schedule": None, "rate": 0.0, "top1": 0.95}]
    for m in METHODS:
        drop = 0.05 if m == "unstructured-global" else 0.3
        rows += [{"model_id": f"{m}-oneshot-r{r:.2f}", "method": m, "schedule": "oneshot", "rate": r,
                  "top1": 0.95 - drop * r ** 2} for r in RATES]
    return rows


def _write_models(run_dir, models):
    for m in models:
        meta = {"model_id": m["model_id"], "arch": "inception-small", "parent": None if m["method"] is None else "ab",
                "method": m["method"], "criterion": None, "schedule": m["schedule"], "rate_requested": m["rate"],
                "sparsity": {"total": round(m["rate"] * 0.98, 4), "all_layers": m["rate"] * 0.9, "per_layer": {}},
                "params_total": 1000, "params_nonzero": int(1000 * (1 - m["rate"])), "flops": 5e6,
                "top1": {"before": m["top1"] - 0.1, "after": m["top1"], "parent": 0.95}, "top5": {"after": 0.99},
                "robustness": {}, "seed": 0}
        folder = run_dir / "models" / m["model_id"]
        folder.mkdir(parents=True)
        (folder / "meta.json").write_text(json.dumps(meta))


def _write_mis(run_dir, models, rng):
    unit_effect = rng.normal(0, 0.04, len(UNITS))
    rows = []
    for m in models:
        for kind in KINDS:
            for i, (layer, unit) in enumerate(UNITS):
                mis = 0.80 - (0.05 if kind == "synthetic" else 0) + MIS_SLOPE * m["rate"] + unit_effect[i]
                rows.append({"model_id": m["model_id"], "kind": kind, "layer": layer, "unit": unit, "status": "ok",
                             "mis": mis + rng.normal(0, 0.01), "mis_hard": 0.8, "n_tasks": 4, "delta_mean": 0.1,
                             "alpha": 16.0, "alpha_source": "configured", "embedding": "observer"})
    units = pd.DataFrame(rows)
    (run_dir / "mis").mkdir()
    units.to_csv(run_dir / "mis" / "units.csv", index=False)
    g = units.groupby(["model_id", "kind"])["mis"]
    models_csv = g.agg(mis="mean", sd="std", units="size").reset_index()
    half = 1.96 * models_csv.pop("sd") / np.sqrt(models_csv["units"])
    models_csv["mis_ci_low"], models_csv["mis_ci_high"] = models_csv["mis"] - half, models_csv["mis"] + half
    models_csv.to_csv(run_dir / "mis" / "models.csv", index=False)
    return units


def _write_dissection_and_robustness(run_dir, models):
    rows = [{"model_id": m["model_id"], "status": "ok", "reason": "", "units": 64, "alive": 64,
             "dead": 0, "pruned": 0, "interpretable": int(30 - 20 * m["rate"]),
             "interpretable_fraction": (30 - 20 * m["rate"]) / 64, "interpretable_fraction_alive": 0.4,
             "unique_concepts": int(12 - 6 * m["rate"]), "n_images": 100, "quantile": 0.995, "iou_threshold": 0.04}
            for m in models]
    (run_dir / "dissection").mkdir()
    pd.DataFrame(rows).to_csv(run_dir / "dissection" / "models.csv", index=False)
    acc, noise = [], []
    for m in models:
        keys = {"model_id": m["model_id"], "arch": "inception-small", "method": m["method"] or "",
                "schedule": m["schedule"] or "", "rate_requested": m["rate"], "sparsity": m["rate"]}
        acc.append({**keys, "distribution": "clean", "severity": 0, "top1": m["top1"], "error": 1 - m["top1"],
                    "excess_error": 0.0})
        for c in ("gaussian_noise", "contrast"):
            for sev in (1, 3, 5):
                top1 = m["top1"] - 0.08 * sev * (1 + m["rate"])
                acc.append({**keys, "distribution": c, "severity": sev, "top1": top1, "error": 1 - top1,
                            "excess_error": 0.01 * sev})
        if m["method"]:
            noise += [{k: keys[k] for k in ("model_id", "arch", "method", "schedule", "rate_requested")}
                      | {"eps": e, "agreement": 1 - e * (0.5 + m["rate"]) / 1.5} for e in np.linspace(0, 0.7, 5)]
    (run_dir / "robustness").mkdir()
    pd.DataFrame(acc).to_csv(run_dir / "robustness" / "accuracy.csv", index=False)
    pd.DataFrame(noise).to_csv(run_dir / "robustness" / "noise_similarity.csv", index=False)


def human_p(kind: str, rate: float) -> float:
    """True accuracy of the simulated humans."""
    return (0.88 if kind == "natural" else 0.78) - 0.3 * rate


def _responses(models, rng, participants: int = 12) -> pd.DataFrame:
    """Each participant answers one task of every model × kind × unit; participant p11 is excluded;
    a machine participant answers too; each human has two catch trials."""
    rows = []
    for p in range(participants):
        pid, skill = f"p{p:02d}", rng.normal(0, 0.03)
        excluded = p == participants - 1
        for m in models:
            for kind in KINDS:
                for layer, unit in UNITS:
                    correct = rng.random() < human_p(kind, m["rate"]) + skill
                    rows.append(dict(participant=pid, model_id=m["model_id"], kind=kind, layer=layer, unit=unit,
                                     correct=bool(correct), trial_type="main", excluded=excluded,
                                     exclusion_reasons="catch_accuracy" if excluded else ""))
        rows += [dict(participant=pid, model_id="base", kind="natural", layer="inception3a", unit=0,
                      correct=not excluded, trial_type="catch", excluded=excluded,
                      exclusion_reasons="catch_accuracy" if excluded else "") for _ in range(2)]
    for m in models:
        rows += [dict(participant="m0", model_id=m["model_id"], kind="natural", layer=layer, unit=unit, correct=True,
                      trial_type="main", excluded=False, exclusion_reasons="", is_machine=True, observer="observer")
                 for layer, unit in UNITS]
    df = pd.DataFrame(rows)
    n = len(df)
    df = df.assign(study="fake", bank_hash="h", external_id="", condition="all", block="main", attempt=0,
                   position=np.arange(n) % 45, trial=[f"t{i}" for i in range(n)], task=0, max_position="upper",
                   choice="upper", confidence=rng.integers(1, 4, n), rt_ms=rng.normal(2500, 400, n).round(),
                   server_ms=2600, responded_at="2024-01-01T00:00:00", participant_stage="complete",
                   served_at="2024-01-01T00:00:00", catch_ref=np.nan, protocol="0123456789ab", hidden_ms=0.0,
                   serves=1)
    df["is_machine"] = df["is_machine"].fillna(False).astype(bool) if "is_machine" in df else False
    df["observer"] = df["observer"].fillna("") if "observer" in df else ""
    return df[RESPONSE_COLUMNS]


def build_study(root, responses: bool = True):
    """A fake study directory under ``root``; returns ``(run_dir, cfg)``."""
    rng = np.random.default_rng(7)
    cfg = load_study(None, "quick", [f'study.output_dir="{root}"', 'study.name="fake"', "analysis.bootstrap=10"])
    run_dir = cfg.run_dir
    write_study(cfg, run_dir)
    models = _models()
    _write_models(run_dir, models)
    _write_mis(run_dir, models, rng)
    _write_dissection_and_robustness(run_dir, models)
    table = _responses(models, rng) if responses else pd.DataFrame(columns=RESPONSE_COLUMNS)
    table.to_csv(run_dir / "responses.csv", index=False)
    epochs = [{"epoch": e, "images": 400, "skipped": 3 - e, "val": {"top1": 0.9, "n": 100, "skipped": 1}}
              for e in range(2)]                          # the base model's training log (two epochs)
    (run_dir / "models" / "base" / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs))
    return run_dir, cfg


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run_dir, cfg = build_study(tmp_path_factory.mktemp("study"))
    results = analyze(run_dir, cfg)
    return run_dir, results


def _entry(results, id_):
    found = [e for e in results["statistics"] if e["id"] == id_]
    assert found, f"no entry {id_!r}; have {[e['id'] for e in results['statistics']]}"
    return found[0]


def test_report_files_and_embedded_figures(report):
    run_dir, results = report
    html = (run_dir / "report" / "index.html").read_text()
    assert set(results["figures"]) == set(FIGURES)
    for name in FIGURES:
        png = run_dir / "report" / results["figures"][name]
        data = png.read_bytes()
        assert data.startswith(PNG) and len(data) > 1024, name
        assert f"alt='{name}'" in html
    assert html.count("src='data:image/png;base64,") == len(FIGURES)
    assert "<script" not in html and "src='figures/" not in html      # self-contained
    assert "[analysis]" in html and "tost_margin = 0.05" in html       # the exact settings
    assert "MIS (natural, all methods" in html and "per 10 % pruning rate" in html
    # the answer's label reads as an answer, not as "equivalent: No"; the intervals say their level
    assert "<strong>pruning changes it</strong>: Yes, for natural references" in html
    assert "(equivalence tests: their 90 % intervals" in html
    assert "ci_low, ci_high: the 90 % interval of the equivalence test (TOST)" in html     # per-model TOST tables
    text = " ".join(html.split())
    assert "10 bootstrap resamples (200 for the models' MIS intervals, <code>mis.bootstrap</code>)" in text
    # each model's MIS is over its own live units: the table says how many, the note why that matters
    assert "Each model&#39;s MIS is the mean over its own live units" in text and "live units natural</th>" in text
    assert f"Holm families: the {len(results['holm']['tests'])} primary slope tests" in text
    assert "exploratory per-method slope tests" in text


def test_results_json_holds_models_and_statistics(report):
    run_dir, results = report
    saved = json.loads((run_dir / "report" / "results.json").read_text())
    assert saved["statistics"] == results["statistics"]
    models = pd.DataFrame(saved["models"]).set_index("model_id")
    assert len(models) == 9 and "observer" not in models.index
    top = models.loc["structured-oneshot-r0.80"]
    assert top["rate"] == 0.8 and top["sparsity"] == pytest.approx(0.784)
    assert top["top1"] == pytest.approx(0.95 - 0.3 * 0.64)
    mis = pd.read_csv(run_dir / "mis" / "models.csv").set_index(["model_id", "kind"])
    assert top["mis_natural"] == pytest.approx(mis.loc[("structured-oneshot-r0.80", "natural"), "mis"])
    assert models.loc["base", "interpretable"] == 30 and models.loc["base", "unique_concepts"] == 12
    assert np.isfinite(top["human_natural"])

    slope = _entry(saved, "mis_slope.natural.all")
    assert slope["status"] == "ok" and slope["holm_family"]
    rate = slope["result"]["terms"]["rate"]
    assert rate["ci_low"] < MIS_SLOPE < rate["ci_high"] and rate["p"] < 0.001
    assert slope["p_holm"] >= slope["p"]
    assert "MIS (natural, all methods) decreased by" in slope["sentence"]      # primary: the total effect
    assert "not shown to be equivalent within ±0.05" in slope["sentence"]      # a real drop of 0.12
    adjusted = _entry(saved, "mis_slope_adjusted.natural.all")                  # secondary, outside the Holm family
    assert "adjusted for top-1" in adjusted["sentence"] and not adjusted["holm_family"]
    answer = {(a["observer"], a["kind"]): a for a in saved["answers"]}
    assert [a["observer"] for a in saved["answers"]] == ["MIS", "MIS", "people", "people"]
    assert answer["MIS", "natural"]["verdict"] == "effect"
    assert answer["MIS", "natural"]["sentence"].startswith("Yes, for natural references: MIS falls")
    people = answer["people", "natural"]        # simulated humans lose 0.3 × 0.8 of accuracy
    assert people["verdict"] == "effect" and "by people (11 included participants): accuracy falls" in people["sentence"]
    assert set(saved["holm"]["tests"]) >= {"mis_slope.natural.all", "mis_slope.synthetic.all",
                                           "human_slope.natural.mixed"}
    per_method = saved["holm"]["families"]["per-method"]["tests"]
    assert per_method and all(t.startswith("mis_slope.") and not t.endswith(".all") for t in per_method)
    assert not set(per_method) & set(saved["holm"]["tests"])
    assert _entry(saved, "mis_dose.natural")["status"] == "ok"
    assert _entry(saved, "mis_equivalence.natural")["status"] == "ok"

    human = _entry(saved, "human_slope.natural.gee")
    assert human["status"] == "ok", human["reason"]
    assert human["result"]["terms"]["rate"]["coef"] < 0 and "Human accuracy (natural) fell" in human["sentence"]
    assert _entry(saved, "human_slope.natural.mixed")["status"] == "ok"
    assert _entry(saved, "human_slope.natural.clustered")["status"] == "ok"
    assert _entry(saved, "conditions.natural-vs-synthetic")["status"] == "ok"
    assert _entry(saved, "calibration")["status"] == "ok"
    assert saved["exclusions"]["excluded"] == 1 and saved["exclusions"]["participants"] == 12
    assert saved["responses"]["included_participants"] == 11


def test_trial_frame_is_canonical(report):
    run_dir, _ = report
    data = load_study_data(run_dir)
    t = data.trials
    assert {"participant", "unit_id", "model_id", "method", "rate", "sparsity", "kind", "correct", "confidence",
            "rt_ms", "trial_type", "is_machine", "excluded", "exclusion_reasons"} <= set(t.columns)
    assert set(t["correct"].unique()) <= {0, 1}
    row = t[t["model_id"] == "structured-oneshot-r0.40"].iloc[0]
    assert row["rate"] == 0.4 and row["method"] == "structured" and row["sparsity"] == pytest.approx(0.392)
    assert t.loc[t["model_id"] == "base", "method"].eq("base").all()
    assert set(t["unit_id"]) >= {"inception3a:0", "inception4a:3"}
    assert t["is_machine"].sum() == 9 * len(UNITS)
    assert {"unit_id", "rate", "top1", "series"} <= set(data.units.columns)


def test_no_responses_still_reports_model_side(tmp_path):
    """Through the study stage: an empty responses table still gives the model-side report."""
    run_dir, cfg = build_study(tmp_path, responses=False)
    stage = AnalysisStage()
    study = Study(cfg)
    assert stage.inputs(study)["analysis"] == {"tost_margin": 0.05, "bootstrap": 10, "alpha_level": 0.05,
                                              "power_participant_sd": 0.5, "power_simulations": 400}
    observer = run_dir / "models" / "observer"
    observer.mkdir(parents=True, exist_ok=True)
    (observer / "meta.json").write_text(json.dumps({"model_id": "observer", "top1": {"after": 0.671}}))
    outputs = stage.run(study)
    assert {p.name for p in outputs} >= {"index.html", "results.json", "interpretability.png", "top1.png"}
    assert all(p.is_file() and p.is_relative_to(run_dir) for p in outputs)
    results = json.loads((run_dir / "report" / "results.json").read_text())
    html = (run_dir / "report" / "index.html").read_text()
    assert NO_RESPONSES in html and "no responses exist yet" in " ".join(results["notes"]).lower()
    scope = [n for n in results["notes"] if "generated concept-shapes data" in n]    # what its answers are about
    assert len(scope) == 1 and f"({cfg.data.image_size} px) with the {cfg.model.arch} network" in scope[0]
    # what the MIS scale rests on: α, its source, the embedding and the observer network's accuracy
    assert results["mis"] == {"alpha": 16.0, "alpha_source": "configured", "embedding": "observer",
                              "observer_top1": 0.671}
    from html import unescape
    said = " ".join(unescape(html).split())
    assert ("in the observer embedding, the penultimate features of the study's observer network (validation top-1 "
            "0.671); α = 16 (mis.alpha, stated: too few human responses to fit it)") in said
    assert _entry(results, "mis_slope.natural.all")["status"] == "ok"
    assert _entry(results, "mis_equivalence.synthetic")["status"] == "ok"
    assert _entry(results, "humans")["status"] == "skipped"
    assert not any(e["group"] == "human" and e["status"] == "failed" for e in results["statistics"])
    assert "mis_vs_human" not in results["figures"] and "interpretability" in results["figures"]
    assert not (run_dir / "report" / "figures" / "mis_vs_human.png").exists()
    assert {m["model_id"] for m in results["models"]} >= {"base", "structured-oneshot-r0.80"}


def _external_csv(path, rng, participants: int = 10):
    """Two within-participant conditions with known accuracies; catch trials that must not count."""
    true = {"A": 0.8, "B": 0.6}
    rows = []
    for p in range(participants):
        for cond, acc in true.items():
            for i in range(20):
                ok = rng.random() < acc
                rows.append({"subj": f"s{p}", "cond": cond, "stim": f"layer{i % 2}:{i}",
                             "acc": "correct" if ok else "incorrect", "rt": 900 + 10 * i, "conf": 1 + i % 3,
                             "is_catch": 0})
        rows.append({"subj": f"s{p}", "cond": "A", "stim": "layer0:0", "rt": 500, "conf": 3, "is_catch": 1,
                     "acc": "incorrect" if p == participants - 1 else "correct"})    # the last one fails it
    pd.DataFrame(rows).to_csv(path, index=False)
    return pd.DataFrame(rows)


MAPPING = {"participant": "subj", "condition": "cond", "unit": "stim", "correct": "acc", "rt": "rt",
           "confidence": "conf", "catch": "is_catch"}


def test_import_reproduces_condition_accuracy_and_paired_test(tmp_path):
    rng = np.random.default_rng(3)
    raw = _external_csv(tmp_path / "ext.csv", rng)
    run_dir = tmp_path / "empty"
    write_study(load_study(None, "quick", ["analysis.bootstrap=40"]), run_dir)
    trials = import_trials(tmp_path / "ext.csv", MAPPING)
    assert (trials["trial_type"] == "catch").sum() == 10
    results = analyze(run_dir, trials=trials, source="imported ext.csv")

    main = raw[raw["is_catch"] == 0].assign(ok=lambda d: (d["acc"] == "correct").astype(float))
    per = main.groupby(["cond", "subj"])["ok"].mean().unstack("cond")
    summary = pd.DataFrame(results["descriptives"]["by_kind"]).set_index("kind")
    for cond in ("A", "B"):
        mean, sem = per[cond].mean(), per[cond].std(ddof=1) / math.sqrt(len(per))
        assert summary.loc[cond, "accuracy"] == pytest.approx(mean, abs=1e-12)
        assert summary.loc[cond, "lo_2sem"] == pytest.approx(mean - 2 * sem, abs=1e-12)
        assert summary.loc[cond, "hi_2sem"] == pytest.approx(mean + 2 * sem, abs=1e-12)
        assert summary.loc[cond, "participants"] == 10
    test = stats.ttest_rel(per["A"], per["B"])
    paired = _entry(results, "conditions.A-vs-B")
    assert paired["result"]["t"] == pytest.approx(test.statistic, abs=1e-10)
    assert paired["result"]["p_t"] == pytest.approx(test.pvalue, abs=1e-12)
    assert paired["result"]["mean_diff"] == pytest.approx((per["A"] - per["B"]).mean(), abs=1e-12)
    assert "t(9)" in paired["sentence"]
    assert _entry(results, "human_slope.A.mixed")["status"] == "skipped"     # no rate in external data
    assert _entry(results, "mis")["status"] == "skipped"


def test_report_escapes_study_values(tmp_path):
    """Condition names and the response source reach the page as text, never as markup."""
    script = "<script>alert('x')</script>"
    raw = _external_csv(tmp_path / "ext.csv", np.random.default_rng(5), participants=4)
    raw.replace({"cond": {"A": script}}).to_csv(tmp_path / "ext.csv", index=False)
    run_dir = tmp_path / "empty"
    write_study(load_study(None, "quick", ["analysis.bootstrap=10"]), run_dir)
    trials = import_trials(tmp_path / "ext.csv", MAPPING)
    results = analyze(run_dir, trials=trials, source=f"imported {script}.csv")
    html = (run_dir / "report" / "index.html").read_text()
    assert "<script" not in html
    escaped = "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"
    assert f"imported {escaped}.csv" in html                                  # the response source
    assert f"<td class='s'>{escaped}</td>" in html                            # a table cell
    assert f"id='conditions.{escaped}-vs-B'" in html                          # an attribute
    assert any(script in e["sentence"] for e in results["statistics"])        # the sentence itself is unchanged
    assert html.count(escaped) > 3


def test_import_missing_column_names_it(tmp_path):
    _external_csv(tmp_path / "ext.csv", np.random.default_rng(0), participants=2)
    with pytest.raises(ValueError, match=r"'accuracy'.*'correct'.*columns are \['subj', 'cond'"):
        import_trials(tmp_path / "ext.csv", {**MAPPING, "correct": "accuracy"})
    with pytest.raises(ValueError, match="ext.csv has no 'participant' column.*--map participant=COLUMN"):
        import_trials(tmp_path / "ext.csv", {"correct": "acc"})
    with pytest.raises(ValueError, match="unknown canonical name 'subject'"):
        import_trials(tmp_path / "ext.csv", {**MAPPING, "subject": "subj"})


def test_import_refuses_what_would_silently_drop_or_blank_trials(tmp_path):
    """A misspelt model id (its rows would lose their rate), a text column mapped to a number, the same name
    mapped twice and a file that is not a CSV each stop the import with a line that names the problem."""
    from analysis.load import parse_mapping

    models = pd.DataFrame({"model_id": ["base", "structured-oneshot-r0.50"], "method": ["base", "structured"],
                           "schedule": ["", "oneshot"], "rate": [0.0, 0.5], "sparsity": [0.0, 0.5]})
    frame = pd.DataFrame({"who": ["a", "a", "b", "b"], "hit": [1, 0, 1, 1], "rt": [800, 900, 700, 650],
                          "model_id": ["base", "structurd-oneshot-r0.50", "base", "structured-oneshot-r0.50"]})
    frame.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(ValueError, match=r"names 1 model\(s\) the study does not have.*structurd-oneshot-r0.50; "
                                         r"the study's models: base, structured-oneshot-r0.50"):
        import_trials(tmp_path / "t.csv", {"participant": "who", "correct": "hit"}, models=models)
    frame.assign(rate=[0.0, 0.5, 0.0, 0.5]).to_csv(tmp_path / "rated.csv", index=False)      # its own rate: fine
    rated = import_trials(tmp_path / "rated.csv", {"participant": "who", "correct": "hit"}, models=models)
    assert rated["rate"].tolist() == [0.0, 0.5, 0.0, 0.5]
    with pytest.raises(ValueError, match=r"column 'who' \(mapped to 'rt'\) holds 4 values that are not numbers"):
        import_trials(tmp_path / "rated.csv", {"participant": "who", "correct": "hit", "rt": "who"})
    with pytest.raises(ValueError, match="maps 'participant' twice"):
        parse_mapping(["participant=who", "participant=subj"])
    (tmp_path / "broken.csv").write_text('who,hit\n"a,1\nb,0\n')
    with pytest.raises(ValueError, match="broken.csv is not a readable CSV"):
        import_trials(tmp_path / "broken.csv", {"participant": "who", "correct": "hit"})
    (tmp_path / "binary.csv").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="binary.csv is not a readable CSV"):
        import_trials(tmp_path / "binary.csv", {"participant": "who", "correct": "hit"})


def test_imported_catch_trials_exclude_by_the_study_rule_unless_the_file_brings_its_own(tmp_path):
    _external_csv(tmp_path / "ext.csv", np.random.default_rng(2), participants=5)
    ruled = import_trials(tmp_path / "ext.csv", MAPPING, catch_min_accuracy=0.8)
    assert ruled.attrs["catch_rule"] == (1, 5)
    assert set(ruled.loc[ruled["excluded"], "participant"]) == {"s4"}
    assert set(ruled.loc[ruled["excluded"], "exclusion_reasons"]) == {"catch_accuracy"}
    raw = pd.read_csv(tmp_path / "ext.csv").assign(dropped=0)
    raw.to_csv(tmp_path / "own.csv", index=False)
    own = import_trials(tmp_path / "own.csv", {**MAPPING, "excluded": "dropped"}, catch_min_accuracy=0.8)
    assert not own["excluded"].any() and "catch_rule" not in own.attrs


def test_import_accepts_boolean_spellings(tmp_path):
    pd.DataFrame({"who": ["a", "a", "b", "b"], "hit": ["true", "False", 1, 0]}).to_csv(tmp_path / "t.csv", index=False)
    t = import_trials(tmp_path / "t.csv", {"participant": "who", "correct": "hit"})
    assert t["correct"].tolist() == [1, 0, 1, 0] and (t["trial_type"] == "main").all()
    pd.DataFrame({"who": ["a"], "hit": ["maybe"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="'hit'.*maybe"):
        import_trials(tmp_path / "bad.csv", {"participant": "who", "correct": "hit"})


def test_cli_import_and_usage_errors(tmp_path):
    _external_csv(tmp_path / "ext.csv", np.random.default_rng(1), participants=4)
    run_dir = tmp_path / "study"
    write_study(load_study(None, "quick", ["analysis.bootstrap=20"]), run_dir)
    (tmp_path / "map.toml").write_text("[columns]\n" + "".join(f'{k} = "{v}"\n' for k, v in MAPPING.items()))
    runner = CliRunner()
    ok = runner.invoke(analyze_cmd, [str(run_dir), "--import", str(tmp_path / "ext.csv"), "--mapping",
                                     str(tmp_path / "map.toml"), "--out", str(tmp_path / "rep")])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "rep" / "index.html").is_file() and "report:" in ok.output
    assert "ext.csv: 1 of 4 participants with catch trials excluded by the study's catch rule" in ok.output
    exclusions = json.loads((tmp_path / "rep" / "results.json").read_text())["exclusions"]
    assert exclusions["participants"] == 4 and exclusions["excluded"] == 1
    assert {"reason": "catch_accuracy", "participants": 1} in exclusions["reasons"]
    bad = runner.invoke(analyze_cmd, [str(run_dir), "--import", str(tmp_path / "ext.csv"), "--map",
                                      "participant=subj", "--map", "correct=score"])
    assert bad.exit_code == 2 and "'score'" in bad.output and "subj" in bad.output
    no_map = runner.invoke(analyze_cmd, [str(run_dir), "--import", str(tmp_path / "ext.csv")])
    assert no_map.exit_code == 2 and "no 'participant' column" in no_map.output and "--map" in no_map.output
    # columns that bear canonical names need no --map, and the command says which it took by name
    raw = pd.read_csv(tmp_path / "ext.csv").rename(columns={v: k for k, v in MAPPING.items()})
    raw.to_csv(tmp_path / "named.csv", index=False)
    named = runner.invoke(analyze_cmd, [str(run_dir), "--import", str(tmp_path / "named.csv")])
    assert named.exit_code == 0, named.output
    assert f"columns taken by their own names: {', '.join(c for c in IMPORT_NAMES if c in raw)}" in named.output
    assert json.loads((run_dir / "report-named" / "results.json").read_text())["statistics"] == \
        json.loads((tmp_path / "rep" / "results.json").read_text())["statistics"]
    assert not (run_dir / "report").exists()          # without --out an import leaves the study's own report alone
    wrong_set = runner.invoke(analyze_cmd, [str(run_dir), "--set", "train.epochs=3"])
    assert wrong_set.exit_code == 2 and "analysis.KEY=VALUE" in wrong_set.output


def test_models_fall_back_to_evaluation_csv(tmp_path):
    run_dir = tmp_path / "ev"
    run_dir.mkdir()
    pd.DataFrame([{"model_id": "base", "arch": "x", "method": "", "schedule": "", "rate_requested": 0.0,
                   "sparsity": 0.0, "top1": 0.9},
                  {"model_id": "connection-oneshot-r0.50", "arch": "x", "method": "connection",
                   "schedule": "oneshot", "rate_requested": 0.5, "sparsity": 0.49, "top1": 0.8},
                  {"model_id": "observer", "arch": "y", "method": "", "schedule": "", "rate_requested": 0.0,
                   "sparsity": 0.0, "top1": 0.7}]).to_csv(run_dir / "evaluation.csv", index=False)
    models = load_models(run_dir).set_index("model_id")
    assert list(models.index) == ["base", "connection-oneshot-r0.50"]
    assert models.loc["base", "method"] == "base" and models.loc["connection-oneshot-r0.50", "rate"] == 0.5


def test_trials_come_from_the_survey_database_and_from_an_export_only_without_one(tmp_path):
    from survey_app import create_app
    from survey_app.testing import make_study_dir

    from analysis.load import load_trials

    run_dir = make_study_dir(tmp_path / "survey", {"main_trials": 4, "catch_trials": 1})
    token = "token-for-the-analysis-test-0123"
    app = create_app({"RUN_DIR": str(run_dir), "TESTING": True, "API_TOKEN": token, "ADMIN_PASSWORD": "pw"})
    client = app.test_client()
    head = {"Authorization": f"Bearer {token}"}
    created = client.post("/api/sessions", json={"observer": "bright"}, headers=head).json
    sid, auth = created["session"], {"Authorization": f"Bearer {created['token']}"}
    for n in range(10):
        state = client.get(f"/api/sessions/{sid}", headers=auth).json
        if state["stage"] == "complete":
            break
        client.post(f"/api/sessions/{sid}/responses", headers=auth,
                    json={"trial": state["trial"]["id"], "choice": "upper", "confidence": 2, "rt_ms": 1700.0,
                          "key": f"key-{n:04d}"})
    trials, source = load_trials(run_dir)
    assert source == "survey database" and len(trials) == 5
    assert trials["is_machine"].all() and (trials["observer"] == "bright").all()
    assert set(trials["trial_type"]) == {"main", "catch"} and set(trials["correct"]) <= {0, 1}
    assert trials["unit_id"].str.fullmatch(r"inception\da:\d").all()

    # an export (`sparsight responses` writes RUN_DIR/responses.csv) is a copy that new answers leave behind:
    # the database stays the source, and the report says the export is not read
    from survey_app.export import responses_frame
    responses_frame(app.config["SESSIONS"]).head(3).to_csv(run_dir / "responses.csv", index=False)
    trials, source = load_trials(run_dir)
    assert len(trials) == 5 and source == "survey database (5 responses; responses.csv, an export of 3, is not read)"
    # the report reruns when an answer changes, even where the number of answers stays the same
    from types import SimpleNamespace

    from sqlalchemy import update

    from analysis.stages import responses_fingerprint
    from sparsight.layout import Layout
    from survey_app.models import Response
    study = SimpleNamespace(run_dir=run_dir, layout=Layout(run_dir), config=app.config["STUDY"], planning=True)
    before = responses_fingerprint(study)
    with app.config["SESSIONS"].begin() as s:
        s.execute(update(Response).where(Response.id == 1).values(choice="lower"))
    after = responses_fingerprint(study)
    assert before["database_responses"] == after["database_responses"] == 5 and before != after

    app.config["ENGINE"].dispose()
    (run_dir / "survey.db").rename(run_dir / "elsewhere.db")           # the folder without its database
    trials, source = load_trials(run_dir)
    assert len(trials) == 3 and source == "responses.csv"


@pytest.mark.parametrize("draw", [
    lambda p: figures.interpretability_vs_sparsity(pd.DataFrame(), None, p),
    lambda p: figures.top1_vs_sparsity(pd.DataFrame(columns=["top1", "sparsity", "series"]), p),
    lambda p: figures.layer_mis_vs_sparsity(pd.DataFrame(), p),
    lambda p: figures.mis_vs_human(pd.DataFrame(columns=["mis", "accuracy"]), p),
    lambda p: figures.interpretable_vs_sparsity(pd.DataFrame(), p),
    lambda p: figures.robustness_curves({}, pd.DataFrame(), p),
], ids=["interpretability", "top1", "layers", "mis_vs_human", "dissection", "robustness"])
def test_figures_without_data_draw_nothing(draw, tmp_path):
    assert draw(tmp_path / "f.png") is None and not (tmp_path / "f.png").exists()


def test_imported_published_style_trials_run_every_applicable_analysis_and_report_catch_accuracy(tmp_path):
    """A CSV shaped like a published 2-AFC data set (subject, condition, catch flag, trial type, confidence, RT)."""
    rng = np.random.default_rng(3)
    rows = []
    for s in range(12):
        for t in range(60):
            catch = t % 10 == 9
            cond = "natural" if t % 2 == 0 else "synthetic"
            p = 0.95 if catch else (0.85 if cond == "natural" else 0.6)
            rows.append({"subj": f"s{s}", "cond": cond, "is_catch": int(catch),
                         "ttype": "practice" if t < 4 else "main", "conf": int(rng.integers(1, 4)),
                         "rt_ms": float(rng.gamma(4, 500)), "acc": int(rng.random() < p), "neuron": f"mixed4a:{t % 7}"})
    frame = pd.DataFrame(rows)
    frame.to_csv(tmp_path / "published.csv", index=False)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    mapping = {"participant": "subj", "condition": "cond", "catch": "is_catch", "trial_type": "ttype",
               "confidence": "conf", "rt": "rt_ms", "correct": "acc", "unit": "neuron"}
    trials = import_trials(tmp_path / "published.csv", mapping)
    results = analyze(run_dir, trials=trials, source="imported published.csv")
    statuses = {e["id"]: e["status"] for e in results["statistics"]}
    assert "failed" not in statuses.values(), {k: v for k, v in statuses.items() if v == "failed"}
    assert statuses["descriptives"] == "ok" and statuses["conditions.natural-vs-synthetic"] == "ok"
    catch = pd.DataFrame(results["descriptives"]["catch"])
    overall = catch[catch["kind"] == "all"].iloc[0]
    expected = frame[frame["is_catch"] == 1]
    assert overall["trials"] == len(expected) and overall["accuracy"] == pytest.approx(expected["acc"].mean())
    assert overall["lowest"] == pytest.approx(expected.groupby("subj")["acc"].mean().min())
    assert "Catch trials" in (run_dir / "report" / "index.html").read_text()


def _simulated_units(seed, n_units, slope, unit_sd=0.05, noise=0.03):
    """A unit table like mis/units.csv joined with the models: the same units in a base and 8 pruned models."""
    rng = np.random.default_rng(seed)
    rates = [0.0] + [r for r in (0.2, 0.4, 0.6, 0.8) for _ in range(2)]
    effect = rng.normal(0, unit_sd, n_units)
    rows = [{"model_id": f"m{i}", "kind": "natural", "unit_id": f"l:{u}", "rate": r, "status": "ok",
             "top1": 0.9 - 0.3 * r + rng.normal(0, 0.02), "series": "base" if r == 0 else "structured",
             "mis": 0.75 + slope * r + effect[u] + rng.normal(0, noise)}
            for i, r in enumerate(rates) for u in range(n_units)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("n_units, slope, noise, verdict", [(40, -0.15, 0.03, "effect"), (200, 0.0, 0.03, "equivalent"),
                                                              (4, 0.0, 0.2, "inconclusive")])
def test_the_answer_follows_the_primary_total_effect(n_units, slope, noise, verdict):
    from analysis.answers import answers
    from analysis.entries import apply_holm, run_analysis
    from analysis.model_fits import mis_slope
    from sparsight.config import load_study

    cfg = load_study(overrides=["analysis.tost_margin=0.05"])
    units = _simulated_units(1, n_units, slope, noise=noise)
    entries = []
    run_analysis(entries, "mis_slope.natural.all", "primary", "model", lambda: mis_slope(units, "natural", None, cfg),
                 family="primary")
    run_analysis(entries, "mis_slope_adjusted.natural.all", "secondary", "model",
                 lambda: mis_slope(units, "natural", None, cfg, adjusted=True))
    apply_holm(entries)
    assert entries[0].result["formula"] == "mis ~ rate" and "top1" in entries[1].result["formula"]
    (answer,) = answers(entries, cfg)
    assert answer["verdict"] == verdict, answer["sentence"]
    if verdict == "inconclusive":
        assert "units per model instead of 4" in answer["sentence"] or "needs more models" in answer["sentence"]
        # the interval equivalence needs is the TOST's 90 % one: quoted, and the narrowing it needs is its own
        import re
        tost, res = entries[0].result["tost"], entries[0].result
        change = res["terms"]["rate"]["coef"] * res["rate_span"]
        assert f"90 % CI {tost['ci_low']:.3f} to {tost['ci_high']:.3f}".replace("-", "−") in answer["sentence"]
        factor = float(re.search(r"needs its 90 % interval about ([0-9.]+)× narrower", answer["sentence"]).group(1))
        assert factor == pytest.approx((tost["ci_high"] - tost["ci_low"]) / 2 / (0.05 - abs(change)), rel=0.05)


def test_the_answer_says_when_model_level_noise_is_not_in_its_interval():
    """With two models the primary slope clusters by unit only; the answer's heading must not claim the noise a
    model's units share is in the interval (it is, from three models on)."""
    from analysis.answers import answers
    from analysis.entries import run_analysis
    from analysis.model_fits import mis_slope
    from analysis.render import _templates
    from sparsight.config import load_study

    heading_of = _templates().get_template("macros.html.j2").module.answer_heading

    cfg = load_study()
    units = _simulated_units(2, 30, 0.0)
    for models, clustered in ((units[units["model_id"].isin(["m0", "m8"])], False), (units, True)):
        entries = []
        run_analysis(entries, "mis_slope.natural.all", "primary", "model",
                     lambda m=models: mis_slope(m, "natural", None, cfg), family="primary")
        (answer,) = answers(entries, cfg)
        assert answer["model_noise"] is clustered
        heading = " ".join(str(heading_of([answer])).split())
        assert ("the noise a model's units share in the intervals" in heading) is clustered
        assert ("with 2 models too few to cluster on" in heading) is not clustered


def test_the_answer_says_it_is_about_the_units_that_stay_live_and_how_many_unit_model_pairs_those_are():
    """Units a model removes or silences have no MIS there: the heading counts the live pairs the slope used
    among all pairs (the analysis fits the live units, as the report does, and counts the rest apart)."""
    from analysis.answers import answers
    from analysis.entries import run_analysis
    from analysis.model_fits import mis_slope, ok_units
    from analysis.render import _templates
    from sparsight.config import load_study

    cfg = load_study()
    units = _simulated_units(3, 30, 0.0)
    removed = (units["rate"] >= 0.6) & (units["unit_id"].str[2:].astype(int) < 10)
    units.loc[removed, ["status", "mis"]] = ["pruned", np.nan]
    entries = []
    run_analysis(entries, "mis_slope.natural.all", "primary", "model",
                 lambda: mis_slope(ok_units(units), "natural", None, cfg, every_unit=units), family="primary")
    (answer,) = answers(entries, cfg)
    assert (answer["live_pairs"], answer["unit_model_pairs"]) == (len(units) - removed.sum(), len(units)) == (230, 270)
    heading = " ".join(str(_templates().get_template("macros.html.j2").module.answer_heading([answer])).split())
    assert "the MIS of the units that stay live" in heading and "natural: 230 of 270 unit × model pairs live" in heading
    assert "MIS is the machine observer's predicted 2-AFC accuracy, a stand-in for people's" in heading


@pytest.mark.parametrize("share, needs", [(0.0, "units"), (0.1, "units"), (0.5, "models")])
def test_an_inconclusive_answer_says_whether_units_or_models_would_decide(share, needs):
    """The slope's variance is split by ``model_variance_share``: only the units' part shrinks as 1/units."""
    from types import SimpleNamespace

    from analysis.answers import _what_decides

    a = SimpleNamespace(alpha_level=0.05, tost_margin=0.05)
    res = {"df": 24, "n_groups": 30, "model_variance_share": share}
    se, span, change = 0.04, 0.75, 0.02
    text = _what_decides(res, {"se": se / span}, change, span, a)
    target = ((0.05 - change) / stats.t.ppf(0.95, 24)) ** 2
    if needs == "units":
        need = math.ceil(30 * (1 - share) * se ** 2 / (target - share * se ** 2))
        assert f"roughly {need} units per model instead of 30" in text, text
    else:
        assert "more units cannot do it" in text and "needs more models" in text, text
        # with the model count known: how many models would do it, the units as they are (variance 1/models);
        # none where the units' own share already exceeds what equivalence allows
        assert "roughly" not in _what_decides({**res, "n_models": 26}, {"se": se / span}, change, span, a)
        counted = _what_decides({**res, "n_models": 26, "model_variance_share": 0.9}, {"se": se / span}, change,
                                span, a)
        needed = math.ceil(26 * 0.9 * se ** 2 / (target - 0.1 * se ** 2))
        assert f"roughly {needed} models instead of 26" in counted and (
            f"prune.copies = {math.ceil(needed / 26)}") in counted, counted
    assert _what_decides(res, {"se": se / span}, 0.06, span, a) is None     # the change is beyond the margin
    if needs == "units":        # where the study has fewer units than that, only more models can get there
        small = _what_decides({**res, "unit_pool": {"units": need - 1, "what": "units alive in every model"}},
                              {"se": se / span}, change, span, a)
        assert f"more than the study has ({need - 1} units alive in every model), so it needs more models" in small
        roomy = _what_decides({**res, "unit_pool": {"units": need, "what": "units"}}, {"se": se / span}, change,
                              span, a)
        assert roomy == text


def test_the_unit_pool_is_what_the_study_could_give_each_kind():
    """Visualized units come from the units alive in every model; with sampling "all" natural units are all
    there are; a per-layer sample could grow, so it has no pool."""
    from analysis.model_fits import _unit_pool
    from sparsight.config import load_study

    rows = [{"model_id": m, "kind": k, "unit_id": f"l:{u}", "status": "ok" if (m == "a" or u < 3) else "pruned"}
            for m in ("a", "b") for k in ("natural", "synthetic") for u in range(5)]
    units = pd.DataFrame(rows)
    cfg = load_study(overrides=["stimuli.synthetic_units=2", "units.sampling=all"])
    assert _unit_pool(units, "synthetic", cfg)["units"] == 3
    assert _unit_pool(units, "natural", cfg)["units"] == 5
    sampled = load_study(overrides=["stimuli.synthetic_units=0", "units.sampling=per-layer"])
    assert _unit_pool(units, "natural", sampled) is None and _unit_pool(units, "synthetic", sampled) is None


def _default_design_units(seed, slope, unit_sd=0.08, noise=0.05):
    """MIS of the default design: 744 units (five layers) in a base and 24 pruned models (4 methods × 2
    schedules × rates 0.25/0.5/0.75); structured pruning silences the share of units it removes."""
    rng = np.random.default_rng(seed)
    effect = rng.normal(0, unit_sd, 744)
    models = [("base", "base", 0.0)] + [(f"{m}-{s}-r{r}", f"{m} ({s})", r)
                                         for m in ("unstructured-global", "structured", "connection", "lrp")
                                         for s in ("oneshot", "iterative") for r in (0.25, 0.5, 0.75)]
    rows = []
    for model_id, series, rate in models:
        alive = rng.random(744) >= (rate if series.startswith("structured") else 0.0)
        rows += [{"model_id": model_id, "kind": "natural", "unit_id": f"l:{u}", "rate": rate, "series": series,
                  "status": "ok" if alive[u] else "dead", "top1": 0.92 - 0.2 * rate + rng.normal(0, 0.01),
                  "mis": 0.8 + slope * rate + effect[u] + rng.normal(0, noise) if alive[u] else np.nan}
                 for u in range(744)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("slope, verdict", [(-0.03, "effect"), (0.0, "equivalent")])
def test_the_default_design_recovers_a_known_slope_and_a_known_null(slope, verdict):
    """Simulated data of the default design: the primary slope's CI covers the true slope, is at most
    ±0.005 per 10 % pruning rate wide, and the answer is an effect (slope) or equivalence (null)."""
    from analysis.answers import answers
    from analysis.entries import apply_holm, run_analysis
    from analysis.model_fits import mis_slope, ok_units
    from sparsight.config import load_study

    cfg = load_study(profile="default")
    units = ok_units(_default_design_units(7, slope))
    entries = []
    run_analysis(entries, "mis_slope.natural.all", "primary", "model", lambda: mis_slope(units, "natural", None, cfg),
                 family="primary")
    apply_holm(entries)
    t = entries[0].result["terms"]["rate"]
    assert t["ci_low"] <= slope <= t["ci_high"]
    assert (t["ci_high"] - t["ci_low"]) / 2 * 0.1 <= 0.005
    (answer,) = answers(entries, cfg)
    assert answer["verdict"] == verdict, answer["sentence"]


def test_gallery_cells_of_visualizations_carry_their_reach_and_flag_invalid_ones(tmp_path, monkeypatch):
    """Each cell of feature visualizations is labelled with its unit's reach from stimuli/units.csv, red where
    not valid; natural cells and cells without a reach get no label (reference: the table itself).  The retrained
    control, which prunes nothing, adds no row and no rate-0 column."""
    from matplotlib.figure import Figure
    from PIL import Image

    from analysis.gallery import INVALID_COLOUR, unit_sheet, visualization_reach

    models = pd.DataFrame({"model_id": ["base", "control-oneshot-r0.00", "s-r0.5", "s-r0.9"],
                           "method": ["base", "control", "structured", "structured"],
                           "schedule": [None, "oneshot", "oneshot", "oneshot"], "rate": [0.0, 0.0, 0.5, 0.9]})
    rows = []
    for mid in models.model_id:
        for kind in ("natural", "synthetic"):
            name = f"{mid}-{kind}.png"
            Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / name)
            rows.append(dict(model_id=mid, kind=kind, layer="l", unit=3, task=0, role="ref_max", rank=0, image=name))
    status = pd.DataFrame([
        dict(model_id="base", kind="natural", layer="l", unit=3, fv_reach=np.nan, fv_valid=np.nan),
        dict(model_id="base", kind="synthetic", layer="l", unit=3, fv_reach=1.734, fv_valid=True),
        dict(model_id="s-r0.5", kind="synthetic", layer="l", unit=3, fv_reach=0.041, fv_valid=False),
        dict(model_id="s-r0.9", kind="synthetic", layer="l", unit=3, fv_reach=np.nan, fv_valid=False)])
    status.to_csv(tmp_path / "units.csv", index=False)
    reach = visualization_reach(pd.read_csv(tmp_path / "units.csv"))
    assert reach == {("base", "l", 3): (1.734, True), ("s-r0.5", "l", 3): (0.041, False)}

    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: drawn.extend(
        (ax.get_ylabel(), ax.get_xlabel(), ax.xaxis.label.get_color()) for ax in fig.axes))
    unit_sheet(pd.DataFrame(rows), models, tmp_path, "l", 3, tmp_path / "sheet.png", reach=reach)
    labels = [(x, c) for y, x, c in drawn if x]
    assert labels == [("reach 1.73", "black"), ("reach 0.04 · not valid", INVALID_COLOUR)]
    assert len(drawn) == 2 * 3            # structured × (natural, synthetic); base, rate 0.5, rate 0.9


def test_the_layer_panels_give_each_kind_its_row_and_one_legend(tmp_path, monkeypatch):
    """Five layers × two kinds: one row of five panels per kind, each titled with its layer and kind and drawing
    that kind's curves only (checked against the per-model means of the input), and one legend naming each
    series once; seven layers wrap to two rows per kind, the spare panels hidden."""
    from matplotlib.figure import Figure

    rows = [dict(model_id=f"{s}-{r}", series=s, sparsity=r, kind=k, layer=f"l{i}", unit=u,
                 mis=0.8 + 0.01 * u + (0.1 if k == "synthetic" else 0.0) - (0.2 * r if s == "b" else 0.0))
            for s in ("a", "b") for r in (0.0, 0.5) for k in ("natural", "synthetic") for i in range(7)
            for u in range(3)]
    seen = {}
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: seen.update(
        panels=[(ax.get_title(), [tuple(np.round(np.asarray(line.get_ydata(), float), 6)) for line in ax.get_lines()
                                  if line.get_linestyle() == "-"])
                for ax in fig.axes if ax.get_visible()],
        hidden=sum(not ax.get_visible() for ax in fig.axes),
        legends=[[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes if ax.get_legend()],
        notes=[(ax.get_title(), " ".join(t.get_text().split())) for ax in fig.axes for t in ax.texts]))
    five = pd.DataFrame([r for r in rows if r["layer"] < "l5"])
    figures.layer_mis_vs_sparsity(five, tmp_path / "l.png")
    assert [t for t, _ in seen["panels"]] == [f"l{i} · {k}" for k in ("natural", "synthetic") for i in range(5)]
    assert seen["legends"] == [["a", "b"]] and seen["hidden"] == 0
    for title, curves in seen["panels"]:
        layer, kind = title.split(" · ")
        d = five[(five.layer == layer) & (five.kind == kind)]
        expected = {s: tuple(np.round(d[d.series == s].groupby("sparsity").mis.mean().to_numpy(), 6)) for s in "ab"}
        assert sorted(curves) == sorted(expected.values())
    figures.layer_mis_vs_sparsity(pd.DataFrame(rows), tmp_path / "l.png")
    assert len(seen["panels"]) == 14 and seen["hidden"] == 2 * 3 and seen["legends"] == [["a", "b"]]
    # a series with live units in the first layer only keeps its legend entry (the legend sits by the last panel)
    first_only = [dict(r, series="c", model_id=f"c-{r['sparsity']}") for r in rows if r["layer"] == "l0"]
    figures.layer_mis_vs_sparsity(pd.DataFrame(rows + first_only), tmp_path / "l.png")
    assert seen["legends"] == [["a", "b", "c"]] and seen["notes"] == []
    # visualized units in some layers only: the other layers' synthetic panels say why they are empty
    partial = [r for r in rows if r["kind"] == "natural" or r["layer"] in ("l0", "l1")]
    figures.layer_mis_vs_sparsity(pd.DataFrame(partial), tmp_path / "l.png")
    assert seen["notes"] == [(f"l{i} · synthetic", "no synthetic units in this layer") for i in range(2, 7)]


def test_legends_cover_no_data_and_captions_say_what_is_drawn(tmp_path, monkeypatch):
    """The legends of the sparsity figures lie outside every panel; top-1 draws the chance line at 1/classes;
    dissection counts start at zero; without human answers the caption promises no human squares, and the
    dissection caption names the IoU threshold."""
    from matplotlib.figure import Figure

    from analysis.render import _figures_data

    drawn = {}

    def capture(fig, *a, **k):
        fig.canvas.draw()
        panels = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
        legends = [ax.get_legend().get_window_extent() for ax in fig.axes if ax.get_legend() is not None]
        drawn["overlap"] = any(legend.overlaps(ax.get_window_extent()) for legend in legends for ax in panels)
        drawn["legends"], drawn["fig"] = len(legends), fig

    monkeypatch.setattr(Figure, "savefig", capture)
    models = pd.DataFrame([dict(model_id=f"{s}-{r}", series=s, method=s, sparsity=r, rate=r, top1=0.9 - r / 2,
                                top1_before=0.5 - r / 2, kind=k, mis=0.8, mis_ci_low=0.7, mis_ci_high=0.9,
                                interpretable=50 - 20 * r, interpretable_fraction_alive=0.1, unique_concepts=9)
                           for s in ("a", "b") for r in (0.0, 0.5) for k in ("natural", "synthetic")])
    figures.top1_vs_sparsity(models, tmp_path / "t.png", chance=0.1)
    assert drawn["legends"] == 1 and not drawn["overlap"]
    lines = [line for line in drawn["fig"].axes[0].get_lines() if line.get_label().startswith("chance")]
    assert len(lines) == 1 and list(lines[0].get_ydata()) == [0.1, 0.1]
    figures.interpretability_vs_sparsity(models, None, tmp_path / "i.png")
    assert drawn["legends"] == 1 and not drawn["overlap"]
    figures.interpretable_vs_sparsity(models, tmp_path / "d.png")
    assert drawn["legends"] == 1 and not drawn["overlap"]
    assert all(ax.get_ylim()[0] == 0.0 for ax in drawn["fig"].axes)
    from PIL import Image
    for name in ("i.png", "d.png"):                     # savefig was replaced: the report needs files to embed
        Image.new("RGB", (2, 2)).save(tmp_path / name)
    plots, _ = _figures_data({"interpretability": tmp_path / "i.png", "dissection": tmp_path / "d.png"},
                             humans=False, iou_threshold=0.04)
    captions = {p["name"]: p["caption"] for p in plots}
    assert "human accuracy (squares" not in captions["interpretability"]
    assert "appear once people have answered" in captions["interpretability"]
    assert captions["dissection"].endswith("best IoU exceeds 0.04.")
    with_people, _ = _figures_data({"interpretability": tmp_path / "i.png"}, humans=True)
    assert "human accuracy (squares, Wilson 95 % CI)" in with_people[0]["caption"]


@pytest.mark.parametrize("coef, phrase", [(-0.0031, "decreased by 0.0003 per 10 %"),
                                          (0.0042, "increased by 0.0004 per 10 %"),
                                          (-0.4, "decreased by 0.040 per 10 %"),
                                          (0.25, "increased by 0.025 per 10 %")])
def test_a_slope_sentence_shows_the_size_of_a_slope_that_rounds_to_zero(coef, phrase):
    t = {"coef": coef, "ci_low": coef - 0.03, "ci_high": coef + 0.03, "p": 0.5}
    sentence = slope_sentence("MIS", t, 0.95, 0.05)
    assert phrase in sentence and "0.000 " not in sentence


def test_fmt_widens_only_values_that_would_round_to_zero():
    assert fmt(-0.0004) == "−0.0004" and fmt(0.00002) == "0.00002" and fmt(-1e-9) == "0.000"
    assert fmt(0.0) == "0.000" and fmt(-0.0006) == "−0.001" and fmt(0.1234) == "0.123"
    assert fmt(-1.25, 1) == "−1.2" and fmt(float("nan")) == "n/a" and fmt(None) == "n/a"


def test_report_tables_write_small_p_values_as_below_a_thousandth_like_the_prose():
    frame = pd.DataFrame({"model_id": ["a", "b", "c"], "difference": [-0.00002, 0.5, 0.01],
                          "p_tost": [2e-6, 0.0451, float("nan")], "p": [0.0009, 0.001, 0.3]})
    rows = [[text for text, _ in row] for row in table_data(frame)["rows"]]
    assert [r[2] for r in rows] == ["< 0.001", "0.045", ""]
    assert [r[3] for r in rows] == ["< 0.001", "0.001", "0.300"]
    assert rows[0][1] == "−0.00002"     # other columns keep their widened decimals


def test_curves_at_one_sparsity_are_set_apart_and_keep_the_shared_base_point(tmp_path, monkeypatch):
    """Three methods at sparsity 0.5 and the retrained control at 0: the methods' points (and so their error bars)
    sit at distinct x within the dodge width about 0.5; the base point every curve starts from stays at 0, drawn
    once more in black on top and named in the legend; the control is not joined to the base."""
    from matplotlib.colors import to_rgba
    from matplotlib.figure import Figure

    rows = [dict(model_id="base", series="base", sparsity=0.0, kind="natural", mis=0.8, mis_ci_low=0.7,
                 mis_ci_high=0.9)]
    rows += [dict(model_id=f"{s}-r0.5", series=s, sparsity=0.5, kind="natural", mis=0.8, mis_ci_low=0.7,
                  mis_ci_high=0.9) for s in ("a", "b", "c")]
    rows += [dict(model_id="control", series="control", sparsity=0.0, kind="natural", mis=0.7, mis_ci_low=0.6,
                  mis_ci_high=0.8)]
    lines, black, labels = [], [], []

    def capture(fig, *a, **k):
        for ax in fig.axes:
            labels.extend(ax.get_legend_handles_labels()[1])
            for line in (line for line in ax.get_lines() if line.get_marker() == "o"):
                black_line = to_rgba(line.get_color()) == (0, 0, 0, 1)
                (black if black_line else lines).append((tuple(line.get_xdata()), line.get_linestyle()))

    monkeypatch.setattr(Figure, "savefig", capture)
    figures.interpretability_vs_sparsity(pd.DataFrame(rows), None, tmp_path / "f.png")
    joined = [x for x, style in lines if style == "-"]
    assert [x[0] for x in joined] == [0.0, 0.0, 0.0]
    pruned = [x[1] for x in joined]
    assert len(set(pruned)) == 3 and all(abs(x - 0.5) <= figures.DODGE_WIDTH / 2 + 1e-12 for x in pruned)
    assert np.diff(sorted(pruned)) == pytest.approx([figures.DODGE_WIDTH / 3] * 2)     # four series' slots
    # the base once, in black, in the legend; the control (sparsity 0 only) not joined to it by a vertical stroke
    assert black == [((0.0,), "None")] and labels.count("MIS · base") == 1
    assert [style for x, style in lines if len(x) == 2 and x[1] < 0.25] == ["None"]


def test_robustness_panels_of_one_measure_share_their_y_range(tmp_path, monkeypatch):
    """Two methods whose accuracies lie far apart: their accuracy panels still show one common y range (and
    their noise panels another), so a lower curve is lower on the page too."""
    from matplotlib.figure import Figure

    models = pd.DataFrame({"model_id": ["base", "a-r0.5", "b-r0.5"], "series": ["base", "a", "b"],
                           "rate": [0.0, 0.5, 0.5]})
    acc = pd.DataFrame([dict(model_id=m, severity=sev, top1=top - 0.05 * sev)
                        for m, top in (("base", 0.9), ("a-r0.5", 0.85), ("b-r0.5", 0.3)) for sev in (0, 2, 4)])
    noise = pd.DataFrame([dict(model_id=m, eps=e, agreement=a - 0.1 * e)
                          for m, a in (("a-r0.5", 0.95), ("b-r0.5", 0.55)) for e in (0.0, 0.5)])
    limits = {}
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: [
        limits.setdefault(ax.get_ylabel(), set()).add(ax.get_ylim()) for ax in fig.axes if ax.get_visible()])
    figures.robustness_curves({"accuracy": acc, "noise_similarity": noise}, models, tmp_path / "r.png")
    accuracy, agreement = limits["top-1 (mean over corruptions)"], limits["agreement with parent"]
    assert len(accuracy) == 1 and len(agreement) == 1
    (lo, hi), = accuracy
    assert lo < 0.1 and hi > 0.9


def test_robustness_curves_carry_the_wilson_band_of_their_images(tmp_path, monkeypatch):
    """Each curve is shaded by the 95 % Wilson interval of its proportion over the subset's images, as
    statsmodels computes it; without an image count there is no band."""
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure
    from statsmodels.stats.proportion import proportion_confint

    models = pd.DataFrame({"model_id": ["base", "a-r0.5"], "series": ["base", "a"], "rate": [0.0, 0.5]})
    acc = pd.DataFrame([dict(model_id=m, severity=sev, top1=top - 0.1 * sev, n_images=300)
                        for m, top in (("base", 0.9), ("a-r0.5", 0.8)) for sev in (0, 2)])
    seen = {}
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: seen.update(
        bands=[c for ax in fig.axes for c in ax.collections if isinstance(c, PolyCollection)]))
    figures.robustness_curves({"accuracy": acc}, models, tmp_path / "r.png")
    assert len(seen["bands"]) == 2
    heights = sorted(round(float(y), 6) for band in seen["bands"] for y in band.get_paths()[0].vertices[:, 1])
    expected = [v for p in (0.9, 0.7, 0.8, 0.6) for v in proportion_confint(round(p * 300), 300, method="wilson")]
    assert all(any(abs(h - e) < 1e-6 for h in heights) for e in expected)
    figures.robustness_curves({"accuracy": acc.drop(columns="n_images")}, models, tmp_path / "r.png")
    assert seen["bands"] == []


def test_dissection_reports_the_interpretable_share_of_live_units_beside_the_count(tmp_path, monkeypatch):
    """A method that removes three quarters of the units: fewer interpretable units in all, but a larger share
    of the units that remain; the sentence, its table and the figure show both."""
    from matplotlib.figure import Figure

    from analysis.model_fits import dissection_summary

    table = pd.DataFrame({"model_id": ["base", "s-r0.75"], "method": ["base", "s"], "series": ["base", "s"],
                          "rate": [0.0, 0.75], "sparsity": [0.0, 0.75], "interpretable": [60, 30],
                          "interpretable_fraction_alive": [60 / 600, 30 / 150], "unique_concepts": [10, 6],
                          "dissection_units": [600, 600], "dissection_alive": [600, 150]})
    outcome = dissection_summary(table)
    assert "base 60 interpretable units (10.0 % of 600 live)" in outcome.sentence
    assert "s at rate 0.75: 30 (20.0 % of 150 live) and 6" in outcome.sentence
    assert "For s the interpretable share of live units rises while their number falls" in outcome.sentence
    kept = dissection_summary(table.assign(interpretable=[60, 70], interpretable_fraction_alive=[0.1, 70 / 150]))
    assert "rises while their number falls" not in kept.sentence      # more interpretable units: a real gain
    assert list(outcome.table["interpretable_fraction_alive"]) == [0.1, 0.2]
    titles = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: titles.extend(
        (ax.get_title(), list(next(line for line in ax.get_lines() if line.get_label() == "s").get_ydata()))
        for ax in fig.axes))
    figures.interpretable_vs_sparsity(table, tmp_path / "d.png")
    assert titles == [("interpretable units (IoU > threshold)", [60, 30]),
                      ("interpretable share of live units", [0.1, 0.2]), ("unique concepts", [10, 6])]


def _simulated_people(seed, beta1, participants, units, beta0=2.0, rates=(0.0, 0.25, 0.5, 0.75)):
    """Crossed main trials: every participant answers every unit at every rate, logit P(correct) =
    β₀ + β₁·rate + participant and unit intercepts (SD 0.4 each)."""
    rng = np.random.default_rng(seed)
    p, u, r = (a.ravel() for a in np.meshgrid(np.arange(participants), np.arange(units), np.array(rates),
                                              indexing="ij"))
    eta = beta0 + beta1 * r + rng.normal(0, 0.4, participants)[p] + rng.normal(0, 0.4, units)[u]
    return pd.DataFrame({"participant": [f"p{i}" for i in p], "unit_id": [f"inception4a:{i}" for i in u],
                         "rate": r, "kind": "natural", "trial_type": "main",
                         "correct": rng.binomial(1, 1 / (1 + np.exp(-eta)))})


@pytest.mark.parametrize("beta1, participants, units, verdict", [(-1.5, 30, 20, "effect"), (0.0, 60, 40, "equivalent"),
                                                                 (0.0, 4, 5, "inconclusive")])
def test_the_answer_from_people_follows_the_primary_human_fit(beta1, participants, units, verdict):
    """Simulated people with a known slope: the answer gains a line for people (after the MIS lines), whose
    verdict follows the mixed logistic fit: a real drop is an effect, a large null study is equivalent,
    a tiny one inconclusive; its stated change lies inside its stated interval."""
    from analysis.answers import answers
    from analysis.entries import apply_holm, run_analysis
    from analysis.human_fits import human_slope
    from sparsight.config import load_study

    cfg = load_study(overrides=["analysis.tost_margin=0.05", "analysis.bootstrap=30"])
    trials = _simulated_people(5, beta1, participants, units)
    entries = []
    run_analysis(entries, "human_slope.natural.mixed", "primary", "human",
                 lambda: human_slope(trials, "natural", "mixed", cfg), family="primary")
    apply_holm(entries)
    assert entries[0].status == "ok", entries[0].reason
    (answer,) = answers(entries, cfg)
    assert answer["observer"] == "people" and answer["verdict"] == verdict, answer["sentence"]
    assert f"by people ({participants} included participants)" in answer["sentence"]
    numbers = [float(x.replace("−", "-")) for x in
               re.search(r"a change of (−?[\d.]+) \(95 % CI (−?[\d.]+) to (−?[\d.]+)", answer["sentence"]).groups()]
    change, lo, hi = numbers
    assert lo <= change <= hi
    shift = entries[0].result["change"]
    assert (shift["estimate"], shift["ci_low"], shift["ci_high"]) == pytest.approx(numbers, abs=5e-4)
    assert (verdict == "equivalent") == shift["tost"]["equivalent"]
    if verdict == "equivalent":           # the claim rests on the TOST interval, as for MIS
        assert "90 % CI" in answer["sentence"] and "TOST" in answer["sentence"]
        assert -0.05 < shift["tost"]["ci_low"] and shift["tost"]["ci_high"] < 0.05
    if verdict == "effect":
        assert hi < 0 and answer["sentence"].startswith("Yes, for natural references, by people")


def test_the_robustness_caption_states_the_images_the_curves_rest_on(tmp_path):
    """The base model's record says how many validation images (per class) and which corruptions the
    robustness curves used; the caption repeats it, and says nothing when no record exists."""
    from analysis.load import load_robustness_subset
    from analysis.render import robustness_subset_note
    from sparsight.layout import META_FILE, Layout

    run_dir = tmp_path / "run"
    assert load_robustness_subset(run_dir) is None and robustness_subset_note(None) == ""
    base = Layout(run_dir).models / "base"
    base.mkdir(parents=True)
    record = {"clean": 0.9, "n": 30, "images_per_class": {"a": 10, "b": 10, "c": 10},
              "settings": {"corruptions": ["contrast", "jpeg"], "severities": [1, 3]}}
    (base / META_FILE).write_text(json.dumps({"robustness": record}))
    note = robustness_subset_note(load_robustness_subset(run_dir))
    assert note == " Measured on 30 validation images (10 per class, 3 classes); corruptions contrast, jpeg at severities 1, 3."
    record["images_per_class"]["c"] = 4
    record["n"] = 24
    (base / META_FILE).write_text(json.dumps({"robustness": record}))
    assert "24 validation images (4–10 per class, 3 classes)" in robustness_subset_note(load_robustness_subset(run_dir))


def test_sparsight_analyze_prints_the_answer_for_mis_and_for_people(report, tmp_path):
    """An analyst re-running the analysis after people answered reads the answer on the terminal too."""
    run_dir, _ = report
    out = CliRunner().invoke(analyze_cmd, [str(run_dir), "--out", str(tmp_path / "rep")])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    start = lines.index("answer (total effect of pruning rate, all methods: on the MIS of the units that stay live, and on human accuracy):")
    answer = lines[start + 1:start + 5]
    assert [line.split(",")[0].strip() for line in answer] == ["Yes"] * 4
    assert sum("by people (11 included participants)" in line for line in answer) == 2


def test_table_headers_align_with_their_columns(report):
    """Text columns are left-aligned, headers included; number columns stay right-aligned."""
    run_dir, _ = report
    html = (run_dir / "report" / "index.html").read_text()
    assert "<th class='s'>check</th><th>value</th>" in html
    assert "<th class='s'>model</th><th class='s'>method</th>" in html and "<th>rate</th>" in html
    assert "<th>live units natural</th>" in html and "<th class='s'>live units" not in html     # counts, not text


def test_the_answer_describes_the_fit_the_primary_slope_uses(report):
    run_dir, results = report
    html = (run_dir / "report" / "index.html").read_text()
    answer = " ".join(html.split("<section id='answer'>", 1)[1].split("</section>", 1)[0].split())
    primary = _entry(results, "mis_slope.natural.all")["sentence"]
    assert "unit fixed effects" in primary and "two-step" in primary      # 9 models: the model-level two-step
    assert "each unit compared with itself across the models that keep it" in answer
    assert "the noise a model's units share in the intervals" in answer and "random effects" not in answer


def test_the_human_power_simulation_spreads_participants_over_the_models_as_the_survey_does(report):
    """The survey balances participants over (model, kind) conditions: the simulation takes one rate per
    model, so the base model gets one model's share of participants, not one rate's."""
    run_dir, results = report
    per_model = sorted(m["rate"] for m in results["models"])
    assert len(per_model) > len(set(per_model))             # several methods share each pruned rate
    for trial_model in results["power"]["trial_models"]:
        assert trial_model["rates"] == per_model


def test_a_person_who_left_part_way_is_excluded_as_incomplete_not_analysed_unchecked():
    """The survey applies its rules when a session ends; a session left in the main block has
    ``excluded`` empty, and its answers must not count as an included participant's."""
    from analysis.load import trials_from_responses
    from analysis.human_fits import split_humans

    responses = _responses(_models(), np.random.default_rng(5), participants=4)
    left = responses["participant"] == "p01"
    responses.loc[left, "participant_stage"] = "main"
    responses["excluded"] = responses["excluded"].astype(object)
    responses.loc[left, "excluded"] = None
    humans = split_humans(trials_from_responses(responses, pd.DataFrame(_models()).assign(sparsity=0.0)))
    assert "p01" in set(humans.all["participant"]) and "p01" not in set(humans.included["participant"])
    assert {"p00", "p02"} <= set(humans.included["participant"])               # p03 failed its catch trials
    reasons = dict(zip(humans.reasons["reason"], humans.reasons["participants"]))
    assert reasons["incomplete (left at main)"] == 1 and reasons["kept"] == 2


def test_the_dose_response_shape_is_fitted_to_one_point_per_model_each_unit_compared_with_itself():
    """Rate varies only between models and pruning removes units: the shape is fitted to each model's level of
    MIS with every unit compared with itself (the model effects of unit + model fixed effects): a unit missing
    from the pruned models does not move them, and the true change per rate is recovered."""
    from analysis.statistics import model_level_mis

    rows = [dict(model_id=f"m{r}", unit_id=f"u{u}", rate=r, kind="natural", status="ok",
                 mis=(0.9 if u < 5 else 0.6) - 0.1 * r)
            for r in (0.0, 0.25, 0.5, 0.75) for u in range(10) if r < 0.5 or u >= 5]   # good units removed at 0.5+
    units = pd.DataFrame(rows)
    m = model_level_mis(units).set_index("model_id")
    pooled = units.groupby("model_id")["mis"].mean()
    assert pooled["m0.5"] - pooled["m0.25"] < -0.15            # the raw means fall by the lost units' level too
    steps = m["mis"].diff().dropna()
    np.testing.assert_allclose(steps.to_numpy(), -0.025, atol=1e-12)   # within units: only the true −0.1 per rate
    assert m.loc["m0.75", "units"] == 5 and m.loc["m0.0", "units"] == 10


def test_the_model_table_shows_the_effective_sparsity_beside_the_measured_one(tmp_path):
    """meta.json's ``sparsity.effective`` (weights reading a removed channel counted as zero) reaches the
    models table and the report; a pruned model's meta.json without it has none (its measured sparsity would
    understate it), an unpruned one's is its measured sparsity; evaluation.csv says the same."""
    from pruning.stages import _effective_sparsity
    from sparsight.modeltable import meta_row

    row = meta_row({"model_id": "structured-oneshot-r0.50", "method": "structured", "rate_requested": 0.5,
                    "sparsity": {"total": 0.5, "effective": 0.746}, "top1": {"after": 0.6}})
    assert (row["sparsity"], row["sparsity_effective"]) == (0.5, 0.746)
    old = meta_row({"model_id": "m", "method": "structured", "sparsity": {"total": 0.5}, "top1": {"after": 0.6}})
    assert math.isnan(old["sparsity_effective"]) and old["sparsity"] == 0.5
    base = meta_row({"model_id": "base", "sparsity": {"total": 0.0}, "top1": {"after": 0.9}})
    assert base["sparsity_effective"] == 0.0
    assert _effective_sparsity({"method": "structured", "sparsity": {"total": 0.5}}) is None
    assert _effective_sparsity({"method": None, "sparsity": {"total": 0.0}}) == 0.0
    assert _effective_sparsity({"method": "structured", "sparsity": {"total": 0.5, "effective": 0.75}}) == 0.75


def test_a_corruption_the_base_is_at_chance_on_stays_out_of_the_robustness_means(tmp_path, monkeypatch):
    """The accuracy table says the base is at chance on contrast: the curves average the other corruptions
    only, the caption says what was left out, and the prune-potential note says why its row is empty and
    what one image weighs against δ."""
    from matplotlib.figure import Figure

    from analysis.render import prune_potential_note, robustness_subset_note

    models = pd.DataFrame({"model_id": ["base", "a-r0.5"], "series": ["base", "a"], "rate": [0.0, 0.5]})
    acc = pd.DataFrame([dict(model_id=m, distribution=d, severity=2, top1=top, base_above_chance=d != "contrast")
                        for m in ("base", "a-r0.5") for d, top in (("contrast", 0.12), ("jpeg", 0.8), ("blur", 0.6))])
    curves = {}
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: [
        curves.setdefault(line.get_label(), list(line.get_ydata())) for ax in fig.axes for line in ax.get_lines()])
    figures.robustness_curves({"accuracy": acc}, models, tmp_path / "r.png")
    assert curves["base"] == pytest.approx([0.7]) and curves["rate 0.50"] == pytest.approx([0.7])
    subset = {"n": 100, "base_at_chance": ["contrast"]}
    assert robustness_subset_note(subset).endswith(
        "Left out of the means: contrast, on which the base model is at chance at one or more severities.")
    note = prune_potential_note(subset, 0.005)
    assert "one image moves the clean error by 0.01, more than δ" in note and "Empty for contrast" in note
    wider = prune_potential_note({"n": 300}, 0.005)
    assert "one image moves the clean error by 0.0033, so δ allows 1 image more misread than the base's." in wider
    assert "more than δ" not in prune_potential_note({"n": 1000}, 0.005)


def test_the_primary_human_fit_carries_a_model_intercept_when_participants_are_nested_in_models():
    """Participants each on one of 12 models whose shared deviations (logit SD 0.7) do not follow rate: the
    primary fit adds a random intercept per model, recovers its SD, and its bootstrap standard error of
    the slope is far larger than the fit with participant and unit alone (which counts each model once per
    participant); the sentence says which term it used."""
    from analysis.human_fits import human_slope
    from analysis.statistics import mixed_logistic

    rng = np.random.default_rng(5)
    rates = np.linspace(0, 0.8, 12)
    model = np.repeat(np.arange(12), 100)
    person = np.repeat(np.arange(120), 10)
    unit = rng.integers(0, 20, len(model))
    eta = 1.0 + rng.normal(0, 0.7, 12)[model] + rng.normal(0, 0.5, 120)[person] + rng.normal(0, 0.5, 20)[unit]
    trials = pd.DataFrame({"participant": [f"p{i}" for i in person], "unit_id": [f"inception4a:{i}" for i in unit],
                           "model_id": [f"m{i}" for i in model], "rate": rates[model], "kind": "natural",
                           "trial_type": "main", "correct": rng.binomial(1, 1 / (1 + np.exp(-eta)))})
    cfg = load_study(overrides=["analysis.bootstrap=20"])
    out = human_slope(trials, "natural", "mixed", cfg)
    assert out.result["n_groups"] == {"participant": 120, "unit_id": 20, "model_id": 12}
    assert 0.35 < out.result["sd"]["model_id"] < 1.2
    assert "with a model term too (12 models, participants nested in models)" in out.sentence
    naive = mixed_logistic(trials, groups=("participant", "unit_id"), n_boot=20, seed=cfg.study.seed)
    assert out.table.set_index("term").loc["rate", "boot_se"] > 1.5 * naive["table"].loc["rate", "boot_se"]
    for kind in ("gee", "clustered"):
        assert "participants nested in models" in human_slope(trials, "natural", kind, cfg).sentence
    with pytest.raises(ValueError, match=r"unknown trial-level fit 'glmm'; choose from \['clustered', 'gee', 'mixed'\]"):
        human_slope(trials, "natural", "glmm", cfg)


def test_without_a_probe_the_report_says_why_dissection_is_missing(tmp_path):
    """A folder study with neither concept masks nor dissection.probe: the skipped entry names the setting
    that would give it dissection, and the note on missing human data promises no dissection."""
    from analysis.entries import Skip
    from analysis.model_fits import dissection_summary
    from stimuli.stages import no_probe_reason

    cfg = load_study(None, "quick", ["data.source=folder", f'data.path="{tmp_path}"'])
    reason = no_probe_reason(cfg, tmp_path)
    assert reason and "dissection.probe is empty" in reason
    with pytest.raises(Skip, match="dissection/models.csv\\) exist: the study data .* has no concept masks"):
        dissection_summary(pd.DataFrame({"interpretable": [math.nan]}), reason)
    (tmp_path / "masks").mkdir()
    assert no_probe_reason(cfg, tmp_path) is None


def test_the_report_says_how_many_unreadable_images_were_left_out(report):
    """From the base model's last training epoch (models/base/metrics.jsonl): 2 of the 402 training images it
    read, and 1 validation image."""
    _, results = report
    assert any("Unreadable images were left out: 2 training images in the base model's last epoch (of 402 it "
               "read) and 1 validation images" in note for note in results["notes"]), results["notes"]


def test_import_refuses_trial_types_it_would_drop_and_recodes_them_from_a_mapping_file(tmp_path):
    """jsPsych's own `trial_type` column (plugin names) would drop every trial from the main analyses: the import
    stops and says how to recode; a mapping file's [values] tables recode a psiTurk-style phase column and
    condition labels. A file with no trials and a trial with no participant stop it too."""
    from analysis.load import read_mapping, read_recoding

    frame = pd.DataFrame({"subject": ["a", "a", "b", "b"], "correct": [1, 0, 1, 1],
                          "trial_type": ["html-button-response"] * 4, "phase": ["test", "catch", "test", "test"],
                          "cond": ["NAT", "SYN", "NAT", "SYN"], "lay": ["inception4a"] * 4, "idx": [3, 3, 7, 7]})
    frame.to_csv(tmp_path / "jspsych.csv", index=False)
    with pytest.raises(ValueError, match=r"column 'trial_type' \(taken by its own name\) holds 'html-button-response'"
                                         r", not the trial types \['main', 'practice', 'catch'\]: recode"):
        import_trials(tmp_path / "jspsych.csv", {"participant": "subject"})
    (tmp_path / "map.toml").write_text('[columns]\nparticipant = "subject"\ntrial_type = "phase"\n'
                                       'condition = "cond"\nlayer = "lay"\nunit = "idx"\n'
                                       '[values.trial_type]\ntest = "main"\n[values.condition]\nNAT = "natural"\n')
    trials = import_trials(tmp_path / "jspsych.csv", read_mapping(tmp_path / "map.toml"),
                           recode=read_recoding(tmp_path / "map.toml"), kinds=["natural", "synthetic"])
    assert trials["trial_type"].tolist() == ["main", "catch", "main", "main"]
    assert trials["kind"].tolist() == ["natural", "SYN", "natural", "SYN"] and trials.attrs["foreign_kinds"] == ["SYN"]
    assert trials["unit_id"].tolist() == ["inception4a:3"] * 2 + ["inception4a:7"] * 2
    assert trials["unit"].tolist() == [3, 3, 7, 7]
    frame.head(0).to_csv(tmp_path / "header.csv", index=False)
    with pytest.raises(ValueError, match="header.csv has a header but no trials"):
        import_trials(tmp_path / "header.csv", {"participant": "subject", "trial_type": "phase"})
    frame.assign(subject=["a", None, "b", " "]).to_csv(tmp_path / "blank.csv", index=False)
    with pytest.raises(ValueError, match=r"column 'subject' \(participant\) is empty in 2 trial\(s\), e.g. on "
                                         r"line\(s\) 3, 5"):
        import_trials(tmp_path / "blank.csv", {"participant": "subject", "trial_type": "phase"},
                      recode={"trial_type": {"test": "main"}})
    (tmp_path / "bad.toml").write_text('[columns]\nparticipant = "subject"\n[values.correct]\nyes = "1"\n')
    with pytest.raises(ValueError, match=r"values.correct cannot be recoded; choose from \['trial_type', "):
        read_recoding(tmp_path / "bad.toml")


def test_the_human_power_simulation_takes_its_spreads_from_the_included_participants_only(report):
    """Participant p11 is excluded (catch accuracy): like every human fit, the power model leaves them out."""
    _, results = report
    sources = [m["source"] for m in results["power"]["trial_models"]]
    assert sources and all(s.startswith("11 human participants") for s in sources), sources


def test_the_mis_human_correlation_counts_units_not_cells():
    """Ten units seen in 40 models each, MIS and accuracy each carrying a unit effect but unrelated to each
    other: every cell counted as independent (a Fisher-z test on 400 cells) rejects the null most of the time;
    the calibration's test on the units' means keeps its nominal 5 %."""
    from analysis.human_fits import calibration_check, pearson_ci

    cfg = load_study(None, "quick")
    rng = np.random.default_rng(2)
    naive, by_unit = [], []
    for _ in range(400):
        unit = np.repeat(np.arange(10), 40)
        x = rng.normal(0, 1, 10)[unit] + rng.normal(0, 0.5, 400)
        y = rng.normal(0, 1, 10)[unit] + rng.normal(0, 0.5, 400)
        naive.append(pearson_ci(x, y, 0.95)[1] < 0.05)
        cells = pd.DataFrame({"unit_id": unit, "mis": x, "accuracy": y})
        result = calibration_check(cells, None, cfg).result
        by_unit.append(result["p"] < 0.05)
    assert result["units"] == 10 and result["cells"] == 400
    assert np.mean(naive) > 0.5 and np.mean(by_unit) < 0.08       # 400 studies: 0.05 ± 0.011


def test_a_step_from_the_base_at_every_rate_is_named_with_the_retraining_it_may_come_from():
    """Every pruned model 0.02 below the base whatever its rate (what retraining alone can do): the per-model
    equivalence entry gives that mean difference at each rate and says the base was not retrained; once the
    design holds models pruned at rate 0 (the retrained controls) it reports their difference instead."""
    from analysis.model_fits import mis_equivalence
    from sparsight.config import load_study

    cfg = load_study(overrides=["analysis.tost_margin=0.05"])
    units = _simulated_units(3, 60, 0.0, noise=0.005)
    units["method"] = np.where(units["rate"] > 0, "structured", "base")
    units.loc[units["rate"] > 0, "mis"] -= 0.02
    out = mis_equivalence(units, "natural", cfg)
    table = out.table.groupby("rate")["difference"].mean()
    assert table.to_numpy() == pytest.approx([-0.02] * 4, abs=0.003)
    assert "Mean difference from the base by rate: " + ", ".join(
        f"{v:.3f} at {r:g}".replace("-", "−") for r, v in table.items()) in out.sentence
    assert "8 of 8 models below it" in out.sentence and "base model was not retrained" in out.sentence
    control = units[units["model_id"] == "m1"].assign(model_id="c0", rate=0.0)    # retrained, nothing pruned
    with_control = mis_equivalence(pd.concat([units, control], ignore_index=True), "natural", cfg)
    step = with_control.table.set_index("model_id").loc["c0", "difference"]
    assert step == pytest.approx(-0.02, abs=0.003) and f"{step:.3f} at 0,".replace("-", "−") in with_control.sentence
    assert "not retrained" not in with_control.sentence
    assert "of 9 retrained models (8 pruned, 1 retrained control) have" in with_control.sentence
    assert "of 8 pruned models have" in out.sentence


def test_each_models_equivalence_to_the_base_is_also_counted_after_holm_over_the_models():
    """Eight models 0.025 below the base, with a margin of 0.05 and noisy units: some pass their own TOST by
    chance. The table carries the tests Holm-adjusted over the models (statsmodels' ``multipletests`` as the
    reference) and the sentence counts both."""
    from statsmodels.stats.multitest import multipletests

    from analysis.model_fits import mis_equivalence
    from sparsight.config import load_study

    cfg = load_study(overrides=["analysis.tost_margin=0.05"])
    units = _simulated_units(2, 30, 0.0, noise=0.04)
    units["method"] = np.where(units["rate"] > 0, "structured", "base")
    units.loc[units["rate"] > 0, "mis"] -= 0.025
    table = mis_equivalence(units, "natural", cfg)
    reject, adjusted, _, _ = multipletests(table.table["p_tost"], alpha=0.05, method="holm")
    assert table.table["p_tost_holm"].to_numpy() == pytest.approx(adjusted)
    raw, held = int(table.table["equivalent"].sum()), int(reject.sum())
    assert held < raw and table.table["equivalent_holm"].tolist() == reject.tolist()
    assert f"{raw} of 8 pruned models have natural MIS equivalent" in table.sentence
    assert f"; {held} after Holm adjustment over the 8 models." in table.sentence


def test_the_analysis_reads_the_time_a_trial_was_seen_not_the_time_it_was_covered():
    """The survey stores how long an overlay or a hidden page covered a trial (``hidden_ms``): the analysed
    ``rt_ms`` is the time it was seen, ``rt_ms − hidden_ms``; an export without the column reads as before."""
    from analysis.load import trials_from_responses

    responses = _responses(_models(), np.random.default_rng(6), participants=2)
    models = pd.DataFrame(_models()).assign(sparsity=0.0)
    before = trials_from_responses(responses, models)["rt_ms"]
    hidden = np.where(np.arange(len(responses)) % 3 == 0, 2500.0, np.nan)
    after = trials_from_responses(responses.assign(hidden_ms=hidden), models)["rt_ms"]
    assert after.to_numpy() == pytest.approx(before.to_numpy() - np.nan_to_num(hidden))


def test_the_human_comparison_with_the_base_counts_the_retrained_control_apart_from_the_pruned_models():
    """Human accuracy per model against the base: a model at rate 0 is the retrained control, not a pruned model,
    and each difference's TOST uses the two participant SEMs combined."""
    from analysis.human_fits import human_equivalence
    from sparsight.config import load_study

    cfg = load_study(overrides=["analysis.tost_margin=0.05"])
    rows = [("base", "base", 0.0, 0.80), ("c0", "control", 0.0, 0.79), ("s1", "structured", 0.5, 0.78),
            ("s2", "structured", 0.75, 0.60)]
    by_model = pd.DataFrame([{"model_id": m, "method": method, "rate": r, "kind": "natural", "participants": 40,
                              "accuracy": a, "sem": 0.01} for m, method, r, a in rows])
    out = human_equivalence(by_model, "natural", cfg)
    assert out.sentence.startswith("2 of 3 retrained models (2 pruned, 1 retrained control) have human natural")
    far = out.table.set_index("model_id").loc["s2"]
    assert far["difference"] == pytest.approx(-0.20) and far["se"] == pytest.approx(np.hypot(0.01, 0.01))
    assert not far["equivalent"]
    pruned_only = human_equivalence(by_model[by_model["model_id"] != "c0"], "natural", cfg)
    assert pruned_only.sentence.startswith("1 of 2 pruned models have")


def test_a_model_folder_the_study_no_longer_names_stays_out_of_its_tables(tmp_path):
    """A rate dropped from a finished study: its model folders stay on disk (a later run may reuse them), but the
    study's evaluation.csv no longer lists them, and neither does the model table the report is made from."""
    run_dir = tmp_path / "st"
    for model_id, method, rate in (("base", None, 0.0), ("structured-oneshot-r0.50", "structured", 0.5),
                                   ("structured-oneshot-r0.90", "structured", 0.9)):
        folder = run_dir / "models" / model_id
        folder.mkdir(parents=True)
        (folder / "meta.json").write_text(json.dumps({
            "model_id": model_id, "arch": "x", "method": method, "schedule": "oneshot" if method else "",
            "rate_requested": rate, "sparsity": {"total": rate, "effective": rate}, "top1": {"after": 0.9 - rate}}))
    assert len(load_models(run_dir)) == 3              # no evaluation.csv yet: every model folder
    pd.DataFrame([{"model_id": m, "arch": "x"} for m in ("base", "structured-oneshot-r0.50")]).to_csv(
        run_dir / "evaluation.csv", index=False)
    models = load_models(run_dir).set_index("model_id")
    assert list(models.index) == ["base", "structured-oneshot-r0.50"]
    assert models.loc["structured-oneshot-r0.50", "top1"] == pytest.approx(0.4)      # from its meta.json


def test_the_top1_and_dissection_sentences_average_the_retrained_copies_of_the_highest_rate():
    from analysis.model_fits import dissection_summary, top1_summary

    models = pd.DataFrame({"model_id": ["base", "s-r0.50", "s-r0.75", "s-r0.75-c2"],
                           "method": ["base", "structured", "structured", "structured"],
                           "series": ["base", "structured", "structured", "structured"],
                           "rate": [0.0, 0.5, 0.75, 0.75], "sparsity": [0.0, 0.5, 0.74, 0.76],
                           "top1": [0.9, 0.8, 0.5, 0.7], "top1_before": [np.nan, 0.4, 0.1, 0.1],
                           "interpretable": [20, 15, 10, 13], "unique_concepts": [8, 7, 5, 6]})
    sentence = top1_summary(models).sentence
    assert "structured: 0.600 at rate 0.75 (sparsity 0.750, mean of 2 retrained copies)" in sentence
    assert "structured at rate 0.75: 11.5 and 5.5, mean of 2 retrained copies" in dissection_summary(models).sentence
    single = models.iloc[:3]
    assert "structured: 0.500 at rate 0.75 (sparsity 0.740)" in top1_summary(single).sentence


def _entries_with_sensitivity(units, cfg):
    """The primary fit of each kind with the report's sensitivity fits beside it, as the report runs them."""
    from analysis.entries import apply_holm, run_analysis
    from analysis.model_fits import mis_slope, mis_slope_matched, mis_slope_retrained, mis_slope_same_units
    entries = []
    for kind in sorted(units["kind"].unique()):
        run_analysis(entries, f"mis_slope.{kind}.all", "primary", "model",
                     lambda kind=kind: mis_slope(units, kind, None, cfg), family="primary")
        run_analysis(entries, f"mis_slope_same_units.{kind}", "same units", "model",
                     lambda kind=kind: mis_slope_same_units(units, kind, cfg))
        run_analysis(entries, f"mis_slope_retrained.{kind}", "retrained", "model",
                     lambda kind=kind: mis_slope_retrained(units, kind, cfg))
    if units["kind"].nunique() > 1:
        run_analysis(entries, "mis_slope_matched.synthetic.natural", "matched", "model",
                     lambda: mis_slope_matched(units, "natural", "synthetic", cfg))
    apply_holm(entries)
    return {e.id: e for e in entries}


def test_the_same_units_fit_shows_when_the_answer_rests_on_which_units_survive():
    """Known effect: 5 units kept by every model lose 0.2 MIS per unit rate; 195 flat units are each removed
    by half the pruned models. The pooled fit finds equivalence; the same-units fit is the within-unit fit of
    the units live in every model (reference), finds the decline, and the answer says the two disagree."""
    from analysis import statistics as st
    from analysis.answers import answers
    from analysis.model_fits import ok_units
    from sparsight.config import load_study

    cfg = load_study(overrides=["analysis.tost_margin=0.05"])
    units = _simulated_units(4, 200, 0.0)
    number = units["unit_id"].str[2:].astype(int)
    units.loc[number < 5, "mis"] -= 0.2 * units.loc[number < 5, "rate"]
    removed = (number >= 5) & (units["rate"] > 0) & (np.random.default_rng(9).random(len(units)) < 0.5)
    units.loc[removed, ["status", "mis"]] = ["pruned", np.nan]
    everywhere = units[units["status"] == "ok"].groupby("unit_id")["model_id"].nunique() == 9
    kept = set(everywhere.index[everywhere])
    by_id = _entries_with_sensitivity(ok_units(units), cfg)
    same = by_id["mis_slope_same_units.natural"]
    reference = st.within_unit_slope(units[units["unit_id"].isin(kept)])["terms"]["rate"]
    assert same.result["terms"]["rate"]["coef"] == pytest.approx(reference["coef"], rel=1e-9)
    assert same.result["terms"]["rate"]["ci_high"] < 0 and 5 <= len(kept) < 10
    assert same.result["subset"] == {"kind": "natural", "what": "live in every model", "units": len(kept), "of": 200}
    (answer,) = answers(list(by_id.values()), cfg)
    assert answer["verdict"] == "equivalent", answer["sentence"]
    assert answer["sensitivity"][0]["verdict"] == "effect" and answer["sensitivity"][0]["agrees"] is False
    from analysis.render import _templates
    label = " ".join(str(_templates().get_template("macros.html.j2").module.answer_label(answer, "0.05")).split())
    assert label == "no change beyond ±0.05 (a sensitivity fit disagrees: same units throughout)"
    assert (f"Same units throughout: on the {len(kept)} of 200 units live in every model" in answer["sentence"]
            and "the answer depends on which units are counted" in answer["sentence"])


def test_a_step_that_retraining_alone_makes_is_told_apart_from_pruning_by_the_retrained_models_fit():
    """Retraining lowers every retrained model's MIS by 0.06 whatever its rate, and pruning does nothing: with the
    un-retrained base at rate 0 the pooled fit cannot show equivalence; the fit on the retrained models only (the
    control at rate 0) finds none, and the answer says that it disagrees and why (reference: the within-unit fit of those
    models' rows)."""
    from analysis import statistics as st
    from analysis.answers import answers
    from analysis.render import _templates
    from sparsight.config import load_study

    cfg = load_study(overrides=["analysis.tost_margin=0.05"])
    units = _simulated_units(11, 60, 0.0, noise=0.01)
    control = units[units["model_id"] == "m0"].assign(model_id="control", series="control")
    units = pd.concat([units, control], ignore_index=True)
    units.loc[units["series"] != "base", "mis"] -= 0.06
    by_id = _entries_with_sensitivity(units, cfg)
    retrained = by_id["mis_slope_retrained.natural"]
    reference = st.within_unit_slope(units[units["series"] != "base"])["terms"]["rate"]
    assert retrained.result["terms"]["rate"]["coef"] == pytest.approx(reference["coef"], rel=1e-9)
    assert "Rate 0: the retrained control." in retrained.sentence
    (answer,) = answers(list(by_id.values()), cfg)
    assert answer["verdict"] != "equivalent", answer["sentence"]          # the step reads as a decline or as noise
    record = next(r for r in answer["sensitivity"] if r["analysis"] == "mis_slope_retrained.natural")
    assert record["verdict"] == "equivalent" and record["agrees"] is False
    assert "Retrained models only (the retrained control alone at rate 0, the base left out)" in answer["sentence"]
    assert "unadjusted)" in answer["sentence"]
    tost = retrained.result["tost"]         # an equivalent fit quotes the interval its TOST rests on
    assert (f"MIS changes by {fmt(tost['estimate'])} (90 % CI {fmt(tost['ci_low'])} to {fmt(tost['ci_high'])}; "
            f"TOST") in answer["sentence"]
    label = " ".join(str(_templates().get_template("macros.html.j2").module.answer_label(answer, "0.05")).split())
    assert label.endswith("disagrees: retrained models only)")
    by_id = _entries_with_sensitivity(units[units["series"] != "control"], cfg)
    assert by_id["mis_slope_retrained.natural"].status == "skipped"


def test_the_answer_is_refitted_with_mis_rescored_at_half_and_twice_alpha():
    """MIS is mean σ(α·Δ) over a unit's tasks, so α sets the scale the margin is on: the α sensitivity fits rescore
    every unit from its tasks' Δ (reference: the within-unit fit of that mean computed here with scipy's expit)
    and skip without task Δ."""
    from scipy.special import expit

    from analysis import statistics as st
    from analysis.model_fits import mis_slope_alpha
    from sparsight.config import load_study

    rng = np.random.default_rng(13)
    units = _simulated_units(13, 20, -0.1).assign(layer="l", alpha=8.0)
    units["unit"] = units["unit_id"].str[2:].astype(int)
    tasks = pd.DataFrame([dict(model_id=r.model_id, kind="natural", layer="l", unit=r.unit, task=k,
                               delta=0.3 - 0.2 * r.rate + rng.normal(0, 0.1))
                          for r in units.itertuples() for k in range(4)])
    for name, factor in (("half", 0.5), ("double", 2.0)):
        out = mis_slope_alpha(units, tasks, "natural", factor, load_study())
        mean = tasks.assign(p=expit(8.0 * factor * tasks["delta"])).groupby(["model_id", "unit"])["p"].mean()
        reference_units = units.assign(mis=[mean[(m, u)] for m, u in zip(units["model_id"], units["unit"])])
        reference = st.within_unit_slope(reference_units)["terms"]["rate"]
        assert out.result["terms"]["rate"]["coef"] == pytest.approx(reference["coef"], rel=1e-9), name
        assert out.result["subset"]["alpha"] == 8.0 * factor
        assert out.sentence.startswith(f"With MIS rescored at α = {8.0 * factor:g} (the study's 8 × {factor:g}): ")
    with pytest.raises(Exception, match="no task Δ"):
        mis_slope_alpha(units, pd.DataFrame(), "natural", 2.0, load_study())


def test_with_every_unit_live_everywhere_there_is_no_same_units_fit():
    from analysis.answers import answers
    from sparsight.config import load_study

    by_id = _entries_with_sensitivity(_simulated_units(5, 30, 0.0), load_study())
    assert by_id["mis_slope_same_units.natural"].status == "skipped"
    assert "already has the same units" in by_id["mis_slope_same_units.natural"].reason
    (answer,) = answers(list(by_id.values()), load_study())
    assert answer["sensitivity"] == [] and "Same units" not in answer["sentence"]
    from analysis.render import _templates
    label = str(_templates().get_template("macros.html.j2").module.answer_label(answer, "0.05")).strip()
    assert label in ("pruning changes it", "no change beyond ±0.05", "undecided")


def test_the_synthetic_answer_gives_natural_references_on_its_own_units():
    """Visualized units are a subset: the synthetic answer quotes the natural fit on those units (reference: the
    within-unit fit of the natural rows of those units)."""
    from analysis import statistics as st
    from analysis.answers import answers
    from sparsight.config import load_study

    natural = _simulated_units(6, 40, -0.1)
    synthetic = _simulated_units(7, 40, 0.0).assign(kind="synthetic")
    synthetic = synthetic[synthetic["unit_id"].str[2:].astype(int) < 12]
    by_id = _entries_with_sensitivity(pd.concat([natural, synthetic], ignore_index=True), load_study())
    matched = by_id["mis_slope_matched.synthetic.natural"]
    mine = natural[natural["unit_id"].isin(synthetic["unit_id"])]
    assert matched.result["terms"]["rate"]["coef"] == pytest.approx(
        st.within_unit_slope(mine)["terms"]["rate"]["coef"], rel=1e-9)
    answer = {a["kind"]: a for a in answers(list(by_id.values()), load_study())}
    assert "Natural references on the same 12 units: MIS changes by" in answer["synthetic"]["sentence"]
    assert "same 12 units" not in answer["natural"]["sentence"]


def test_a_methods_slope_has_the_base_and_the_retrained_control_at_rate_0():
    """Every pruned model was retrained and the base was not: a method's slope takes the retrained control at
    rate 0 beside the base, as the pooled fit does, and no other method's models."""
    from analysis import statistics as st
    from analysis.model_fits import mis_slope
    from sparsight.config import load_study

    units = _simulated_units(8, 30, -0.1)
    control = units[units["model_id"] == "m0"].assign(model_id="control", series="control")
    other = units[units["model_id"] == "m8"].assign(model_id="other", series="lrp")
    units = pd.concat([units, control, other], ignore_index=True)
    out = mis_slope(units, "natural", "structured", load_study())
    assert out.result["n_models"] == 10 and "Rate 0: the base model and the retrained control." in out.sentence
    reference = st.within_unit_slope(units[units["series"].isin(["base", "control", "structured"])])
    assert out.result["terms"]["rate"]["coef"] == pytest.approx(reference["terms"]["rate"]["coef"], rel=1e-9)


def test_a_slope_from_few_models_says_its_error_is_uncertain_itself():
    """A method with two pruned models, the base and the control: five models, so the two-step error has 3 df;
    the sentence says so, and where the unit mixed model's error is the wider one it does not call that
    narrower one trustworthy. The pooled fit over 10 models says neither."""
    from analysis.model_fits import FEW_DF, mis_slope
    from sparsight.config import load_study

    units = _simulated_units(12, 30, -0.1)
    control = units[units["model_id"] == "m0"].assign(model_id="control", series="control")
    units = pd.concat([units, control], ignore_index=True)
    units.loc[units["model_id"].isin(["m1", "m3", "m5"]), "series"] = "lrp"
    few = mis_slope(units, "natural", "lrp", load_study())
    assert few.result["n_models"] == 5 and few.result["df"] < FEW_DF
    assert f"Its error comes from how 5 models scatter about the line (t with {few.result['df']} df)" in few.sentence
    mixed, own = few.result["unit_mixed_model"]["se"], few.result["terms"]["rate"]["se"]
    assert ("larger: the error above, from few models, is likely too small." in few.sentence) is (mixed > own)
    pooled = mis_slope(units, "natural", None, load_study())
    assert pooled.result["df"] >= FEW_DF and "scatter about the line" not in pooled.sentence


def test_the_answers_are_adjusted_among_the_primary_tests_and_the_per_method_slopes_among_themselves():
    """Reference: statsmodels' Holm on each family's p-values alone."""
    from statsmodels.stats.multitest import multipletests

    from analysis.entries import Outcome, apply_holm, run_analysis

    entries = []
    for i, (family, p) in enumerate([("primary", 0.02), ("primary", 0.03), ("per-method", 0.001),
                                     ("per-method", 0.04), ("per-method", 0.01), ("", 0.001)]):
        run_analysis(entries, f"t{i}", "test", "model", lambda p=p: Outcome("s.", {}, p=p), family=family)
    holm = apply_holm(entries)
    for family, ids in (("primary", [0, 1]), ("per-method", [2, 3, 4])):
        expected = multipletests([entries[i].p for i in ids], method="holm")[1]
        assert [entries[i].p_holm for i in ids] == pytest.approx(list(expected))
        assert holm["families"][family]["tests"] == [f"t{i}" for i in ids]
    assert holm["tests"] == ["t0", "t1"] and entries[5].p_holm is None
    assert "Holm-adjusted over 2 primary slope tests" in entries[0].sentence


@pytest.mark.parametrize("interval, undetermined", [((0.2, 0.6), True), ((0.3, 0.5), False)])
def test_a_breakpoint_whose_interval_spans_the_grid_is_called_undetermined(monkeypatch, interval, undetermined):
    from analysis import statistics
    from analysis.model_fits import mis_dose
    from sparsight.config import load_study

    def hinge(x, y, **kw):
        return {"preferred": "hinge", "delta_aic": 3.0, "breakpoint_ci": interval, "grid": np.array([0.2, 0.4, 0.6]),
                "linear": {"slope": -0.1}, "hinge": {"slope": 0.0, "breakpoint": 0.4, "slope_after": -0.2}}
    monkeypatch.setattr(statistics, "dose_response", hinge)
    out = mis_dose(_simulated_units(9, 10, -0.1), "natural", load_study())
    assert ("where the bend lies is not determined" in out.sentence) is undetermined


def test_the_synthetic_answer_says_whether_it_holds_on_valid_visualizations_only():
    """Known effect carried by invalid visualizations only: their pairs lose 0.3 MIS per unit rate, the valid ones
    none. The valid-only fit is the within-unit fit of the valid pairs (reference) and the answer says the two
    disagree; with every visualization valid there is no such fit."""
    from analysis import statistics as st
    from analysis.answers import answers
    from analysis.entries import apply_holm, run_analysis
    from analysis.model_fits import mis_slope, mis_slope_valid_fv
    from sparsight.config import load_study

    cfg = load_study(overrides=["analysis.tost_margin=0.05"])
    units = _simulated_units(10, 60, 0.0).assign(kind="synthetic", fv_valid=True)
    bad = (units["rate"] > 0) & (units["unit_id"].str[2:].astype(int) < 30)
    units.loc[bad, "fv_valid"] = False
    units.loc[bad, "mis"] -= 0.3 * units.loc[bad, "rate"]
    entries = []
    run_analysis(entries, "mis_slope.synthetic.all", "primary", "model",
                 lambda: mis_slope(units, "synthetic", None, cfg), family="primary")
    run_analysis(entries, "mis_slope_valid_fv.synthetic", "valid", "model",
                 lambda: mis_slope_valid_fv(units, "synthetic", cfg))
    apply_holm(entries)
    valid = entries[1].result
    assert valid["terms"]["rate"]["coef"] == pytest.approx(
        st.within_unit_slope(units[~bad])["terms"]["rate"]["coef"], rel=1e-9)
    assert valid["subset"]["units"] == int((~bad).sum()) and valid["subset"]["of"] == len(units)
    (answer,) = answers(entries, cfg)
    assert answer["verdict"] == "effect" and answer["sensitivity"][0]["verdict"] == "equivalent"
    assert f"Valid visualizations only: on the {int((~bad).sum())} of {len(units)} unit × model pairs" in \
        answer["sentence"] and "rests on visualizations that do not show what drives their unit" in answer["sentence"]
    entries = []
    run_analysis(entries, "v", "valid", "model", lambda: mis_slope_valid_fv(units.assign(fv_valid=True), "synthetic",
                                                                             cfg))
    assert entries[0].status == "skipped" and "every synthetic visualization is valid" in entries[0].reason


def test_the_effective_sparsity_fit_puts_each_model_at_the_dose_it_received():
    """Reference: the within-unit fit with each model's effective sparsity as its rate; no such fit where they are
    equal; an agreeing one stays out of the answer."""
    from analysis import statistics as st
    from analysis.answers import answers
    from analysis.entries import apply_holm, run_analysis
    from analysis.model_fits import mis_slope, mis_slope_effective
    from sparsight.config import load_study

    cfg = load_study()
    units = _simulated_units(11, 40, -0.1)
    structured = units["model_id"].isin(["m2", "m4", "m6", "m8"])
    units["sparsity_effective"] = np.where(structured, np.minimum(units["rate"] * 1.25, 0.95), units["rate"])
    entries = []
    run_analysis(entries, "mis_slope.natural.all", "primary", "model", lambda: mis_slope(units, "natural", None, cfg),
                 family="primary")
    run_analysis(entries, "mis_slope_effective.natural", "dose", "model",
                 lambda: mis_slope_effective(units, "natural", cfg))
    apply_holm(entries)
    reference = st.within_unit_slope(units.assign(rate=units["sparsity_effective"]))["terms"]["rate"]
    assert entries[1].result["terms"]["rate"]["coef"] == pytest.approx(reference["coef"], rel=1e-9)
    assert entries[1].result["rate_span"] == pytest.approx(0.95) and "effective sparsity" in entries[1].sentence
    (answer,) = answers(entries, cfg)
    record = answer["sensitivity"][0]
    assert record["analysis"] == "mis_slope_effective.natural"
    assert ("effective sparsity as the dose" in answer["sentence"]) is (not record["agrees"])
    entries = []
    run_analysis(entries, "e", "dose", "model",
                 lambda: mis_slope_effective(units.assign(sparsity_effective=units["rate"]), "natural", cfg))
    assert entries[0].status == "skipped" and "already has it" in entries[0].reason
