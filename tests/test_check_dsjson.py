"""`bigbatch.check.dsjson.check_config`: DeepSpeed's own parser run until it accepts, unknown keys, the batch
arithmetic, placeholders and the defaults DeepSpeed applies silently."""

from __future__ import annotations

import json

from bigbatch.cli import main

from conftest import check_messages


def test_each_mistake_is_one_sentence_with_a_hint(tmp_path, capsys):
    bad = {
        "train_batch_size": 100, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2,
        "gradient_clippin": 1.0,
        "fp16": {"enabled": True, "initial_scale_powr": 16}, "bf16": {"enabled": True},
        "zero_optimization": {"stage": 5, "overlap_com": True},
        "optimizer": {"type": "Adamm", "params": {"lr": 1e-3}},
        "scheduler": {"type": "WarmupLRR"},
        "activation_checkpointing": {"partition_activations": True, "cpu_checkpointng": True},
        "tensorboard": {"enabled": True, "output_pth": "x"},
    }
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(bad))
    assert main(["check", str(path)]) == 2
    out = capsys.readouterr().out
    expected = [
        "train_batch_size=100 is not micro 8 x accumulation 2 = 16 times a whole number of ranks",
        "gradient_clippin is not a DeepSpeed key and DeepSpeed would ignore it silently "
        "(did you mean 'gradient_clipping'?)",
        "fp16.initial_scale_powr is not a DeepSpeed key (did you mean 'initial_scale_power'?)",
        "fp16.enabled and bf16.enabled are both true",
        "zero_optimization.stage=5 must be a whole number in [0, 3]",
        "zero_optimization.overlap_com is not a DeepSpeed key (did you mean 'overlap_comm'?)",
        "optimizer.type='Adamm' is not an optimizer DeepSpeed or bigbatch knows (did you mean 'adam'?)",
        "scheduler.type='WarmupLRR' is not a DeepSpeed LR schedule (did you mean 'WarmupLR'?)",
        "activation_checkpointing.cpu_checkpointng is not a key of DeepSpeed's activation_checkpointing section",
        "tensorboard.output_pth is not a DeepSpeed key (did you mean 'output_path'?)",
    ]
    for text in expected:
        assert text in out, f"missing: {text}\n{out}"
    error_lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(error_lines) == len(expected), out  # each problem reported once
    assert "Traceback" not in out


