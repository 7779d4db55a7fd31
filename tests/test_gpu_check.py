"""The GPU check kit's own run, at smoke size on the CPU: every check it runs is recorded with the contract
fields, CUDA-only checks are skipped here, and the JSON file is what the table shows."""
import json
import os
import shutil
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
    assert set(report["machine"]) == {"cpus", "shm_free_gb", "c_compiler", "python_headers"}
    compiler = report["machine"]["c_compiler"]
    assert report["machine"]["cpus"] == os.cpu_count() and (compiler is None or shutil.which(compiler))
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == ["cuda-tests", "mining", "mis"]
    for c in checks.values():
        assert set(c) == {"name", "status", "value", "target", "seconds"}
        assert c["status"] in ("passed", "failed", "measured", "skipped") and c["seconds"] >= 0
    assert checks["cuda-tests"]["status"] == "skipped"
    assert checks["mining"]["status"] == "measured" and checks["mining"]["value"]["fp32_img_s"] > 0
    assert checks["mis"]["value"]["mis"]["max_error"] < 1e-4
    assert all(f"{name:18s} {c['status']}" in proc.stdout for name, c in checks.items())


def test_cuda_test_files_hold_every_cuda_marked_test():
    """The check collects only these files; pytest's own selection over the whole suite finds no other."""
    from benchmarks.gpu_check import cuda_test_files

    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-m", "cuda",
                           "-p", "no:cacheprovider", "tests"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:]
    collected = {line.split("::")[0] for line in proc.stdout.splitlines() if "::" in line}
    assert collected and collected == set(cuda_test_files())


def test_a_check_past_the_budget_is_stopped_and_the_rest_skipped(monkeypatch, tmp_path):
    import time

    from benchmarks import gpu_check

    def slow(ctx):
        time.sleep(30)
        return "measured", 1, None

    monkeypatch.setitem(gpu_check.CHECKS, "slow", slow)
    monkeypatch.setitem(gpu_check.CHECKS, "fast", lambda ctx: ("measured", 2, None))
    ctx = {"budget": gpu_check.TimeBudget(0.5)}
    t0 = time.monotonic()
    first = gpu_check.run_check("slow", ctx)
    assert time.monotonic() - t0 < 5
    assert first["status"] == "failed" and "time budget" in first["value"]
    assert gpu_check.run_check("fast", ctx)["status"] == "skipped"
    assert gpu_check.run_check("fast", {"budget": gpu_check.TimeBudget(None)})["status"] == "measured"


def test_the_report_is_on_disk_after_every_check(monkeypatch, tmp_path):
    """A run cut short (here: the second check kills the process) leaves the first check's result."""
    from benchmarks import gpu_check

    out = tmp_path / "report.json"
    seen = []

    def first(ctx):
        return "measured", 1, None

    def second(ctx):
        seen.append(json.loads(out.read_text()))
        raise KeyboardInterrupt

    monkeypatch.setattr(gpu_check, "CHECKS", {"first": first, "second": second})
    monkeypatch.setattr(gpu_check, "prepare_data", lambda work, smoke: {})
    args = gpu_check.get_args_parser().parse_args(["--smoke", "--out", str(out), "--workdir", str(tmp_path / "w")])
    args.only = ["first", "second"]
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(args)
    assert [c["name"] for c in seen[0]["checks"]] == ["first"]
    assert json.loads(out.read_text())["checks"][0]["status"] == "measured"


def test_missing_packages_stop_the_run_before_any_check(monkeypatch, capsys):
    from benchmarks import gpu_check

    monkeypatch.setattr(gpu_check, "required_packages", lambda: ["torch", "no-such-package-for-sure"])
    monkeypatch.setattr(gpu_check, "CHECKS", {})
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(gpu_check.get_args_parser().parse_args(["--smoke"]))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no-such-package-for-sure" in err and "torch," not in err


def test_every_project_dependency_is_checked_before_the_run():
    """The preflight list is pyproject's dependencies (markers applied to this Python) plus pytest."""
    import tomllib

    from benchmarks.gpu_check import required_packages

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    applicable = [d for d in deps if "python_version < '3.11'" not in d]
    assert len(required_packages()) == len(applicable) + 1 and required_packages()[-1] == "pytest"
    assert "psycopg" in required_packages() and "tomli" not in required_packages()


