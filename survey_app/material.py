"""The trial material a survey serves, read once from the stimulus bank (DESIGN §3).

An *item* is one unit under one reference kind of one model (``model_id, kind, layer, unit``); it
has ``n_tasks`` tasks, each with one max and one min query and K references per side.  Images are
addressed by their content hash only, so nothing a participant receives names a side or a rank.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pandas as pd

from sparsight.files import sha256_file
from sparsight.layout import MANIFEST_FILE
from stimuli.bank import StimulusBank, validate_manifest

IMAGE_ID = re.compile(r"^[0-9a-f]{64}$")
CONDITION_KEYS = {"model-kind": ("model_id", "kind"), "kind": ("kind",), "model": ("model_id",), "none": ()}


@dataclass(frozen=True, order=True)
class Item:
    model_id: str
    kind: str
    layer: str
    unit: int

    @property
    def key(self) -> str:
        return f"{self.model_id}|{self.kind}|{self.layer}:{self.unit}"

    def condition(self, condition_by: str) -> str:
        return "|".join(str(getattr(self, k)) for k in CONDITION_KEYS[condition_by]) or "all"


@dataclass(frozen=True)
class Task:
    """One task's images (content ids, references in rank order)."""
    query_max: str
    query_min: str
    ref_max: tuple[str, ...]
    ref_min: tuple[str, ...]


def image_id(bank_path: str) -> str:
    """``images/<sha>.png`` → ``<sha>``."""
    return Path(bank_path).stem


def _units_with_every_kind(manifest: pd.DataFrame) -> pd.DataFrame:
    """The rows of the (model, unit)s that have tasks of every kind in ``manifest``."""
    keys = ["model_id", "layer", "unit"]
    kinds = manifest.groupby(keys)["kind"].nunique()
    full = kinds[kinds == manifest["kind"].nunique()].index
    return manifest[pd.MultiIndex.from_frame(manifest[keys]).isin(full)]


def _tasks(manifest: pd.DataFrame) -> dict[Item, list[Task]]:
    """Item → its tasks, from a manifest sorted by item, task, role and rank (one pass over the rows)."""
    out: dict[Item, list[Task]] = {}
    columns = [manifest[c].to_numpy() for c in ("model_id", "kind", "layer", "unit", "task", "role", "image")]
    current, roles = None, None

    def flush():
        if current is not None:
            item = Item(current[0], current[1], current[2], int(current[3]))
            out.setdefault(item, []).append(Task(roles["query_max"][0], roles["query_min"][0],
                                                 tuple(roles["ref_max"]), tuple(roles["ref_min"])))

    for model_id, kind, layer, unit, task, role, image in zip(*columns):
        key = (model_id, kind, layer, unit, task)
        if key != current:
            flush()
            current, roles = key, {"query_max": [], "query_min": [], "ref_max": [], "ref_min": []}
        roles[role].append(image[7:-4])     # images/<sha>.png (validated) → <sha>
    flush()
    return out


class Material:
    """Every servable task of a stimulus bank, optionally restricted to some models and kinds, and to units
    that have every kind (``every_kind``: so a comparison of kinds compares the same units)."""

    def __init__(self, bank_root: str | Path, *, models: list[str] | None = None, kinds: list[str] | None = None,
                 every_kind: bool = False):
        self.bank = StimulusBank(bank_root)
        manifest_path = self.bank.root / MANIFEST_FILE
        if not manifest_path.is_file():
            raise FileNotFoundError(f"no stimulus manifest at {manifest_path}; run `sparsight stimuli` first")
        self.bank_hash = sha256_file(manifest_path)
        manifest = pd.read_parquet(manifest_path)
        validate_manifest(manifest)
        if models:
            unknown = sorted(set(models) - set(manifest["model_id"]))
            if unknown:
                raise ValueError(f"survey.models names {unknown[0]!r}, which has no stimuli; models in the bank: "
                                 f"{sorted(set(manifest['model_id']))}")
            manifest = manifest[manifest["model_id"].isin(models)]
        if kinds:
            manifest = manifest[manifest["kind"].isin(kinds)]
        if manifest.empty:
            raise ValueError(f"the stimulus bank {self.bank.root} holds no tasks for models {models or 'all'} "
                             f"and kinds {kinds or 'all'}")
        if every_kind and manifest["kind"].nunique() > 1:
            manifest = _units_with_every_kind(manifest)
        manifest = manifest.sort_values(["model_id", "kind", "layer", "unit", "task", "role", "rank"], kind="stable")
        self.tasks: dict[Item, list[Task]] = _tasks(manifest)
        self.images = {image_id(p) for p in manifest["image"].unique()}
        self.manifest = manifest

    @property
    def items(self) -> list[Item]:
        return sorted(self.tasks)

    @cached_property
    def refs_per_side(self) -> int:
        """The most references one side of a trial shows."""
        return max(max(len(t.ref_max), len(t.ref_min)) for tasks in self.tasks.values() for t in tasks)

    def task(self, item: Item, task: int) -> Task:
        try:
            return self.tasks[item][task]
        except (KeyError, IndexError):
            raise KeyError(f"no task {task} of {item.key} in the stimulus bank") from None

    def conditions(self, condition_by: str) -> dict[str, list[Item]]:
        if condition_by not in CONDITION_KEYS:
            raise ValueError(f"unknown condition_by {condition_by!r}; choose from {sorted(CONDITION_KEYS)}")
        out: dict[str, list[Item]] = {}
        for item in self.items:
            out.setdefault(item.condition(condition_by), []).append(item)
        return out

    def image_path(self, image: str) -> Path:
        """The file of a content id; ``KeyError`` for anything not in this material."""
        if not IMAGE_ID.match(image) or image not in self.images:
            raise KeyError(image)
        return self.bank.images / f"{image}.png"
