"""The tree tells the architecture: who may import whom, and no import cycle.

The three folders install as one distinct import name, `vllm_gateway` (setup.cfg maps
`vllm_gateway.gateway` to `gateway/` and so on), so the graph below names modules without
that prefix."""

from __future__ import annotations

import ast
import configparser
import re
from pathlib import Path

from conftest import ROOT

PACKAGES = ("protocol", "engine", "gateway")
PREFIX = "vllm_gateway."


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
            found |= {t[len(PREFIX):] for t in targets if t.startswith(PREFIX) and t[len(PREFIX):] in modules}
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


def test_one_distinct_import_name():
    """Every package folder is installed, under `vllm_gateway.` only, and nothing in the
    tree (code, tests, benchmarks) imports the bare folder names, which would work from
    the checkout alone and load a second copy of a module."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    folders = {PREFIX + ".".join(p.parent.relative_to(ROOT).parts)
               for pkg in PACKAGES for p in (ROOT / pkg).rglob("__init__.py")}
    assert listed == folders
    bare = re.compile(r"^\s*(from|import) (%s)\b" % "|".join(PACKAGES), re.M)
    for folder in (*PACKAGES, "tests", "benchmarks", "deploy"):
        for path in (ROOT / folder).rglob("*.py"):
            assert not bare.search(path.read_text()), path
