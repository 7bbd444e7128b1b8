"""The recipe tree: loading shipped recipes (the user's own ./recipes and ./ds_configs first), overrides on the
tree's own names, unknown keys with a hint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bigbatch.config import ConfigError, Recipe, dsconfig
from bigbatch.config.files import load_recipe, recipe_from_dict
from bigbatch.config.overrides import apply_overrides, parse_override_args


def test_tiny_recipe_loads_and_validates():
    recipe = load_recipe("tiny")
    assert recipe.name == "tiny"
    assert recipe.batch.global_batch >= 4096
    assert recipe.optimizer.type == "lamb"
    assert recipe.deepspeed.configs == ("zero1.json", "fp32.json")


def test_overrides_parse_to_field_types():
    overrides, rest = parse_override_args(
        ["tiny", "--batch.global_batch=8192", "--optimizer.lr", "0.01", "--optimizer.betas=0.8,0.95",
         "--data.sources=a.txt,b.jsonl", "--run-dir", "x"])
    assert rest == ["tiny", "--run-dir", "x"]
    recipe = apply_overrides(Recipe(), overrides)
    assert recipe.batch.global_batch == 8192
    assert recipe.optimizer.lr == 0.01
    assert recipe.optimizer.betas == (0.8, 0.95)
    assert recipe.data.sources == ("a.txt", "b.jsonl")


def test_unknown_key_gets_did_you_mean():
    with pytest.raises(ConfigError, match=r"--batch\.global_batch\?"):
        apply_overrides(Recipe(), {"batch.global_bach": "1"})


def test_bad_value_names_key_and_type():
    with pytest.raises(ConfigError, match=r"--batch.global_batch='lots' is not a valid int"):
        apply_overrides(Recipe(), {"batch.global_batch": "lots"})
    with pytest.raises(ConfigError, match="1.5"):
        apply_overrides(Recipe(), {"batch.global_batch": "1.5"})


def test_validation_names_key_value_and_fix():
    with pytest.raises(ConfigError, match=r"optimizer.type='lamm'.*did you mean 'lamb'"):
        load_recipe("tiny", {"optimizer.type": "lamm"})
    with pytest.raises(ConfigError, match=r"model.hidden_size=65 is not divisible by model.num_heads=2"):
        load_recipe("tiny", {"model.hidden_size": "65"})


def test_unknown_recipe_lists_shipped_ones():
    with pytest.raises(ConfigError, match=r"did you mean 'tiny'"):
        load_recipe("tinny")


def test_recipe_json_round_trip(tmp_path):
    recipe = load_recipe("tiny", {"batch.global_batch": "8192"})
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"recipe": recipe.to_dict(), "resolved": {}}))
    assert load_recipe(str(path)) == recipe
    with pytest.raises(ConfigError, match="unknown recipe key --batch.nope"):
        recipe_from_dict({"batch": {"nope": 1}})


def test_the_users_own_recipes_and_fragments_come_before_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "tiny.py").write_text(
        "import dataclasses\n"
        "from bigbatch.config.files import shipped_dir, load_recipe_file\n"
        "RECIPE = dataclasses.replace(load_recipe_file(shipped_dir('recipes') / 'tiny.py'), name='my_tiny')\n")
    (tmp_path / "ds_configs").mkdir()
    (tmp_path / "ds_configs" / "zero1.json").write_text('{"zero_optimization": {"stage": 1}}')
    assert load_recipe("tiny").name == "my_tiny"
    assert load_recipe("bert_base").name == "bert_base"  # not in ./recipes: the shipped one
    assert dsconfig.find_fragment("zero1") == Path("ds_configs") / "zero1.json"
    assert dsconfig.find_fragment("bf16.json") == dsconfig.DS_CONFIGS / "bf16.json"
    with pytest.raises(ConfigError, match="not found .*shipped: act_ckpt.json"):
        dsconfig.find_fragment("zero9.json")


@pytest.mark.parametrize("overrides,ok", [
    ({"model.heads_per_layer": "1,2"}, True),
    ({"model.heads_per_layer": "2"}, False),  # one count for two layers
    ({"model.heads_per_layer": "0,2"}, False),
    ({"model.heads_per_layer": "3,2"}, False),  # more than num_heads
    ({"model.arch": "llama", "model.num_heads": "4", "model.num_kv_heads": "2", "model.heads_per_layer": "2,4"},
     True),
    ({"model.arch": "llama", "model.num_heads": "4", "model.num_kv_heads": "2", "model.heads_per_layer": "1,4"},
     False),  # half a key-value group
])
def test_heads_per_layer_gives_one_count_per_layer_within_the_heads(overrides, ok):
    if ok:
        assert load_recipe("tiny", overrides).model.heads_per_layer == tuple(
            int(h) for h in overrides["model.heads_per_layer"].split(","))
        return
    with pytest.raises(ConfigError, match=r"model.heads_per_layer=.* must give 2 counts \(one per layer\)"):
        load_recipe("tiny", overrides)
