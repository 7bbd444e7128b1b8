"""The resolved DeepSpeed JSON: fragments merged, recipe-owned keys filled in, conflicts refused."""

from __future__ import annotations

import json

import hjson
import pytest
from deepspeed.runtime.config_utils import dict_raise_error_on_duplicate_keys

from bigbatch import engine
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


# What DeepSpeed 0.19 accepts in a config file (it reads it with hjson): comments of both kinds, trailing commas in
# objects and lists, a UTF-8 byte-order mark; and whole-valued numbers written with an exponent or a ".0".
LENIENT = ('\ufeff{\n  // a comment DeepSpeed skips\n  # and another\n  "zero_optimization": {"stage": 1,},\n'
           '  "steps_per_print": 1e3,\n  "wall_clock_breakdown": false,\n'
           '  "fp16": {"enabled": false, "loss_scale": 0.0},\n'
           '  "tensorboard": {"enabled": false, "output_path": "tb",}, "dummy": [1, 2,],\n}\n')


def deepspeeds_reading(path):
    """The file as DeepSpeed 0.19 itself reads it (`DeepSpeedConfig.__init__`, runtime/config.py)."""
    with open(path) as f:
        return hjson.load(f, object_pairs_hook=dict_raise_error_on_duplicate_keys)


@pytest.mark.parametrize("text", [LENIENT, '{"a": 1.5e3, "b": [1.0, 2.5], "c": "x"}', '{}', "  {\n}\n"])
def test_fragments_are_read_as_deepspeed_reads_them(tmp_path, text):
    path = tmp_path / "ds.json"
    path.write_text(text, encoding="utf-8")
    assert dsconfig.load_fragment(path) == deepspeeds_reading(path)
    if text == LENIENT:
        assert dsconfig.load_fragment(path)["steps_per_print"] == 1000


@pytest.mark.parametrize("text", ['{"a": 1, "a": 2}', '// twice, nested\n{"z": {"stage": 1, "stage": 2,},}'])
def test_duplicate_keys_stay_refused_like_deepspeed_refuses_them(tmp_path, text):
    path = tmp_path / "ds.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="Duplicate key"):
        deepspeeds_reading(path)
    with pytest.raises(ConfigError, match="states '(a|stage)' more than once in one object; keep one"):
        dsconfig.load_fragment(path)


@pytest.mark.parametrize("text", ["", "   \n\t\n", "\ufeff  \n"])
def test_a_file_of_whitespace_only_is_empty(tmp_path, text):
    path = tmp_path / "ds.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"ds.json is empty; write a JSON object into it"):
        dsconfig.load_fragment(path)


def test_the_engine_reads_a_config_path_the_same_way(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(LENIENT, encoding="utf-8")
    assert engine._load(path) == engine._load(str(path)) == dsconfig.load_fragment(path)
    with pytest.raises(ConfigError, match="cannot be read"):
        engine._load(tmp_path / "absent.json")
