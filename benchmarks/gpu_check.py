"""The GPU check kit: one prepared run that proves every CUDA path and measures every GPU benchmark.

    python -m benchmarks.gpu_check             # on one H100/H200: every check at its GPU size (< 9 minutes)
    python -m benchmarks.gpu_check --smoke     # the same checks at tiny sizes on a CPU (< 10 minutes on 2 cores)
    make gpu-check [SMOKE=1]
    python3 -m benchmarks.gpu_check --wheels build/wheels   # a PyTorch image without a package index or make
    make gpu-check WHEELS=build/wheels PYTHON=python3       # the same (the wheels come from wheelhouse.py)

Checks, in order (each is timed, and a failure is recorded, never fatal to the others):

- ``cuda-tests``: every ``cuda``-marked test (pytest ``-m cuda``);
- ``googlenet-study``: ``sparsight run`` of a GoogLeNet mini-study on generated JPEGs with random
  weights saved under the torchvision weights file name in a temporary ``TORCH_HOME`` (so the real
  loading code runs): two methods × one rate, one retraining epoch, stimuli for 16 units, MIS,
  dissection on a probe in the Broden release layout, the report;
- ``featurevis``: ``render_units`` vs lucent one unit at a time (GoogLeNet, 224 px, 512 steps), s/unit,
  the speed-up and the quality-normalised s/unit (until the max image reaches the natural top images);
- ``mining``: activation mining img/s of every unit layer (fp32 and bf16);
- ``jpeg-training``: GoogLeNet retraining img/s from generated ImageNet-size JPEGs, device decode vs the
  PIL DataLoader in the same run;
- ``mask-overhead``: training with pruning masks enforced vs dense;
- ``mis``: MIS from cached embeddings vs a per-task loop, and embedding throughput;
- ``train-throughput``: fp32 / bf16 + channels_last / + compile.

Writes ``benchmarks/results/gpu-check-<device>.json`` (``device``, ``torch``, ``smoke``, ``packages``, ``machine``
and ``checks``: ``{name, status, value, target, seconds}`` with status passed | failed | measured | skipped)
after every check, so a run cut short still leaves what it measured, and prints a table at the end.  The
output of the checks that run a subprocess (the CUDA tests, the mini-study) goes to ``<out>-logs/``, so a
failure or a hang shows where it happened (its last lines are printed too).  ``--wheels DIR`` installs a
folder of wheels into ``build/site`` (``--site``) and runs the kit again with it on ``PYTHONPATH``.
Before any check it makes sure every package the project needs imports (one line names the missing
ones; ``python -m benchmarks.wheelhouse`` builds a folder of wheels for a machine without a package
index).  ``--budget-s`` bounds the whole run: a check still running at the budget is stopped and
recorded as failed, and the checks after it as skipped.  On a GPU each check also has a cap
(``CHECK_CAPS_S``), so one that hangs costs its cap, not the checks after it; a check's subprocesses are
ended with it.  The full run stops at once (exit 2, one line saying what CUDA reports) where torch sees
no GPU, so a machine whose driver does not fit its torch never passes by measuring nothing.  With ``--smoke`` every check that needs a GPU reports ``skipped``
and the targets (which are GPU targets) are not judged: the values are ``measured``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: GPU targets (DESIGN §9).
TARGETS = {"featurevis_s_per_unit": 0.15, "featurevis_speedup": 90.0, "jpeg_training": 5000.0,
           "jpeg_vs_pil": 4.0, "mining": 10000.0, "mask_overhead": 0.03}

# Sizes: (GPU, smoke on a CPU)
SIZES = {
    # lucent renders 2 of the 16 units: its s/unit is per unit, and one unit takes it ~10 s on a GPU
    "featurevis": (["--arch", "googlenet", "--image-size", "224", "--steps", "512", "--units", "16",
                    "--lucent-units", "2", "--n-diverse", "2", "--batch-size", "192"],
                   ["--arch", "inception-small", "--image-size", "64", "--steps", "16", "--units", "2",
                    "--n-diverse", "1", "--batch-size", "8", "--device", "cpu"]),
    "mining": (["--arch", "googlenet", "--batch-size", "256", "--batches", "20", "--rounds", "3"],
               ["--arch", "inception-small", "--image-size", "64", "--batch-size", "32", "--batches", "4",
                "--rounds", "1", "--warmup", "2", "--k", "20", "--device", "cpu"]),
    # retraining as the study runs it (no torch.compile); loader-only, plain-training and mining rows are
    # left to the mining and train-throughput checks
    "jpeg": (["--train-images", "8192", "--val-images", "256", "--skip", "loader", "train", "mining"],
             ["--device", "cpu", "--arch", "inception-small", "--image-size", "64", "--train-images", "200",
              "--val-images", "200", "--batch-size", "16", "--steps", "3", "--warmup", "1", "--workers", "1"]),
    "mask": (["--models", "googlenet", "--steps", "20", "--rounds", "3"],
             ["--device", "cpu", "--models", "googlenet", "--batch-size", "4", "--image-size", "64", "--steps", "2",
              "--rounds", "1", "--warmup", "1"]),
    "train": (["--models", "googlenet", "--steps", "20", "--warmup", "8"],
              ["--device", "cpu", "--models", "googlenet", "--batch-size", "4", "--image-size", "64", "--steps", "2",
               "--warmup", "1", "--modes", "fp32 eager", "bf16 + channels_last"]),
    # 60 units: the bank's PNGs are written by the CPU, which is not what this check measures
    "mis": (["--device", "cuda", "--backbone", "resnet50", "--images", "2048", "--units", "60"],
            ["--device", "cpu", "--backbone", "observer-small", "--images", "64", "--units", "20", "--tasks", "5"]),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: tests the script itself")
    p.add_argument("--only", nargs="+", default=None, choices=CHECK_NAMES, help="run only these checks")
    p.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/gpu-check-<device>.json)")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"seconds for the whole run (default: {GPU_BUDGET_S:g} on a GPU, none on a CPU); a check still "
                        "running then is stopped and recorded as failed, later ones as skipped")
    p.add_argument("--wheels", default=None,
                   help="a folder of wheels (python -m benchmarks.wheelhouse) to install first, for a machine "
                        "without a package index")
    p.add_argument("--site", default=str(ROOT / "build" / "site"), help="where --wheels installs them")
    return p


#: seconds of checks on a GPU: with the wheels' install, the imports and the end, the run stays under 9 minutes
GPU_BUDGET_S = 480.0


# ---- a machine without a package index ----------------------------------------------------------------------
def install_wheels(wheels: Path, site: Path) -> None:
    """Install every wheel in ``wheels`` into ``site`` (no index, no dependencies: the folder holds them all)."""
    found = sorted(wheels.glob("*.whl"))
    if not found:
        print(f"Error: no wheels in {wheels}; `python -m benchmarks.wheelhouse --out {wheels}` gathers them",
              file=sys.stderr)
        raise SystemExit(2)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                    "--upgrade", "--target", str(site), *map(str, found)], check=True)
    print(f"{len(found)} wheels installed into {site} in {time.perf_counter() - t0:.1f} s", flush=True)


def without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` less ``option`` and its value (``--opt V`` or ``--opt=V``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def rerun_with_site(site: Path, argv: list[str]):
    """Replace this process by the kit's run with ``site`` first on ``PYTHONPATH`` (output unbuffered)."""
    env = subprocess_env(PYTHONUNBUFFERED="1", **{SITE_VARIABLE: str(site.resolve())})
    env["PYTHONPATH"] = os.pathsep.join([str(site.resolve()), env["PYTHONPATH"]])
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.gpu_check", *without_option(argv, "--wheels")], env)


