"""The instructions' example screenshot: one task from the bank drawn in the trial layout, the query
that matches the right examples framed green."""
from __future__ import annotations

import io

from PIL import Image, ImageDraw, ImageFont

from stimuli.preview import image_grid

from .assignment import example_task
from .material import Material
from .screen import GRID_COLUMNS

TILE, GAP, PAD, HEAD = 88, 6, 18, 34
GREEN, GREY = (22, 150, 60), (90, 90, 90)


def _grid(material: Material, images: tuple[str, ...] | list[str], cols: int = GRID_COLUMNS) -> Image.Image:
    """Bank images as the trial page lays them out (``GRID_COLUMNS`` per row)."""
    return image_grid([material.image_path(name) for name in images], cols, TILE, GAP)


def example_png(material: Material) -> bytes:
    """PNG bytes of an example trial (:func:`~survey_app.assignment.example_task`; the answer is the upper image)."""
    item, index = example_task(material)
    task = material.tasks[item][index]
    left, right = _grid(material, task.ref_min), _grid(material, task.ref_max)
    centre = _grid(material, [task.query_max, task.query_min], cols=1)
    body = max(left.height, right.height, centre.height)
    width = left.width + right.width + TILE + 4 * PAD + 2 * GAP
    sheet = Image.new("RGB", (width, body + HEAD + 2 * PAD), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=15)      # Pillow's scalable font where FreeType is present
    x = PAD
    for title, part in (("Left examples", left), ("Centre", centre), ("Right examples", right)):
        draw.text((x, PAD // 2), title, fill=GREY, font=font)
        y = HEAD + PAD + (body - part.height) // 2
        sheet.paste(part, (x, y))
        if part is centre:
            draw.rectangle((x - 4, y - 4, x + TILE + 3, y + TILE + 3), outline=GREEN, width=4)
        x += part.width + PAD + GAP
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()
