"""The import rule (DESIGN.md): imports flow down the pipeline and never form a cycle.

lqc.ir imports nothing of lqc; lqc.runtime imports lqc.ir; lqc.passes and lqc.codegen import
lqc.ir and lqc.runtime (never each other); the modules in lqc/ sit on top. Function-level
("lazy") imports count: they are cycles all the same, only deferred. Imports under
``if TYPE_CHECKING:`` do not run and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"lqc": ROOT / "lqc", "lqc.passes": ROOT / "passes", "lqc.ir": ROOT / "ir", "lqc.codegen": ROOT / "codegen",
           "lqc.runtime": ROOT / "runtime"}
MAY_IMPORT = {
    "lqc.ir": {"lqc.ir"},
    "lqc.runtime": {"lqc.ir", "lqc.runtime"},
    "lqc.passes": {"lqc.ir", "lqc.runtime", "lqc.passes"},
    "lqc.codegen": {"lqc.ir", "lqc.runtime", "lqc.codegen"},
    "lqc": set(FOLDERS),
}


def _modules() -> dict[str, tuple[Path, bool]]:
    modules = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            modules[".".join([package, *parts])] = (path, path.name == "__init__.py")
    return modules


def _imports(tree: ast.AST):
    """Import statements that run, at any depth (skipping ``if TYPE_CHECKING:`` blocks)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in _imports(child))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports(node)


def import_graph() -> nx.DiGraph:
    modules = _modules()

    def owner(name: str) -> str | None:  # the module an imported name lives in
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = nx.DiGraph()
    for name, (path, is_package) in modules.items():
        graph.add_node(name)
        here = name if is_package else name.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = here
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if node.module else anchor
                targets = [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                imported = owner(target) if target.split(".")[0] == "lqc" else None
                if imported and imported != name:
                    graph.add_edge(name, imported, line=f"{path.relative_to(ROOT)}:{node.lineno}")
    return graph


def _layer(module: str) -> str:
    return next((p for p in ("lqc.passes", "lqc.ir", "lqc.codegen", "lqc.runtime") if module == p or module.startswith(p + ".")), "lqc")


def test_no_import_points_up_the_pipeline():
    graph = import_graph()
    upward = [f"{data['line']}: {a} -> {b}" for a, b, data in graph.edges(data=True)
              if _layer(b) not in MAY_IMPORT[_layer(a)] or (b == "lqc" and _layer(a) != "lqc")]
    assert not upward, "imports against the pipeline's direction:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = import_graph()
    cycles = [c for c in nx.strongly_connected_components(graph) if len(c) > 1]
    lines = [f"{sorted(c)}: " + ", ".join(d["line"] for _, _, d in graph.subgraph(c).edges(data=True)) for c in cycles]
    assert not cycles, "import cycles:\n" + "\n".join(lines)


def test_the_scan_sees_lazy_imports_and_relative_ones():
    graph = import_graph()
    assert graph.has_edge("lqc.pipeline", "lqc.viz.annotate")  # a function-level import
    assert graph.has_edge("lqc.passes.context", "lqc.passes.base")  # `from .base import Pass`
    assert not graph.has_edge("lqc.passes.base", "lqc.passes.context")  # under TYPE_CHECKING only