def test_hugging_face_auto_values_are_errors():
    found = check_messages({"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": 1.0,
                      "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}})
    assert any(m.startswith('train_micro_batch_size_per_gpu="auto"') for m in found)
    assert any(m.startswith('zero_optimization.reduce_bucket_size="auto"') for m in found)


def test_world_makes_the_batch_product_exact():
    config = {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2,
              "gradient_clipping": 1.0}
    assert check_messages(config, world=4) == []
    assert check_messages(config) == []  # 64 = 8 x 2 x 4 for some whole world
    (found,) = check_messages(config, world=3)
    assert found.startswith("train_batch_size=64 != micro 8 x accumulation 2 x world 3 = 48")


def test_silent_defaults_are_notes_not_errors():
    notes = check_messages({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8}, level="note")
    assert any("clips gradients at global norm 1.0" in n for n in notes)
    assert check_messages({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8}) == []


def test_deepspeed_parser_failures_name_the_key_they_were_reading():
    (found,) = check_messages({"gradient_clipping": 1.0, "vocabulary_size": "big"})
    assert found.startswith("DeepSpeed's parser fails on vocabulary_size='big' (TypeError")
    (found,) = check_messages({"gradient_clipping": 1.0,
                               "fp16": {"enabled": True, "fp16_master_weights_and_grads": True}})
    assert found.startswith("DeepSpeed rejects the combination: Fp16_master_weights_and_grads is only supported")


def test_auto_inside_a_section_is_said_to_be_dropped_not_to_fail():
    """DeepSpeed's pydantic sections drop "auto" (DeepSpeedConfigModel.__init__): fp16.enabled="auto" runs in fp32.
    Only the top-level batch keys fail with a TypeError."""
    found = check_messages({"gradient_clipping": 1.0, "train_batch_size": "auto",
                            "fp16": {"enabled": "auto", "loss_scale": "auto"}, "bf16": {"enabled": "auto"},
                            "zero_optimization": {"stage": "auto", "offload_optimizer": {"device": "auto"}}})
    assert 'fp16.enabled="auto" is a placeholder only the Hugging Face Trainer fills in; DeepSpeed drops it ' \
           "silently and uses its default false, so fp16 is off and the run is in fp32 unless another precision " \
           "is on: give a value." in found
    assert any(m.startswith('bf16.enabled="auto"') and "so bf16 is off" in m for m in found)
    assert any(m.startswith('fp16.loss_scale="auto"') and "uses its default 0:" in m for m in found)
    assert any(m.startswith('zero_optimization.stage="auto"') and "uses its default 0:" in m for m in found)
    assert any(m.startswith('zero_optimization.offload_optimizer.device="auto"') and "drops it silently" in m
               for m in found)
    assert [m for m in found if "TypeError" in m] == [
        'train_batch_size="auto" is a placeholder only the Hugging Face Trainer fills in (DeepSpeed fails on it with '
        "a TypeError); give a value, or leave batch keys out and let bigbatch fill them from the recipe."]


def test_underscore_keys_are_comments_noted_not_misspellings():
    config = {"gradient_clipping": 1.0, "_comment": "from the 64K LAMB run", "_comet": 1,
              "activation_checkpointing": {"_why": "memory", "partition_activations": True}}
    assert check_messages(config) == []
    notes = check_messages(config, level="note")
    assert "_comment starts with _, a comment by convention: DeepSpeed ignores it." in notes
    assert "activation_checkpointing._why starts with _, a comment by convention: DeepSpeed ignores it." in notes
    assert not any("did you mean" in n for n in notes)
    # fp16 is a pydantic model that refuses every key it does not know, comments included
    (found,) = check_messages({"gradient_clipping": 1.0, "fp16": {"enabled": False, "_note": "x"}})
    assert found == ("fp16._note is refused: DeepSpeed's fp16 section takes no comment keys; move it to the top "
                     "level, where DeepSpeed ignores keys starting with _.")


def test_a_sibling_sections_key_is_named_as_such():
    found = check_messages({"gradient_clipping": 1.0, "bf16": {"enabled": True, "loss_scale": 0}})
    assert found == ["bf16.loss_scale is an fp16-only key, which DeepSpeed's bf16 section refuses; remove it."]
    found = check_messages({"gradient_clipping": 1.0, "fp16": {"enabled": True, "immediate_grad_update": True}})
    assert found == ["fp16.immediate_grad_update is a bf16-only key, which DeepSpeed's fp16 section refuses; "
                     "remove it."]


def test_a_misspelt_stage3_key_is_suggested_with_its_stage3_spelling():
    (found,) = check_messages({"gradient_clipping": 1.0,
                               "zero_optimization": {"stage": 3, "stage3_param_persitence_threshold": 10}})
    assert found == ("zero_optimization.stage3_param_persitence_threshold is not a DeepSpeed key "
                     "(did you mean 'stage3_param_persistence_threshold'?).")


def test_a_whole_float_batch_size_is_refused_without_contradiction(tmp_path):
    found = check_messages({"gradient_clipping": 1.0, "train_batch_size": 1000.0,
                            "train_micro_batch_size_per_gpu": 1e1})
    assert found == ["train_batch_size=1000.0 must be written as an integer: 1000.",
                     "train_micro_batch_size_per_gpu=10.0 must be written as an integer: 10."]
    # a file is read as DeepSpeed reads it (hjson), which turns 1e3 into the integer 1000: accepted
    path = tmp_path / "ds.json"
    path.write_text('{"train_batch_size": 1e3, "train_micro_batch_size_per_gpu": 10, "gradient_clipping": 1.0}')
    assert main(["check", str(path), "--world", "100"]) == 0


def test_a_file_of_whitespace_only_is_empty(tmp_path, capsys):
    path = tmp_path / "ds.json"
    path.write_text("  \n\t\n")
    assert main(["check", str(path)]) == 2
    assert f"DeepSpeed config {path} is empty; write a JSON object into it, at least {{}}." in capsys.readouterr().err


def test_non_finite_values_of_a_dict_are_refused():
    """hjson reads NaN on one line as a parse error, so only a config built in Python reaches the value rules."""
    found = check_messages({"gradient_clipping": float("nan"), "optimizer": {"type": "AdamW",
                                                                             "params": {"lr": float("inf")}}})
    assert any(m.startswith("gradient_clipping=nan must be") for m in found)
    assert "optimizer.params.lr=inf must be a number > 0." in found
