"""bigbatch/plan/__init__.py's rule: its modules import only downwards (hardware < memory < timing < teacher <
advice < command), every bigbatch import at the top of a module, and only the command line reaches into the run or the
checker."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

from conftest import ROOT, launch_env

LAYERS = ("hardware", "memory", "timing", "teacher", "advice", "command")


def _bigbatch_imports(node: ast.AST) -> list[str]:
    """The bigbatch modules (or their attributes) an import statement names."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
        names = [f"{node.module}.{alias.name}" for alias in node.names]
    else:
        return []
    return [name for name in names if name.split(".")[0] == "bigbatch"]


def test_imports_go_down_and_sit_at_the_top():
    for rank, layer in enumerate(LAYERS):
        tree = ast.parse((ROOT / "bigbatch" / "plan" / f"{layer}.py").read_text())
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            for name in _bigbatch_imports(node):
                assert id(node) in top, f"plan/{layer}.py imports {name} inside a function"
                parts = name.split(".")
                if parts[:2] == ["bigbatch", "plan"] and len(parts) > 2:
                    assert LAYERS.index(parts[2]) < rank, f"plan/{layer}.py imports {name}, a layer above or beside"
                if layer != "command":
                    assert parts[1] not in ("run", "check"), f"plan/{layer}.py imports {name}"


def test_importing_a_layer_loads_none_above_it():
    """Each layer imported in turn in one fresh process: what it loads, transitively, stays at or below it."""
    code = ("import importlib, json, sys\n"
            f"for layer in {LAYERS!r}:\n"
            "    importlib.import_module('bigbatch.plan.' + layer)\n"
            "    print(json.dumps(sorted(m for m in sys.modules if m.startswith(('bigbatch.plan.', 'bigbatch.run', "
            "'bigbatch.check')))))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=launch_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("[")]
    for rank, modules in enumerate(loaded):
        allowed = {f"bigbatch.plan.{layer}" for layer in LAYERS[:rank + 1]}
        if LAYERS[rank] == "command":  # the command line reads a pilot run's metrics.jsonl
            allowed |= {"bigbatch.run", "bigbatch.run.metrics", "bigbatch.run.rundir", "bigbatch.run.launch"}
        assert set(modules) <= allowed, (LAYERS[rank], sorted(set(modules) - allowed))
