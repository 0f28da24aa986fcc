"""The layering of serve/ (docs/ARCHITECTURE.md), read from every import statement, lazy ones included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WEB = ("ray", "fastapi", "starlette", "uvicorn")


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every import in `path`; `from x import y` counts as x and x.y."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1]) if path.is_relative_to(ROOT) else ""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return found


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
