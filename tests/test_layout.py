"""The package's layout (../shared/DESIGN.md): folders that follow a run's flow, imports that only go down, no circle,
no import tucked inside a function to hide one, short functions. Read from the source with `ast`, so a violation is
named by file and line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "bigbatch"

# Low to high. A module imports from its own layer's package or from lower layers only; the commands (the CLI, each
# package's `command` module and the faces kept for documented paths) sit on top and may import anything.
LAYERS = [
    ("bigbatch.config",),
    ("bigbatch.optim", "bigbatch.data"),
    ("bigbatch.models",),
    ("bigbatch.engine", "bigbatch.resolve"),
    ("bigbatch.plan",),
    ("bigbatch.check",),
    ("bigbatch.run",),
]
COMMANDS = ("bigbatch.cli", "bigbatch.__main__", "bigbatch.finetune", "bigbatch.plan.command", "bigbatch.check.command",
            "bigbatch.run.command")
MAX_FUNCTION_LINES = 59


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _imports(name: str, tree: ast.Module) -> list[tuple[str, int, bool]]:
    """(imported bigbatch module, line, inside a function) for each import statement of `name`."""
    out = []
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nested = {id(n) for f in functions for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if MODULES_ARE_PACKAGES.get(name) else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            if not base.startswith("bigbatch"):
                continue
            for alias in node.names:  # `from bigbatch.run import checkpoint` imports the module bigbatch.run.checkpoint
                target = f"{base}.{alias.name}"
                out.append((target if target in MODULES else base, node.lineno, id(node) in nested))
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) in nested) for a in node.names if a.name.startswith("bigbatch")]
    return sorted(set(out))


MODULES_ARE_PACKAGES = {_module_name(p): p.name == "__init__.py" for p in PACKAGE.rglob("*.py")}


def _layer(module: str) -> int:
    if module in COMMANDS:
        return len(LAYERS)
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} belongs to no layer of tests/test_layout.py: place it in DESIGN.md's flow")


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_imports_only_go_down():
    wrong = []
    for name, tree in MODULES.items():
        for target, line, _ in _imports(name, tree):
            if name in COMMANDS or target == "bigbatch" or _package(target) == _package(name):
                continue  # the commands are the top; inside one package the cycle test below keeps it acyclic
            if _layer(target) >= _layer(name):
                wrong.append(f"{name}:{line} imports {target}, which is not below it")
    assert not wrong, "\n".join(wrong)


def test_no_import_hides_inside_a_function():
    hidden = [f"{name}:{line} imports {target} inside a function" for name, tree in MODULES.items()
              for target, line, inside in _imports(name, tree) if inside]
    assert not hidden, "\n".join(hidden)


def test_no_import_circle():
    graph = {name: {t for t, _, _ in _imports(name, tree) if t in MODULES and t != name}
             for name, tree in MODULES.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_top_level_is_a_short_list_of_rooms():
    # seven rooms, the CLI, the two public modules users import (engine, resolve) and the documented
    # `python -m bigbatch.finetune`
    entries = sorted(p.name for p in PACKAGE.iterdir()
                     if p.name not in ("__init__.py", "__main__.py", "__pycache__") and not p.name.startswith("."))
    assert len(entries) <= 11, entries
    assert {"config", "optim", "data", "models", "plan", "check", "run"} <= set(entries)


def test_every_function_fits_on_a_screen():
    long = [f"{name}.{n.name}: {n.end_lineno - n.lineno + 1} lines" for name, tree in MODULES.items()
            for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, "\n".join(long)


@pytest.mark.parametrize("path", ["bigbatch.optim.LAMB", "bigbatch.optim.LARS", "bigbatch.optim.param_groups",
                                  "bigbatch.engine.initialize", "bigbatch.engine.client_optimizer",
                                  "bigbatch.resolve.resolve", "bigbatch.data.prepare", "bigbatch.config.Recipe",
                                  "bigbatch.cli.main", "bigbatch.finetune.main"])
def test_the_documented_import_paths_still_hold(path):
    import importlib

    module, name = path.rsplit(".", 1)
    assert callable(getattr(importlib.import_module(module), name))