def test_subprocesses_find_this_tree_and_relative_pythonpath_entries_from_any_folder(monkeypatch, tmp_path):
    """The mini-study runs in a scratch folder: a relative PYTHONPATH (``make gpu-check WHEELS=``) must
    still point where it pointed."""
    from benchmarks.gpu_check import subprocess_env

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "marker_pkg_for_env.py").write_text("WHERE = 'site'\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", "site")
    env = subprocess_env(EXTRA="1")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, "-c", "import marker_pkg_for_env, benchmarks, os; "
                           "print(marker_pkg_for_env.WHERE, os.environ['EXTRA'])"],
                          cwd=elsewhere, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["site", "1"]


BENCHMARK_OF = {"featurevis": "featurevis", "mining": "mining", "jpeg": "jpeg_pipeline", "mask": "mask_overhead",
                "train": "train_throughput", "mis": "mis"}


@pytest.mark.parametrize("size", [0, 1], ids=["gpu", "smoke"])
def test_every_size_parses_with_its_benchmarks_own_parser(size):
    """The GPU sizes never run on this machine: each argument list must at least be one its benchmark accepts."""
    import importlib

    from benchmarks.gpu_check import SIZES

    assert set(SIZES) == set(BENCHMARK_OF)
    for key, module in BENCHMARK_OF.items():
        parser = importlib.import_module(f"benchmarks.{module}").get_args_parser()
        parser.exit = lambda status=0, message=None: pytest.fail(f"{key}: {message}")
        args = parser.parse_args(SIZES[key][size])
        if size == 0:
            assert getattr(args, "device", "auto") in ("auto", "cuda"), key      # the GPU
    gpu_fv = importlib.import_module("benchmarks.featurevis").get_args_parser().parse_args(SIZES["featurevis"][0])
    assert (gpu_fv.arch, gpu_fv.image_size, gpu_fv.steps) == ("googlenet", 224, 512)
    assert 0 < gpu_fv.lucent_units < gpu_fv.units


@pytest.mark.parametrize("small", [False, True], ids=["gpu", "cpu"])
def test_the_mini_study_file_is_a_valid_googlenet_study(tmp_path, small):
    from benchmarks.gpu_check import mini_study_toml
    from sparsight.config import load_study

    path = tmp_path / "mini.toml"
    path.write_text(mini_study_toml(tmp_path, tmp_path / "jpeg", tmp_path / "probe", small=small))
    cfg = load_study(path)
    assert cfg.model.arch == "googlenet" and cfg.model.weights == "IMAGENET1K_V1"
    assert cfg.data.image_size == (96 if small else 224) and cfg.stimuli.fv_steps == (8 if small else 512)
    assert cfg.prune.methods == ["unstructured-global", "structured"] and cfg.prune.retrain_epochs == 1
    assert cfg.study.output_dir == str(tmp_path / "runs")


def test_the_full_run_stops_where_torch_sees_no_gpu(monkeypatch, capsys):
    """Without --smoke a machine whose torch sees no GPU fails at once instead of passing at smoke size."""
    import torch

    from benchmarks import gpu_check

    ran = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "CHECKS", {name: lambda ctx: ran.append(ctx) for name in gpu_check.CHECK_NAMES})
    monkeypatch.setattr(gpu_check, "prepare_data", lambda work, smoke: ran.append("data") or {})
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(gpu_check.get_args_parser().parse_args([]))
    assert stop.value.code == 2 and ran == []
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("Error: the full check needs a CUDA GPU") and "SMOKE=1" in err


