"""What a participant session does, independent of HTTP: create, serve the next trial, save a
response, log events, finish.  Pages and the JSON API both call this; every call is one
transaction and every failure is a :class:`SurveyError` raised before anything is written.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import math
import re
import secrets
from collections import Counter
from dataclasses import asdict

from sqlalchemy import and_, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from . import assignment, exclusions
from .db import lock, transaction
from .material import Item, Material
from .models import Event, Exclusion, Participant, Response, SurveyStudy, Trial, utcnow
from .protocol import settings_from, settings_record

STAGES = ("consent", "instructions", "practice", "main", "complete", "screened_out")
ACTIVE = ("instructions", "practice", "main")
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{8,64}$")
#: Longest event detail stored (characters of its JSON); a longer one is refused, never cut.
MAX_EVENT_DETAIL = 2000
#: Most browser events one session stores (a whole study logs a few hundred); more are refused, so a script
#: cannot fill the database through one session.
MAX_EVENTS_PER_SESSION = 5000
EVENT_KINDS = ("focus", "blur", "visibility", "fullscreen_enter", "fullscreen_exit", "resize", "reload",
               "preload_error", "page", "note", "display", "covered", "uncovered")
TRIAL_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


class SurveyError(Exception):
    """A request the survey refuses; ``status`` is the HTTP code, ``reason`` says why."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


#: How much longer than the server's own elapsed time a client's reaction time may claim to be.
RT_SLACK_MS = 1000


def _check_server_time(server_ms: float | None, rt_ms: float, min_ms: int) -> None:
    """Refuse timings the server's clock contradicts (422); the stored data stay unchanged."""
    if server_ms is None:
        raise SurveyError(409, "this trial was never served; fetch the session state first")
    if server_ms < min_ms:
        raise SurveyError(422, f"answered {server_ms:.0f} ms after the trial was served; responses are accepted "
                               f"after {min_ms} ms")
    if rt_ms > server_ms + RT_SLACK_MS:
        raise SurveyError(422, f"rt_ms {rt_ms:g} is longer than the {server_ms:.0f} ms since the trial was served")


def _event_time(event: dict, name: str) -> float | None:
    value = event.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value)):
        raise SurveyError(400, f"event time {name!r} must be a finite number (ms)")
    return value


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def image_url(image: str) -> str:
    return f"/stimuli/{image}.png"


