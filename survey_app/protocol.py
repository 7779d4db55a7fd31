"""The survey settings a participant was assigned under, stored with the participant.

A server may be restarted with other settings (``sparsight serve --set``, an edited study file) while a
study runs; each participant keeps the settings of their assignment, which judge their own session
(timing checks, practice, exclusions) and which the exports name as a short ``protocol`` id.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json

#: Settings that say where the server keeps its data, not what a participant does (the database URL may
#: hold a password): left out of the record.
NOT_PROTOCOL = ("database",)


def settings_record(settings) -> str:
    """The survey settings as stored with a participant: sorted JSON of every setting but :data:`NOT_PROTOCOL`."""
    values = {k: v for k, v in dataclasses.asdict(settings).items() if k not in NOT_PROTOCOL}
    return json.dumps(values, sort_keys=True)


@functools.lru_cache(maxsize=256)       # called once per exported response: one record per participant
def protocol_id(record: str | None) -> str | None:
    """The first 12 hex digits of the record's SHA-256 (None for a participant stored without a record)."""
    return None if not record else hashlib.sha256(record.encode()).hexdigest()[:12]


def settings_from(record: str | None, fallback):
    """The settings of ``record`` (a participant's); ``fallback`` (the server's) for a participant stored
    without one, and for any setting the record predates."""
    if not record:
        return fallback
    known = {f.name for f in dataclasses.fields(fallback)}
    return dataclasses.replace(fallback, **{k: v for k, v in json.loads(record).items() if k in known})
