"""Which exceptions are the user's to fix, and the one line that tells them so.

The command line (``sparsight.cli``) prints these as ``Error: …`` without a traceback; anything else
is a bug and keeps its traceback.
"""
from __future__ import annotations

import pickle


class NotKnownWhilePlanning(Exception):
    """Raised by a stage's ``inputs`` under ``--plan`` when knowing them would mean connecting to a
    service (e.g. a database server); the plan then says the stage may run, and why."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _database_message(err) -> str:
    url = getattr(err, "url", None) or ""
    cause = getattr(err, "orig", None) or err
    first = _one_line(str(cause).split("\n")[0]) if str(cause) else type(cause).__name__
    where = f" {url}" if url else ""
    return (f"cannot use the survey database{where}: {first}; check that the server runs and the URL "
            f"(--database, survey.database or SPARSIGHT_DATABASE_URL) is right")


def user_error_message(err: BaseException) -> str | None:
    """The one-line message for an error the user can fix, ``None`` for a bug."""
    module = type(err).__module__ or ""
    if module.startswith("sqlalchemy"):
        name = type(err).__name__
        if name in ("OperationalError", "InterfaceError", "ArgumentError", "NoSuchModuleError", "ProgrammingError",
                    "DatabaseError"):
            return _database_message(err)
        return None
    if isinstance(err, pickle.UnpicklingError):
        return f"not a readable file of this kind: {_one_line(err)}"
    if isinstance(err, FileNotFoundError):
        what = err.filename or ""
        detail = err.strerror if err.filename else str(err)
        return _one_line(f"{detail}: {what}" if what else detail)
    if isinstance(err, PermissionError):
        return _one_line(f"permission denied: {err.filename or err}; check the file's owner and mode")
    if isinstance(err, (ValueError, OSError)):    # ConfigError, PruningError, WeightsError, ProbeError, …
        return _one_line(err) or type(err).__name__
    return None