class SurveyService:
    """One study served from one stimulus bank.  ``settings`` are the server's: a new participant is assigned
    under them and keeps them (:mod:`.protocol`), so a participant's own session is judged by their own."""

    def __init__(self, sessions: sessionmaker, material: Material, settings, study_name: str):
        self.sessions, self.material, self.settings, self.study_name = sessions, material, settings, study_name
        self.settings_record = settings_record(settings)
        self._settings_of: dict[str, object] = {self.settings_record: settings}
        # reads start a deferred transaction (SQLite: no write lock); writes go through ``transaction``
        self.readers = sessionmaker(sessions.kw["bind"].execution_options(read_only=True), expire_on_commit=False)
        self.conditions = material.conditions(settings.condition_by)
        assignment.check_reserve(material, settings.reserved_tasks)
        self.study_id = self._study_row()

    def _study_row(self) -> int:
        where = and_(SurveyStudy.name == self.study_name, SurveyStudy.bank_hash == self.material.bank_hash)
        with self.sessions() as s:
            found = s.scalars(select(SurveyStudy.id).where(where)).first()
        if found is None:
            try:
                with transaction(self.sessions) as s:
                    s.add(SurveyStudy(name=self.study_name, bank_hash=self.material.bank_hash,
                                      settings=json.dumps(asdict(self.settings), sort_keys=True)))
            except IntegrityError:
                pass
            with self.sessions() as s:
                found = s.scalars(select(SurveyStudy.id).where(where)).one()
        return found

    # ---- creating a session -------------------------------------------------------------
    def record_decline(self, external_id: str | None) -> None:
        """Store that someone declined consent (with the study link's participant ID, if any)."""
        from .models import Decline
        with self.sessions.begin() as s:
            s.add(Decline(study_name=self.study_name, external_id=external_id))

    def create_participant(self, *, is_machine: bool = False, external_id: str | None = None,
                           prolific_study_id: str | None = None, prolific_session_id: str | None = None,
                           observer: str | None = None, user_agent: str | None = None, window: str | None = None,
                           mode: str = "participant", condition: str | None = None,
                           practice: bool | None = None, seed: int | None = None) -> tuple[str, str]:
        """A new participant with its stored trial list; returns ``(public_id, token)``.

        ``mode='exhaustive'`` (machines only) assigns every task of the condition (or of all items).  ``seed``
        (machines only) fixes the session's draws, so a study's machine sessions repeat; a person's is random.
        """
        if mode not in ("participant", "exhaustive"):
            raise SurveyError(400, f"unknown mode {mode!r}; choose from ['exhaustive', 'participant']")
        if mode == "exhaustive" and not is_machine:
            raise SurveyError(400, "mode 'exhaustive' is for machine participants")
        if condition is not None and condition not in self.conditions:
            raise SurveyError(400, f"unknown condition {condition!r}; choose from {sorted(self.conditions)}")
        if external_id is not None and not external_id.strip():
            external_id = None
        if seed is not None and not is_machine:
            raise SurveyError(400, "a seed is for machine participants only")
        practice = (not is_machine) if practice is None else practice
        token, public_id = secrets.token_urlsafe(24), secrets.token_urlsafe(12)
        seed = secrets.randbelow(2**31) if seed is None else seed
        try:
            with transaction(self.sessions) as s:
                lock(s, SurveyStudy, self.study_id)      # serializes assignment: balance counts are exact
                if external_id is not None:
                    taken = s.scalars(select(Participant.id).where(Participant.study_name == self.study_name,
                                                                   Participant.external_id == external_id)).first()
                    if taken is not None:
                        raise SurveyError(409, "this participant ID has already taken part in the study")
                counts = self.balance_counts(s)

                def rng_of(purpose):
                    return assignment.make_rng(self.study_name, self.material.bank_hash, seed, purpose)
                if mode == "exhaustive":
                    cond = condition or "all"
                    items = self.conditions[condition] if condition else self.material.items
                    specs = assignment.exhaustive_block(self.material, items, rng_of)
                else:
                    cond = condition or assignment.choose_condition(list(self.conditions), counts, rng_of("condition"))
                    items = self.conditions[cond]
                    reserved = self.settings.reserved_tasks
                    specs = assignment.main_block(self.material, items, self.settings.main_trials,
                                                  self.settings.catch_trials, counts, rng_of, reserved)
                    if practice and self.settings.practice_trials:
                        shown = assignment.shown_queries(self.material, [(sp.item, sp.task) for sp in specs])
                        specs += assignment.practice_block(self.material, items, {sp.item for sp in specs},
                                                           self.settings.practice_trials, 1, rng_of, reserved, shown)
                has_practice = any(sp.block == "practice" for sp in specs)
                stage = "main" if is_machine and not has_practice else ("practice" if is_machine else "instructions")
                p = Participant(public_id=public_id, token_hash=token_hash(token), study_id=self.study_id,
                                study_name=self.study_name, external_id=external_id,
                                prolific_study_id=prolific_study_id, prolific_session_id=prolific_session_id,
                                is_machine=is_machine, observer=observer, seed=seed, condition=cond, stage=stage,
                                practice_attempt=1 if has_practice else 0, user_agent=(user_agent or "")[:512],
                                window=(window or "")[:64], settings=self.settings_record)
                s.add(p)
                s.flush()
                s.add_all(self._trial_rows(p.id, specs))
        except IntegrityError:
            raise SurveyError(409, "this participant ID has already taken part in the study") from None
        return public_id, token

    def _trial_rows(self, participant_id: int, specs) -> list[Trial]:
        return [Trial(public_id=secrets.token_urlsafe(12), participant_id=participant_id, block=sp.block,
                      attempt=sp.attempt, position=sp.position, trial_type=sp.trial_type, model_id=sp.item.model_id,
                      kind=sp.item.kind, layer=sp.item.layer, unit=sp.item.unit, task=sp.task,
                      max_position=sp.max_position, catch_ref=sp.catch_ref) for sp in specs]

    def balance_counts(self, s) -> assignment.BalanceCounts:
        """Assignments of human participants that hold a slot: finished and not excluded, or active recently."""
        cutoff = utcnow() - dt.timedelta(minutes=self.settings.slot_timeout_min)
        holds = and_(Participant.study_id == self.study_id, Participant.is_machine.is_(False),
                     or_(and_(Participant.stage == "complete", or_(Participant.excluded.is_(None),
                                                                   Participant.excluded.is_(False))),
                         and_(Participant.stage.in_(ACTIVE), Participant.last_seen_at >= cutoff)))
        conditions = Counter(dict(s.execute(select(Participant.condition, func.count())
                                            .where(holds).group_by(Participant.condition)).all()))
        rows = s.execute(select(Trial.model_id, Trial.kind, Trial.layer, Trial.unit, Trial.task, func.count())
                         .join(Participant, Trial.participant_id == Participant.id)
                         .where(holds, Trial.trial_type == "main")
                         .group_by(Trial.model_id, Trial.kind, Trial.layer, Trial.unit, Trial.task)).all()
        items, tasks = Counter(), Counter()
        for model_id, kind, layer, unit, task, n in rows:
            item = Item(model_id, kind, layer, unit)
            items[item] += n
            tasks[(item, task)] += n
        return assignment.BalanceCounts(conditions, items, tasks)

    # ---- authentication -----------------------------------------------------------------
    def authenticate(self, public_id: str, token: str | None) -> None:
        """Raise 401 without a token, 403 when the token does not belong to ``public_id``."""
        if not token:
            raise SurveyError(401, "missing session token (Authorization: Bearer <token>)")
        with self.readers() as s:
            stored = s.scalars(select(Participant.token_hash).where(Participant.public_id == public_id)).first()
        if stored is None:
            raise SurveyError(404, f"no session {public_id!r}")
        if not hmac.compare_digest(stored, token_hash(token)):
            raise SurveyError(403, "the token does not belong to this session")

    def _participant(self, s, public_id: str, *, for_update: bool = False) -> Participant:
        q = select(Participant).where(Participant.public_id == public_id)
        if for_update:
            q = q.with_for_update()
        p = s.scalars(q).first()
        if p is None:
            raise SurveyError(404, f"no session {public_id!r}")
        if p.study_id != self.study_id:
            raise SurveyError(410, "this session belongs to an earlier version of the stimulus bank")
        return p

    def find_by_external(self, external_id: str) -> tuple[str, str | None, str] | None:
        """``(public_id, prolific_session_id, stage)`` of a participant ID that already started, else None."""
        with self.readers() as s:
            row = s.execute(select(Participant.public_id, Participant.prolific_session_id, Participant.stage)
                            .where(Participant.study_name == self.study_name,
                                   Participant.external_id == external_id)).first()
        return None if row is None else (row[0], row[1], row[2])

    def external_id(self, public_id: str) -> str | None:
        """The study link's participant ID a session was started with (None without one)."""
        with self.readers() as s:
            return s.scalar(select(Participant.external_id).where(Participant.study_name == self.study_name,
                                                                  Participant.public_id == public_id))

    def declined(self, external_id: str) -> bool:
        """Whether this participant ID declined consent before."""
        from .models import Decline
        with self.readers() as s:
            return s.scalar(select(Decline.id).where(Decline.study_name == self.study_name,
                                                     Decline.external_id == external_id).limit(1)) is not None

    def reissue_token(self, public_id: str) -> str:
        """A fresh token for a participant resuming on a new browser (after Prolific identity checks)."""
        token = secrets.token_urlsafe(24)
        with transaction(self.sessions) as s:
            self._participant(s, public_id, for_update=True).token_hash = token_hash(token)
        return token

    def settings_of(self, p: Participant):
        """The survey settings ``p`` was assigned under (the server's for a participant stored without them)."""
        if not p.settings:
            return self.settings
        if p.settings not in self._settings_of:
            self._settings_of[p.settings] = settings_from(p.settings, self.settings)
        return self._settings_of[p.settings]

    def settings_for(self, public_id: str):
        """:meth:`settings_of` the session ``public_id``."""
        with self.readers() as s:
            return self.settings_of(self._participant(s, public_id))

    # ---- stages -------------------------------------------------------------------------
    def stage(self, public_id: str) -> str:
        with self.readers() as s:
            return self._participant(s, public_id).stage

    def instructions_seen(self, public_id: str) -> None:
        with transaction(self.sessions) as s:
            p = self._participant(s, public_id, for_update=True)
            if p.instructions_started_at is None:
                p.instructions_started_at = utcnow()
            p.last_seen_at = utcnow()

    def instructions_done(self, public_id: str) -> str:
        with transaction(self.sessions) as s:
            p = self._participant(s, public_id, for_update=True)
            if p.stage != "instructions" or p.instructions_started_at is None:
                return p.stage          # instructions never shown (a bare POST): they are shown first
            now = utcnow()
            p.instructions_done_at = now
            p.stage = "practice" if p.practice_attempt else "main"
            p.last_seen_at = now
            return p.stage

    # ---- trials -------------------------------------------------------------------------
    def _block_trials(self, s, p: Participant) -> list[Trial]:
        block, attempt = ("practice", p.practice_attempt) if p.stage == "practice" else ("main", 0)
        return list(s.scalars(select(Trial).where(Trial.participant_id == p.id, Trial.block == block,
                                                  Trial.attempt == attempt).order_by(Trial.position)))

    def _answered_ids(self, s, trials: list[Trial]) -> set[int]:
        if not trials:
            return set()
        return set(s.scalars(select(Response.trial_id).where(Response.trial_id.in_([t.id for t in trials]))))

    def _progress(self, s, p: Participant) -> dict:
        main_total = s.scalar(select(func.count()).select_from(Trial).where(Trial.participant_id == p.id,
                                                                             Trial.block == "main"))
        main_done = s.scalar(select(func.count()).select_from(Response).join(Trial, Response.trial_id == Trial.id)
                             .where(Response.participant_id == p.id, Trial.block == "main"))
        practice = self.settings_of(p).practice_trials if p.practice_attempt else 0
        done = main_done + (practice if p.stage in ("main", "complete") else 0)
        if p.stage == "practice":
            block = self._block_trials(s, p)
            done += len(self._answered_ids(s, block))
        return {"done": done, "total": main_total + practice}

    def payload(self, t: Trial) -> dict:
        """What a participant sees of a trial: image URLs only, the queries by position."""
        task = self.material.task(Item(t.model_id, t.kind, t.layer, t.unit), t.task)
        query_max = task.query_max if t.catch_ref is None else task.ref_max[t.catch_ref]
        upper, lower = (query_max, task.query_min) if t.max_position == "upper" else (task.query_min, query_max)
        return {"id": t.public_id, "block": t.block, "attempt": t.attempt,
                "left": [image_url(i) for i in task.ref_min], "right": [image_url(i) for i in task.ref_max],
                "upper": image_url(upper), "lower": image_url(lower)}

    def _urls(self, payload: dict) -> list[str]:
        return payload["left"] + payload["right"] + [payload["upper"], payload["lower"]]

    def state(self, public_id: str, *, serve: bool = True) -> dict:
        """The session's stage, progress and (during practice/main) the current trial plus the next one's images.

        A read; it writes only to count the current trial's servings (stamping the first) and, at most every 30 s,
        the last-seen time."""
        with self.readers() as s:
            p = self._participant(s, public_id)
            out = {"session": p.public_id, "stage": p.stage, "progress": self._progress(s, p),
                   "practice_attempt": p.practice_attempt, "practice_attempts": self.settings_of(p).practice_attempts}
            served = None
            if p.stage in ("practice", "main"):
                block = self._block_trials(s, p)
                answered = self._answered_ids(s, block)
                pending = [t for t in block if t.id not in answered]
                if pending:
                    current = pending[0]
                    out["trial"] = self.payload(current)
                    out["trial"]["number"] = current.position + 1
                    out["trial"]["of"] = len(block)
                    upcoming = pending[1] if len(pending) > 1 else None
                    if upcoming is None and p.stage == "practice":
                        upcoming = self._first_main(s, p)
                    out["prefetch"] = self._urls(self.payload(upcoming)) if upcoming is not None else []
                    served = current.id
            stale = p.last_seen_at < utcnow() - dt.timedelta(seconds=30)
            pid = p.id
        if serve and (served is not None or stale):
            from sqlalchemy import func, update
            now = utcnow()
            with transaction(self.sessions) as s:
                if served is not None:      # the first serving stamps the time; every serving counts
                    s.execute(update(Trial).where(Trial.id == served)
                              .values(served_at=func.coalesce(Trial.served_at, now),
                                      serves=func.coalesce(Trial.serves, 0) + 1))
                s.execute(update(Participant).where(Participant.id == pid).values(last_seen_at=now))
        return out

    def _first_main(self, s, p: Participant) -> Trial | None:
        return s.scalars(select(Trial).where(Trial.participant_id == p.id, Trial.block == "main")
                         .order_by(Trial.position).limit(1)).first()

    def record_response(self, public_id: str, body: dict) -> dict:
        """Save one answer (idempotent by ``key``) and advance the session; return the feedback."""
        trial_id, choice, confidence, rt_ms, key = _parse_response(body)
        hidden_ms = _parse_hidden(body, rt_ms)
        with transaction(self.sessions) as s:
            p = self._participant(s, public_id, for_update=True)
            t = s.scalars(select(Trial).where(Trial.public_id == trial_id)).first()
            if t is None or t.participant_id != p.id:
                raise SurveyError(404, f"no trial {trial_id!r} in this session")
            previous = s.scalars(select(Response).where(Response.participant_id == p.id,
                                                        Response.idempotency_key == key)).first()
            if previous is not None:
                if previous.trial_id != t.id or previous.choice != choice or previous.confidence != confidence:
                    raise SurveyError(409, "this idempotency key was already used for a different answer")
                return self._feedback(s, p, t, previous, replayed=True)
            if s.scalars(select(Response.id).where(Response.trial_id == t.id)).first() is not None:
                raise SurveyError(409, "this trial was already answered")
            if p.stage not in ("practice", "main"):
                raise SurveyError(409, f"the session is at stage {p.stage!r}; no trial is open")
            block = self._block_trials(s, p)
            answered = self._answered_ids(s, block)
            pending = [x for x in block if x.id not in answered]
            if not pending or pending[0].id != t.id:
                raise SurveyError(409, "this is not the current trial; fetch the session state for the current one")
            settings = self.settings_of(p)
            if not p.is_machine and rt_ms - (hidden_ms or 0.0) < settings.min_response_ms:
                raise SurveyError(422, f"responses are accepted after {settings.min_response_ms} ms on screen "
                                       f"(rt_ms was {rt_ms:g}, hidden_ms {hidden_ms or 0:g})")
            now = utcnow()
            server_ms = (now - t.served_at).total_seconds() * 1000 if t.served_at else None
            if not p.is_machine and settings.check_server_time:
                _check_server_time(server_ms, rt_ms, settings.min_response_ms)
            r = Response(trial_id=t.id, participant_id=p.id, idempotency_key=key, choice=choice,
                         confidence=confidence, correct=(choice == t.max_position), rt_ms=rt_ms, server_ms=server_ms,
                         hidden_ms=hidden_ms, created_at=now)
            s.add(r)
            s.flush()
            p.last_seen_at = utcnow()
            if len(pending) == 1:
                self._finish_block(s, p, block, answered | {t.id})
            return self._feedback(s, p, t, r, replayed=False)

    def _feedback(self, s, p, t: Trial, r: Response, *, replayed: bool) -> dict:
        return {"trial": t.public_id, "correct": r.correct, "correct_position": t.max_position,
                "replayed": replayed, "stage": p.stage, "practice_attempt": p.practice_attempt,
                "progress": self._progress(s, p)}

    def _finish_block(self, s, p: Participant, block: list[Trial], answered_ids: set[int]) -> None:
        now, settings = utcnow(), self.settings_of(p)
        if p.stage == "practice":
            correct = s.scalars(select(Response.correct).where(Response.trial_id.in_(answered_ids))).all()
            if all(correct):
                p.stage = "main"
            elif p.practice_attempt < settings.practice_attempts:
                p.practice_attempt += 1
                s.add_all([Trial(public_id=secrets.token_urlsafe(12), participant_id=p.id, block="practice",
                                 attempt=p.practice_attempt, position=t.position, trial_type="practice",
                                 model_id=t.model_id, kind=t.kind, layer=t.layer, unit=t.unit, task=t.task,
                                 max_position=pos)
                            for t, pos in zip(block, assignment.balanced_positions(
                                len(block), assignment.make_rng(self.study_name, self.material.bank_hash, p.seed,
                                                                f"practice-positions-{p.practice_attempt}")))])
            else:
                p.stage, p.finished_at = "screened_out", now
            return
        p.stage, p.finished_at = "complete", now
        if not p.is_machine:
            answered = s.execute(select(Trial, Response).join(Response, Response.trial_id == Trial.id)
                                 .where(Trial.participant_id == p.id)).all()
            results = exclusions.evaluate(p, answered, settings)
            s.add_all([Exclusion(participant_id=p.id, rule=r.rule, value=r.value, passed=r.passed, reason=r.reason)
                       for r in results])
            p.excluded = not all(r.passed for r in results)

    def record_events(self, public_id: str, body) -> int:
        """Store browser events ``{"events": [{"kind", "detail", "t", "epoch_ms", "trial"}, ...]}`` (``t``: ms since
        the page loaded; ``epoch_ms``: the client's wall clock; ``trial``: the trial on screen); return how many."""
        events = body.get("events") if isinstance(body, dict) else None
        if not isinstance(events, list) or not 1 <= len(events) <= 100:
            raise SurveyError(400, "expected {\"events\": [...]} with 1 to 100 events")
        rows = []
        for e in events:
            if not isinstance(e, dict) or e.get("kind") not in EVENT_KINDS:
                raise SurveyError(400, f"each event needs a kind from {list(EVENT_KINDS)}")
            t, epoch = (_event_time(e, name) for name in ("t", "epoch_ms"))
            trial = e.get("trial")
            if trial is not None and not (isinstance(trial, str) and TRIAL_ID.match(trial)):
                raise SurveyError(400, "event 'trial' must be a trial id or null")
            try:
                detail = json.dumps(e.get("detail", ""), allow_nan=False)
            except (TypeError, ValueError):
                raise SurveyError(400, "event detail must be JSON without NaN or Infinity") from None
            if len(detail) > MAX_EVENT_DETAIL:
                raise SurveyError(400, f"event detail is {len(detail)} characters as JSON; at most {MAX_EVENT_DETAIL}")
            rows.append(dict(kind=e["kind"], detail=detail, client_ms=t, client_epoch_ms=epoch, trial=trial))
        with transaction(self.sessions) as s:
            p = self._participant(s, public_id)
            stored = s.scalar(select(func.count(Event.id)).where(Event.participant_id == p.id))
            if stored + len(rows) > MAX_EVENTS_PER_SESSION:
                raise SurveyError(429, f"this session has stored {stored} browser events, the most one session keeps "
                                       f"is {MAX_EVENTS_PER_SESSION}")
            s.add_all([Event(participant_id=p.id, **row) for row in rows])
            p.last_seen_at = utcnow()
        return len(rows)

    def delete_machine_sessions(self, observer: str) -> int:
        """Remove the machine sessions of ``observer`` with everything they stored (human data is never touched)."""
        from sqlalchemy import delete
        with transaction(self.sessions) as s:
            ids = list(s.scalars(select(Participant.id).where(Participant.is_machine.is_(True),
                                                               Participant.observer == observer)))
            if ids:
                trial_ids = select(Trial.id).where(Trial.participant_id.in_(ids))
                s.execute(delete(Response).where(Response.trial_id.in_(trial_ids)))
                for model in (Event, Exclusion, Trial):
                    s.execute(delete(model).where(model.participant_id.in_(ids)))
                s.execute(delete(Participant).where(Participant.id.in_(ids)))
            return len(ids)

    def completion(self, public_id: str) -> dict:
        with self.readers() as s:
            p = self._participant(s, public_id)
            return {"stage": p.stage, "excluded": p.excluded}


