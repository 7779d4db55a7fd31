"""The GPU check kit's own run, at smoke size on the CPU: every check it runs is recorded with the contract
fields, CUDA-only checks are skipped here, and the JSON file is what the table shows."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_run_records_every_check_with_its_contract_fields(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--smoke",
                           "--only", "cuda-tests", "mining", "mis", "--out", str(out), "--workdir", str(tmp_path / "work")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["device"] == "cpu" and report["torch"]
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == ["cuda-tests", "mining", "mis"]
    for c in checks.values():
        assert set(c) == {"name", "status", "value", "target", "seconds"}
        assert c["status"] in ("passed", "failed", "measured", "skipped") and c["seconds"] >= 0
    assert checks["cuda-tests"]["status"] == "skipped"
    assert checks["mining"]["status"] == "measured" and checks["mining"]["value"]["fp32_img_s"] > 0
    assert checks["mis"]["value"]["mis"]["max_error"] < 1e-4
    assert all(f"{name:18s} {c['status']}" in proc.stdout for name, c in checks.items())
