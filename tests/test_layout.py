"""The source tree's shape: module names are unique and the import graph has no cycles.

Every import that runs counts, including the ones inside functions: a lazy import that breaks a
cycle at load time still ties the two modules together, so it is a cycle all the same. Imports
under ``if TYPE_CHECKING:`` never run; they name a type for annotations and are left out.
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package it is installed as (pyproject.toml's package-dir).
PACKAGES = {"graphopt": "graphopt", "passes": "graphopt.passes", "targets": "graphopt.targets"}


def _modules() -> dict[str, Path]:
    modules = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def _is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imported(module: str, path: Path, known: set[str]) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text())
    type_only = {id(n) for block in ast.walk(tree) if _is_type_checking_block(block) for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            # the longest known module the name refers to (a symbol's module, or the module itself)
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph() -> nx.DiGraph:
    modules = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for module, path in modules.items():
        for target in _imported(module, path, set(modules)):
            # a package's __init__ re-exporting its own modules is not a dependency on itself
            if not module.startswith(target + ".") and not target.startswith(module + "."):
                graph.add_edge(module, target)
    return graph


def test_the_import_graph_is_acyclic():
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c + c[:1]) for c in cycles[:20])


def test_no_two_modules_share_a_name():
    names = Counter(path.name for path in _modules().values() if path.name != "__init__.py")
    assert [name for name, n in names.items() if n > 1] == []


def test_the_import_graph_sees_real_edges():
    graph = import_graph()
    assert graph.has_edge("graphopt.targets.build", "graphopt.targets.registry")
    assert graph.has_edge("graphopt.targets.frontend.quantized", "graphopt.qdq")
