"""The import layering of lightning_ft, read from the source with ``ast`` (nothing is imported).

Every ``import`` / ``from ... import`` of every module counts, at module level and inside functions (an import
inside a function that closes a loop is still a loop, only a later one), ``TYPE_CHECKING`` blocks included.
Imports by string (``importlib.import_module``) are not edges: the artifact-format registry of
:mod:`lightning_ft.core.weights` uses one on purpose, to load the format plug-ins of the packages above it.

Packages are the first name below ``lightning_ft`` (``core``, ``merging``, ...); a top-level module
(``lightning_ft.cli``, ``lightning_ft.support``) is its own node. ``lightning_ft.errors`` and
``lightning_ft.assets`` are base modules, below everything, and so is the bare ``lightning_ft`` package
(it holds only ``__version__``).
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

import lightning_ft

ROOT = Path(lightning_ft.__file__).parent
BASE = {"errors", "assets", ""}
# Package-level edges that close a cycle and are tolerated for now, each with the reason (issue #16).
ALLOWED_CYCLE_EDGES: dict[tuple[str, str], str] = {}
# Packages core must not import (the method packages above it and the command line).
CORE_MUST_NOT_IMPORT = {"merging", "sparse", "callbacks", "objectives", "copilot", "modules", "data", "cli"}
CUDA_EXT_MAY_IMPORT = {"cuda_ext"}


def _module_name(path: Path) -> str:
    parts = ["lightning_ft", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imported(node: ast.AST, module: str, is_package: bool, known: dict[str, Path]) -> Iterator[str]:
    """lightning_ft modules named by one import statement."""
    if isinstance(node, ast.Import):
        yield from (a.name for a in node.names if a.name.split(".")[0] == "lightning_ft")
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            target = ".".join([*anchor, *([node.module] if node.module else [])])
        else:
            target = node.module or ""
        if target.split(".")[0] != "lightning_ft":
            return
        for alias in node.names:
            sub = f"{target}.{alias.name}"
            yield sub if sub in known else target


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """lightning_ft module -> the lightning_ft modules it imports (anywhere in its source)."""
    known = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[name] = {
            target
            for node in ast.walk(tree)
            for target in _imported(node, name, path.name == "__init__.py", known)
            if target != name
        }
    return graph


def package(module: str) -> str:
    """``lightning_ft.merging.engine`` -> ``merging``; ``lightning_ft.cli`` -> ``cli``; ``lightning_ft`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def package_edges(graph: dict[str, set[str]]) -> dict[tuple[str, str], list[str]]:
    """``(package, package)`` -> the module imports behind that edge (``a -> b``), base modules left out."""
    edges: dict[tuple[str, str], list[str]] = {}
    for source, targets in graph.items():
        for target in targets:
            a, b = package(source), package(target)
            if a != b and a not in BASE and b not in BASE:
                edges.setdefault((a, b), []).append(f"{source} -> {target}")
    return edges


def _cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components with more than one package (Tarjan)."""
    nodes = sorted({n for e in edges for n in e})
    out_edges = {n: sorted(b for a, b in edges if a == n) for n in nodes}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in out_edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in nodes:
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_function_level_and_relative_imports() -> None:
    graph = import_graph()
    assert "lightning_ft.core.io" in graph["lightning_ft.core.weights"] or any(
        m.startswith("lightning_ft.core.weights.") for m in graph
    )
    assert "lightning_ft.core.layer_map" in graph["lightning_ft.core.snapshot"]
    src = "def f():\n    from lightning_ft.merging import engine\n    from . import io\n"
    tree = ast.parse(src)
    known = {"lightning_ft.merging.engine": Path(), "lightning_ft.core.io": Path()}
    found = {t for n in ast.walk(tree) for t in _imported(n, "lightning_ft.core.x", False, known)}
    assert found == {"lightning_ft.merging.engine", "lightning_ft.core.io"}


def test_no_import_cycle_between_packages() -> None:
    edges = package_edges(import_graph())
    kept = {e for e in edges if e not in ALLOWED_CYCLE_EDGES}
    cycles = _cycles(kept)
    detail = {
        " <-> ".join(c): sorted(i for (a, b), imps in edges.items() if a in c and b in c for i in imps) for c in cycles
    }
    assert not cycles, f"import cycles between packages: {detail}"
    stale = [e for e in ALLOWED_CYCLE_EDGES if e not in edges]
    assert not stale, f"allowed cycle edges that no longer exist (remove them): {stale}"


def test_core_imports_no_method_package() -> None:
    bad = sorted(imp for (a, b), imps in package_edges(import_graph()).items()
                 if a == "core" and b in CORE_MUST_NOT_IMPORT for imp in imps)  # fmt: skip
    assert not bad, f"core imports packages above it: {bad}"


def test_cuda_ext_imports_nothing_above_it() -> None:
    graph = import_graph()
    bad = sorted(f"{m} -> {t}" for m, ts in graph.items() if package(m) == "cuda_ext" for t in ts
                 if package(t) not in CUDA_EXT_MAY_IMPORT)  # fmt: skip
    assert not bad, f"cuda_ext imports lightning_ft modules outside it: {bad}"