#: set for the run that ``--wheels`` starts: the folder its wheels went to (the report says whether it was used)
SITE_VARIABLE = "SPARSIGHT_GPU_CHECK_SITE"


# ---- before any check -------------------------------------------------------------------------------------
def required_packages() -> list[str]:
    """The distributions the checks import: the project's dependencies (``pyproject.toml``) and pytest."""
    from benchmarks.wheelhouse import project_requirements

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return [re.match(r"[A-Za-z0-9_.-]+", req).group(0) for req in project_requirements(version)]


def installed_versions(names: list[str]) -> tuple[dict, list[str]]:
    """``({name: version}, [missing names])`` as ``importlib.metadata`` sees them on ``sys.path``."""
    from importlib import metadata

    versions, missing = {}, []
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    return versions, missing


def machine_facts() -> dict:
    """What a failed check may come down to: CPU cores (the PIL baseline's workers), free shared memory (DataLoader
    workers hand batches over through it) and what ``torch.compile`` builds with (a C compiler, Python's headers)."""
    import shutil
    import sysconfig

    shm = Path("/dev/shm")
    include = sysconfig.get_paths().get("include", "")
    return {"cpus": os.cpu_count(),
            "shm_free_gb": round(shutil.disk_usage(shm).free / 2**30, 1) if shm.is_dir() else None,
            "c_compiler": next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None),
            "python_headers": bool(include) and (Path(include) / "Python.h").is_file()}


