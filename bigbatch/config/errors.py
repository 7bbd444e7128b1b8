"""How a command ends other than by finishing: the exceptions every layer raises and the exit codes the CLI gives them.

Here, in the lowest layer, because the data preparation, the run and every command raise them and the CLI (the top)
catches them: bad input (2), a run that stopped itself (3), and a stop request every rank agreed on (0, requeued).
"""

from __future__ import annotations

EXIT_BAD_INPUT = 2  # bad input: one sentence, nothing written
EXIT_STOPPED = 3  # the run stopped itself (overflow policy, divergence): not bad input (2), not a crash (1)


class ConfigError(ValueError):
    """Bad user input: one sentence naming the key, the value and the fix. The CLI turns it into exit code 2."""


class TrainingStopped(RuntimeError):
    """The run cannot make progress; its checkpoint holds the last good state. The CLI exits with EXIT_STOPPED."""


class Preempted(Exception):
    """Every rank agreed to stop before the run's last step; the state is resumable as it stands (exit 0)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
