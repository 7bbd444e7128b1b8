"""Phases and the batch ramp: the step table against formulas written out here, and a real run across a phase
boundary (one process, fp32) that keeps model and optimizer state and resumes bit for bit after the boundary."""

from __future__ import annotations

import dataclasses
import math
import shutil

import pytest

from bigbatch.cli import main
from bigbatch.config import BatchConfig, ConfigError, PhaseConfig, ScheduleConfig
from bigbatch.config.files import load_recipe
from bigbatch.config.overrides import apply_overrides
from bigbatch.config.schedule import ramp_batch, step_table
from bigbatch.run.metrics import read_metrics


def test_ramp_follows_megatron_increments():
    # start 32, +32 every 1000 / ((128 - 32) / 32) = 333.3 samples, capped at 128
    expected = {0: 32, 333: 32, 334: 64, 666: 64, 667: 96, 999: 96, 1000: 128, 10_000: 128}
    for consumed, batch in expected.items():
        assert ramp_batch(consumed, 32, 32, 1000, 128) == batch, consumed


def recipe(**changes):
    r = load_recipe("tiny")
    return dataclasses.replace(r, **changes)


def test_ramp_steps_and_lr_follow_the_rule():
    r = recipe(batch=BatchConfig(global_batch=128, micro_batch=16, ramp_start=32, ramp_increment=32, ramp_samples=1000),
               schedule=ScheduleConfig(steps=30, warmup=0.0, decay="constant"))
    steps = step_table(r, world=2)
    consumed = 0
    for sp in steps:
        batch = min(128, 32 + 32 * math.floor(consumed / (1000 / 3)))
        assert (sp.global_batch, sp.offset) == (batch, consumed)
        assert sp.grad_accum == batch // (16 * 2) and sp.micro_batch == 16
        # the square-root rule from 5e-3 at 256, at each step's own batch
        assert sp.lr == pytest.approx(5e-3 * math.sqrt(batch / 256))
        consumed += batch
    assert steps[0].global_batch == 32 and steps[-1].global_batch == 128


def test_warmup_in_samples_under_a_ramp_counts_samples():
    # ramp 32 -> 128 over 1000 samples; warmup 1500 samples, which the ramp's batches (11 x 32, 5 x 64, 4 x 96,
    # 4 x 128) take 24 steps to consume; counted in steps of the target batch (12) the LR would peak after 416
    r = recipe(batch=BatchConfig(global_batch=128, micro_batch=16, ramp_start=32, ramp_increment=32, ramp_samples=1000),
               schedule=ScheduleConfig(steps=40, warmup=1500, decay="poly", power=1.0))
    steps = step_table(r, world=2)
    consumed, warm = 0, None
    for sp in steps:
        if consumed + sp.global_batch >= 1500 and warm is None:
            warm = sp.step + 1
        consumed += sp.global_batch
    assert warm == 24
    consumed = 0
    for sp in steps:
        peak = 5e-3 * math.sqrt(sp.global_batch / 256)
        if sp.step < warm:  # Megatron's --lr-warmup-samples: LR x samples consumed / warmup samples
            expected = peak * min((consumed + sp.global_batch) / 1500, 1.0)
        else:  # then linear decay to 0 over the steps left
            expected = peak * (1 - (sp.step - warm) / (40 - warm))
        assert sp.lr == pytest.approx(expected), sp.step
        consumed += sp.global_batch
    assert steps[warm - 1].lr == pytest.approx(5e-3 * math.sqrt(128 / 256))  # the peak at the last warmup step


def test_ramp_that_does_not_divide_is_one_sentence():
    r = recipe(batch=BatchConfig(global_batch=128, micro_batch=16, ramp_start=8, ramp_increment=8, ramp_samples=100))
    with pytest.raises(ConfigError, match="reaches global batch 8, not divisible by micro_batch 16 x world 2"):
        step_table(r, world=2)
    with pytest.raises(ConfigError, match="is not a multiple of batch.ramp_increment"):
        apply_overrides(load_recipe("tiny"), {"batch.ramp_start": "100", "batch.ramp_increment": "7",
                                              "batch.ramp_samples": "10"}).validate()


