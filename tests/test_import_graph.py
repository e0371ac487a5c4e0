"""kvdemo's modules import one way: no module-level import cycle (lazy imports inside functions aside)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "kvdemo"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([name] if name else []))


def _edges() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.parse(path.read_text(encoding="utf-8")).body:  # module level only
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.split(".")[0] == "kvdemo"}
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0 and not (node.module or "").startswith("kvdemo"):
                    continue
                target = node.module if node.level == 0 else _resolve(module, is_package, node.level, node.module)
                for alias in node.names:  # `from . import mask`: the submodule, when there is one
                    sub = f"{target}.{alias.name}"
                    targets.add(sub if sub in modules else target)
        graph[module] = {t for t in targets if t in modules and t != module}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_level_import_cycle():
    graph = _edges()
    assert "kvdemo.runtime_view" in graph["kvdemo.scenarios.base"]  # the graph is read at all
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


def test_scenarios_and_upload_budget_see_the_runtime_only_through_its_view():
    graph = _edges()
    for module in ("kvdemo.scenarios.base", "kvdemo.scenarios.blend", "kvdemo.scenarios.share",
                   "kvdemo.upload_budget", "kvdemo.runtime_view"):
        assert "kvdemo.runtime" not in graph[module], module
