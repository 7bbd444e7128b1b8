"""`bigbatch check <recipe | ds_config.json> [--world N]`: every problem of a recipe or a DeepSpeed JSON, one sentence
per line on stdout, their count on stderr; exit 2 when one is an error.

A DeepSpeed JSON goes through `bigbatch.check.dsjson.check_config`; a recipe through its own checks (data, tokenizer,
fragments, batch arithmetic), then its resolved DeepSpeed JSON through the same `check_config`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Optional

from bigbatch.check.dsjson import check_config
from bigbatch.check.rules import Finding
from bigbatch.config import ConfigError


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.level == "error"]


def raise_on_errors(findings: list[Finding], source: str) -> None:
    """Used by `bigbatch train`: every error of the resolved config, one line each, as one ConfigError."""
    bad = errors(findings)
    if bad:
        lines = "\n  ".join(f.message for f in bad)
        raise ConfigError(f"the DeepSpeed config from {source} has {len(bad)} problem(s):\n  {lines}")


def check_recipe(name: str, overrides: dict[str, str], world: Optional[int]) -> list[Finding]:
    """The recipe's own checks (keys, data files, fragments, batch arithmetic), then its resolved DeepSpeed JSON."""
    from bigbatch.config import dsconfig
    from bigbatch.config.files import load_recipe
    from bigbatch.data.corpus import HubUnreachable, check_sources
    from bigbatch.data.tokenizer import check_tokenizer
    from bigbatch.resolve import resolve

    out: list[Finding] = []
    recipe = load_recipe(name, overrides)
    try:
        check_sources(tuple(s for s in recipe.data.sources if s.startswith("hf:")), recipe.data.cache_dir or None)
    except HubUnreachable as err:  # nothing to say about the data until the hub can be asked: the rest still counts
        out.append(Finding("note", f"{err} (bigbatch check could not verify it; the run will stop if it cannot)"))
    except ConfigError as err:
        out.append(Finding("error", str(err)))
    for step in (lambda: check_sources(tuple(s for s in recipe.data.sources if not s.startswith("hf:"))),
                 lambda: check_tokenizer(recipe.data.tokenizer, recipe.data.vocab_size),
                 lambda: [dsconfig.find_fragment(f) for f in recipe.deepspeed.configs]):
        try:
            step()
        except ConfigError as err:
            out.append(Finding("error", str(err)))
    if any(f.level == "error" for f in out):
        return out
    world = world or recipe.cluster.nodes * recipe.cluster.gpus_per_node  # the cluster it was planned for
    try:
        run = resolve(recipe, world)  # every phase's and every ramp step's batch arithmetic, and the JSON
    except ConfigError as err:
        return [*out, Finding("error", str(err))]
    return [*out, *check_config(run.ds_config, run.world)]


def cmd_check(args: list[str]) -> int:
    """`bigbatch check X [--world N]`: X is a DeepSpeed JSON when it names an existing .json file, else a recipe."""
    from bigbatch.config.overrides import parse_override_args

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
        from bigbatch.config.dsconfig import load_fragment

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
        data = json.loads(path.read_text())
    except (ValueError, OSError, RecursionError):  # not JSON, not UTF-8, too deep: load_fragment says which
        return False
    return isinstance(data, dict) and "recipe" in data and "resolved" in data
