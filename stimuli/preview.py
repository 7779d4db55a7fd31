"""A contact sheet of one task, laid out as participants see it (IMI): min references left, the two
queries in the centre (in a seeded random order), max references right."""
from __future__ import annotations

import math
import random
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw

from sparsight.errors import closest
from sparsight.files import atomic_write_bytes

TILE, GAP, MARGIN, HEADER, TITLE = 96, 6, 16, 28, 18
#: References per row on the survey's trial page (``survey.css``: ``.grid``), which the sheets here copy.
TRIAL_COLUMNS = 3


def image_grid(images: list, cols: int = TRIAL_COLUMNS, tile: int = TILE, gap: int = GAP) -> Image.Image:
    """``images`` (PIL images or paths) as ``tile``-pixel squares, ``cols`` per row, rows as many as needed."""
    rows = math.ceil(len(images) / cols)
    sheet = Image.new("RGB", (cols * tile + (cols - 1) * gap, rows * tile + (rows - 1) * gap), "white")
    for i, image in enumerate(images):
        image = image if isinstance(image, Image.Image) else Image.open(image)
        image = image.convert("RGB").resize((tile, tile), Image.Resampling.BICUBIC)
        sheet.paste(image, ((i % cols) * (tile + gap), (i // cols) * (tile + gap)))
    return sheet


def _numbers(values) -> str:
    """Sorted integers as runs: ``[0, 1, 2, 5, 7, 8]`` → ``"0-2, 5, 7-8"``."""
    runs: list[list[int]] = []
    for v in sorted({int(v) for v in values}):
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def _missing_task(have: pd.DataFrame, model_id: str, layer: str, unit: int, task: int, kind: str) -> str:
    """Why ``have`` (one kind's manifest rows) holds no such task: the first of model, layer, unit, task that
    has none, with what there is instead."""
    what = f"no {kind} stimuli for {model_id} {layer}:{unit} task {task}"
    model_rows = have[have.model_id == model_id]
    if model_rows.empty:
        models = sorted(have.model_id.unique())
        return f"{what}: model {model_id!r} has none; models with {kind} stimuli: {models}{closest(model_id, models)}"
    layer_rows = model_rows[model_rows.layer == layer]
    if layer_rows.empty:
        layers = sorted(model_rows.layer.unique())
        return f"{what}: layer {layer!r} has none; layers with {kind} stimuli: {layers}{closest(layer, layers)}"
    unit_rows = layer_rows[layer_rows.unit == unit]
    if unit_rows.empty:
        return f"{what}: units of {layer} with {kind} stimuli: {_numbers(layer_rows.unit)}"
    return f"{what}: tasks of this unit: {_numbers(unit_rows.task)}"


def _unit_status(root: Path, model_id: str, layer: str, unit: int, kind: str) -> str | None:
    """Why the bank holds no stimuli of a unit it recorded as dead, pruned or skipped (``units.csv``), else None."""
    path = root / "units.csv"
    if not path.is_file() or path.stat().st_size < 2:
        return None
    status = pd.read_csv(path, keep_default_na=False)
    hit = status[(status.model_id == model_id) & (status.layer == layer) & (status.unit == unit)
                 & (status.kind == kind) & (status.status != "ok")]
    if hit.empty:
        return None
    row = hit.iloc[0]
    return (f"no {kind} stimuli for {model_id} {layer}:{unit}: the unit is {row['status']} in this model"
            f"{f' ({row.reason})' if row.get('reason') else ''}")


def task_sheet(manifest: pd.DataFrame, bank_root: str | Path, *, model_id: str, layer: str, unit: int, task: int = 0,
               kind: str = "natural", seed: int = 0) -> tuple[Image.Image, list[str]]:
    """The sheet image and the query order shown (e.g. ``['query_min', 'query_max']`` top to bottom)."""
    rows = manifest[(manifest.model_id == model_id) & (manifest.layer == layer) & (manifest.unit == unit)
                    & (manifest.task == task) & (manifest.kind == kind)]
    root = Path(bank_root)
    if rows.empty:
        why = _unit_status(root, model_id, layer, unit, kind)
        raise ValueError(why or _missing_task(manifest[manifest.kind == kind], model_id, layer, unit, task, kind))

    def paths(role):
        sel = rows[rows.role == role].sort_values("rank")
        return [root / p for p in sel.image]
    order = ["query_max", "query_min"]
    random.Random(f"{seed}:{model_id}:{layer}:{unit}:{task}").shuffle(order)
    left, right = image_grid(paths("ref_min")), image_grid(paths("ref_max"))
    centre = image_grid([paths(role)[0] for role in order], 1)
    width = left.width + centre.width + right.width + 4 * MARGIN
    height = max(left.height, centre.height, right.height) + 2 * MARGIN + HEADER + TITLE
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((MARGIN, MARGIN // 2), f"{model_id} · {layer}:{unit} · task {task} · {kind} references", fill="black")
    x = MARGIN
    for title, part in (("min references", left), ("queries", centre), ("max references", right)):
        draw.text((x, MARGIN // 2 + TITLE), title, fill="black")
        sheet.paste(part, (x, MARGIN + HEADER + TITLE + (max(left.height, right.height) - part.height) // 2))
        x += part.width + MARGIN
    return sheet, order


def write_preview(manifest: pd.DataFrame, bank_root: str | Path, out: str | Path, **kw) -> list[str]:
    import io

    sheet, order = task_sheet(manifest, bank_root, **kw)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(Path(out), buf.getvalue())
    return order
