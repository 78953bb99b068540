"""The tree tells the architecture: who may import whom, and no import cycle.

The three folders install as one distinct import name, `vllm_gateway` (setup.cfg maps
`vllm_gateway.gateway` to `gateway/` and so on), so the graph below names modules without
that prefix."""

from __future__ import annotations

import ast
import configparser
import re
from pathlib import Path

from support import ROOT

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


# The gateway's rooms, bottom up: a room may import its own and the ones below it.
INTAKES = ("openai", "anthropic", "responses", "runpod")
BELOW = {
    "config": {"engines"},  # settings name the routing policies
    "metrics": {"engines"},  # the engines' reports, exposed at scrape time
    "engines": set(),
    "core": {"config", "metrics", "engines"},
    "http": {"config", "metrics", "engines", "core"},
    **{intake: {"config", "metrics", "engines", "core"} for intake in INTAKES},
    "supervisor": {"config"},
    "api": {"core", "http", *INTAKES},  # the table: every intake's rows joined
}


def room(mod: str) -> str:
    """gateway.openai.routes -> openai; gateway.cli -> cli; engine.server -> engine"""
    parts = mod.split(".")
    if parts[0] != "gateway" or len(parts) == 1:
        return parts[0]
    return parts[1]


def test_who_imports_whom():
    graph = imports()
    for mod, deps in graph.items():
        top = mod.split(".")[0]
        if top == "protocol":  # the wire contract stands alone
            assert not {d for d in deps if not d.startswith("protocol")}, (mod, deps)
        if top == "engine":  # the engine knows the wire, not the gateway
            assert not {d for d in deps if d.startswith("gateway")}, (mod, deps)
        if top != "gateway":
            continue
        here = room(mod)
        if here == "cli":  # on top of everything: it reaches engine/ for `engine` and `bake`
            continue
        assert not {d for d in deps if d.startswith("engine")}, (mod, deps)
        if here in ("__init__", "__main__", "gateway"):
            continue
        allowed = BELOW[here] | {here, "gateway"}  # `gateway` itself: VERSION
        wrong = {d for d in deps if d.startswith("gateway") and room(d) not in allowed}
        assert not wrong, f"{mod} imports {sorted(wrong)}: {here}/ may import only {sorted(allowed)}"


def test_intakes_are_siblings():
    """No intake imports another; neither engines/ nor the core import an intake."""
    graph = imports()
    for mod, deps in graph.items():
        if not mod.startswith("gateway."):
            continue
        here = room(mod)
        if here in INTAKES or here in ("engines", "core", "http"):
            reached = {room(d) for d in deps if d.startswith("gateway.")} & set(INTAKES)
            assert reached <= {here}, (mod, reached)


def test_engines_reach_no_settings_nor_intake():
    """The engine client takes a router and returns neutral states: it reads
    no settings and knows no API's bodies."""
    graph = imports()
    for mod, deps in graph.items():
        if mod.startswith("gateway.engines"):
            assert not {d for d in deps if d.startswith("gateway.") and room(d) != "engines"}, (mod, deps)


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


def test_tests_are_laid_out_for_a_newcomer():
    """Unit tests apart from integration tests, helpers in tests/support/, no test
    file importing another, and no two test files of one name (pytest imports them
    by their basename)."""
    tests = ROOT / "tests"
    files = sorted(tests.rglob("test_*.py"))
    assert {p.parent.name for p in files} == {"unit", "integration"}
    names = [p.name for p in files]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    imports_a_test = re.compile(r"^\s*(from|import) test_\w+", re.M)
    assert not [p for p in files if imports_a_test.search(p.read_text())]
