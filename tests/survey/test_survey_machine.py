"""The machine participant answers through the API exactly the trials the bank defines; CLI commands."""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import torch
from click.testing import CliRunner
from PIL import Image
from sqlalchemy import func, select

from sparsight.cli import main
from survey_app.embeddings import create_embedding, penultimate
from survey_app.machine import FlaskTransport, SimilarityObserver, SurveyClient, TrialImages, run_session
from survey_app.material import Item
from survey_app.models import Trial
from survey_helpers import API_TOKEN
from tiny_models import assert_no_hooks


def offline_delta(observer, material, item: Item, task: int) -> float:
    """Δ with the max query in the upper place, straight from the bank (no API)."""
    t = material.task(item, task)
    load = lambda name: Image.open(material.image_path(name)).convert("RGB")  # noqa: E731
    return observer.delta(TrialImages([load(i) for i in t.ref_min], [load(i) for i in t.ref_max],
                                      load(t.query_max), load(t.query_min)))


def test_machine_accuracy_through_the_api_equals_the_offline_decision_rule(app):
    observer = SimilarityObserver(create_embedding("pixels", size=8), alpha=4.0, name="pixels")
    summary = run_session(SurveyClient(FlaskTransport(app)), observer, api_token=API_TOKEN, mode="exhaustive")
    material = app.extensions["survey"].material
    assert summary["stage"] == "complete" and summary["trials"] == sum(len(t) for t in material.tasks.values())
    with app.config["SESSIONS"]() as s:
        served = {t.public_id: t for t in s.scalars(select(Trial))}
    hard = []
    for d in summary["decisions"]:
        t = served[d["trial"]]
        delta = offline_delta(observer, material, Item(t.model_id, t.kind, t.layer, t.unit), t.task)
        sign = 1 if t.max_position == "upper" else -1
        assert abs(d["delta"] - sign * delta) < 1e-9                    # the same images, by position
        hard.append(delta > 0)
    assert summary["accuracy"] == sum(hard) / len(hard)                # = mis_hard over the same tasks
    assert summary["accuracy"] > 0.9                                   # bright max vs dark min is easy


def brightness_embedding(images):
    """A perfectly informative embedding for the synthetic bank (max images bright, min images dark)."""
    return torch.tensor([[float(np.asarray(im, dtype=np.float64).mean()) - 127.5, 1.0] for im in images])


def random_embedding(images):
    """An uninformative embedding: a fixed random vector per image content."""
    rows = []
    for im in images:
        gen = torch.Generator().manual_seed(int(hashlib.sha256(im.tobytes()).hexdigest()[:12], 16))
        rows.append(torch.randn(32, generator=gen))
    return torch.stack(rows)


def test_an_informative_embedding_is_always_right_and_a_random_one_near_chance(make_app):
    app = make_app()
    good = run_session(SurveyClient(FlaskTransport(app)), SimilarityObserver(brightness_embedding, 50.0, "bright"),
                       api_token=API_TOKEN)
    assert good["accuracy"] == 1.0 and all(d["confidence"] == 3 for d in good["decisions"])
    noise = run_session(SurveyClient(FlaskTransport(app)), SimilarityObserver(random_embedding, 50.0, "random"),
                        api_token=API_TOKEN)
    assert noise["trials"] == 64 and 0.3 <= noise["accuracy"] <= 0.7


