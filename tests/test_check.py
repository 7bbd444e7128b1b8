"""`bigbatch check`: every problem of a DeepSpeed JSON, one sentence each, exit 2; clean configs exit 0."""

from __future__ import annotations

import itertools
import json

import pytest

from bigbatch.check import check_config, errors
from bigbatch.cli import main
from bigbatch.dsconfig import DS_CONFIGS

STAGES = sorted(p.name for p in DS_CONFIGS.glob("zero*.json"))
PRECISIONS = ("fp32.json", "fp16.json", "bf16.json")


def messages(config, world=None, level="error"):
    return [f.message for f in check_config(config, world) if f.level == level]


@pytest.mark.parametrize("name", sorted(p.name for p in DS_CONFIGS.glob("*.json")))
def test_every_shipped_fragment_passes_on_its_own(name, capsys):
    assert main(["check", str(DS_CONFIGS / name)]) == 0
    out = capsys.readouterr().out
    assert "0 error(s)" in out and "error:" not in out
    # absent batch keys are filled in by the recipe: a note, not an error
    assert "no batch sizes given" in out


@pytest.mark.parametrize("stage,precision", list(itertools.product(STAGES, PRECISIONS)))
def test_every_combination_resolved_by_the_recipe_is_clean(stage, precision, capsys):
    # LAMB in 16 bits at stage 0 is refused by design (see test_lamb_16bit_stage0_is_an_error)
    optimizer = "adamw" if stage == "zero0.json" and precision != "fp32.json" else "lamb"
    code = main(["check", "tiny", f"--deepspeed.configs={stage},{precision}", f"--optimizer.type={optimizer}",
                 "--world", "2"])
    assert code == 0, capsys.readouterr().out


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
        "zero_optimization.stage=5 is invalid",
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
    found = messages({"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": 1.0,
                      "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}})
    assert any(m.startswith('train_micro_batch_size_per_gpu="auto"') for m in found)
    assert any(m.startswith('zero_optimization.reduce_bucket_size="auto"') for m in found)


def test_world_makes_the_batch_product_exact():
    config = {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2,
              "gradient_clipping": 1.0}
    assert messages(config, world=4) == []
    assert messages(config) == []  # 64 = 8 x 2 x 4 for some whole world
    (found,) = messages(config, world=3)
    assert found.startswith("train_batch_size=64 != micro 8 x accumulation 2 x world 3 = 48")


def test_values_deepspeed_never_validates():
    found = messages({"gradient_clipping": "big", "steps_per_print": 0, "train_batch_size": 0})
    assert "gradient_clipping='big' must be a number >= 0 (0 disables clipping)." in found
    assert "steps_per_print=0 must be a whole number >= 1." in found
    assert "train_batch_size=0 must be a whole number >= 1." in found


def test_silent_defaults_are_notes_not_errors():
    notes = messages({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8}, level="note")
    assert any("clips gradients at global norm 1.0" in n for n in notes)
    assert messages({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8}) == []


def test_lamb_and_lars_rules_of_bigbatch_engine():
    base = {"gradient_clipping": 1.0, "optimizer": {"type": "lars", "params": {"lr": 0.1, "momentm": 0.9}},
            "bf16": {"enabled": True}, "zero_optimization": {"stage": 0}}
    found = messages(base)
    assert any("optimizer.params.momentm is not a LARS parameter; did you mean 'momentum'?" in m for m in found)
    refusal = "bf16.enabled=true with bigbatch's LAMB/LARS needs zero_optimization.stage >= 1"
    assert any(m.startswith(refusal) for m in found)
    offload = {"gradient_clipping": 1.0, "optimizer": {"type": "LAMB"},
               "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    assert any("offload_optimizer.device='cpu' is not supported" in m for m in messages(offload))


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


def test_bad_file_and_arguments(tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert main(["check", str(broken)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    assert main(["check", "tiny", "--world", "0"]) == 2
    assert "--world=0 must be at least 1" in capsys.readouterr().err
