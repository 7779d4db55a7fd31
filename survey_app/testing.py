"""A small synthetic study directory (stimulus bank + study.toml) for tests, load benchmarks and
trying the survey without running the pipeline.

Max-side images are bright and min-side images dark, with per-image noise so every image has its
own content hash; a participant (or a test) can therefore answer correctly by brightness.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from sparsight.config import apply_settings, load_study, write_study
from sparsight.layout import Layout
from stimuli.bank import StimulusBank


def _image(rng: np.random.Generator, bright: bool, size: int) -> np.ndarray:
    base = rng.integers(150, 230) if bright else rng.integers(20, 90)
    noise = rng.integers(-20, 21, size=(size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def make_bank(root: str | Path, *, models=("base", "m1"), kinds=("natural", "synthetic"),
              units=(("inception3a", 0), ("inception3a", 1), ("inception4a", 2), ("inception4a", 5)),
              n_tasks: int = 4, k: int = 3, size: int = 16, seed: int = 0, shared_queries: bool = False) -> Path:
    """Write ``root/stimuli`` (images, parts, manifest.parquet); return the manifest path.  With
    ``shared_queries`` the kinds of a unit show the same query pair in the same task, as a bank the
    pipeline builds does (the queries are natural images whatever the references are)."""
    rng = np.random.default_rng(seed)
    bank = StimulusBank(Layout(root).stimuli)
    queries: dict = {}
    for model_id in models:
        for kind in kinds:
            for layer, unit in units:
                rows = []
                for task in range(n_tasks):
                    for role, n in (("query_max", 1), ("query_min", 1), ("ref_max", k), ("ref_min", k)):
                        for rank in range(1, n + 1):
                            shared = shared_queries and role.startswith("query")
                            key = (model_id, layer, unit, task, role)
                            name = queries.get(key) if shared else None
                            if name is None:
                                name = queries[key] = bank.add_image(_image(rng, role.endswith("max"), size))
                            rows.append({"model_id": model_id, "layer": layer, "unit": unit, "task": task,
                                         "role": role, "kind": kind, "image": name, "source": f"synthetic:{rank}",
                                         "activation": float(rng.normal()), "rank": rank})
                bank.write_unit(model_id, kind, layer, unit, rows)
    manifest, _ = bank.assemble(list(models))
    return manifest


def make_study_dir(root: str | Path, survey: dict | None = None, name: str = "survey-test", **bank_kw) -> Path:
    """A study directory with a synthetic bank and a study.toml whose ``[survey]`` holds ``survey``."""
    root = Path(root)
    cfg = load_study(overrides=[f'study.name="{name}"'])
    apply_settings(cfg, {"survey": dict(survey or {})}, "make_study_dir")
    write_study(cfg, root)
    make_bank(root, **bank_kw)
    return root
