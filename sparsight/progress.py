"""Progress bars on a terminal only.

A bar redraws itself with ``\\r`` many times a second: on a terminal that is a bar, in a log file it is
megabytes of noise.  So bars appear only when standard error is a terminal; without one, the stages
print a line per stage, per epoch and per model instead (``note``).
"""
from __future__ import annotations

import sys

from tqdm import tqdm


def on_terminal() -> bool:
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None) and stream.isatty())


def progress_bar(iterable=None, *, enabled: bool = True, **kwargs) -> tqdm:
    """A tqdm bar, shown only when ``enabled`` and standard error is a terminal."""
    return tqdm(iterable, disable=not (enabled and on_terminal()), **kwargs)


def note(message: str) -> None:
    """One line of progress that does not break a bar being drawn."""
    tqdm.write(message)
