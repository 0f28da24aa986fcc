"""The layering of serve/ (docs/ARCHITECTURE.md), read from every import statement, lazy ones included; and no
import cycle among the project's modules."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WEB = ("ray", "fastapi", "starlette", "uvicorn")
PROJECT = ("serve", "adapters", "training", "loadtests")


def import_statements(path: Path, root: Path = ROOT) -> list[tuple[int, str, list[str] | None]]:
    """(line, absolute module, names or None) per import statement in `path`, relative ones resolved;
    `import a, b` gives one entry per module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1]) if path.is_relative_to(root) else ""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.append((node.lineno, base, [a.name for a in node.names]))
    return found


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every import in `path`; `from x import y` counts as x and x.y."""
    found = []
    for line, base, names in import_statements(path):
        found.append((line, base))
        found += [(line, f"{base}.{n}") for n in names or ()]
    return found


def module_graph(root: Path = ROOT, packages: tuple[str, ...] = PROJECT) -> dict[str, dict[str, int]]:
    """{module: {imported project module: line}} over every .py file of `packages`, function-level imports
    included. `from p import n` is an edge to the module p.n when n is one, else to p; the parent packages
    Python initialises on the way are not edges (every submodule import would otherwise loop through them)."""
    files_of = {}
    for package in packages:
        for f in sorted((root / package).rglob("*.py")):
            parts = f.relative_to(root).with_suffix("").parts
            files_of[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph: dict[str, dict[str, int]] = {}
    for module, f in files_of.items():
        edges = graph.setdefault(module, {})
        for line, base, names in import_statements(f, root):
            targets = [base] if names is None else [f"{base}.{n}" if f"{base}.{n}" in files_of else base for n in names]
            for target in targets:
                if target in files_of and target != module:
                    edges.setdefault(target, line)
    return graph


def import_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    counter = itertools.count()
    components = []

    def visit(v: str) -> None:  # the project's graph is shallow: recursion is fine
        index[v] = low[v] = next(counter)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                components.append(set(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_through(min(c), c, graph) for c in components]


def _cycle_through(start: str, component: set[str], graph: dict[str, dict[str, int]]) -> list[str]:
    """A shortest path start -> ... -> start inside one strongly connected component (breadth first)."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    return [*paths[v], start]
                if w in component and w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")


def files(package: str) -> list[Path]:
    return sorted((ROOT / package.replace(".", "/")).rglob("*.py"))


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def violations(package: str, forbidden: tuple[str, ...], allow=lambda m: False) -> list[str]:
    out = []
    for f in files(package):
        for line, module in imports(f):
            if any(_under(module, p) for p in forbidden) and not allow(module):
                out.append(f"{f.relative_to(ROOT)}:{line} imports {module}")
    return out


def test_no_import_cycles_among_the_projects_modules():
    """serve, adapters, training and loadtests: every arrow runs one way (lazy imports count too: a cycle
    hidden in a function still ties the two modules together)."""
    graph = module_graph()
    problems = [" -> ".join(f"{a} (line {graph[a][b]})" for a, b in itertools.pairwise(cycle)) + f" -> {cycle[-1]}"
                for cycle in import_cycles(graph)]
    assert problems == [], "import cycles:\n" + "\n".join(problems)


def test_serve_imports_neither_training_nor_loadtests():
    """training/ and loadtests/ build on serve/, never the other way (the console script serve/cli.py names its
    subcommands' modules as strings, not imports)."""
    assert violations("serve", ("training", "loadtests")) == []


def test_the_cycle_check_sees_cycles(tmp_path):
    """It must be able to fail: a cycle closed by a function-level import and a relative one is found, and a
    package importing its own submodules (re-exports) is not a cycle."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("from .a import f\n")
    (tmp_path / "pkg" / "a.py").write_text("from pkg import b\n\ndef f():\n    pass\n")
    (tmp_path / "pkg" / "b.py").write_text("def g():\n    from . import c\n")
    (tmp_path / "pkg" / "c.py").write_text("import pkg.a\n")
    (tmp_path / "pkg" / "d.py").write_text("from pkg.a import f\n")
    graph = module_graph(tmp_path, ("pkg",))
    assert graph["pkg"] == {"pkg.a": 1} and graph["pkg.a"] == {"pkg.b": 1} and graph["pkg.d"] == {"pkg.a": 1}
    assert import_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    (tmp_path / "pkg" / "c.py").write_text("\n")
    assert import_cycles(module_graph(tmp_path, ("pkg",))) == []


def test_the_three_packages_exist():
    for package in ("serve/engine", "serve/app", "serve/registry"):
        assert (ROOT / package / "__init__.py").is_file()
    loose = sorted(p.name for p in (ROOT / "serve").glob("*.py") if p.name not in ("__init__.py", "cli.py"))
    assert loose == [], f"modules outside the three packages: {loose}"


def test_engine_imports_no_web_stack_app_or_registry():
    assert violations("serve.engine", (*WEB, "serve.app", "serve.registry")) == []


def test_registry_imports_no_web_stack_app_or_engine():
    assert violations("serve.registry", (*WEB, "serve.app", "serve.engine")) == []


def test_adapters_import_nothing_from_serve():
    assert violations("adapters", (*WEB, "serve")) == []


def test_app_reaches_the_engine_only_through_its_public_api():
    import serve.engine as public

    def is_public(module: str) -> bool:  # `serve.engine` itself, or `from serve.engine import <exported name>`
        return module == "serve.engine" or module.removeprefix("serve.engine.") in public.__all__

    assert violations("serve.app", ("serve.engine",), allow=is_public) == []


def test_every_public_engine_name_resolves():
    import serve.engine as public

    for name in public.__all__:
        assert getattr(public, name) is not None


@pytest.mark.parametrize("snippet, expected", [
    ("from serve.engine.cache import AdapterCache", ["serve.engine.cache", "serve.engine.cache.AdapterCache"]),
    ("def f():\n    import ray\n", ["ray"]),
])
def test_the_checker_sees_lazy_and_submodule_imports(tmp_path, snippet, expected):
    """The rules above must be able to fail: a submodule import and an import inside a function are seen."""
    f = tmp_path / "probe.py"
    f.write_text(snippet)
    assert [m for _, m in imports(f)] == expected


def test_public_entry_points_resolve():
    """The README's in-process API, the console script and every Serve YAML's import_path."""
    import importlib
    import re

    import yaml

    from serve.engine import Engine, EngineConfig, GenerationParams, GenerationRequest  # noqa: F401

    script = re.search(r'^peftserve = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    module, _, attr = script.partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    for config in sorted((ROOT / "deploy").glob("*.yaml")):
        for app in yaml.safe_load(config.read_text())["applications"]:
            module, _, attr = app["import_path"].partition(":")
            assert callable(getattr(importlib.import_module(module), attr)), config.name
