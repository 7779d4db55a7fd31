"""Many participants at once over real HTTP against a two-worker gunicorn server: nothing lost,
nothing duplicated, balance kept (a bounded version of benchmarks/survey_load.py; the simulated
participants and the database checks live in benchmarks/loadsim.py)."""
from __future__ import annotations

import pytest

pytest.importorskip("gunicorn")
pytest.importorskip("PIL")

from benchmarks import loadsim  # noqa: E402
from survey_app.testing import make_study_dir  # noqa: E402

SURVEY = {**loadsim.LOAD_SURVEY, "practice_trials": 2, "main_trials": 8, "catch_trials": 1, "min_response_ms": 1500}
PARTICIPANTS = 12


@pytest.mark.slow
def test_concurrent_participants_lose_and_duplicate_nothing(tmp_path, database_url):
    run_dir = make_study_dir(tmp_path / "study", SURVEY)
    # every participant claims rt 1600 ms (≥ min_response_ms) without waiting; a quarter fail one
    # practice answer (the practice repeats); retries with the same key, half of them concurrent
    cfg = loadsim.SimConfig(rt_ms=1600, retry_rate=0.2, practice_fail_rate=0.25, completion_code="LOAD")
    with loadsim.gunicorn_server(run_dir, database_url=database_url, workers=2, threads=4) as base:
        run = loadsim.run_participants(base, PARTICIPANTS, cfg, seed=0)
    loadsim.print_summary(run, title=f"load on {database_url.split(':', 1)[0]}")

    checks = {c.name: c for c in loadsim.verify(database_url, run.logs, SURVEY, run_dir)}
    report = "\n".join(c.line() for c in checks.values())
    print(report)
    failed = [c.line() for c in checks.values() if c.required and not c.ok]
    assert not failed, report
    # with 8 main trials over 4 units per condition every unit gets 2 distinct tasks, so tasks stay balanced too
    assert checks["task balance"].ok, report
    assert any(log.practice_attempts > 1 for log in run.logs), "no participant repeated the practice"
    assert sum(log.retries for log in run.logs) >= PARTICIPANTS
    routes = run.latencies.by_route
    assert len(routes["state"]) >= PARTICIPANTS * (SURVEY["main_trials"] + SURVEY["catch_trials"])
    assert len(routes["response_conflict"]) == 2 * PARTICIPANTS
