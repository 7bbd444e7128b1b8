"""The `bigbatch` command: `bigbatch train <recipe> [--section.key=value ...] [--run-dir DIR] [--resume|--overwrite]`.

Bad input ends with one sentence on stderr and exit code 2, on every rank, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Callable, Optional

from bigbatch.config import ConfigError
from bigbatch.config.files import load_recipe
from bigbatch.config.overrides import parse_override_args
from bigbatch.run.overflow import EXIT_STOPPED, TrainingStopped

EXIT_BAD_INPUT = 2


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
    from bigbatch.run.train import train

    train(recipe, run_dir, resume=known.resume, overwrite=known.overwrite, argv=sys.argv)
    return 0


def _lazy(module: str, name: str) -> Callable[[list[str]], int]:
    """A subcommand imported when it runs, so `bigbatch train` does not load the planner, the sweep or SentencePiece."""

    def run(args: list[str]) -> int:
        return getattr(importlib.import_module(module), name)(args)

    return run


COMMANDS = {
    "train": cmd_train,
    "check": _lazy("bigbatch.check.command", "cmd_check"),
    "plan": _lazy("bigbatch.plan.command", "cmd_plan"),
    "sweep": _lazy("bigbatch.run.sweep", "cmd_sweep"),
    "tokenizer": _lazy("bigbatch.data.tokenizer", "cmd_tokenizer"),
    "export": _lazy("bigbatch.run.export", "cmd_export"),
}


def _drop_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher puts --local_rank=N before the subcommand; LOCAL_RANK in the environment says the same."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg.startswith(("--local_rank=", "--local-rank=")):
            continue
        elif arg in ("--local_rank", "--local-rank"):
            skip = True
        else:
            out.append(arg)
    return out


def _as_program(code: int) -> int:
    """The process is about to exit: tear the process group down first (see `bigbatch.run.distributed.shutdown`).
    Only when run as a program: an in-process caller may train again on the same group."""
    from bigbatch.run.distributed import shutdown

    shutdown()
    return code


def main(argv: Optional[list[str]] = None) -> int:
    if argv is None:  # a program (the `bigbatch` script): a training's signals are stop requests from here on
        from bigbatch.run.preemption import install_handlers, trains

        if trains(sys.argv[1:]):
            install_handlers()
        return _as_program(main(sys.argv[1:]))
    argv = _drop_local_rank(list(argv))
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: bigbatch {" + ",".join(COMMANDS) + "} ...\n\n"
              "  train   train a recipe on this launch's ranks (see `bigbatch train --help`)\n"
              "  check   report every problem of a recipe or a DeepSpeed JSON, one sentence each\n"
              "  plan    memory per GPU for each ZeRO stage, precision and phase; step time and time to train\n"
              "  sweep   a grid of overrides as one SLURM job array; --report tabulates final eval losses\n"
              "  tokenizer train   a SentencePiece model for --data.tokenizer\n"
              "  export  a run's newest checkpoint as a transformers directory (from_pretrained), with its tokenizer\n")
        return 0 if argv else EXIT_BAD_INPUT
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"bigbatch: error: unknown command {command!r}; commands: {', '.join(COMMANDS)}.", file=sys.stderr)
        return EXIT_BAD_INPUT
    return _exit_code(lambda: COMMANDS[command](rest))


def _exit_code(run: Callable[[], int]) -> int:
    """Bad input is one sentence and exit 2; a run that stopped itself, its sentence and exit 3."""
    try:
        return run()
    except ConfigError as err:
        print(f"bigbatch: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingStopped as err:
        print(f"bigbatch: {err}", file=sys.stderr)
        return EXIT_STOPPED


def run_recipe(recipe_file: str, argv: Optional[list[str]] = None) -> int:
    """`python recipes/<name>.py [--key=value ...]`: train that recipe in this process (or under a launcher)."""
    if argv is None:
        from bigbatch.run.preemption import install_handlers

        install_handlers()
        return _as_program(run_recipe(recipe_file, sys.argv[1:]))
    return _exit_code(lambda: cmd_train(_drop_local_rank(list(argv)), recipe_path=recipe_file))
