"""Stage records say where they ran; the report groups the stages by machine and software."""
from __future__ import annotations

import json
import os
import platform
import time

import torch

from analysis.report import _environments
from sparsight.environment import describe, summary


def test_describe_reports_this_process():
    env = describe()
    assert env["packages"]["torch"] == torch.__version__.split("+")[0]
    assert env["python"] == platform.python_version() and env["cpu_count"] == os.cpu_count()
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert "gpu" not in env or torch.cuda.is_initialized()
    line = summary(env)
    assert env["cpu"] in line and f"torch {env['packages']['torch']}" in line


def test_the_report_lists_each_machine_with_its_stages(tmp_path):
    stages = tmp_path / ".stages"
    stages.mkdir()
    here = describe()
    gpu = {**here, "gpu": "NVIDIA H200", "cpu": "Intel Xeon"}
    for name, env in (("data", here), ("base", gpu), ("prune", gpu), ("stimuli", here), ("old", None)):
        record = {"fingerprint": "x", "outputs": {}}
        if env is not None:
            record["environment"] = env
        (stages / f"{name}.json").write_text(json.dumps(record))
        time.sleep(0.01)                                          # records are ordered by when they were written
    groups = _environments(tmp_path)
    assert [g["stages"] for g in groups] == [["data", "stimuli", "analysis"], ["base", "prune"]]
    assert "NVIDIA H200" in groups[1]["summary"] and "Intel Xeon" in groups[1]["summary"]


def test_the_source_commit_is_recorded_from_a_git_work_tree_and_left_out_elsewhere(tmp_path):
    """A copy of the package in a fresh git repository records that repository's HEAD and whether tracked files
    changed since; the same copy outside any repository records no source."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import sparsight
    package = Path(sparsight.__file__).parent
    copy = tmp_path / "tree"
    shutil.copytree(package, copy / "sparsight", ignore=shutil.ignore_patterns("__pycache__"))
    probe = ("import json, sparsight.environment as e; print(json.dumps(e.source_revision()))")

    def revision():
        out = subprocess.run([sys.executable, "-c", probe], cwd=copy, capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": str(copy)})
        return json.loads(out.stdout)

    assert revision() is None
    git = ["git", "-C", str(copy), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert revision() == {"revision": head, "modified": False}
    (copy / "sparsight" / "layout.py").write_text((copy / "sparsight" / "layout.py").read_text() + "\n# edited\n")
    assert revision() == {"revision": head, "modified": True}
    assert summary({"source": {"revision": head, "modified": True}}).endswith(
        f"sparsight at commit {head[:12]} with local changes")
