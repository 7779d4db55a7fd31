"""A contact sheet of one task, laid out as participants see it (IMI): min references left, the two
queries in the centre (in a seeded random order), max references right."""
from __future__ import annotations

import math
import random
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw

from sparsight.files import atomic_write_bytes

TILE, GAP, MARGIN, HEADER = 96, 6, 16, 28


def _grid(paths: list[Path], cols: int) -> Image.Image:
    rows = math.ceil(len(paths) / cols)
    sheet = Image.new("RGB", (cols * TILE + (cols - 1) * GAP, rows * TILE + (rows - 1) * GAP), "white")
    for i, p in enumerate(paths):
        img = Image.open(p).convert("RGB").resize((TILE, TILE), Image.Resampling.BICUBIC)
        sheet.paste(img, ((i % cols) * (TILE + GAP), (i // cols) * (TILE + GAP)))
    return sheet


def task_sheet(manifest: pd.DataFrame, bank_root: str | Path, *, model_id: str, layer: str, unit: int, task: int = 0,
               kind: str = "natural", seed: int = 0) -> tuple[Image.Image, list[str]]:
    """The sheet image and the query order shown (e.g. ``['query_min', 'query_max']`` top to bottom)."""
    rows = manifest[(manifest.model_id == model_id) & (manifest.layer == layer) & (manifest.unit == unit)
                    & (manifest.task == task) & (manifest.kind == kind)]
    if rows.empty:
        have = manifest[(manifest.model_id == model_id) & (manifest.kind == kind)]
        units = sorted({f"{r.layer}:{r.unit}" for r in have.itertuples()})[:20]
        raise ValueError(f"no {kind} task {task} for {model_id} {layer}:{unit}; units with stimuli: {units}")
    root = Path(bank_root)

    def paths(role):
        sel = rows[rows.role == role].sort_values("rank")
        return [root / p for p in sel.image]
    order = ["query_max", "query_min"]
    random.Random(f"{seed}:{model_id}:{layer}:{unit}:{task}").shuffle(order)
    cols = math.ceil(math.sqrt(len(paths("ref_max"))))
    left, right = _grid(paths("ref_min"), cols), _grid(paths("ref_max"), cols)
    centre = _grid([paths(role)[0] for role in order], 1)
    width = left.width + centre.width + right.width + 4 * MARGIN
    height = max(left.height, centre.height, right.height) + 2 * MARGIN + HEADER
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    x = MARGIN
    for title, part in (("min references", left), ("queries", centre), ("max references", right)):
        draw.text((x, MARGIN // 2), title, fill="black")
        sheet.paste(part, (x, MARGIN + HEADER + (max(left.height, right.height) - part.height) // 2))
        x += part.width + MARGIN
    return sheet, order


def write_preview(manifest: pd.DataFrame, bank_root: str | Path, out: str | Path, **kw) -> list[str]:
    import io

    sheet, order = task_sheet(manifest, bank_root, **kw)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(Path(out), buf.getvalue())
    return order
