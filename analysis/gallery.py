"""A unit gallery: what pruning did to a unit's stimuli, one contact sheet per unit.

Each sheet shows one unit's max references (task 0) — natural exemplars and feature visualizations —
with one row per method (and reference kind) and one column per pruning rate, the base model first.
The units are drawn (seeded) from those with references in every model, so every cell is filled
where the unit is alive; a dead or removed unit leaves its cell grey.  Under each cell of feature
visualizations stands their reach (``stimuli/units.csv``: how hard they drive the unit relative to its
natural max references), red where they are not valid, so noise that does not drive its unit is not
read as what the unit responds to.
"""
from __future__ import annotations

import random
from pathlib import Path

import pandas as pd
from PIL import Image

from sparsight.config import CONTROL_METHOD
from sparsight.layout import Layout

from .load import BASE_METHOD

MAX_TILE, GAP, DPI = 96, 2, 100      # a reference is shown at its own size up to MAX_TILE pixels
INVALID_COLOUR = "firebrick"


def gallery_units(manifest: pd.DataFrame, n: int = 3, seed: int = 0) -> list[tuple[str, int]]:
    """``n`` units (layer, unit) with synthetic (else natural) references in the most models (seeded ties)."""
    if manifest.empty:
        return []
    kinds = set(manifest["kind"])
    kind = "synthetic" if "synthetic" in kinds else "natural"
    per_unit = manifest[manifest["kind"] == kind].groupby(["layer", "unit"])["model_id"].nunique()
    rng = random.Random(f"{seed}:gallery")
    order = rng.sample(sorted(per_unit.index), len(per_unit))       # ties in a seeded order
    chosen = sorted(order, key=lambda u: -per_unit[u])[:n]
    return sorted((str(layer), int(unit)) for layer, unit in chosen)


def tile_size(manifest: pd.DataFrame, bank_root: Path) -> int:
    """The side of one reference in a sheet: the stimuli's own size, at most :data:`MAX_TILE` pixels."""
    first = manifest.loc[manifest["role"] == "ref_max", "image"]
    if first.empty:
        return MAX_TILE
    with Image.open(bank_root / first.iloc[0]) as img:
        return min(MAX_TILE, max(img.size))


def _references(manifest: pd.DataFrame, bank_root: Path, model_id: str, kind: str, layer: str, unit: int,
                k: int, tile: int) -> Image.Image:
    rows = manifest[(manifest["model_id"] == model_id) & (manifest["kind"] == kind) & (manifest["layer"] == layer)
                    & (manifest["unit"] == unit) & (manifest["task"] == 0) & (manifest["role"] == "ref_max")]
    cell = Image.new("RGB", (k * tile + (k - 1) * GAP, tile), (200, 200, 200))
    for i, name in enumerate(rows.sort_values("rank")["image"].head(k)):
        img = Image.open(bank_root / name).convert("RGB")
        if img.size != (tile, tile):
            img = img.resize((tile, tile), Image.Resampling.LANCZOS)
        cell.paste(img, (i * (tile + GAP), 0))
    return cell


def visualization_reach(unit_status: pd.DataFrame) -> dict[tuple[str, str, int], tuple[float, bool]]:
    """``{(model_id, layer, unit): (fv_reach, fv_valid)}`` of the synthetic rows of ``stimuli/units.csv``."""
    if unit_status.empty or "fv_reach" not in unit_status:
        return {}
    rows = unit_status[(unit_status["kind"] == "synthetic") & unit_status["fv_reach"].notna()]
    return {(str(r.model_id), str(r.layer), int(r.unit)): (float(r.fv_reach), str(r.fv_valid).lower() == "true")
            for r in rows.itertuples()}


def reach_label(reach: dict, model_id: str, layer: str, unit: int) -> tuple[str, str] | None:
    """``(text, colour)`` under a cell of feature visualizations, or None where the reach is unknown."""
    if (model_id, layer, unit) not in reach:
        return None
    value, valid = reach[(model_id, layer, unit)]
    return (f"reach {value:.2f}", "black") if valid else (f"reach {value:.2f} · not valid", INVALID_COLOUR)