def test_network_embedding_reads_the_input_of_the_last_linear_layer():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 2))
    embed = penultimate(net, "cpu")
    feats = embed(torch.tensor([200, 10, 30], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 8, 8))
    x = (torch.tensor([200, 10, 30]).float() / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor(
        [0.229, 0.224, 0.225])
    expected = net[:3](x.view(1, 3, 1, 1).expand(1, 3, 8, 8))
    assert feats.shape == (2, 4) and torch.allclose(feats[0], expected[0], atol=1e-5)
    assert_no_hooks(net)


def test_cli_participant_and_responses_export(tmp_path):
    from survey_app.testing import make_study_dir
    run_dir = make_study_dir(tmp_path / "study", {"main_trials": 4, "catch_trials": 1})
    runner = CliRunner()
    r = runner.invoke(main, ["participant", str(run_dir), "--observer", "pixels", "--mode", "participant",
                             "--condition", "base|natural"])
    assert r.exit_code == 0, r.output
    assert "5 trials" in r.output
    r = runner.invoke(main, ["participant", str(run_dir), "--observer", "observer"])
    assert r.exit_code != 0 and "no observer network" in r.output
    r = runner.invoke(main, ["responses", str(run_dir)])
    assert r.exit_code == 0, r.output
    df = pd.read_csv(run_dir / "responses.csv")
    assert len(df) == 5 and set(df["condition"]) == {"base|natural"} and df["is_machine"].all()
    r = runner.invoke(main, ["serve", str(run_dir), "--set", "train.epochs=3"])
    assert r.exit_code != 0 and "only survey.KEY=VALUE" in r.output


def test_credentials_are_made_once_and_open_the_admin_area(tmp_path, monkeypatch):
    from survey_app import create_app
    from survey_app.cli import ensure_credentials
    from survey_app.testing import make_study_dir
    from survey_helpers import csrf_from
    monkeypatch.delenv("SPARSIGHT_ADMIN_PASSWORD", raising=False)
    monkeypatch.delenv("SPARSIGHT_API_TOKEN", raising=False)
    run_dir = make_study_dir(tmp_path / "study")
    shown = ensure_credentials(run_dir, None)
    again = ensure_credentials(run_dir, None)
    assert "admin_password" in shown and "admin_password" not in again      # shown once
    token = (run_dir / "survey" / "api_token").read_text().strip()
    assert (run_dir / "survey" / "api_token").stat().st_mode & 0o077 == 0
    client = create_app({"RUN_DIR": str(run_dir)}).test_client()
    assert client.post("/api/sessions", json={"observer": "x"},
                       headers={"Authorization": f"Bearer {token}"}).status_code == 201
    field = csrf_from(client.get("/admin/login").text)
    r = client.post("/admin/login", data={"csrf_token": field, "password": shown["admin_password"]})
    assert r.status_code == 302 and client.get("/admin/").status_code == 200


def test_machine_participants_stage_replaces_its_own_sessions_and_keeps_human_data(tmp_path):
    from sparsight.config import load_study
    from survey_app import create_app
    from survey_app.export import responses_frame
    from sparsight.config import study_from_run_dir
    from sparsight.study import Study
    from survey_app.stages import run_participants
    from survey_app.testing import make_study_dir
    from survey_helpers import human_session
    run_dir = make_study_dir(tmp_path / "study", {"main_trials": 3, "catch_trials": 1, "machine_participants": 2,
                                                  "check_server_time": False})
    cfg = study_from_run_dir(run_dir, overrides=['mis.embedding="pixels"'])
    app = create_app({"RUN_DIR": str(run_dir)})
    client = app.test_client()
    sid = human_session(client)
    with client.session_transaction() as s:
        csrf = s["csrf"]
    trial = client.get(f"/api/sessions/{sid}").json["trial"]
    assert client.post(f"/api/sessions/{sid}/responses", headers={"X-CSRF-Token": csrf},
                       json={"trial": trial["id"], "choice": "upper", "confidence": 3, "rt_ms": 2000,
                             "key": "human-key-1"}).status_code == 200
    for _ in range(2):
        table = pd.read_csv(run_participants(Study(cfg), log=lambda *_: None)[0])
        assert len(table) == 2 * 4 and set(table["trials"]) == {4}             # 2 per condition, 3 main + 1 catch
    df = responses_frame(app.config["SESSIONS"])
    assert (~df["is_machine"]).sum() == 1 and df.loc[~df["is_machine"], "trial"].item() == trial["id"]
    assert df["is_machine"].sum() == 8 * 4                                     # the second run replaced the first


def test_a_seeded_machine_session_draws_the_same_trials_again(app):
    """A study's machine sessions are seeded from the study's seed, so running the participants stage again gives
    the same trials (hence the same accuracies); another seed draws others, and a bad seed is a 400 that stores
    nothing.  A person's session is never seeded by a caller."""
    import pytest

    from survey_app.models import Participant
    from survey_app.service import SurveyError
    from survey_app.stages import machine_seed

    client = app.test_client()
    headers = {"Authorization": f"Bearer {API_TOKEN}"}

    def drawn(seed):
        r = client.post("/api/sessions", json={"observer": "m", "mode": "participant", "seed": seed}, headers=headers)
        assert r.status_code == 201, r.json
        with app.config["SESSIONS"]() as s:
            p = s.scalars(select(Participant).where(Participant.public_id == r.json["session"])).one()
            return p.condition, [(t.block, t.position, t.model_id, t.kind, t.layer, t.unit, t.task, t.max_position,
                                  t.catch_ref) for t in s.scalars(select(Trial).where(Trial.participant_id == p.id)
                                                                  .order_by(Trial.block, Trial.position))]

    seed = machine_seed(0, "all", 0)
    assert seed == machine_seed(0, "all", 0) != machine_seed(1, "all", 0) != machine_seed(0, "all", 1)
    first = drawn(seed)
    assert drawn(seed) == first and len(first[1]) > 4
    assert any(drawn(s) != first for s in (seed + 1, seed + 2, seed + 3))
    with app.config["SESSIONS"]() as s:
        before = s.scalar(select(func.count(Participant.id)))
    for bad in (-1, 2**31, 1.5, "7", True):
        r = client.post("/api/sessions", json={"observer": "m", "seed": bad}, headers=headers)
        assert r.status_code == 400 and "seed" in r.json["error"]
    with app.config["SESSIONS"]() as s:
        assert s.scalar(select(func.count(Participant.id))) == before
    with pytest.raises(SurveyError, match="machine participants only"):
        app.extensions["survey"].create_participant(seed=seed)