def subprocess_env(**extra) -> dict:
    """The environment for the checks' subprocesses, which run in other folders: this source tree first on
    ``PYTHONPATH``, and the entries already there made absolute."""
    inherited = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *inherited]), **extra}


class TimeBudget:
    """Seconds left of the run's budget."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float | None:
        return None if self.end is None else self.end - time.monotonic()


@contextlib.contextmanager
def alarm(seconds: float | None):
    """Raise ``BudgetExceeded`` in this (main) thread after ``seconds`` (none: never)."""
    if seconds is None or not hasattr(signal, "setitimer"):
        yield
        return

    def stop(signum, frame):
        raise BudgetExceeded("stopped at the check's time limit")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_bounded(cmd: list[str], timeout: float | None, log: Path | None = None,
                **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` (text output captured) in a process group of its own, which is ended when the
    command returns, times out or is interrupted: SIGTERM first (torchrun passes it to its workers, which
    run in sessions of their own), SIGKILL 5 s later.  Nothing a check starts outlives it or keeps the GPU.

    With ``log`` its stdout and stderr go to that file as they come (returned as ``stdout``), so a command
    that times out still leaves what it printed; its last lines are then printed here too."""
    if log is None:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, **kwargs)
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            _end_group(proc)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                **kwargs)
        try:
            proc.wait(timeout=timeout)
        except BaseException:
            _end_group(proc)
            print(f"... the last lines of {log}:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-40:]),
                  flush=True)
            raise
        _end_group(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, log.read_text(errors="replace"), "")


def _end_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break                                   # the group is gone
        if wait is not None:
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and (proc.poll() is None or _group_alive(proc.pid)):
                time.sleep(0.1)
    with contextlib.suppress(Exception):
        proc.communicate(timeout=5)                 # reap the leader, close the pipes


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


class BudgetExceeded(BaseException):
    """A check ran past its time limit.  Not an ``Exception``: a benchmark that records its own failures (``except
    Exception``) must not swallow it and run on past the limit."""


def check(name: str, status: str, value, target, seconds: float) -> dict:
    return {"name": name, "status": status, "value": value, "target": target, "seconds": round(seconds, 1)}


def judged(ok: bool, gpu: bool) -> str:
    """``passed``/``failed`` against a GPU target; on a CPU only ``measured``."""
    return ("passed" if ok else "failed") if gpu else "measured"


