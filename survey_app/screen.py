"""The smallest browser window a trial fits in, from the study's display sizes.

The trial page (``trials.html`` with ``survey.css``) sets its images at fixed CSS sizes, so the room it
needs follows from ``reference_px``, ``query_px`` and the references per side.  The constants below
are the page's own (gaps, frames, paddings) and its text rows as measured in Chromium, with some room
for fonts that run taller.  The consent page and ``sparsight serve`` quote these numbers; the trial page
measures the trial on screen itself.
"""
from __future__ import annotations

import math

from stimuli.preview import TRIAL_COLUMNS

GRID_COLUMNS = TRIAL_COLUMNS    # .grid: references per row (the stimulus previews draw the same)
GRID_GAP = 6            # .grid gap
QUERY_FRAME = 6         # .query border, each side
QUERY_GAP = 14          # .queries gap
LAYOUT_GAP = 32         # .layout gap (2rem), between the three columns
PAGE_PADDING_X = 16     # .trial-page left and right padding (1rem)
HEADING = 26            # "Left examples" above a grid
ABOVE_AND_BELOW = 205   # progress bar, prompt, answer rows and the bottom padding kept for the status line
SLACK = 16              # room for fonts that run taller than Chromium's defaults


def trial_window(reference_px: int, query_px: int, refs_per_side: int) -> tuple[int, int]:
    """``(width, height)`` in CSS pixels that a trial needs to be shown whole, without scrolling."""
    columns = GRID_COLUMNS                  # the grid keeps its columns however few references fill them
    rows = max(1, math.ceil(refs_per_side / GRID_COLUMNS))
    grid_w = columns * reference_px + (columns - 1) * GRID_GAP
    query = query_px + 2 * QUERY_FRAME
    width = 2 * grid_w + query + 2 * LAYOUT_GAP + 2 * PAGE_PADDING_X
    grids_h = HEADING + rows * reference_px + (rows - 1) * GRID_GAP
    height = ABOVE_AND_BELOW + max(grids_h, 2 * query + QUERY_GAP) + SLACK
    return width + SLACK, height


def minimum_window(settings, refs_per_side: int) -> tuple[int, int]:
    """The window a participant must have: the configured minimum, raised to what a trial needs."""
    width, height = trial_window(settings.reference_px, settings.query_px, refs_per_side)
    return max(settings.min_window_width, width), max(settings.min_window_height, height)
