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
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from sparsight.files import atomic_write, atomic_write_bytes, atomic_write_frame, atomic_write_text
from sparsight.layout import MANIFEST_FILE, UNITS_FILE

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


def _atomic_parquet(df: pd.DataFrame, path: Path, units: dict[str, list[int]] | None = None) -> Path:
    """Write ``df`` to ``path`` atomically; ``units`` (layer → units) is kept in the file's metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if units is None:
        return atomic_write_frame(df, path)
    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = {**(table.schema.metadata or {}), _UNITS_KEY: json.dumps(units).encode()}
    with atomic_write(path) as tmp:
        pq.write_table(table.replace_schema_metadata(meta), tmp)
    return path


_UNITS_KEY = b"sparsight.units"


def _part_units(path: Path) -> list[tuple[str, int]]:
    """The (layer, unit) pairs one part file records: its name's, or the list in its metadata."""
    layer, _, tail = path.stem.rpartition("__")
    if not tail.startswith("set-"):
        return [(layer, int(tail))]
    import pyarrow.parquet as pq

    units = json.loads(pq.read_schema(path).metadata[_UNITS_KEY])
    return [(la, int(u)) for la, us in units.items() for u in us]


class StimulusBank:
    """Images and manifest parts under ``root`` (a study's ``stimuli/`` folder)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.images = self.root / "images"
        self.parts = self.root / "parts"
        self._indexes: dict[tuple[str, str], dict[tuple[str, int], Path]] = {}

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

    def _set_path(self, model_id: str, kind: str, layer: str, units: list[int]) -> Path:
        digest = hashlib.sha256(",".join(map(str, units)).encode()).hexdigest()[:12]
        return self.parts / model_id / kind / f"{layer}__set-{digest}.parquet"

    def _index(self, model_id: str, kind: str) -> dict[tuple[str, int], Path]:
        """(layer, unit) → the part file holding it, for one model and kind (read once, then kept)."""
        key = (model_id, kind)
        if key not in self._indexes:
            index = {}
            for path in sorted((self.parts / model_id / kind).glob("*.parquet")):
                for layer, unit in _part_units(path):
                    index[(layer, unit)] = path
            self._indexes[key] = index
        return self._indexes[key]

    def is_done(self, model_id: str, kind: str, layer: str, unit: int) -> bool:
        return self.part_path(model_id, kind, layer, unit).is_file() or (layer, unit) in self._index(model_id, kind)

    def write_unit(self, model_id: str, kind: str, layer: str, unit: int, rows: list[dict]) -> Path:
        """Record one finished unit (its rows; an empty list records a skipped unit via ``status``)."""
        df = pd.DataFrame(rows, columns=MANIFEST_COLUMNS + EXTRA_COLUMNS)
        path = _atomic_parquet(df, self.part_path(model_id, kind, layer, unit))
        self._indexes.get((model_id, kind), {})[(layer, unit)] = path
        return path

    def write_units(self, model_id: str, kind: str, layer: str, rows_of: dict[int, list[dict]]) -> Path | None:
        """Record several finished units of one layer in one part file (cheap units such as exemplars:
        one file per unit would cost more than making them).  The file names its units in its metadata,
        so a unit without rows (a skipped one) is recorded too."""
        units = sorted(rows_of)
        if not units:
            return None
        df = pd.DataFrame([r for u in units for r in rows_of[u]], columns=MANIFEST_COLUMNS + EXTRA_COLUMNS)
        path = _atomic_parquet(df, self._set_path(model_id, kind, layer, units), units={layer: units})
        index = self._indexes.get((model_id, kind))
        if index is not None:
            index.update({(layer, u): path for u in units})
        return path

    def read_unit(self, model_id: str, kind: str, layer: str, unit: int) -> pd.DataFrame:
        own = self.part_path(model_id, kind, layer, unit)
        path = own if own.is_file() else self._index(model_id, kind).get((layer, unit), own)
        table = pd.read_parquet(path)
        return table if path == own else table[(table["layer"] == layer) & (table["unit"] == unit)] \
            .reset_index(drop=True)

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

    def _forget(self, model_id: str, drop) -> None:
        """Remove every stored unit of one model for which ``drop(kind, layer, unit)`` holds."""
        for path in sorted((self.parts / model_id).glob("*/*.parquet")):
            kind, units = path.parent.name, _part_units(path)
            gone = [(layer, unit) for layer, unit in units if drop(kind, layer, unit)]
            if not gone:
                continue
            if len(gone) == len(units):
                path.unlink()
            else:           # a part holding several units of one layer: keep the others
                gone, layer = set(gone), units[0][0]
                table = pd.read_parquet(path)
                keep = [(la, int(u)) not in gone for la, u in zip(table["layer"], table["unit"])]
                left = sorted(u for la, u in units if (la, u) not in gone)
                path.unlink()
                _atomic_parquet(table[keep].reset_index(drop=True), self._set_path(model_id, kind, layer, left),
                                units={layer: left})
        for key in [k for k in self._indexes if k[0] == model_id]:
            del self._indexes[key]

    def drop_units(self, model_id: str, units, kinds) -> None:
        """Forget the parts of ``units`` × ``kinds`` of one model (to make them again)."""
        wanted = {(u.layer, u.unit) for u in units}
        self._forget(model_id, lambda kind, layer, unit: kind in kinds and (layer, unit) in wanted)

    def keep_only(self, model_id: str, units_of: dict) -> None:
        """Drop the parts and status rows of one model that are not the study's now (``units_of``:
        kind → the units of that kind)."""
        wanted = {kind: {(u.layer, u.unit) for u in units} for kind, units in units_of.items()}
        self._forget(model_id, lambda kind, layer, unit: (layer, unit) not in wanted.get(kind, ()))
        status = self.parts / model_id / "status.parquet"
        if status.is_file():
            table = pd.read_parquet(status)
            keep = [(la, int(u)) in wanted.get(k, ()) for k, la, u in zip(table["kind"], table["layer"],
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
        out = _atomic_parquet(manifest, self.root / MANIFEST_FILE)
        units = pd.concat(status, ignore_index=True) if status else pd.DataFrame(columns=STATUS_COLUMNS)
        units = units.reindex(columns=STATUS_COLUMNS)
        units_csv = atomic_write_text(self.root / UNITS_FILE, units.to_csv(index=False))
        return out, units_csv

    def manifest(self) -> pd.DataFrame:
        path = self.root / MANIFEST_FILE
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
