"""The database_url fixture gives a working, empty database on SQLite and on PostgreSQL."""
from __future__ import annotations

from sqlalchemy import create_engine, inspect, text


def test_database_url_round_trip(database_url):
    engine = create_engine(database_url)
    try:
        assert inspect(engine).get_table_names() == []
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE item (id INTEGER PRIMARY KEY, label VARCHAR(40) NOT NULL)"))
            conn.execute(text("INSERT INTO item (id, label) VALUES (:id, :label)"), {"id": 1, "label": "ünïcode ok"})
        with engine.connect() as conn:
            assert conn.execute(text("SELECT label FROM item WHERE id = 1")).scalar_one() == "ünïcode ok"
    finally:
        engine.dispose()
