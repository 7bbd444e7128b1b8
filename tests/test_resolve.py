"""bigbatch/resolve.py: one step from a recipe and a world size to the batch plan, LR, step table and DeepSpeed JSON;
and `bigbatch plan` on every phase of a recipe, not only the first."""

from __future__ import annotations

import math

import pytest

from bigbatch.cli import main
from bigbatch.config.files import load_recipe
from bigbatch.plan.advice import plan
from bigbatch.plan.command import parse_memory
from bigbatch.resolve import phase_recipe, resolve

from conftest import pinned


def test_tiny_resolves_as_the_readme_says():
    run = resolve(load_recipe("tiny"), 2)
    # README: 256 per micro-batch x 8 accumulation x 2 ranks = 4,096; 5e-3 at batch 256 carried by the square-root
    # rule: 5e-3 * sqrt(4096 / 256) = 2e-2; 60 steps
    assert (run.batch.micro_batch, run.batch.grad_accum, run.batch.global_batch) == (256, 8, 4096)
    assert run.lr == pytest.approx(5e-3 * math.sqrt(4096 / 256)) and "sqrt" in run.lr_rule
    assert len(run.steps) == 60 and max(sp.lr for sp in run.steps) == pytest.approx(0.02)
    assert (run.ds.stage, run.ds.precision, run.ds.checkpointing, run.ds.clipping) == (1, "fp32", False, 1.0)
    cfg = run.ds_config
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == \
        (4096, 256, 8)
    assert cfg["optimizer"]["type"] == "LAMB" and cfg["optimizer"]["params"]["lr"] == run.lr


def test_the_typed_view_reads_stage_precision_and_checkpointing():
    run = resolve(pinned("gpt2_xl"), 128)  # ZeRO-2, bf16, activation checkpointing (README's table)
    assert (run.ds.stage, run.ds.precision, run.ds.checkpointing) == (2, "bf16", True)
    assert run.ds.zero["stage"] == 2


def test_a_phase_runs_with_its_own_length_and_batch():
    recipe = pinned("bert_large")  # phase 2: 32,768 x seq 512, micro-batch 32 (NVIDIA's BERT LAMB recipe)
    second = phase_recipe(recipe, 1)
    assert (second.data.seq_len, second.batch.global_batch, second.batch.micro_batch, second.phases) == \
        (512, 32768, 32, ())
    first = phase_recipe(recipe, 0)
    assert (first.data.seq_len, first.batch.global_batch, first.phases) == (128, 65536, ())
    run = resolve(recipe, 64)
    assert sorted({(sp.phase, sp.seq_len, sp.global_batch) for sp in run.steps}) == [(0, 128, 65536), (1, 512, 32768)]


def test_plan_checks_every_phase(capsys):
    """A second phase that does not fit makes `bigbatch plan` exit 1 even when the first fits (before, only the
    first phase was planned: bert_large's seq-512 phase was never checked)."""
    over = ["--phases.1.micro_batch=128"]  # 128 x 512 tokens per micro-batch against phase 1's 256 x 128
    recipe = pinned("bert_large", {"phases.1.micro_batch": "128"})
    c = recipe.cluster
    need = [plan(phase_recipe(recipe, p), c.nodes, c.gpus_per_node, parse_memory("80GB")).own.total for p in (0, 1)]
    assert need[0] < need[1]
    between = (need[0] + need[1]) // 2
    assert main(["plan", "bert_large", *over, f"--gpu-memory={between / 2**30:.3f}GiB"]) == 1
    out = capsys.readouterr().out
    assert "bert_large does not fit as written" in out
    lines = out.splitlines()
    one = next(line for line in lines if "phase 1 of 2 (sequence length 128, global batch 65536)" in line)
    two = next(line for line in lines if "phase 2 of 2 (sequence length 512, global batch 32768)" in line)
    assert "(does not fit)" not in one and "(does not fit)" in two
    assert main(["plan", "bert_large", *over, f"--gpu-memory={need[1] / 2**30 + 0.01:.3f}GiB"]) == 0
