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
