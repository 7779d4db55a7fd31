"""The stimulus bank: content-addressed images and the manifest that gives them meaning (DESIGN §3).

Images are PNG files named by the sha256 of their bytes (``stimuli/images/<sha>.png``), so no file
name or URL reveals a unit, a side (max/min) or a rank, and an exemplar shared by several models is
stored once.  The meaning lives in ``stimuli/manifest.parquet``: one row per (model, unit, kind,
task, role, image).  Each finished (model, kind, unit) is first written as its own small part file,
so a rerun skips finished units and an interrupted run loses at most the unit in progress; the
manifest is assembled from the parts atomically.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from sparsight.files import atomic_write_bytes, atomic_write_text

MANIFEST_COLUMNS = ["model_id", "layer", "unit", "task", "role", "kind", "image", "source", "activation", "rank"]
#: Written by this bank, not required of other banks: the optimization steps behind a synthetic image (0 for
#: a natural one).
EXTRA_COLUMNS = ["steps"]
ROLES = ("query_max", "query_min", "ref_max", "ref_min")
KINDS = ("natural", "synthetic")
STATUS_COLUMNS = ["model_id", "kind", "layer", "unit", "status", "reason", "fv_reach", "fv_valid"]
_IMAGE_NAME = re.compile(r"^images/[0-9a-f]{64}\.png$")


def to_pil(image) -> Image.Image:
    """A PIL RGB image from a PIL image, a uint8 HWC array, or a CHW tensor in [0, 1] or uint8."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if type(image).__module__.startswith("torch"):   # a tensor (torch is not imported by readers of the bank)
        import torch
        t = image.detach().cpu()
        if t.dtype != torch.uint8:
            t = (t.float().clamp(0, 1) * 255).round().to(torch.uint8)
        image = t.permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(image), "RGB")


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _atomic_parquet(df: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


class StimulusBank:
    """Images and manifest parts under ``root`` (a study's ``stimuli/`` folder)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.images = self.root / "images"
        self.parts = self.root / "parts"

    # ---- images -------------------------------------------------------------------------
    def add_image(self, image) -> str:
        """Store ``image`` as PNG under its content hash; return the bank-relative path."""
        data = png_bytes(image)
        name = f"images/{hashlib.sha256(data).hexdigest()}.png"
        path = self.root / name
        if not path.exists():
            atomic_write_bytes(path, data)
        return name

    # ---- per-unit parts -----------------------------------------------------------------
    def part_path(self, model_id: str, kind: str, layer: str, unit: int) -> Path:
        return self.parts / model_id / kind / f"{layer}__{unit}.parquet"

    def is_done(self, model_id: str, kind: str, layer: str, unit: int) -> bool:
        return self.part_path(model_id, kind, layer, unit).is_file()

    def write_unit(self, model_id: str, kind: str, layer: str, unit: int, rows: list[dict]) -> Path:
        """Record one finished unit (its rows; an empty list records a skipped unit via ``status``)."""
        df = pd.DataFrame(rows, columns=MANIFEST_COLUMNS + EXTRA_COLUMNS)
        return _atomic_parquet(df, self.part_path(model_id, kind, layer, unit))

    def read_unit(self, model_id: str, kind: str, layer: str, unit: int) -> pd.DataFrame:
        return pd.read_parquet(self.part_path(model_id, kind, layer, unit))

    def write_status(self, model_id: str, rows: list[dict], *, merge: bool = False) -> Path:
        """Per model: every unit with status ``ok`` / ``dead`` / ``pruned`` and why; with ``merge`` these
        rows replace only the same (kind, layer, unit) rows of the stored table."""
        path = self.parts / model_id / "status.parquet"
        table = pd.DataFrame(rows, columns=STATUS_COLUMNS)
        if merge and path.is_file():     # replace rows in place, keep the stored order, append new units
            old = pd.read_parquet(path)
            key = lambda t: list(zip(t["kind"], t["layer"], t["unit"].astype(int)))  # noqa: E731
            fresh = dict(zip(key(table), table.to_dict("records")))
            rows = [fresh.pop(k, r) for k, r in zip(key(old), old.to_dict("records"))] + list(fresh.values())
            table = pd.DataFrame(rows, columns=STATUS_COLUMNS)
        return _atomic_parquet(table, path)

    def _unit_parts(self, model_id: str):
        """``(path, kind, layer, unit)`` of every stored part of ``model_id``."""
        for path in sorted((self.parts / model_id).glob("*/*.parquet")):
            layer, _, unit = path.stem.rpartition("__")
            yield path, path.parent.name, layer, int(unit)

    def drop_units(self, model_id: str, units, kinds) -> None:
        """Forget the parts of ``units`` × ``kinds`` of one model (to make them again)."""
        wanted = {(u.layer, u.unit) for u in units}
        for path, kind, layer, unit in self._unit_parts(model_id):
            if kind in kinds and (layer, unit) in wanted:
                path.unlink()

    def keep_only(self, model_id: str, units, kinds) -> None:
        """Drop the parts of one model that are not among ``units`` × ``kinds`` (the study's now)."""
        wanted = {(u.layer, u.unit) for u in units}
        for path, kind, layer, unit in self._unit_parts(model_id):
            if kind not in kinds or (layer, unit) not in wanted:
                path.unlink()
        status = self.parts / model_id / "status.parquet"
        if status.is_file():
            table = pd.read_parquet(status)
            keep = [k in kinds and (la, int(u)) in wanted for k, la, u in zip(table["kind"], table["layer"],
                                                                                table["unit"])]
            if not all(keep):
                _atomic_parquet(table[keep].reset_index(drop=True), status)

    # ---- the manifest -------------------------------------------------------------------
    def assemble(self, model_ids: list[str] | None = None) -> tuple[Path, Path]:
        """Write ``manifest.parquet`` and ``units.csv`` from the parts (of ``model_ids``, default all)."""
        present = sorted(p.name for p in self.parts.iterdir() if p.is_dir()) if self.parts.is_dir() else []
        models = model_ids if model_ids is not None else present
        frames, status = [], []
        for mid in models:
            frames += [pd.read_parquet(p) for p in sorted((self.parts / mid).glob("*/*.parquet"))]
            if (self.parts / mid / "status.parquet").is_file():
                status.append(pd.read_parquet(self.parts / mid / "status.parquet"))
        frames = [f for f in frames if len(f)]
        manifest = (pd.concat(frames, ignore_index=True) if frames
                    else pd.DataFrame(columns=MANIFEST_COLUMNS + EXTRA_COLUMNS))
        manifest["steps"] = (manifest["steps"] if "steps" in manifest else pd.Series(0, index=manifest.index)) \
            .fillna(0).astype("int64")
        manifest = manifest.sort_values(["model_id", "kind", "layer", "unit", "task", "role", "rank"],
                                        kind="stable", ignore_index=True)
        manifest["unit"] = manifest["unit"].astype("int64")
        manifest["task"] = manifest["task"].astype("int64")
        manifest["rank"] = manifest["rank"].astype("int64")
        manifest["activation"] = manifest["activation"].astype("float64")
        validate_manifest(manifest, self.root)
        out = _atomic_parquet(manifest, self.root / "manifest.parquet")
        units = pd.concat(status, ignore_index=True) if status else pd.DataFrame(columns=STATUS_COLUMNS)
        units = units.reindex(columns=STATUS_COLUMNS)
        units_csv = atomic_write_text(self.root / "units.csv", units.to_csv(index=False))
        return out, units_csv

    def manifest(self) -> pd.DataFrame:
        path = self.root / "manifest.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"no stimulus manifest at {path}; run `sparsight stimuli` first")
        return pd.read_parquet(path)


def validate_manifest(df: pd.DataFrame, root: str | os.PathLike | None = None) -> None:
    """Check the DESIGN §3 contract: columns, roles, kinds, one query per side per task, K refs, names."""
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"manifest lacks columns {missing}; required: {MANIFEST_COLUMNS}")
    if len(df) == 0:
        return
    bad_roles = sorted(set(df["role"]) - set(ROLES))
    if bad_roles:
        raise ValueError(f"manifest has unknown roles {bad_roles}; valid: {list(ROLES)}")
    bad_kinds = sorted(set(df["kind"]) - set(KINDS))
    if bad_kinds:
        raise ValueError(f"manifest has unknown kinds {bad_kinds}; valid: {list(KINDS)}")
    bad_names = [n for n in df["image"].unique() if not _IMAGE_NAME.match(n)]
    if bad_names:
        raise ValueError(f"image {bad_names[0]!r} is not content-addressed (images/<sha256>.png)")
    counts = df.groupby(["model_id", "kind", "layer", "unit", "task", "role"]).size().unstack(fill_value=0)
    for role in ROLES:
        if role not in counts.columns:
            raise ValueError(f"manifest has no {role!r} rows")
    if not ((counts["query_max"] == 1) & (counts["query_min"] == 1)).all():
        raise ValueError("every task needs exactly one max query and one min query")
    if not (counts["ref_max"] == counts["ref_min"]).all() or (counts["ref_max"] == 0).any():
        raise ValueError("every task needs the same positive number of max and min references")
    if root is not None:
        absent = [n for n in df["image"].unique() if not (Path(root) / n).is_file()]
        if absent:
            raise ValueError(f"manifest names {len(absent)} images missing from {root}, e.g. {absent[0]}")
