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