def test_a_check_past_its_cap_is_stopped_and_the_next_still_runs(monkeypatch):
    """On a GPU each check has a cap below the budget: a hang costs the cap, not the checks after it."""
    import time

    from benchmarks import gpu_check

    ran = []

    def hangs(ctx):
        time.sleep(30)

    def after(ctx):
        ran.append(ctx["limit_s"])
        return "measured", 1, None

    ctx = {"budget": gpu_check.TimeBudget(60), "caps": {"hangs": 0.5}}
    monkeypatch.setitem(gpu_check.CHECKS, "hangs", hangs)
    monkeypatch.setitem(gpu_check.CHECKS, "after", after)
    t0 = time.monotonic()
    first = gpu_check.run_check("hangs", ctx)
    assert time.monotonic() - t0 < 5
    assert first["status"] == "failed" and "its cap of 0.5 s" in first["value"]
    assert gpu_check.run_check("after", ctx)["status"] == "measured"
    assert 50 < ran[0] <= 60            # no cap of its own: what is left of the budget
    assert gpu_check.check_limit("x", {"caps": {"x": 90}}, 40.0) == (40.0, "the run's time budget")
    assert gpu_check.check_limit("x", {"caps": {"x": 90}}, None) == (90, "its cap of 90 s")
    assert gpu_check.check_limit("x", {}, None) == (None, "the run's time budget")
    assert set(gpu_check.CHECK_CAPS_S) == set(gpu_check.CHECK_NAMES)


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (a container's init may never reap one)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.parametrize("ends", ["timeout", "exit"])
def test_a_bounded_subprocess_takes_its_children_with_it(tmp_path, ends):
    """A check's subprocess (pytest, torchrun, a study) never leaves a child behind: not when it times out,
    not when it returns with one still running."""
    import time

    from benchmarks.gpu_check import run_bounded

    pidfile = tmp_path / "pid"
    script = f"sleep 120 >/dev/null 2>&1 & echo $! > {pidfile}; " + ("wait" if ends == "timeout" else "echo done")
    t0 = time.monotonic()
    if ends == "timeout":
        with pytest.raises(subprocess.TimeoutExpired):
            run_bounded(["sh", "-c", script], timeout=1)
    else:
        proc = run_bounded(["sh", "-c", script], timeout=30)
        assert proc.returncode == 0 and proc.stdout.strip() == "done"
    assert time.monotonic() - t0 < 15
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(child)


def test_a_check_that_records_its_own_errors_still_stops_at_its_limit():
    """A benchmark that catches ``Exception`` to record a failed mode and run the next (train_throughput does)
    must not swallow the time limit and run on past it."""
    import time

    from benchmarks import gpu_check

    def records_its_errors(ctx):
        for _ in range(3):
            try:
                time.sleep(10)
            except Exception:       # noqa: BLE001 - as a benchmark recording a failed mode
                pass
        return "measured", 1, None

    t0 = time.monotonic()
    with pytest.MonkeyPatch.context() as m:
        m.setitem(gpu_check.CHECKS, "own-errors", records_its_errors)
        result = gpu_check.run_check("own-errors", {"budget": gpu_check.TimeBudget(0.5)})
    assert time.monotonic() - t0 < 5
    assert result["status"] == "failed" and "time budget" in result["value"]


def test_a_logged_subprocess_keeps_its_output_when_it_times_out(tmp_path, capsys):
    """The CUDA tests and the mini-study write their output to a log as it comes: a hang leaves what was printed
    on disk and its last lines in the kit's own output, so one GPU run shows where it stopped."""
    from benchmarks.gpu_check import run_bounded

    log = tmp_path / "logs" / "hang.log"
    with pytest.raises(subprocess.TimeoutExpired):
        run_bounded(["sh", "-c", "echo stage one done; echo to stderr >&2; sleep 60"], timeout=1, log=log)
    assert log.read_text().splitlines() == ["stage one done", "to stderr"]
    assert "stage one done" in capsys.readouterr().out
    done = run_bounded(["sh", "-c", "echo all; exit 3"], timeout=30, log=log)
    assert done.returncode == 3 and done.stdout == "all\n" == log.read_text()


def test_without_option_drops_an_option_and_its_value():
    from benchmarks.gpu_check import without_option

    argv = ["--wheels", "w", "--smoke", "--wheels=v", "--only", "mis", "--wheelsx"]
    assert without_option(argv, "--wheels") == ["--smoke", "--only", "mis", "--wheelsx"]


def _wheel(folder: Path, name: str) -> Path:
    """A minimal pure-Python wheel of one module ``name``."""
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    files = {f"{name}.py": "VALUE = 7\n", f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


@pytest.mark.slow
def test_wheels_are_installed_and_the_kit_runs_again_with_them_on_its_path(tmp_path):
    """``--wheels DIR`` (a machine with no package index and no make): the wheels go into ``--site``, and the
    checks run in a process that has it on ``PYTHONPATH``; the subprocess check's output is in ``<out>-logs``."""
    _wheel(tmp_path / "wheels", "kitprobe")
    site, out = tmp_path / "site", tmp_path / "check.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--wheels", str(tmp_path / "wheels"),
                           "--site", str(site), "--smoke", "--only", "cuda-tests", "--out", str(out),
                           "--workdir", str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (site / "kitprobe.py").is_file() and "1 wheels installed" in proc.stdout
    report = json.loads(out.read_text())
    assert report["wheels"] == {"site": str(site.resolve()), "on_path": True}
    assert [c["name"] for c in report["checks"]] == ["cuda-tests"]
    log = (tmp_path / "check-logs" / "cuda-tests.log").read_text()
    assert report["checks"][0]["value"].startswith("no CUDA device (") and "skipped" in log
    empty = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--wheels", str(tmp_path / "none"),
                            "--smoke"], cwd=ROOT, capture_output=True, text=True)
    assert empty.returncode == 2 and empty.stderr.strip().startswith("Error: no wheels in")
    assert "\n" not in empty.stderr.strip()
