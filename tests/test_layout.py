"""The layout is checked, not remembered: layer contracts, no import cycles, lint.

- ``lint-imports`` (import-linter, contracts in pyproject.toml): the layers of README's "Layout", and no
  torch in the cell description, mutations and deduplication.
- No import cycle among cellsearch's modules, function-local imports included (import-linter's layers
  only forbid upward imports between layers; a cycle inside one package would pass them).
- Every package and top-level module of cellsearch belongs to a layer, so a new module cannot escape
  the contract.
- ``ruff check`` with the committed configuration.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "cellsearch"


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]'")
    return found


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _runtime_nodes(tree: ast.AST):
    """Every node, except those under ``if TYPE_CHECKING:`` (names for type checkers, never imported)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
            else:
                stack.append(child)


def import_graph() -> nx.DiGraph:
    """Module -> modules it imports, from every import statement at run time (module level or inside
    functions; not the ``if TYPE_CHECKING:`` ones, as import-linter is configured)."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from package import module` names a module; `from module import name` the module itself
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph.add_edge(name, target)
    return graph


def test_layer_contracts_hold():
    result = subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_no_import_cycles_even_through_function_local_imports():
    graph = import_graph()
    # A package's __init__ re-exporting its own modules is not a cycle of the design: a module of the
    # package importing a sibling through the package's name is resolved to the package, so drop those edges.
    packages = {module_name(path) for path in PACKAGE.rglob("__init__.py")}
    for package in packages:
        graph.remove_edges_from([(module, package) for module in list(graph.predecessors(package))
                                 if module.startswith(package + ".")])
    cycles = sorted(nx.simple_cycles(graph), key=len)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join([*cycle, cycle[0]]) for cycle in cycles[:10])


def test_every_module_belongs_to_a_layer():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    layered = {name.strip() for contract in config["contracts"] if contract["type"] == "layers"
               for layer in contract["layers"] for name in layer.split("|")}
    top_level = {f"cellsearch.{path.stem}" for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    top_level |= {f"cellsearch.{path.parent.name}" for path in PACKAGE.glob("*/__init__.py")}
    assert top_level - layered == set(), "add these modules to a layer in pyproject.toml"


def test_the_graph_reader_sees_function_local_imports(tmp_path):
    # The cycle test is only as good as the graph: a known function-local import must be in it.
    graph = import_graph()
    assert graph.number_of_edges() > 100
    assert graph.has_edge("cellsearch.cli", "cellsearch.errors")


def test_ruff_passes():
    result = subprocess.run([_tool("ruff"), "check", "cellsearch", "tests", "benchmarks"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
