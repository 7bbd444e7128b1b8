"""Every command called in-process (`bigbatch.cli.main(argv)`, how tests and notebooks drive it) returns its exit
code: --help is 0 with its usage printed, an unknown flag 2, and neither leaves the interpreter through SystemExit."""

from __future__ import annotations

import pytest

from bigbatch.cli import COMMANDS, main
from bigbatch.config.errors import EXIT_BAD_INPUT, ConfigError, StorageFault, exit_code
from bigbatch.models.finetune import main as finetune_main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_and_a_bad_flag_return_their_codes(command, capsys):
    assert main([command, "--help"]) == 0
    assert "usage" in capsys.readouterr().out.lower()
    assert main([command, "--no-such-flag-anywhere"]) == EXIT_BAD_INPUT


def test_finetune_help_and_bad_flag_return_their_codes(capsys):
    assert finetune_main(["--help"]) == 0
    assert "python -m bigbatch.finetune" in capsys.readouterr().out
    assert finetune_main(["--no-such-flag-anywhere"]) == EXIT_BAD_INPUT


@pytest.mark.parametrize("raised, code, said", [
    (SystemExit(None), 0, ""), (SystemExit(0), 0, ""), (SystemExit(5), 5, ""),
    (SystemExit("a sentence"), 1, "a sentence"), (ConfigError("bad key"), 2, "prog: error: bad key"),
    (StorageFault("disk full"), 4, "prog: storage fault: disk full")])
def test_each_ending_has_its_code_and_sentence(raised, code, said, capsys):
    def run() -> int:
        raise raised

    assert exit_code(run, prog="prog") == code
    assert said in capsys.readouterr().err