def _bench(module: str, argv: list[str]) -> dict:
    """Run ``benchmarks.<module>``'s ``main`` with ``argv``; its printed table goes to our stdout."""
    mod = importlib.import_module(f"benchmarks.{module}")
    return mod.main(mod.get_args_parser().parse_args(argv))


# ---- the checks ---------------------------------------------------------------------------------------
def cuda_test_files() -> list[str]:
    """The test files that hold ``cuda``-marked tests (collecting only these needs no browser or database)."""
    return [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").glob("test_*.py"))
            if "mark.cuda" in p.read_text()]


def cuda_tests(ctx) -> tuple:
    proc = run_bounded([sys.executable, "-m", "pytest", "-q", "-ra", "-m", "cuda", "-p", "no:cacheprovider",
                        *cuda_test_files()], timeout=ctx["limit_s"], log=ctx["logs"] / "cuda-tests.log", cwd=ROOT,
                       env=subprocess_env())
    counted = re.compile(r"\d+ (passed|failed|skipped|deselected|error)")
    summary = [line for line in proc.stdout.splitlines() if counted.search(line)]
    tail = summary[-1:] or (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", tail[0])}
    if not ctx["gpu"]:
        return "skipped", f"no CUDA device ({tail[0]})", "every CUDA test passes"
    ok = proc.returncode == 0 and counts.get("passed", 0) > 0 and not counts.get("failed") and not counts.get("error")
    failures = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    return ("passed" if ok else "failed"), "; ".join([tail[0], *failures]), "every CUDA test passes"


def featurevis(ctx) -> tuple:
    argv = SIZES["featurevis"][ctx["size"]] + ["--quality", "--data", str(ctx["study_data"])]
    r = _bench("featurevis", argv)
    quality = r.get("quality", {}).get("ours", {})
    value = {"s_per_unit": r["ours_s_per_unit"], "lucent_s_per_unit": r["lucent_s_per_unit"],
             "speedup": r["speedup"], "quality_s_per_unit": quality.get("s_per_unit_to_valid")}
    ok = r["ours_s_per_unit"] <= TARGETS["featurevis_s_per_unit"] and r["speedup"] >= TARGETS["featurevis_speedup"]
    return judged(ok, ctx["gpu"]), value, (f"≤ {TARGETS['featurevis_s_per_unit']} s/unit, "
                                           f"≥ {TARGETS['featurevis_speedup']:g}× lucent")


def mining(ctx) -> tuple:
    fp32 = _bench("mining", SIZES["mining"][ctx["size"]])
    bf16 = _bench("mining", SIZES["mining"][ctx["size"]] + ["--amp", "bf16", "--channels-last"])
    value = {"fp32_img_s": fp32["mining"], "bf16_img_s": bf16["mining"], "vs_plain_forward": fp32["ratio"]}
    return (judged(max(fp32["mining"], bf16["mining"]) >= TARGETS["mining"], ctx["gpu"]), value,
            f"≥ {TARGETS['mining']:g} img/s")


def jpeg_training(ctx) -> tuple:
    (ctx["work"] / "jpeg").mkdir(parents=True, exist_ok=True)
    r = _bench("jpeg_pipeline", SIZES["jpeg"][ctx["size"]] + ["--workdir", str(ctx["work"] / "jpeg")])
    rows = {(row["what"], row["path"]): row["images_per_s"] for row in r["rows"]}
    trainer = {path: ips for (what, path), ips in rows.items() if what.startswith("retraining")}
    device = next((v for k, v in trainer.items() if k.startswith("device")), math.nan)
    pil = next((v for k, v in trainer.items() if k.startswith("PIL")), math.nan)
    value = {"device_decode_img_s": device, "pil_img_s": pil, "ratio": device / pil if pil else None}
    ok = device >= TARGETS["jpeg_training"] and device / pil >= TARGETS["jpeg_vs_pil"]
    return judged(ok, ctx["gpu"]), value, (f"≥ {TARGETS['jpeg_training']:g} img/s and ≥ {TARGETS['jpeg_vs_pil']:g}× "
                                           f"the PIL DataLoader")


def mask_overhead(ctx) -> tuple:
    r = _bench("mask_overhead", SIZES["mask"][ctx["size"]])
    overhead = max(v["overhead"] for v in r.values())
    return judged(overhead <= TARGETS["mask_overhead"], ctx["gpu"]), r, f"≤ {TARGETS['mask_overhead']:.0%}"


def train_throughput(ctx) -> tuple:
    r = _bench("train_throughput", SIZES["train"][ctx["size"]])
    failed = [f"{arch} {mode}" for arch, modes in r.items() for mode, v in modes.items() if v is None]
    status = "failed" if failed else "measured"
    return status, r, "every mode runs; bf16 + channels_last faster than fp32 eager"


def mis(ctx) -> tuple:
    r = _bench("mis", SIZES["mis"][ctx["size"]])
    ok = r["mis"]["max_error"] < 1e-4
    return ("measured" if ok else "failed"), r, "equals the per-task loop (max |ΔΔ| < 1e-4)"


def mini_study_toml(work: Path, jpeg_data: Path, probe: Path, small: bool) -> str:
    """The GoogLeNet mini-study's file: at GPU size, or ``small`` (96 px, 8 steps) for a CPU."""
    return f"""
[study]
name = "googlenet-mini"
output_dir = "{work / 'runs'}"
profile = "paper"
seed = 0
[data]
source = "folder"
path = "{jpeg_data}"
image_size = {96 if small else 224}
batch_size = {8 if small else 128}
eval_batch_size = {16 if small else 256}
[model]
arch = "googlenet"
weights = "IMAGENET1K_V1"
num_classes = 1000
[train]
epochs = 0
[observer]
arch = "observer-small"
epochs = 1
[prune]
methods = ["unstructured-global", "structured"]
rates = [0.5]
schedules = ["oneshot"]
retrain_epochs = 1
[evaluate]
corruptions = ["gaussian_noise"]
severities = [3]
max_images = {16 if small else 256}
[units]
units = ["inception4a:0-{3 if small else 15}"]
[stimuli]
n_tasks = {2 if small else 8}
n_references = 3
fv_steps = {8 if small else 512}
fv_batch_units = 16
[mis]
bootstrap = 100
[dissection]
probe = "{probe}"
units = "study"
[survey]
machine_participants = 1
main_trials = 4
catch_trials = 1
practice_trials = 1
"""


def googlenet_study(ctx) -> tuple:
    """``sparsight run`` of a GoogLeNet mini-study, exactly as a researcher would start one."""
    import torch
    from torchvision.models import GoogLeNet_Weights, googlenet

    work = ctx["work"]
    torch_home = work / "torch-home"
    weights = GoogLeNet_Weights.IMAGENET1K_V1
    target = torch_home / "hub" / "checkpoints" / os.path.basename(weights.url)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = googlenet(weights=None, aux_logits=False, init_weights=True, num_classes=1000)
    torch.save(net.state_dict(), target)            # random weights under the real file name
    study = work / "googlenet-mini.toml"
    study.write_text(mini_study_toml(work, ctx["jpeg_data"], ctx["probe"], small=not ctx["gpu"]))
    env = subprocess_env(TORCH_HOME=str(torch_home), SPARSIGHT_DEBUG="1")
    proc = run_bounded([sys.executable, "-m", "sparsight", "run", "--study", str(study)], timeout=ctx["limit_s"],
                       log=ctx["logs"] / "googlenet-study.log", cwd=work, env=env)
    run_dir = work / "runs" / "googlenet-mini"
    results = run_dir / "report" / "results.json"
    if proc.returncode != 0 or not results.is_file():
        tail = (proc.stdout + proc.stderr)[-1500:]
        return "failed", f"exit {proc.returncode}: {tail}", "the mini-study completes"
    r = json.loads(results.read_text())
    models = [m["model_id"] for m in r["models"]]
    stages = re.findall(r"\[(\w+)\] done in ([\d.]+) s", proc.stdout + proc.stderr)
    value = {"models": models, "stage_seconds": {k: float(v) for k, v in stages},
             "validity_failed": [c["name"] for c in r.get("validity", []) if c["passed"] is False]}
    return "passed", value, "the mini-study completes (data, prune, stimuli, MIS, dissection, report)"


#: the research path first (the CUDA tests, then the GoogLeNet mini-study), then the benchmarks with targets,
#: then those only measured, the one that compiles last: a run that meets its time budget early loses speed
#: figures, not the proof that the path works
CHECKS = {"cuda-tests": cuda_tests, "googlenet-study": googlenet_study, "featurevis": featurevis, "mining": mining,
          "jpeg-training": jpeg_training, "mask-overhead": mask_overhead, "mis": mis,
          "train-throughput": train_throughput}
CHECK_NAMES = list(CHECKS)
#: on a GPU, the most seconds each check may take, about three times what it should: a check that hangs (a
#: collective waiting for a rank that died, say) costs its cap, not the rest of the run
CHECK_CAPS_S = {"cuda-tests": 180, "googlenet-study": 240, "featurevis": 150, "mining": 90, "jpeg-training": 180,
                "mask-overhead": 90, "mis": 90, "train-throughput": 240}


# ---- data the checks share ------------------------------------------------------------------------------
def prepare_data(work: Path, smoke: bool) -> dict:
    """Concept-shapes images as a JPEG ImageFolder (train/, val/) and the val split as a Broden probe."""
    import shutil

    from PIL import Image

    from pruning.data.concept_shapes import generate
    from stimuli.probes import ProbeSet, write_broden

    shapes = work / "concept-shapes"
    size = 96 if smoke else 224
    # enough validation images for the tasks' disjoint max and min sets (2 × n_tasks × (K + 1))
    generate(shapes, train_per_class=3 if smoke else 40, val_per_class=4 if smoke else 16, image_size=size)
    jpeg = work / "jpeg-data"
    for split in ("train", "val"):
        for png in sorted((shapes / split).rglob("*.png")):
            out = jpeg / split / png.parent.name / f"{png.stem}.jpg"
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.open(png).convert("RGB").save(out, quality=90)
    probe = work / "probe"
    shutil.rmtree(probe, ignore_errors=True)    # a --workdir used before gets a fresh probe
    write_broden(ProbeSet.from_concept_shapes(shapes, "val"), probe)   # the layout of the Broden release
    return {"study_data": shapes, "jpeg_data": jpeg, "probe": probe}


def check_limit(name: str, ctx, left: float | None) -> tuple[float | None, str]:
    """Seconds ``name`` may run (none: no limit) and what sets them: the ``left`` of the budget, or on a GPU
    the check's cap where that is smaller."""
    cap = ctx.get("caps", {}).get(name)
    if cap is not None and (left is None or cap < left):
        return cap, f"its cap of {cap:g} s"
    return left, "the run's time budget"


def run_check(name: str, ctx) -> dict:
    """One check, timed; an error, its cap or the time budget is recorded as ``failed``, never raised."""
    print(f"\n## {name}", flush=True)
    t0 = time.perf_counter()
    left = ctx["budget"].left()
    if left is not None and left <= 0:
        status, value, target = "skipped", "the run's time budget was spent before this check", None
    else:
        limit, why = check_limit(name, ctx, left)
        ctx["limit_s"] = limit
        try:
            with alarm(limit):
                status, value, target = CHECKS[name](ctx)
        except (BudgetExceeded, subprocess.TimeoutExpired) as err:
            status, value, target = "failed", f"{err.__class__.__name__}: stopped at {why}", None
        except Exception as err:  # noqa: BLE001 - every check is recorded, the others still run
            traceback.print_exc()
            status, value, target = "failed", f"{type(err).__name__}: {err}", None
    result = check(name, status, _plain(value), target, time.perf_counter() - t0)
    print(f"-> {status} in {result['seconds']} s", flush=True)
    return result


def _why_no_cuda() -> str:
    """What the CUDA runtime says about its devices (empty when it says nothing)."""
    import torch
    try:
        torch.cuda.init()
    except Exception as err:  # noqa: BLE001 - only its message is wanted
        return f" ({str(err).splitlines()[0]})" if str(err) else ""
    return ""


def write_report(out: Path, report: dict) -> None:
    """Replace ``out`` whole (written after every check, so a run cut short keeps what it measured)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, allow_nan=False))
    os.replace(tmp, out)


def main(args) -> dict:
    packages, missing = installed_versions(required_packages())
    if missing:
        print(f"Error: missing packages: {', '.join(missing)} (install them, or on a machine without a package index "
              f"put `python -m benchmarks.wheelhouse` wheels on PYTHONPATH)", file=sys.stderr)
        raise SystemExit(2)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print(f"Error: the full check needs a CUDA GPU, and torch {torch.__version__} (built for CUDA "
              f"{torch.version.cuda or 'none'}) sees none{_why_no_cuda()}; `make gpu-check SMOKE=1` (--smoke) runs "
              f"the same checks at tiny sizes on the CPU", file=sys.stderr)
        raise SystemExit(2)
    gpu = not args.smoke
    device = torch.cuda.get_device_name(0) if gpu else "cpu"
    names = args.only or CHECK_NAMES
    out = Path(args.out) if args.out else HERE / "results" / f"gpu-check-{re.sub(r'[^A-Za-z0-9]+', '-', device)}.json"
    budget = TimeBudget(args.budget_s if args.budget_s is not None else (GPU_BUDGET_S if gpu else None))
    report = {"device": device, "torch": torch.__version__, "smoke": bool(args.smoke), "packages": packages,
              "machine": machine_facts(), "checks": []}
    if site := os.environ.get(SITE_VARIABLE):
        report["wheels"] = {"site": site, "on_path": site in sys.path}
    print(f"{device}; torch {torch.__version__}; {json.dumps(report['machine'])}", flush=True)
    with contextlib.ExitStack() as stack:
        work = Path(args.workdir) if args.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        ctx = {"gpu": gpu, "smoke": args.smoke, "size": 0 if gpu else 1, "work": work, "budget": budget,
               "caps": CHECK_CAPS_S if gpu else {}, "logs": out.with_name(out.stem + "-logs"),
               **prepare_data(work, smoke=not gpu)}
        print(f"data prepared in {time.perf_counter() - t0:.1f} s", flush=True)
        for name in names:
            report["checks"].append(run_check(name, ctx))
            write_report(out, report)
        print("\n" + table(report["checks"]), flush=True)       # before the scratch folder is removed
        print(f"\n{out}", flush=True)
    return report


def _plain(value):
    """JSON-ready: NaN/inf → None, tuples → lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def table(checks: list[dict]) -> str:
    def short(v) -> str:
        text = json.dumps(v) if not isinstance(v, str) else v
        return text if len(text) <= 70 else text[:67] + "..."
    lines = [f"{'check':18s} {'status':9s} {'seconds':>8s}  value / target"]
    for c in checks:
        lines.append(f"{c['name']:18s} {c['status']:9s} {c['seconds']:8.1f}  {short(c['value'])}")
        if c["target"]:
            lines.append(f"{'':38s}  target: {c['target']}")
    return "\n".join(lines)


if __name__ == "__main__":
    arguments = get_args_parser().parse_args()
    if arguments.wheels:
        install_wheels(Path(arguments.wheels), Path(arguments.site))
        rerun_with_site(Path(arguments.site), sys.argv[1:])
    report = main(arguments)
    sys.exit(1 if any(c["status"] == "failed" for c in report["checks"]) else 0)
