"""`bigbatch check <recipe | ds_config.json> [--world N]`: every problem of a recipe or a DeepSpeed JSON, one sentence
per line on stdout, their count on stderr; exit 2 when one is an error.

A DeepSpeed JSON goes through `bigbatch.check.dsjson.check_config`; a recipe through the pre-flight `bigbatch train`
runs too (`bigbatch.check.preflight`).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Optional

from bigbatch.check.dsjson import check_config
from bigbatch.check.preflight import preflight
from bigbatch.check.rules import Finding, errors
from bigbatch.config import ConfigError
from bigbatch.config.dsconfig import load_fragment
from bigbatch.config.files import load_recipe
from bigbatch.config.overrides import parse_override_args


def check_recipe(name: str, overrides: dict[str, str], world: Optional[int]) -> list[Finding]:
    """The pre-flight `bigbatch train` runs, on `world` ranks or else the cluster the recipe was planned for."""
    recipe = load_recipe(name, overrides)
    world = world or recipe.cluster.nodes * recipe.cluster.gpus_per_node
    return list(preflight(recipe, world, hub_required=False).findings)


def cmd_check(args: list[str]) -> int:
    """`bigbatch check X [--world N]`: X is a DeepSpeed JSON when it names an existing .json file, else a recipe."""
    overrides, rest = parse_override_args(args)
    # On a host without a GPU, importing DeepSpeed logs its accelerator choice to stdout, where its logger then
    # stays; stdout here holds findings only.
    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed  # noqa: F401
    p = argparse.ArgumentParser(prog="bigbatch check", description=cmd_check.__doc__)
    p.add_argument("target", help="a DeepSpeed JSON file, or a recipe (name, recipes/*.py, recipe.json)")
    p.add_argument("--world", type=int, default=None,
                   help="data-parallel ranks; default: a recipe's cluster, any whole number for a JSON")
    known, unknown = p.parse_known_args(rest)
    if unknown:
        raise ConfigError(f"unknown argument {unknown[0]!r}; see `bigbatch check --help`.")
    if known.world is not None and known.world < 1:
        raise ConfigError(f"--world={known.world} must be at least 1.")
    path = Path(known.target)
    if path.suffix == ".json" and not path.is_file():
        raise ConfigError(f"{path} is not a file; give the path of a DeepSpeed JSON or of a run's recipe.json, or a "
                          "recipe name.")
    if path.suffix == ".json" and not _is_recipe_json(path):
        findings = check_config(load_fragment(path), known.world)
    else:
        findings = check_recipe(known.target, overrides, known.world)
    for f in findings:
        print(f)
    bad = errors(findings)
    # stdout is one line per finding, for scripts; the count is for the person reading
    print(f"{known.target}: {len(bad)} error(s), {len(findings) - len(bad)} note(s)", file=sys.stderr)
    return 2 if bad else 0


def _is_recipe_json(path: Path) -> bool:
    try:
        data = load_fragment(path)
    except ConfigError:  # not JSON, not UTF-8, too deep, empty: the DeepSpeed reading says which
        return False
    return isinstance(data, dict) and "recipe" in data and "resolved" in data
