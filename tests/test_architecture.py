"""The package structure of DESIGN §1, checked from the source's own imports (nested ones included).

Layers, lowest first: the ``sparsight`` kernel, ``pruning``, ``stimuli``, ``survey_app``, ``analysis``,
and on top the CLI root (``sparsight.cli`` and ``sparsight.__main__``; ``survey_app.wsgi`` is the
server's entry point).  A module imports only its own layer or lower ones, nothing imports the
root, no two modules import each other through any chain, no ``_private`` name crosses a package
border, and every product module is used from an entry point.
"""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["sparsight", "pruning", "stimuli", "survey_app", "analysis"]
ENTRY_POINTS = {"sparsight.cli", "sparsight.__main__", "survey_app.wsgi"}
ROOT = {"sparsight.cli", "sparsight.__main__"}
OFFERED_TO_USERS = {"survey_app.testing"}     # helpers for a study's own tests, like flask.testing
LONGEST_FUNCTION = 80


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=1)
def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in LAYERS for p in sorted((REPO / pkg).rglob("*.py"))}


def known(name: str) -> str | None:
    """The product module ``name`` refers to (a name inside a module maps to the module)."""
    while name and name not in modules():
        name = name.rpartition(".")[0]
    return name or None


def imports_of(name: str) -> list[tuple[str, str | None, int]]:
    """``(target module, imported name or None, line)`` for every import statement in module ``name``."""
    path = modules()[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append((full if full in modules() else base, alias.name, node.lineno))
    return [(known(t), n, line) for t, n, line in found if known(t) and known(t) != name]


@lru_cache(maxsize=1)
def graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in imports_of(m)} for m in modules()}


def layer(name: str) -> int:
    return len(LAYERS) if name in ROOT else LAYERS.index(name.split(".")[0])


def test_every_import_points_down_and_never_at_the_root():
    wrong = [f"{m}:{line} imports {t}" for m in modules() if m not in ROOT
             for t, _, line in imports_of(m) if t in ROOT or layer(t) > layer(m)]
    assert not wrong, "imports that point up or at the CLI root:\n" + "\n".join(wrong)


def test_no_private_name_crosses_a_package_border():
    wrong = [f"{m}:{line} imports {n} from {t}" for m in modules() for t, n, line in imports_of(m)
             if n and n.startswith("_") and not n.startswith("__") and t.split(".")[0] != m.split(".")[0]]
    assert not wrong, "\n".join(wrong)


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that reach each other (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, groups, counter = {}, {}, set(), [], [], [0]
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        groups.append(sorted(group))
            elif child not in index:
                index[child] = low[child] = counter[0]
                counter[0] += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(edges.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return groups


def test_strongly_connected_finds_a_planted_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert strongly_connected(edges) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = strongly_connected(graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_every_product_module_is_used_from_an_entry_point():
    seen, todo = set(), [m for m in ENTRY_POINTS | OFFERED_TO_USERS if m in modules()]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph()[m]
    unused = sorted(m for m, p in modules().items() if m not in seen and p.name != "__init__.py")
    assert not unused, f"modules no entry point reaches (test or benchmark code in the product?): {unused}"


@pytest.mark.parametrize("package", LAYERS)
def test_functions_stay_short(package):
    long = []
    for name, path in modules().items():
        if name.split(".")[0] != package:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONGEST_FUNCTION:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {LONGEST_FUNCTION} lines:\n" + "\n".join(long)


def test_the_walk_sees_nested_and_relative_imports():
    """The walk is only as good as its parser: a nested relative import inside a function is found."""
    targets = {t for t, _, _ in imports_of("sparsight.cli")}
    assert {"pruning.training", "analysis.stages", "sparsight.study"} <= targets


@pytest.mark.parametrize("module", ["sparsight.cli", "survey_app.app", "analysis.load"])
def test_light_entry_points_do_not_load_torch(module):
    """The command's start, the survey server's workers and the analysis tables come up without torch."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", f"import sys, {module}; print('torch' in sys.modules)"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
