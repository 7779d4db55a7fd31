"""Engines and transactions: SQLite by default (WAL, busy timeout, serialized writers), any
SQLAlchemy URL (PostgreSQL) instead.

Every write runs in one short transaction (:func:`transaction`).  On SQLite each write transaction
starts with ``BEGIN IMMEDIATE`` — it takes the single write lock up front, so concurrent requests
queue on the busy timeout instead of failing with "database is locked" half-way through; reads
(sessions bound with the execution option ``read_only``) start a deferred ``BEGIN`` and never wait
for the write lock (WAL lets them read while one writer writes).  On
PostgreSQL, rows that must not be raced (the study row while a participant's trials are chosen, a
participant while a response is saved) are locked with ``SELECT … FOR UPDATE``.
"""
from __future__ import annotations

import contextlib
import random
import time
from pathlib import Path

from sqlalchemy import create_engine, event, inspect, select, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from .models import Base, Secret

SQLITE_BUSY_MS = 30_000


def missing_sqlite_file(url: str) -> Path | None:
    """The SQLite file ``url`` names when it does not exist (yet); None for a database server, an
    in-memory database or a file that exists."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    path = Path(parsed.database)
    return None if path.is_file() else path


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout, foreign keys and immediate transactions."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_MS / 1000, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            dbapi_conn.isolation_level = None   # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn):
            if conn.get_execution_options().get("read_only"):   # readers never take the write lock
                conn.exec_driver_sql("BEGIN")
                return
            _begin_immediate(conn)
        return engine
    return create_engine(url, pool_recycle=1800, pool_size=10, max_overflow=10)


def _begin_immediate(conn) -> None:
    """``BEGIN IMMEDIATE``, retried every 0.5–2 ms while another writer holds the lock.

    SQLite's own busy handler sleeps 1, 2, 5, … up to 100 ms between tries, so under load a waiter
    sleeps through many releases of a lock held for about a millisecond; a short busy timeout plus
    this loop wakes waiters promptly.  Gives up after ``SQLITE_BUSY_MS``."""
    deadline = time.monotonic() + SQLITE_BUSY_MS / 1000
    conn.exec_driver_sql("PRAGMA busy_timeout=2")
    try:
        while True:
            try:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
                return
            except OperationalError as err:
                if "locked" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(random.uniform(0.0005, 0.002))
    finally:
        conn.exec_driver_sql(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")


def add_missing_columns(conn) -> list[str]:
    """Add the optional (nullable) columns a database made by an earlier version lacks, so it keeps being
    served; returns them as ``table.column``.  A missing required column is an error naming it."""
    quote = conn.dialect.identifier_preparer.quote
    inspector = inspect(conn)
    added = []
    for table in Base.metadata.sorted_tables:
        if not inspector.has_table(table.name):
            continue
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in (c for c in table.columns if c.name not in present):
            if not column.nullable:
                raise ValueError(f"the survey database's table {table.name} lacks the required column "
                                   f"{column.name}; export it with an earlier sparsight and start a new database")
            conn.execute(text(f"ALTER TABLE {quote(table.name)} ADD COLUMN {quote(column.name)} "
                              f"{column.type.compile(dialect=conn.dialect)}"))
            added.append(f"{table.name}.{column.name}")
    return added


def init_schema(engine: Engine, attempts: int = 5) -> None:
    """Create missing tables and optional columns; safe when several server workers start at once."""
    for attempt in range(attempts):
        try:
            with engine.begin() as conn:
                if engine.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(7242031)"))
                Base.metadata.create_all(conn)
                add_missing_columns(conn)
            return
        except (OperationalError, ProgrammingError, IntegrityError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def open_sessions(url: str) -> sessionmaker:
    """The one way a part of the program opens the survey database: an engine for ``url``
    (:func:`make_engine`), the schema created where missing, and its session factory (objects stay
    readable after commit).  Dispose of ``sessions.kw["bind"]`` when done, or use :func:`database`."""
    engine = make_engine(url)
    init_schema(engine)
    return sessionmaker(engine, expire_on_commit=False)


@contextlib.contextmanager
def database(url: str):
    """``with database(url) as sessions:`` :func:`open_sessions`, the engine disposed on exit."""
    sessions = open_sessions(url)
    try:
        yield sessions
    finally:
        sessions.kw["bind"].dispose()


def read_only_sqlite(path: str) -> Engine:
    """An engine that opens the SQLite file ``path`` read-only (it never creates or changes the file)."""
    return create_engine(f"sqlite:///file:{path}?mode=ro&uri=true")


def get_or_create_secret(sessions: sessionmaker, name: str, make) -> str:
    """The stored secret ``name``, creating it with ``make()`` if absent (first writer wins)."""
    with sessions() as s:
        found = s.get(Secret, name)
        if found is not None:
            return found.value
    try:
        with sessions.begin() as s:
            s.add(Secret(name=name, value=make()))
    except IntegrityError:
        pass
    with sessions() as s:
        return s.scalars(select(Secret.value).where(Secret.name == name)).one()


def set_secret(sessions: sessionmaker, name: str, value: str) -> None:
    with sessions.begin() as s:
        found = s.get(Secret, name)
        if found is None:
            s.add(Secret(name=name, value=value))
        else:
            found.value = value


@contextlib.contextmanager
def transaction(sessions: sessionmaker):
    """One unit of work: commit on success, roll back on any error."""
    with sessions.begin() as session:
        yield session


@contextlib.contextmanager
def scratch_postgres(admin_url: str, prefix: str = "sparsight_scratch"):
    """A fresh, uniquely named database on the server of ``admin_url`` (a role with CREATEDB), dropped
    afterwards — ``WITH (FORCE)`` (PostgreSQL 13+) also ends connections left open."""
    import uuid
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(make_url(admin_url), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def lock(session: Session, model, pk) -> object:
    """Load a row and lock it until the transaction ends (FOR UPDATE; SQLite already holds the write lock)."""
    return session.execute(select(model).where(model.id == pk).with_for_update()).scalar_one()
