"""`sparsight responses` joins each model's method, schedule, rate and sparsity from the study directory."""
from __future__ import annotations

import json

import pandas as pd
from click.testing import CliRunner

from sparsight.cli import main
from survey_app.export import MODEL_FIELDS, RESPONSE_COLUMNS
from survey_helpers import auth, machine_session


def test_the_responses_export_names_each_models_method_schedule_rate_and_sparsity(make_app, database_url):
    """``base`` from its meta.json (before its row in evaluation.csv), ``m1`` from evaluation.csv (a model without
    a meta.json), as the analysis reads them; a study directory without either exports the responses as they are
    stored."""
    app = make_app()
    run_dir = app.config["RUN_DIR"]
    client = app.test_client()
    sid, token = machine_session(client, mode="exhaustive")
    n = 0
    while "trial" in (state := client.get(f"/api/sessions/{sid}", headers=auth(token)).json):
        client.post(f"/api/sessions/{sid}/responses", headers=auth(token),
                    json={"trial": state["trial"]["id"], "choice": "upper", "confidence": 1, "rt_ms": 10.0,
                          "key": f"key-{n:05d}"})
        n += 1
    runner = CliRunner()
    assert runner.invoke(main, ["responses", str(run_dir), "--database", database_url]).exit_code == 0
    assert list(pd.read_csv(run_dir / "responses.csv").columns) == RESPONSE_COLUMNS
    (run_dir / "models" / "base").mkdir(parents=True)
    (run_dir / "models" / "base" / "meta.json").write_text(json.dumps(
        {"model_id": "base", "arch": "inception-small", "method": None, "schedule": None, "rate_requested": 0.0,
         "sparsity": {"total": 0.0}, "top1": {"after": 0.9}}))
    pd.DataFrame([{"model_id": "base", "arch": "inception-small", "method": "", "schedule": "",
                   "rate_requested": 0.0, "sparsity": 0.25, "top1": 0.1},          # meta.json wins
                  {"model_id": "m1", "arch": "inception-small", "method": "structured", "schedule": "oneshot",
                   "rate_requested": 0.5, "sparsity": 0.48, "top1": 0.8}]).to_csv(run_dir / "evaluation.csv",
                                                                                 index=False)
    result = runner.invoke(main, ["responses", str(run_dir), "--database", database_url])
    assert result.exit_code == 0, result.output
    df = pd.read_csv(run_dir / "responses.csv", keep_default_na=False)
    at = df.columns.get_loc("model_id")
    assert list(df.columns[at + 1:at + 5]) == list(MODEL_FIELDS) and len(df) == n
    models = df.groupby("model_id")[list(MODEL_FIELDS)].agg(lambda v: set(v.astype(str)))
    assert models.loc["base"].tolist() == [{"base"}, {""}, {"0.0"}, {"0.0"}]
    assert models.loc["m1"].tolist() == [{"structured"}, {"oneshot"}, {"0.5"}, {"0.48"}]
