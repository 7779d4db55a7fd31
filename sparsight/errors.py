"""Which exceptions are the user's to fix, and the one line that tells them so.

The command line (``sparsight.cli``) prints these as ``Error: …`` without a traceback; anything else
is a bug and keeps its traceback.
"""
from __future__ import annotations

import difflib
import pickle
from typing import Iterable


class UserError(Exception):
    """Mixed into an error the user can fix whose builtin base says otherwise (e.g. a RuntimeError:
    a corrupt image, a device that is not there); the command line prints it as one line."""


class NotKnownWhilePlanning(Exception):
    """Raised by a stage's ``inputs`` under ``--plan`` when knowing them would mean connecting to a
    service (e.g. a database server); the plan then says the stage may run, and why."""


def closest(name: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` when some of ``choices`` are spelled like ``name``, else ``""``."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(map(repr, close))}?" if close else ""


def module_choices(names: Iterable[str], limit: int = 40) -> str:
    """Dotted module names for an error: all of them up to ``limit``; beyond it the top-level ones (each
    of which stands for its submodules), so that a deep network's list stays readable."""
    names = [n for n in names if n]
    top = [n for n in names if "." not in n]
    if len(names) <= limit or not top:
        return str(names)
    example = next(n for n in names if "." in n)
    return f"{top} and their submodules (e.g. {example!r}; {len(names)} in all)"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _original_message(err: BaseException) -> str:
    """The message an error had where it was raised: a DataLoader worker re-raises it in the main process
    as "Caught X in DataLoader worker process N. Original Traceback … X: message"."""
    text = str(err)
    if not text.startswith("Caught ") or "Original Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    prefix = f"{type(err).__module__}.{type(err).__qualname__}: "
    for head in (prefix, f"{type(err).__qualname__}: "):
        if last.startswith(head):
            return last[len(head):]
    return last


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
    if isinstance(err, UserError):
        return _one_line(_original_message(err)) or type(err).__name__
    if isinstance(err, pickle.UnpicklingError):
        return f"not a readable file of this kind: {_one_line(err)}"
    if isinstance(err, FileNotFoundError):
        what = err.filename or ""
        detail = err.strerror if err.filename else str(err)
        return _one_line(f"{detail}: {what}" if what else detail)
    if isinstance(err, PermissionError):
        return _one_line(f"permission denied: {err.filename or err}; check the file's owner and mode")
    if isinstance(err, (ValueError, OSError)):    # ConfigError, PruningError, WeightsError, ProbeError, …
        return _one_line(_original_message(err)) or type(err).__name__
    return None
