"""A survey database made by an earlier version keeps being served: the optional columns added since are
added to it (ALTER TABLE), its rows untouched; a missing required column stops with its name."""
from __future__ import annotations

import pytest
from sqlalchemy import inspect, select, text

from survey_app.db import add_missing_columns, database
from survey_app.models import Event
from survey_helpers import auth, machine_session

NEW = ("trial", "client_epoch_ms")


def test_an_older_database_gets_the_new_event_columns_and_keeps_its_rows(make_app):
    app = make_app()
    client = app.test_client()
    sid, token = machine_session(client)
    assert client.post(f"/api/sessions/{sid}/events", json={"events": [{"kind": "blur", "t": 12.5}]},
                       headers=auth(token)).status_code == 200
    engine = app.config["ENGINE"]
    with engine.begin() as conn:                         # the table as an earlier version made it
        for column in NEW:
            conn.execute(text(f"ALTER TABLE events DROP COLUMN {column}"))
    url = app.config["DATABASE"]
    engine.dispose()
    with database(url) as sessions:
        columns = {c["name"] for c in inspect(sessions.kw["bind"]).get_columns("events")}
        assert set(NEW) <= columns
        with sessions() as s:
            rows = s.execute(select(Event.kind, Event.client_ms, Event.trial, Event.client_epoch_ms)).all()
        assert [tuple(r) for r in rows] == [("blur", 12.5, None, None)]
        with sessions.kw["bind"].begin() as conn:
            assert add_missing_columns(conn) == []       # a second start adds nothing


def test_a_missing_required_column_is_named(make_app):
    app = make_app()
    engine = app.config["ENGINE"]
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE events DROP COLUMN kind"))
        with pytest.raises(ValueError, match="events lacks the required column kind"):
            add_missing_columns(conn)