def _parse_hidden(body: dict, rt_ms: float) -> float | None:
    """The optional ``hidden_ms``: how much of ``rt_ms`` the trial was covered (an overlay, a hidden page)."""
    hidden = body.get("hidden_ms")
    if hidden is None:
        return None
    if isinstance(hidden, bool) or not isinstance(hidden, (int, float)) or not 0 <= hidden <= rt_ms:
        raise SurveyError(422, f"hidden_ms {hidden!r} must be a number of milliseconds in [0, rt_ms = {rt_ms:g}]")
    return float(hidden)


def _parse_response(body) -> tuple[str, str, int, float, str]:
    if not isinstance(body, dict):
        raise SurveyError(400, "expected a JSON object")
    missing = [k for k in ("trial", "choice", "confidence", "rt_ms", "key") if k not in body]
    if missing:
        raise SurveyError(400, f"missing field {missing[0]!r}; a response needs trial, choice, confidence, rt_ms, key")
    trial, choice, confidence, rt, key = (body[k] for k in ("trial", "choice", "confidence", "rt_ms", "key"))
    if not isinstance(trial, str) or not trial:
        raise SurveyError(400, "'trial' must be the trial id string")
    if choice not in ("upper", "lower"):
        raise SurveyError(422, f"choice {choice!r} is not valid; choose from ['lower', 'upper']")
    if isinstance(confidence, bool) or confidence not in (1, 2, 3):
        raise SurveyError(422, f"confidence {confidence!r} is not valid; choose from [1, 2, 3]")
    if isinstance(rt, bool) or not isinstance(rt, (int, float)) or not 0 <= rt < 3_600_000:
        raise SurveyError(422, f"rt_ms {rt!r} must be a number of milliseconds in [0, 3600000)")
    if not isinstance(key, str) or not KEY_PATTERN.match(key):
        raise SurveyError(400, "'key' (idempotency key) must be 8–64 characters of [A-Za-z0-9_.:-]")
    return trial, choice, int(confidence), float(rt), key
