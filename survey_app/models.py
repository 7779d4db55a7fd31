"""Database tables: study, participant session, assigned trial, response, event, exclusion.

Every row a participant produces is written the moment it happens; nothing waits for the end of a
session.  Uniqueness is enforced by the database, not by application checks alone: one response
per trial, one idempotency key per participant, one Prolific ID per study.
"""
from __future__ import annotations

import datetime as dt

from sqlalchemy import (Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> dt.datetime:
    """Naive UTC (stored the same way on SQLite and PostgreSQL)."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Secret(Base):
    """Per-database secrets shared by every server worker (cookie signing key, API token hash)."""
    __tablename__ = "secrets"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


class SurveyStudy(Base):
    """One study name served from one version of the stimulus bank (its manifest hash)."""
    __tablename__ = "studies"
    __table_args__ = (UniqueConstraint("name", "bank_hash"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    bank_hash: Mapped[str] = mapped_column(String(64))
    settings: Mapped[str] = mapped_column(Text, default="{}")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Participant(Base):
    __tablename__ = "participants"
    __table_args__ = (UniqueConstraint("study_name", "external_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True, index=True)
    token_hash: Mapped[str] = mapped_column(String(64))
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    study_name: Mapped[str] = mapped_column(String(128))
    external_id: Mapped[str | None] = mapped_column(String(128), nullable=True)   # PROLIFIC_PID
    prolific_study_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    prolific_session_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    is_machine: Mapped[bool] = mapped_column(Boolean, default=False)
    observer: Mapped[str | None] = mapped_column(String(128), nullable=True)
    seed: Mapped[int] = mapped_column(Integer)
    condition: Mapped[str] = mapped_column(String(256))
    stage: Mapped[str] = mapped_column(String(32))       # see service.STAGES
    practice_attempt: Mapped[int] = mapped_column(Integer, default=0)
    user_agent: Mapped[str | None] = mapped_column(String(512), nullable=True)
    window: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    instructions_started_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    instructions_done_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    last_seen_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    excluded: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    settings: Mapped[str | None] = mapped_column(Text, nullable=True)     # the survey settings assigned under

    trials: Mapped[list[Trial]] = relationship(back_populates="participant", order_by="Trial.id")
    exclusions: Mapped[list[Exclusion]] = relationship(order_by="Exclusion.id")


class Trial(Base):
    """One assigned trial; ``max_position`` is the answer and is never sent before a response."""
    __tablename__ = "trials"
    __table_args__ = (UniqueConstraint("participant_id", "block", "attempt", "position"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True, index=True)
    participant_id: Mapped[int] = mapped_column(ForeignKey("participants.id"), index=True)
    block: Mapped[str] = mapped_column(String(16))          # practice | main
    attempt: Mapped[int] = mapped_column(Integer, default=0)  # practice attempt (1..); 0 for main
    position: Mapped[int] = mapped_column(Integer)            # order within the block
    trial_type: Mapped[str] = mapped_column(String(16))     # practice | main | catch
    model_id: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))
    layer: Mapped[str] = mapped_column(String(128))
    unit: Mapped[int] = mapped_column(Integer)
    task: Mapped[int] = mapped_column(Integer)
    max_position: Mapped[str] = mapped_column(String(8))    # upper | lower
    catch_ref: Mapped[int | None] = mapped_column(Integer, nullable=True)  # catch: index of the repeated reference
    served_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    # how often the session's state served it while open: more than once, a reload or a second tab restarted it
    serves: Mapped[int | None] = mapped_column(Integer, nullable=True)

    participant: Mapped[Participant] = relationship(back_populates="trials")
    response: Mapped[Response | None] = relationship(back_populates="trial", uselist=False)


class Response(Base):
    __tablename__ = "responses"
    __table_args__ = (UniqueConstraint("participant_id", "idempotency_key"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("trials.id"), unique=True)
    participant_id: Mapped[int] = mapped_column(ForeignKey("participants.id"), index=True)
    idempotency_key: Mapped[str] = mapped_column(String(64))
    choice: Mapped[str] = mapped_column(String(8))          # upper | lower
    confidence: Mapped[int] = mapped_column(Integer)        # 1..3
    correct: Mapped[bool] = mapped_column(Boolean)
    rt_ms: Mapped[float] = mapped_column(Float)                       # client: performance.now(), images decoded
    server_ms: Mapped[float | None] = mapped_column(Float, nullable=True)  # server: first served → saved
    # client: of rt_ms, the time an overlay or a hidden page covered the trial (None from older pages)
    hidden_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    trial: Mapped[Trial] = relationship(back_populates="response")


class Event(Base):
    """Browser events (focus, blur, fullscreen exit, resize, …) with the client clock."""
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    participant_id: Mapped[int] = mapped_column(ForeignKey("participants.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str] = mapped_column(Text, default="")
    client_ms: Mapped[float | None] = mapped_column(Float, nullable=True)        # ms since the page loaded
    client_epoch_ms: Mapped[float | None] = mapped_column(Float, nullable=True)  # the client's wall clock
    trial: Mapped[str | None] = mapped_column(String(32), nullable=True)        # the trial on screen
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Exclusion(Base):
    """One exclusion rule evaluated for one participant, with the value it saw."""
    __tablename__ = "exclusions"
    __table_args__ = (UniqueConstraint("participant_id", "rule"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    participant_id: Mapped[int] = mapped_column(ForeignKey("participants.id"), index=True)
    rule: Mapped[str] = mapped_column(String(64))
    value: Mapped[float | None] = mapped_column(Float, nullable=True)
    passed: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str] = mapped_column(String(256))


class LoginAttempt(Base):
    """One admin login attempt (the throttle counts recent failures across every worker)."""
    __tablename__ = "login_attempts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    client: Mapped[str] = mapped_column(String(64), index=True)
    succeeded: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)


class AdminSession(Base):
    """A signed-in admin browser; logging out revokes it, so a copied cookie stops working."""
    __tablename__ = "admin_sessions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class Decline(Base):
    """A person who saw the consent page and declined (nothing else about them is stored)."""
    __tablename__ = "declines"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_name: Mapped[str] = mapped_column(String(128))
    external_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
