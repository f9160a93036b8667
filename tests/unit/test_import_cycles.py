"""No import cycle in the runtime: modules import each other one way (lazy and type-only imports count)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the supervisord_llm modules it imports anywhere (top level, in functions, under TYPE_CHECKING)."""
    modules = {}
    for path in (root / "supervisord_llm").rglob("*.py"):
        name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target not in (name, "supervisord_llm"):
                    graph[name].add(target)
    return graph


def cycle_from(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_no_import_cycle_in_the_runtime() -> None:
    """A newcomer can follow imports one way: no module of supervisord_llm reaches itself again."""
    cycle = cycle_from(import_graph(ROOT))
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_cycle_check_finds_a_cycle() -> None:
    """The check is not vacuous: a graph with a back edge is reported."""
    graph = import_graph(ROOT)
    graph["supervisord_llm.configtable"].add("supervisord_llm.config")
    assert cycle_from(graph) is not None
