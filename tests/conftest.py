"""Shared fixtures: a tiny generated dataset, a skip rule for CUDA-only tests, one torch thread per
module, and for the survey app a database per backend (SQLite, PostgreSQL) and the Chromium path."""
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


@pytest.fixture(scope="session")
def quick_study(tmp_path_factory):
    """``sparsight run --profile quick`` exactly as a user types it: a separate process, run from a fresh
    working directory with the default relative output folder (``runs/``), no terminal attached.
    Returns ``(working directory, run directory, printed output)``."""
    import subprocess
    import sys

    cwd = tmp_path_factory.mktemp("newcomer")
    proc = subprocess.run([sys.executable, "-m", "sparsight", "run", "--profile", "quick"], cwd=cwd,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return cwd, cwd / "runs" / "quick", proc.stdout + proc.stderr


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny tensors run fastest on one thread and do not stall when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- Databases and browsers for the survey-app tests ------------------------------------------------

DATABASE_URL_ENV = "SPARSIGHT_TEST_DATABASE_URL"


@pytest.fixture(params=["sqlite", "postgresql"], ids=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """SQLAlchemy URL of an empty database, once per backend.

    sqlite: a file under tmp_path. postgresql: a fresh scratch database created through the server
    named by $SPARSIGHT_TEST_DATABASE_URL (skipped when unset) and dropped after the test.
    """
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/survey.db"
        return

    import os

    from survey_app.db import scratch_postgres

    admin_url = os.environ.get(DATABASE_URL_ENV)
    if not admin_url:
        pytest.skip(f"PostgreSQL tests need {DATABASE_URL_ENV} (e.g. postgresql+psycopg://user:pw@127.0.0.1:5432/db)")
    with scratch_postgres(admin_url, prefix="sparsight_t") as url:
        yield url


@pytest.fixture(scope="session")
def chromium_path():
    """Path of Debian's Chromium for the Playwright browser tests; skips when it is not installed."""
    import os

    path = "/usr/bin/chromium"
    if not os.access(path, os.X_OK):
        pytest.skip(f"browser tests need Chromium at {path} (apt-get install chromium chromium-driver)")
    return path
