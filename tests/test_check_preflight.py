"""`bigbatch.check.preflight`: the pre-flight `bigbatch check <recipe>` and `bigbatch train` share."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from bigbatch.check.preflight import chosen_in_free_memory
from bigbatch.cli import main
from bigbatch.config import ConfigError
from bigbatch.config.dsconfig import DS_CONFIGS
from bigbatch.config.files import load_recipe

STAGES = sorted(p.name for p in DS_CONFIGS.glob("zero*.json"))
PRECISIONS = ("fp32.json", "fp16.json", "bf16.json")


@pytest.mark.parametrize("stage,precision", list(itertools.product(STAGES, PRECISIONS)))
@pytest.mark.parametrize("optimizer", ["lamb", "lars", "adamw"])
def test_every_combination_resolved_by_the_recipe_is_clean_but_16_bits_at_stage_0(stage, precision, optimizer,
                                                                                    capsys):
    """16 bits at stage 0 go through DeepSpeed's FP16_UnfusedOptimizer for each of bigbatch's optimizers (measured
    wrong for LAMB, LARS and DeepSpeed's AdamW: tests/test_ds_configs.py); everything else is clean."""
    code = main(["check", "tiny", f"--deepspeed.configs={stage},{precision}", f"--optimizer.type={optimizer}",
                 "--world", "2"])
    out = capsys.readouterr().out
    if stage == "zero0.json" and precision != "fp32.json":
        assert code == 2 and "needs zero_optimization.stage >= 1, not 0" in out, out
    else:
        assert code == 0, out


def test_lamb_16bit_stage0_is_an_error(capsys):
    assert main(["check", "tiny", "--deepspeed.configs=zero0.json,fp16.json"]) == 2
    assert "needs zero_optimization.stage >= 1" in capsys.readouterr().out


def test_recipe_with_a_missing_data_file(tmp_path, capsys):
    assert main(["check", "tiny", f"--data.sources={tmp_path / 'nope.txt'}"]) == 2
    out = capsys.readouterr().out
    assert "nope.txt does not exist" in out and "Traceback" not in out


def test_train_runs_the_same_check_before_starting(tmp_path, capsys):
    fragment = tmp_path / "mine.json"
    fragment.write_text(json.dumps({"wall_clock_breakdwn": True}))
    code = main(["train", "tiny", f"--deepspeed.configs=zero1.json,fp32.json,{fragment}",
                 "--run-dir", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert "wall_clock_breakdwn is not a DeepSpeed key" in err and "'wall_clock_breakdown'" in err
    assert not (tmp_path / "run").exists()  # nothing was created


def _fragment_with_a_typo(tmp_path):
    fragment = tmp_path / "mine.json"
    fragment.write_text(json.dumps({"wall_clock_breakdwn": True}))
    return f"--deepspeed.configs=zero1.json,fp32.json,{fragment}"


# One mistake each, in the recipe's inputs (said as they are) or in its DeepSpeed JSON (said under one heading by train)
MISTAKES = {
    "missing data file": (lambda tmp: f"--data.sources={tmp / 'nope.txt'}", False),
    "bad tokenizer path": (lambda tmp: f"--data.tokenizer={tmp / 'nope.model'}", False),
    "batch that does not divide": (lambda tmp: "--batch.global_batch=4095", False),
    "unknown DeepSpeed key": (_fragment_with_a_typo, True),
    "16 bits at stage 0": (lambda tmp: "--deepspeed.configs=zero0.json,fp16.json", True),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_train_and_check_refuse_a_recipe_with_the_same_sentence(mistake, tmp_path, capsys):
    make_arg, in_json = MISTAKES[mistake]
    arg = make_arg(tmp_path)
    assert main(["check", "tiny", arg, "--world", "1"]) == 2  # the world an in-process train runs on
    out = capsys.readouterr().out
    (sentence,) = [line.removeprefix("error: ") for line in out.splitlines() if line.startswith("error: ")]
    assert main(["train", "tiny", arg, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    said = f"the DeepSpeed config from recipe tiny has 1 problem(s):\n  {sentence}" if in_json else sentence
    assert err.endswith(f"bigbatch: error: {said}\n") and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_an_unreachable_hub_is_a_note_for_check_and_the_error_that_stops_train(tmp_path, capsys):
    """Where the two differ on purpose: check may run where the hub is out of reach while the cluster is not; train
    cannot read the source (the tests run offline: conftest)."""
    source = "--data.sources=hf:bigbatch-tests/no-such-corpus"
    assert main(["check", "tiny", source]) == 0
    (note,) = [line for line in capsys.readouterr().out.splitlines() if "no-such-corpus" in line]
    unverified = " (bigbatch check could not verify it; the run will stop if it cannot)"
    assert note.startswith("note: data source hf:bigbatch-tests/no-such-corpus is not in the local cache")
    assert note.endswith(unverified)
    assert main(["train", "tiny", source, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.endswith(f"bigbatch: error: {note.removeprefix('note: ').removesuffix(unverified)}\n"), err
    assert not (tmp_path / "run").exists()


def test_train_on_gpus_chooses_again_in_the_free_memory_the_ranks_agree_on(monkeypatch):
    """What `bigbatch train` does once its process group exists on GPUs (faked: no GPU here): the "auto" choice made
    again in the ranks' least free memory, resolved and checked; a batch no micro-batch fits is refused."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (70 * 2**30, 81_559 * 2**20))
    recipe = load_recipe("gpt2_xl", {"batch.micro_batch": "auto", "deepspeed.activation_checkpointing": "auto"})
    run, why = chosen_in_free_memory(recipe, 128, lambda free: min(free, 20 * 2**30))
    assert (run.batch.micro_batch, run.batch.grad_accum, run.ds_config["train_micro_batch_size_per_gpu"]) == (2, 16, 2)
    assert "of 20.0 GiB free (the least of 128 ranks)" in why
    with pytest.raises(ConfigError, match="no micro-batch fits in 1.00 GiB per GPU"):
        chosen_in_free_memory(recipe, 128, lambda free: 2**30)
