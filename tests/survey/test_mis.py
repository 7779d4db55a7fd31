"""The MIS surrogate: formulas against a direct re-implementation, limits, α recovery, calibration,
unit status, embeddings and their cache, and agreement with the machine participant."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from sqlalchemy import select

from sparsight.config import load_study, study_from_run_dir
from survey_app.embeddings import Embedding, EmbeddingCache, create_embedding
from survey_app.machine import FlaskTransport, SimilarityObserver, SurveyClient, run_session
from survey_app.material import Material
from survey_app.mis import (bootstrap_ci, calibration, fit_alpha, model_scores, sigmoid, task_deltas, unit_scores,
                            with_status)
from survey_app.models import Trial
from sparsight.study import Study
from survey_app.stages import run_mis
from survey_app.testing import make_study_dir
from survey_helpers import API_TOKEN


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    root = make_study_dir(tmp_path_factory.mktemp("mis"), {}, n_tasks=5, k=4)
    return root, Material(root / "stimuli")


class Lookup:
    """A hand-made embedding: fixed vectors per image id (nothing is computed from pixels)."""

    def __init__(self, vectors: dict[str, torch.Tensor]):
        self.vectors = vectors

    def cache(self) -> EmbeddingCache:
        cache = EmbeddingCache(Embedding("lookup", "lookup", 8, lambda b: None, torch.device("cpu")))
        cache.vectors = dict(self.vectors)
        return cache


def reference_mis(material: Material, vectors: dict, alpha: float) -> dict:
    """Per unit (mis, mis_hard) with plain loops over tasks and references."""
    def cos(a, b):
        a, b = vectors[a].double().numpy(), vectors[b].double().numpy()
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    def s(q, refs):
        return sum(cos(q, e) for e in refs) / len(refs)
    out = {}
    for item, tasks in material.tasks.items():
        ps, hard = [], []
        for t in tasks:
            d = (s(t.query_max, t.ref_max) - s(t.query_max, t.ref_min)) - (s(t.query_min, t.ref_max)
                                                                            - s(t.query_min, t.ref_min))
            ps.append(1 / (1 + math.exp(-alpha * d)))
            hard.append(d > 0)
        out[(item.model_id, item.kind, item.layer, item.unit)] = (sum(ps) / len(ps), sum(hard) / len(hard))
    return out


def test_mis_equals_a_direct_implementation_of_the_formulas(bank):
    _, material = bank
    gen = torch.Generator().manual_seed(0)
    vectors = {i: torch.randn(6, generator=gen, dtype=torch.float64) for i in sorted(material.images)}
    deltas = task_deltas(material, Lookup(vectors).cache())
    scores = unit_scores(deltas, alpha=7.0)
    expected = reference_mis(material, vectors, alpha=7.0)
    assert len(scores) == len(expected) == 16
    for r in scores.itertuples():
        mis, hard = expected[(r.model_id, r.kind, r.layer, r.unit)]
        assert r.mis == pytest.approx(mis, abs=1e-6) and r.mis_hard == hard
        assert r.n_tasks == 5


def test_informative_embedding_gives_mis_near_one_and_a_random_one_near_half(bank):
    _, material = bank
    manifest = material.manifest
    side = {p.split("/")[1][:-4]: (1.0 if role.endswith("max") else -1.0)
            for p, role in zip(manifest["image"], manifest["role"])}
    informative = {i: torch.tensor([side[i], 0.0]) for i in material.images}
    perfect = unit_scores(task_deltas(material, Lookup(informative).cache()), alpha=50.0)
    assert (perfect["mis_hard"] == 1.0).all() and perfect["mis"].min() > 0.999
    rand = []
    for seed in range(8):
        gen = torch.Generator().manual_seed(seed)
        vectors = {i: torch.randn(16, generator=gen) for i in sorted(material.images)}
        rand.append(unit_scores(task_deltas(material, Lookup(vectors).cache()), alpha=16.0)["mis"].mean())
    assert abs(np.mean(rand) - 0.5) < 0.05


def test_fitted_alpha_recovers_the_true_alpha_within_its_interval():
    rng = np.random.default_rng(3)
    covered = 0
    for rep in range(20):
        delta = rng.normal(0.05, 0.08, size=3000)
        correct = rng.random(3000) < sigmoid(12.0 * delta)
        fit = fit_alpha(delta, correct)
        covered += fit.ci_low <= 12.0 <= fit.ci_high
        assert fit.n == 3000 and fit.se > 0
    assert covered >= 17                                   # nominal 95 %: 19 of 20 expected
    with pytest.raises(ValueError, match="cannot fit"):
        fit_alpha(np.zeros(5), np.ones(5))


def test_calibration_on_simulated_humans_predicts_held_out_units():
    rng = np.random.default_rng(1)
    rows = []
    for unit in range(40):
        shift = rng.normal(0.06, 0.06)                    # units differ in how separable their tasks are
        for task in range(10):
            d = shift + rng.normal(0, 0.02)
            for _ in range(12):
                rows.append({"model_id": "m", "kind": "natural", "layer": "l", "unit": unit, "task": task,
                             "delta": d, "correct": bool(rng.random() < sigmoid(10.0 * d))})
    report = calibration(pd.DataFrame(rows), folds=5, seed=0)
    assert report["alpha_ci"][0] <= 10.0 <= report["alpha_ci"][1]
    assert report["heldout_r"] > 0.6 and abs(report["calibration_slope"] - 1) < 0.35
    assert report["units"] == 40 and report["folds"] == 5


def test_dead_and_pruned_units_are_listed_apart_and_never_averaged_in(bank):
    _, material = bank
    vectors = {i: torch.randn(4) for i in sorted(material.images)}
    scores = unit_scores(task_deltas(material, Lookup(vectors).cache()), 16.0)
    status = pd.DataFrame([{"model_id": "m1", "kind": "natural", "layer": "inception5a", "unit": 3, "status": "pruned",
                            "reason": ""},
                           {"model_id": "m1", "kind": "natural", "layer": "inception5a", "unit": 4, "status": "dead",
                            "reason": ""}])
    units = with_status(scores, status)
    assert len(units) == 18 and units["mis"].isna().sum() == 2
    models = model_scores(units, n_boot=200, seed=0).set_index(["model_id", "kind"])
    m1 = models.loc[("m1", "natural")]
    live = scores[(scores.model_id == "m1") & (scores.kind == "natural")]["mis"]
    assert (m1["units"], m1["dead"], m1["pruned"]) == (4, 1, 1)
    assert m1["mis"] == pytest.approx(live.mean()) and m1["mis_ci_low"] <= m1["mis"] <= m1["mis_ci_high"]


def test_bootstrap_ci_matches_the_normal_interval_on_many_units():
    values = np.random.default_rng(0).normal(0.7, 0.1, size=400)
    lo, hi = bootstrap_ci(values, 4000, seed=1)
    half = 1.96 * values.std(ddof=1) / math.sqrt(len(values))
    assert lo == pytest.approx(values.mean() - half, abs=0.004) and hi == pytest.approx(values.mean() + half, abs=0.004)
    assert all(math.isnan(x) for x in bootstrap_ci(values[:1], 100, 0))


def test_each_image_is_embedded_once_and_the_cache_survives_a_reload(tmp_path, bank):
    _, material = bank
    calls = []
    base = create_embedding("pixels", size=8)

    def counting(batch):
        calls.append(len(batch))
        return base.fn(batch)
    emb = Embedding("pixels", "pixels-8", 8, counting, torch.device("cpu"))
    path = tmp_path / "cache.pt"
    first = task_deltas(material, EmbeddingCache(emb, path, batch_size=50))
    assert sum(calls) == len(material.images) and max(calls) <= 50
    second = task_deltas(material, EmbeddingCache(emb, path))
    assert sum(calls) == len(material.images)                       # nothing recomputed
    pd.testing.assert_frame_equal(first, second)


def test_embedding_registry_errors_name_the_choices_and_the_missing_files(tmp_path):
    with pytest.raises(ValueError, match=r"unknown embedding 'vit'; choose from \[.*'observer'.*'pixels'"):
        create_embedding("vit", tmp_path)
    with pytest.raises(FileNotFoundError, match="no observer network"):
        create_embedding("observer", tmp_path)
    with pytest.raises(ValueError, match="needs local weights"):
        create_embedding("resnet18", tmp_path)
    import importlib.util
    if importlib.util.find_spec("dreamsim") is None:
        with pytest.raises(ValueError, match="dreamsim package"):
            create_embedding("dreamsim", tmp_path)


def test_a_registered_model_with_a_local_weights_file_gives_penultimate_features(tmp_path):
    from pruning.models import create_model
    net = create_model("resnet18", num_classes=1000)
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    emb = create_embedding("resnet18", tmp_path, weights=str(tmp_path / "r18.pth"), size=32)
    from PIL import Image
    feats = emb([Image.new("RGB", (40, 40), (10, 200, 30)), Image.new("RGB", (40, 40), (200, 10, 30))])
    assert feats.shape == (2, 512) and emb.key.startswith("resnet18-") and not torch.allclose(feats[0], feats[1])


def test_machine_participant_accuracy_per_unit_equals_offline_mis_hard(tmp_path):
    from survey_app import create_app
    run_dir = make_study_dir(tmp_path / "study", {})
    cfg = study_from_run_dir(run_dir, overrides=['mis.embedding="pixels"', "mis.embedding_size=8"])
    run_mis(Study(cfg))
    offline = pd.read_csv(run_dir / "mis" / "units.csv")
    app = create_app({"RUN_DIR": str(run_dir), "API_TOKEN": API_TOKEN})
    observer = SimilarityObserver(create_embedding("pixels", size=8), 16.0, "pixels")
    summary = run_session(SurveyClient(FlaskTransport(app)), observer, api_token=API_TOKEN, mode="exhaustive")
    with app.config["SESSIONS"]() as s:
        served = {t.public_id: (t.model_id, t.kind, t.layer, t.unit) for t in s.scalars(select(Trial))}
    online = pd.DataFrame([(*served[d["trial"]], d["correct"]) for d in summary["decisions"]],
                          columns=["model_id", "kind", "layer", "unit", "correct"])
    per_unit = online.groupby(["model_id", "kind", "layer", "unit"])["correct"].mean().rename("accuracy")
    both = offline.set_index(["model_id", "kind", "layer", "unit"]).join(per_unit, how="inner")
    assert len(both) == 16
    np.testing.assert_allclose(both["accuracy"], both["mis_hard"], atol=1e-12)


def test_a_unit_made_for_one_model_only_stays_out_of_the_comparison(tmp_path):
    """`sparsight stimuli --model base --unit …` adds a unit to the base model alone: the MIS tables leave it out,
    so every model's mean covers the same units, and the stage says so."""
    from sparsight.layout import Layout
    from stimuli.bank import StimulusBank
    from survey_app.testing import make_bank

    run_dir = make_study_dir(tmp_path / "study", {})
    make_bank(run_dir, models=("base",), units=(("inception5a", 9),), seed=1)      # the extra unit, base only
    StimulusBank(Layout(run_dir).stimuli).assemble(["base", "m1"])
    cfg = study_from_run_dir(run_dir, overrides=['mis.embedding="pixels"', "mis.embedding_size=8"])
    said = []
    run_mis(Study(cfg), log=said.append)
    units = pd.read_csv(run_dir / "mis" / "units.csv")
    assert not ((units["layer"] == "inception5a") & (units["unit"] == 9)).any()
    assert units.groupby(["model_id", "kind"]).size().to_dict() == {(m, k): 4 for m in ("base", "m1")
                                                                     for k in ("natural", "synthetic")}
    models = pd.read_csv(run_dir / "mis" / "models.csv")
    assert set(models["units"]) == {4}
    assert any("left out 2 unit(s) that not every model has" in line and "base inception5a:9" in line for line in said)


