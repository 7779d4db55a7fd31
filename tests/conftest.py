"""Shared fixtures: a tiny generated dataset and a skip rule for CUDA-only tests."""
from __future__ import annotations

import pytest
import torch

from pruning.data import concept_shapes


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Concept-shapes at 32 px: 16 training and 6 validation images per class."""
    root = tmp_path_factory.mktemp("tiny_data")
    concept_shapes.generate(root, seed=3, train_per_class=16, val_per_class=6, image_size=32, workers=1)
    return root


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    return 0