def unit_sheet(manifest: pd.DataFrame, models: pd.DataFrame, bank_root: str | Path, layer: str, unit: int, out: Path,
               schedule: str | None = None, reach: dict | None = None) -> Path:
    """Write the contact sheet of one unit to ``out`` (rows: method × kind; columns: rate); ``reach``
    (from :func:`visualization_reach`) labels each cell of feature visualizations."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bank_root = Path(bank_root)
    kinds = [k for k in ("natural", "synthetic") if k in set(manifest["kind"])]
    k = int(manifest[(manifest["role"] == "ref_max")].groupby(["model_id", "kind", "layer", "unit", "task"])
            .size().max())
    pruned = models[~models["method"].isin([BASE_METHOD, CONTROL_METHOD])]     # rows of methods that prune
    schedules = sorted(pruned["schedule"].dropna().unique(), key=lambda x: (x != "oneshot", x))
    schedule = schedule or (schedules or [""])[0]
    pruned = pruned[pruned["schedule"] == schedule] if schedule else pruned
    base = models.loc[models["method"] == BASE_METHOD, "model_id"].tolist()
    rates = sorted(pruned["rate"].unique())
    methods = sorted(pruned["method"].unique())
    rows = [(m, kind) for m in methods for kind in kinds]
    tile = tile_size(manifest, bank_root)
    width, height = (k * tile + (k - 1) * GAP) / DPI, tile / DPI          # one cell at one image pixel per pixel
    fig, axes = plt.subplots(len(rows), len(rates) + 1, squeeze=False,
                             figsize=(1.3 + (width + 0.15) * (len(rates) + 1), (height + 0.35) * len(rows) + 0.5))
    for r, (method, kind) in enumerate(rows):
        for c, rate in enumerate([0.0] + rates):
            ids = base if c == 0 else pruned.loc[(pruned["method"] == method) & (pruned["rate"] == rate),
                                                 "model_id"].tolist()
            ax = axes[r][c]
            ax.imshow(_references(manifest, bank_root, ids[0], kind, layer, unit, k, tile) if ids
                      else Image.new("RGB", (tile, tile), (200, 200, 200)))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("base" if c == 0 else f"rate {rate:g}", fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{method}\n{kind}", fontsize=8.5, rotation=0, ha="right", va="center")
            label = reach_label(reach or {}, ids[0], layer, unit) if ids and kind == "synthetic" else None
            if label:
                ax.set_xlabel(label[0], fontsize=7.5, labelpad=1, color=label[1])
    fig.suptitle(f"{layer}:{unit} — max references of task 0 ({schedule or 'all'} schedule)", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def make_gallery(run_dir: str | Path, models: pd.DataFrame, out: Path, n: int = 3, seed: int = 0) -> dict[str, Path]:
    """``{"gallery:<layer>:<unit>": sheet}`` for up to ``n`` units of the study's stimulus bank."""
    path = Layout(run_dir).manifest
    if not path.is_file() or models.empty or "method" not in models:
        return {}
    manifest = pd.read_parquet(path)
    known = set(models["model_id"])
    manifest = manifest[manifest["model_id"].isin(known)]
    chosen = gallery_units(manifest, n, seed)
    status = Layout(run_dir).stimulus_units
    reach = visualization_reach(pd.read_csv(status)) if status.is_file() else {}
    keys = pd.MultiIndex.from_frame(manifest[["layer", "unit"]])
    manifest = manifest[keys.isin(chosen) & (manifest["task"] == 0) & (manifest["role"] == "ref_max")]
    return {f"gallery:{layer}:{unit}": unit_sheet(manifest, models, Layout(run_dir).stimuli, layer, unit,
                                                  out / f"gallery-{layer}-{unit}.png", reach=reach)
            for layer, unit in chosen}