def test_the_participant_command_sees_with_the_studys_embedding_size_as_the_mis_stage_does(tmp_path, monkeypatch):
    """`sparsight participant` with the study's embedding uses the study's mis.embedding_size (2 px here), as
    the MIS stage does: the same embedding key, and per-unit accuracies equal to the offline mis_hard."""
    from click.testing import CliRunner

    import survey_app.machine
    from sparsight.cli import main
    from sparsight.config import write_study

    run_dir = make_study_dir(tmp_path / "study", {})
    cfg = study_from_run_dir(run_dir, overrides=['mis.embedding="pixels"', "mis.embedding_size=2"])
    write_study(cfg, run_dir)
    run_mis(Study(cfg))
    offline = pd.read_csv(run_dir / "mis" / "units.csv").set_index(["model_id", "kind", "layer", "unit"])
    seen, session = [], survey_app.machine.run_session

    def watched(client, observer, **kw):
        seen.append(observer.embed.key)
        return session(client, observer, **kw)
    monkeypatch.setattr(survey_app.machine, "run_session", watched)
    result = CliRunner().invoke(main, ["participant", str(run_dir), "--mode", "exhaustive"])
    assert result.exit_code == 0, result.output
    assert seen == [offline["embedding"].iloc[0]] == ["pixels-2"]
    assert CliRunner().invoke(main, ["responses", str(run_dir)]).exit_code == 0
    online = pd.read_csv(run_dir / "responses.csv")
    per_unit = online.groupby(["model_id", "kind", "layer", "unit"])["correct"].mean().rename("accuracy")
    both = offline.join(per_unit, how="inner")
    assert len(both) == 16
    np.testing.assert_allclose(both["accuracy"], both["mis_hard"], atol=1e-12)
