"""`bigbatch train <recipe> [--section.key=value ...] [--run-dir DIR] [--resume|--overwrite]`: the command line
of a training run, handed to `bigbatch.run.train.train`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

from bigbatch.config.errors import ConfigError
from bigbatch.config.files import load_recipe
from bigbatch.config.overrides import parse_override_args
from bigbatch.run import train as training


def _train_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: slurm/pretrain.sh must see the run directory exactly as this parser does (`--run-d X` would
    # otherwise reach the trainer unseen by the template).
    p = argparse.ArgumentParser(
        prog="bigbatch train", allow_abbrev=False,
        description="Train a recipe. Override any recipe key as --section.key=value, e.g. --batch.global_batch=8192.",
    )
    p.add_argument("recipe", help="a shipped recipe name (tiny, ...), a recipes/*.py path, or a run's recipe.json")
    p.add_argument("--run-dir", type=Path, default=None,
                   help="default: $BIGBATCH_RUN_DIR, else <run.runs_root>/<recipe>-<time>")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace whatever --run-dir holds")
    return p


def run_dir_from(given: Optional[Path]) -> Optional[Path]:
    """--run-dir, else BIGBATCH_RUN_DIR (what slurm/pretrain.sh chooses and exports), else None (the default name).
    Both, naming different directories, are refused: the run would train in one and look for STOP in the other."""
    env = os.environ.get("BIGBATCH_RUN_DIR", "")
    if not env:
        return given
    if given is None:
        return Path(env)
    if given.resolve() != Path(env).resolve():
        raise ConfigError(f"--run-dir {given} and BIGBATCH_RUN_DIR={env} name different run directories; give the "
                          "run directory one way only (drop one, or make them the same).")
    return given


def cmd_train(args: list[str], recipe_path: Optional[str] = None) -> int:
    overrides, rest = parse_override_args(args)
    if recipe_path is not None:
        rest = [recipe_path, *rest]
    parser = _train_parser()
    known, unknown = parser.parse_known_args(rest)
    if unknown:
        raise ConfigError(f"unknown argument {unknown[0]!r}; recipe keys look like --batch.global_batch=8192, "
                          "see `bigbatch train --help`.")
    recipe = load_recipe(known.recipe, overrides)
    run_dir = run_dir_from(known.run_dir)
    training.train(recipe, run_dir, resume=known.resume, overwrite=known.overwrite, argv=sys.argv)
    return 0
