"""Every shipped recipe: planned and checked at its real scale (arithmetic, no GPU), and a CPU smoke run with size
overrides (a few layers, a small width) that trains a few steps through the real trainer with the recipe's own
DeepSpeed fragments, ramp and phases."""

from __future__ import annotations

import json
import math

import pytest

from bigbatch.cli import main
from bigbatch.config.files import load_recipe, shipped_recipes
from bigbatch.models.build import build_model, count_parameters
from bigbatch.run.metrics import read_metrics

from conftest import ROOT, pinned

RECIPES = shipped_recipes()
# Parameter counts the recipes' names promise (transformers' own models, padded vocabularies), within 10%.
SIZES = {"bert_base": 110e6, "bert_large": 335e6, "bert_large_32k": 335e6, "gpt2_small": 124e6, "gpt2_medium": 355e6,
         "gpt2_xl": 1.56e9, "llama_1b": 1.1e9}


def test_the_issue_list_of_recipes_is_shipped():
    assert set(SIZES) | {"tiny"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_plan_and_check_at_real_scale(name, capsys):
    assert main(["check", name]) == 0, capsys.readouterr().out
    assert main(["plan", name]) == 0, capsys.readouterr().out  # fits the cluster it names, as written
    out = capsys.readouterr().out
    r = load_recipe(name)
    assert f"on {r.cluster.nodes * r.cluster.gpus_per_node} GPUs" in out


@pytest.mark.parametrize("name", sorted(SIZES))
def test_model_size_matches_its_name(name):
    import torch

    r = load_recipe(name)
    with torch.device("meta"):
        n = count_parameters(build_model(r.model, r.data.vocab_size, pad_id=0))
    assert n == pytest.approx(SIZES[name], rel=0.1)


SMOKE = ["--model.hidden_size=32", "--model.num_layers=1", "--model.num_heads=2", "--model.intermediate_size=64",
         "--model.max_position=64", "--data.seq_len=32", "--data.vocab_size=300", "--data.eval_samples=32",
         "--data.eval_fraction=0.05", "--schedule.steps=2", "--batch.global_batch=16", "--batch.micro_batch=8",
         "--run.eval_every=2", "--cluster.gpus_per_node=1", "--data.whole_word_masking=true"]
# gpt2_xl's ramp, 512 -> 4,096 in steps of 512 (1/8 of the batch each), shrunk to 2 -> 16 in steps of 2, finished in
# 8 samples. Megatron's rule: a level lasts 8 / ((16 - 2) / 2) = 8/7 samples, so after s samples the batch is
# 2 + 2 * floor(s / (8/7)): steps of 2 (s=0), 4 (s=2), 12 (s=6), then 16 (s=18, past the ramp).
RAMP = ["--batch.micro_batch=2", "--batch.ramp_start=2", "--batch.ramp_increment=2", "--batch.ramp_samples=8",
        "--schedule.steps=4"]
RAMP_BATCHES = [2, 4, 12, 16]


def fragment_settings(configs: tuple[str, ...]) -> tuple[int, bool, bool]:
    """(ZeRO stage, bf16, activation checkpointing) as the recipe's own ds_configs/ files state them."""
    merged: dict = {}
    for name in configs:
        merged.update(json.loads((ROOT / "ds_configs" / name).read_text()))
    return (merged["zero_optimization"]["stage"], bool(merged.get("bf16", {}).get("enabled")),
            "activation_checkpointing" in merged)


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_smoke_train_with_size_overrides(name, tmp_path, corpus_file, monkeypatch):
    """Each recipe's own DeepSpeed fragments (ZeRO stage, bf16, activation checkpointing), its batch ramp and phases,
    shrunk in size only; the engine that really ran is read as DeepSpeed built it."""
    import deepspeed
    import torch

    built = []
    real = deepspeed.initialize

    def recording_initialize(*args, **kwargs):
        result = real(*args, **kwargs)
        engine = result[0]
        built.append((engine.zero_optimization_stage(), engine.bfloat16_enabled(),
                      engine.module.hf.is_gradient_checkpointing, next(engine.module.parameters()).dtype))
        return result

    monkeypatch.setattr(deepspeed, "initialize", recording_initialize)
    r = load_recipe(name)
    extra = [f"--data.sources={corpus_file}"]
    if r.model.num_kv_heads:
        extra.append("--model.num_kv_heads=1")
    if r.batch.ramp_start:
        assert (r.batch.ramp_start * 8, r.batch.ramp_increment * 8) == (r.batch.global_batch,) * 2  # RAMP's shape
        extra += RAMP
    for i, _ in enumerate(r.phases, start=1):
        extra += [f"--phases.{i}.seq_len=64", f"--phases.{i}.global_batch=8", f"--phases.{i}.micro_batch=4",
                  f"--phases.{i}.steps=1"]
    run = tmp_path / "run"
    assert main(["train", name, "--run-dir", str(run), *SMOKE, *extra]) == 0
    stage, bf16, checkpointing = fragment_settings(r.deepspeed.configs)
    assert built and set(built) == {(stage, bf16, checkpointing, torch.bfloat16 if bf16 else torch.float32)}
    records = [x for x in read_metrics(run / "metrics.jsonl") if "loss" in x]
    steps = len(RAMP_BATCHES) if r.batch.ramp_start else 2
    assert len(records) == steps + len(r.phases)
    assert all(math.isfinite(x["loss"]) for x in records)
    if r.batch.ramp_start:
        samples = [0] + [x["samples"] for x in records]
        assert [b - a for a, b in zip(samples, samples[1:])] == RAMP_BATCHES
    assert (run / "checkpoints" / "latest").is_file()


def test_pure_32k_plan_is_the_lamb_papers():
    """The second BERT-large plan: 15,625 steps at 32,768 (LAMB paper, Table 1), 90% of them at sequence 128."""
    from bigbatch.config.schedule import step_table

    steps = step_table(pinned("bert_large_32k"), world=64)
    assert len(steps) == 15_625 and {sp.global_batch for sp in steps} == {32_768}
    assert [sum(sp.seq_len == n for sp in steps) for n in (128, 512)] == [14_063, 1_562]
    assert max(sp.lr for sp in steps) == pytest.approx(5e-3)
    r = load_recipe("bert_large_32k")
    assert (r.optimizer.min_coeff, r.optimizer.max_coeff) == (0.0, math.inf)  # no trust-ratio clamp, as published