def test_second_phase_rewarms_with_its_own_schedule():
    # NVIDIA's BERT LAMB recipe shape: phase 2 at a smaller batch and longer sequences, with its own warmup and
    # poly decay (power 0.5), and its own peak LR
    r = recipe(schedule=ScheduleConfig(steps=10, warmup=0.2, decay="poly", power=0.5),
               phases=(PhaseConfig(global_batch=2048, seq_len=128, samples=2048 * 8 - 100, lr=4e-3, warmup=0.25,
                                   decay="poly", power=0.5),))
    r = apply_overrides(r, {"model.max_position": "128"}).validate()
    steps = step_table(r, world=2)
    first, second = steps[:10], steps[10:]
    assert len(second) == 8  # ceil((16384 - 100) / 2048)
    peak1 = 5e-3 * math.sqrt(4096 / 256)
    for k, sp in enumerate(first):  # 2 warmup steps, then (1 - p)^0.5 with p = (k - 2) / 8
        expected = peak1 * ((k + 1) / 2 if k < 2 else (1 - (k - 2) / 8) ** 0.5)
        assert sp.lr == pytest.approx(expected) and (sp.phase, sp.seq_len, sp.global_batch) == (0, 64, 4096)
    for k, sp in enumerate(second):  # re-warmup over 2 steps to 4e-3, then its own decay over 6
        expected = 4e-3 * ((k + 1) / 2 if k < 2 else (1 - (k - 2) / 6) ** 0.5)
        assert sp.lr == pytest.approx(expected)
        assert (sp.phase, sp.phase_step, sp.seq_len, sp.global_batch, sp.offset) == (1, k, 128, 2048, k * 2048)
        assert sp.micro_batch == 256 and sp.grad_accum == 4  # the first phase's micro-batch, solved accumulation
    assert [sp.step for sp in steps] == list(range(18))


def test_phase_overrides_and_validation():
    r = recipe(phases=(PhaseConfig(seq_len=64, steps=3),))
    assert apply_overrides(r, {"phases.1.global_batch": "1024"}).phases[0].global_batch == 1024
    with pytest.raises(ConfigError, match="give exactly one of --phases.1.steps or --phases.1.samples"):
        apply_overrides(r, {"phases.1.samples": "100"}).validate()
    with pytest.raises(ConfigError, match="phases.1.seq_len=1024 exceeds model.max_position=64"):
        apply_overrides(r, {"phases.1.seq_len": "1024"}).validate()


SMALL = ["--batch.micro_batch=16", "--run.eval_every=2", "--checkpoint.keep_last=9", "--data.vocab_size=400",
         "--data.eval_samples=64", "--data.seq_len=32", "--model.max_position=64"]


@pytest.mark.slow
def test_run_across_a_phase_boundary_and_resume_after_it(tmp_path, capsys, corpus_file):
    recipe_file = tmp_path / "two_phase.py"
    recipe_file.write_text(
        "from bigbatch.config import BatchConfig, PhaseConfig, ScheduleConfig\n"
        "from bigbatch.config.files import find_recipe, load_recipe_file\n"
        "import dataclasses\n"
        "RECIPE = dataclasses.replace(load_recipe_file(find_recipe('tiny')), name='two_phase',\n"
        "    batch=BatchConfig(global_batch=64, micro_batch=16, ramp_start=32, ramp_increment=16, ramp_samples=64),\n"
        "    schedule=ScheduleConfig(steps=4, warmup=0.25),\n"
        "    phases=(PhaseConfig(global_batch=32, seq_len=64, steps=3, lr=2e-3, warmup=0.67),))\n")
    run = tmp_path / "run"
    args = ["train", str(recipe_file), f"--data.sources={corpus_file}", "--checkpoint.every_steps=1", *SMALL]
    assert main([*args, "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "phase 2/2 from step 4: seq 64, batch 16 x 2 x 1 = 32, 3 steps" in out
    records = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [(r["phase"], r["global_batch"], r["seq_len"]) for r in records] == [
        (1, 32, 32), (1, 48, 32), (1, 64, 32), (1, 64, 32), (2, 32, 64), (2, 32, 64), (2, 32, 64)]
    assert [r["samples"] for r in records] == [32, 80, 144, 208, 240, 272, 304]
    assert records[-1]["tokens"] == 208 * 32 + 96 * 64
    # the second phase re-warms over its own 2 steps (0.67 x 3), from half its peak
    assert records[4]["lr"] == pytest.approx(2e-3 / 2) and records[5]["lr"] == pytest.approx(2e-3)
    assert all(math.isfinite(r["loss"]) for r in records)
    assert (run / "data" / "phase2" / "train.npy").is_file()  # packed anew at 64 tokens, same tokenizer

    # Resume from the checkpoint one step into phase 2: the rest repeats bit for bit.
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    for step in (6, 7):
        shutil.rmtree(resumed / "checkpoints" / f"step{step:08d}")
    (resumed / "checkpoints" / "latest").write_text("step00000005")
    (resumed / "metrics.jsonl").write_text("")
    assert main(["train", str(run / "recipe.json"), "--run-dir", str(resumed), "--resume"]) == 0
    after = [r for r in read_metrics(resumed / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in after] == [6, 7]
    assert [r["loss"] for r in after] == [r["loss"] for r in records[5:]]
    assert [r["lr"] for r in after] == [r["lr"] for r in records[5:]]
