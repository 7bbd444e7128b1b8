"""The `bigbatch` command, one entry point: each subcommand lives with its package (`bigbatch.run.command` for
`train`, `bigbatch.check.command`, `bigbatch.plan`, ...) and is imported only when it runs.

Bad input ends with one sentence on stderr and exit code 2, on every rank, never a traceback; a run that stopped
itself, its sentence and exit code 3; a storage fault (full, unwritable or damaged run directory), exit code 4.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Optional

from bigbatch.config.errors import EXIT_BAD_INPUT, exit_code
from bigbatch.run.distributed import shutdown
from bigbatch.run.launch import drop_local_rank
from bigbatch.run.preemption import install_handlers, trains


def _lazy(module: str, name: str) -> Callable[[list[str]], int]:
    """A subcommand imported when it runs, so `bigbatch train` does not load the planner, the sweep or SentencePiece."""

    def run(args: list[str]) -> int:
        return getattr(importlib.import_module(module), name)(args)

    return run


COMMANDS = {
    "train": _lazy("bigbatch.run.command", "cmd_train"),
    "check": _lazy("bigbatch.check.command", "cmd_check"),
    "plan": _lazy("bigbatch.plan.command", "cmd_plan"),
    "sweep": _lazy("bigbatch.run.sweep", "cmd_sweep"),
    "tokenizer": _lazy("bigbatch.data.tokenizer", "cmd_tokenizer"),
    "export": _lazy("bigbatch.run.export", "cmd_export"),
    "compress": _lazy("bigbatch.run.compress", "cmd_compress"),
}


def _as_program(code: int) -> int:
    """The process is about to exit: tear the process group down first (see `bigbatch.run.distributed.shutdown`).
    Only when run as a program: an in-process caller may train again on the same group."""
    shutdown()
    return code


def main(argv: Optional[list[str]] = None) -> int:
    if argv is None:  # a program (the `bigbatch` script): a training's signals are stop requests from here on
        if trains(sys.argv[1:]):
            install_handlers()
        return _as_program(main(sys.argv[1:]))
    argv = drop_local_rank(list(argv))
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: bigbatch {" + ",".join(COMMANDS) + "} ...\n\n"
              "  train   train a recipe on this launch's ranks (see `bigbatch train --help`)\n"
              "  check   report every problem of a recipe or a DeepSpeed JSON, one sentence each\n"
              "  plan    memory per GPU for each ZeRO stage, precision and phase; step time and time to train\n"
              "  sweep   a grid of overrides as one SLURM job array; --report tabulates final eval losses\n"
              "  tokenizer train   a SentencePiece model for --data.tokenizer\n"
              "  export  a run's newest checkpoint as a transformers directory (from_pretrained), with its tokenizer\n"
              "  compress  prune and/or quantize a run or an export; compression.json reports before and after\n")
        return 0 if argv else EXIT_BAD_INPUT
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"bigbatch: error: unknown command {command!r}; commands: {', '.join(COMMANDS)}.", file=sys.stderr)
        return EXIT_BAD_INPUT
    return exit_code(lambda: COMMANDS[command](rest))


def run_recipe(recipe_file: str, argv: Optional[list[str]] = None) -> int:
    """`python recipes/<name>.py [--key=value ...]`: train that recipe in this process (or under a launcher)."""
    if argv is None:
        install_handlers()
        return _as_program(run_recipe(recipe_file, sys.argv[1:]))
    command = importlib.import_module("bigbatch.run.command")
    return exit_code(lambda: command.cmd_train(drop_local_rank(list(argv)), recipe_path=recipe_file))
