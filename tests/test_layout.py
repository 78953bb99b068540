"""The tree tells the architecture: who may import whom, and no import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = ("protocol", "engine", "gateway")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Each project module -> the project modules it imports (anywhere in it)."""
    modules = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            found |= {t for t in targets if t in modules}
        graph[name] = found - {name}
    return graph


def test_who_imports_whom():
    graph = imports()
    for mod, deps in graph.items():
        top = mod.split(".")[0]
        if top == "protocol":  # the wire contract stands alone
            assert not {d for d in deps if not d.startswith("protocol")}, (mod, deps)
        if top == "engine":  # the engine knows the wire, not the gateway
            assert not {d for d in deps if d.startswith("gateway")}, (mod, deps)
        if top == "gateway" and not mod.startswith("gateway.supervisor"):
            assert not {d for d in deps if d.startswith("engine")}, (mod, deps)
    # the supervisor starts engine processes; only its CLI reaches into engine/, for `engine` and `bake`
    assert not {d for d in graph["gateway.supervisor.launcher"] if d.startswith("engine")}


def test_no_import_cycle():
    graph = imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = 1
        for dep in sorted(graph[mod]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
