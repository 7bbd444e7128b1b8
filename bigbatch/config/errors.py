"""How a command ends other than by finishing: the exceptions every layer raises and the exit codes the CLI gives them.

Here, in the lowest layer, because the data preparation, the run and every command raise them and the CLI (the top)
catches them: bad input (2), a run that stopped itself (3), a storage fault (4: a full disk, an unwritable or damaged
run directory; not requeued), and a stop request every rank agreed on (0, requeued).
"""

from __future__ import annotations

import sys
from typing import Callable

EXIT_BAD_INPUT = 2  # bad input: one sentence, nothing written
EXIT_STOPPED = 3  # the run stopped itself (overflow policy, divergence): not bad input (2), not a crash (1)
EXIT_STORAGE = 4  # the run directory's storage failed it (full, unwritable, damaged): a requeue would fail the same way


class ConfigError(ValueError):
    """Bad user input: one sentence naming the key, the value and the fix. The CLI turns it into exit code 2."""


class TrainingStopped(RuntimeError):
    """The run cannot make progress; its checkpoint holds the last good state. The CLI exits with EXIT_STOPPED."""


class StorageFault(RuntimeError):
    """The run directory cannot hold what the run must write, or what it holds is damaged: one sentence naming the
    filesystem, the bytes needed and free and the last complete checkpoint; the last good state is kept. The CLI exits
    with EXIT_STORAGE."""


class Preempted(Exception):
    """Every rank agreed to stop before the run's last step; the state is resumable as it stands (exit 0)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def exit_code(run: Callable[[], int], prog: str = "bigbatch") -> int:
    """`run()`'s exit code, with the endings above turned into theirs: bad input is one sentence and 2, a run that
    stopped itself its sentence and 3, a storage fault its sentence and 4, and argparse's own exit (--help, a bad
    flag) its code, so that a command called in-process returns instead of leaving the interpreter."""
    try:
        return run()
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(exit_.code, file=sys.stderr)  # sys.exit("sentence"): the interpreter would print it and exit 1
        return 1
    except ConfigError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingStopped as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return EXIT_STOPPED
    except StorageFault as err:
        print(f"{prog}: storage fault: {err}", file=sys.stderr)
        return EXIT_STORAGE
