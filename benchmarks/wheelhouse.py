"""A folder of wheels for running the project on a GPU machine that has a PyTorch image but no package index.

    python -m benchmarks.wheelhouse --out wheels                  # for the image in gpu_image_packages.txt
    python -m benchmarks.wheelhouse --out wheels --python 3.12 --have other-image-pip-freeze.txt

Resolves the project's dependencies (``pyproject.toml``) and pytest for the target's Python and
platform (``pip install --dry-run --report``, binary wheels only), at the versions installed where this
runs wherever those exist for the target (the versions the tests passed with; ``--any-version`` lifts
that), leaves out what the target already has (``--have``: package names or ``pip freeze``/``pip list`` files; by default the image listed in
``benchmarks/gpu_image_packages.txt``) and the CUDA stack (torch, torchvision, triton, nvidia-*, which
must be the machine's own), and downloads the rest with ``--no-deps``.  On the target::

    python3 -m benchmarks.gpu_check --wheels wheels      # installs them into build/site, then runs with it

or ``make gpu-check WHEELS=wheels PYTHON=python3``.
"""
from __future__ import annotations

import argparse
import json
import operator
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from sparsight.config import read_toml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_HAVE = HERE / "gpu_image_packages.txt"
PLATFORMS = ["manylinux_2_35_x86_64", "manylinux_2_34_x86_64", "manylinux_2_31_x86_64", "manylinux_2_28_x86_64",
             "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
#: never carried: the target's CUDA build of torch and what it was built with
CUDA_STACK = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*)$")
_PYTHON_MARKER = re.compile(r"""python_version\s*(<|<=|>|>=|==|!=)\s*["'](\d+)\.(\d+)["']""")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder the wheels go to")
    p.add_argument("--python", default="3.12", help="the target's Python version (default: 3.12)")
    p.add_argument("--platform", nargs="+", default=PLATFORMS, help="the target's wheel platform tags")
    p.add_argument("--have", nargs="+", default=[str(DEFAULT_HAVE)],
                   help="what the target already has: package names, or files of them (pip freeze / pip list)")
    p.add_argument("--any-version", action="store_true",
                   help="let pip pick the newest versions instead of the ones installed here")
    return p


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project_requirements(python: str) -> list[str]:
    """The project's dependencies that apply on ``python`` (their ``python_version`` markers), and pytest."""
    target = tuple(int(x) for x in python.split(".")[:2])
    project = read_toml(ROOT / "pyproject.toml", "project file")["project"]
    reqs = []
    for req in project["dependencies"]:
        spec, _, marker = req.partition(";")
        m = _PYTHON_MARKER.search(marker)
        if m and not _compare(target, m.group(1), (int(m.group(2)), int(m.group(3)))):
            continue
        reqs.append(spec.strip())
    return reqs + [r for r in project["optional-dependencies"]["dev"] if canonical(r).startswith("pytest")]


_OPERATORS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq,
              "!=": operator.ne}


def _compare(a: tuple, op: str, b: tuple) -> bool:
    return _OPERATORS[op](a, b)


def _pip(args: list[str], failure: str) -> None:
    """``python -m pip ARGS``; a failure exits with one line: ``failure`` and pip's last words."""
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        raise SystemExit(f"Error: {failure}: {last[0]}")


def read_have(items: list[str]) -> set[str]:
    """Canonical names from names and files (``name==1.0``, ``name 1.0`` or ``name`` per line)."""
    names = set()
    for item in items:
        path = Path(item)
        lines = path.read_text().splitlines() if path.is_file() else [item]
        for line in lines:
            line = line.split("#", 1)[0].strip()
            m = re.match(r"[A-Za-z0-9][A-Za-z0-9_.-]*", line)
            if m and not line.startswith(("Package", "---")):
                names.add(canonical(m.group(0)))
    return names


def _target_args(python: str, platforms: list[str]) -> list[str]:
    args = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
    for tag in platforms:
        args += ["--platform", tag]
    return args


def local_pins() -> list[str]:
    """``name==version`` of every distribution installed here, the CUDA stack left out."""
    from importlib import metadata

    pins = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}
    return sorted(f"{n}=={v}" for n, v in pins.items() if not CUDA_STACK.match(n))


def resolve(reqs: list[str], python: str, platforms: list[str], pins: list[str] = ()) -> list[tuple[str, str]]:
    """``(name, version)`` of every distribution ``reqs`` need on the target, as pip resolves them
    (held to ``pins`` where those apply)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text("".join(f"{pin}\n" for pin in pins))
        _pip(["install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
              "--target", str(Path(tmp) / "target"), "--constraint", str(constraints),
              *_target_args(python, platforms), *reqs], f"pip could not resolve the requirements for Python {python}")
        entries = json.loads(report.read_text())["install"]
    return [(e["metadata"]["name"], e["metadata"]["version"]) for e in entries]


def download(pins: list[tuple[str, str]], out: Path, python: str, platforms: list[str]) -> None:
    _pip(["download", "--no-deps", "--quiet", "-d", str(out), *_target_args(python, platforms),
          *[f"{name}=={version}" for name, version in pins]], "pip could not download the wheels")


def carried(resolved: list[tuple[str, str]], have: set[str]) -> list[tuple[str, str]]:
    """What the target lacks: the resolved distributions minus ``have`` and the CUDA stack."""
    return sorted((n, v) for n, v in resolved if canonical(n) not in have and not CUDA_STACK.match(canonical(n)))


def main(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    resolved = resolve(project_requirements(args.python), args.python, args.platform,
                       pins=[] if args.any_version else local_pins())
    pins = carried(resolved, read_have(args.have))
    for stale in out.glob("*.whl"):     # an earlier run's other versions would make the target's install fail
        stale.unlink()
    download(pins, out, args.python, args.platform)
    (out / "requirements.txt").write_text("".join(f"{n}=={v}\n" for n, v in pins))
    wheels = sorted(out.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    for w in wheels:
        print(f"{w.stat().st_size / 1e6:8.2f} MB  {w.name}")
    print(f"{len(wheels)} wheels, {total / 1e6:.1f} MB, for Python {args.python} in {out} "
          f"({len(resolved) - len(pins)} of {len(resolved)} resolved distributions are already on the target)")
    return {"wheels": [w.name for w in wheels], "bytes": total, "pins": pins}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
