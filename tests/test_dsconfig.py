"""The resolved DeepSpeed JSON: fragments merged, recipe-owned keys filled in, conflicts refused."""

from __future__ import annotations

import json

import pytest

from bigbatch.config import ConfigError, dsconfig
from bigbatch.config.files import load_recipe
from bigbatch.config.schedule import solve_batch

SHIPPED = sorted(p.name for p in dsconfig.DS_CONFIGS.glob("*.json"))


def test_every_shipped_fragment_is_a_json_object():
    expected = {"zero0.json", "zero1.json", "zero2.json", "zero3.json", "fp32.json", "fp16.json", "bf16.json"}
    assert expected | {"act_ckpt.json"} <= set(SHIPPED)
    for name in SHIPPED:
        assert isinstance(dsconfig.load_fragment(dsconfig.DS_CONFIGS / name), dict)


def test_build_fills_recipe_owned_keys():
    recipe = load_recipe("tiny")
    plan = solve_batch(4096, 2, micro_batch=256)
    config = dsconfig.build(recipe, plan, lr=0.02)
    assert config["train_batch_size"] == 4096
    assert config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"] * 2 == 4096
    assert config["gradient_clipping"] == 1.0  # always stated: DeepSpeed would otherwise clip at 1.0 silently
    assert config["optimizer"]["type"] == "LAMB" and config["optimizer"]["params"]["lr"] == 0.02
    assert config["zero_optimization"]["stage"] == 1


def test_conflicting_fragments_are_refused(tmp_path):
    recipe = load_recipe("tiny", {"deepspeed.configs": "zero1.json,zero2.json"})
    with pytest.raises(ConfigError, match=r"zero_optimization.stage is 1 in .*zero1.json but 2 in .*zero2.json"):
        dsconfig.build(recipe, solve_batch(64, 1, micro_batch=64), lr=1e-3)


def test_fragment_may_not_restate_recipe_numbers_differently(tmp_path):
    frag = tmp_path / "batch.json"
    frag.write_text(json.dumps({"train_batch_size": 999}))
    recipe = load_recipe("tiny", {"deepspeed.configs": f"zero1.json,{frag}"})
    with pytest.raises(ConfigError, match="sets train_batch_size=999 but the recipe gives 64"):
        dsconfig.build(recipe, solve_batch(64, 1, micro_batch=64), lr=1e-3)
    frag.write_text(json.dumps({"train_batch_size": 64}))  # the same number is fine
    assert dsconfig.build(recipe, solve_batch(64, 1, micro_batch=64), lr=1e-3)["train_batch_size"] == 64
    frag.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="the recipe owns it"):
        dsconfig.build(recipe, solve_batch(64, 1, micro_batch=64), lr=1e-3)


def test_missing_fragment_lists_shipped():
    recipe = load_recipe("tiny", {"deepspeed.configs": "zero9.json"})
    with pytest.raises(ConfigError, match="'zero9.json' not found.*zero1.json"):
        dsconfig.build(recipe, solve_batch(64, 1, micro_batch=64), lr=1e-3)
