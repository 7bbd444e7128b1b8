"""`bigbatch check`: every problem of a DeepSpeed JSON, one sentence each, exit 2; clean configs exit 0."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import re
from pathlib import Path
from typing import Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bigbatch.check.command import check_config
from bigbatch.cli import main
from bigbatch.config.dsconfig import DS_CONFIGS

STAGES = sorted(p.name for p in DS_CONFIGS.glob("zero*.json"))
PRECISIONS = ("fp32.json", "fp16.json", "bf16.json")


def messages(config, world=None, level="error"):
    return [f.message for f in check_config(config, world) if f.level == level]


@pytest.mark.parametrize("name", sorted(p.name for p in DS_CONFIGS.glob("*.json")))
def test_every_shipped_fragment_passes_on_its_own(name, capsys):
    assert main(["check", str(DS_CONFIGS / name)]) == 0
    out, err = capsys.readouterr()
    assert re.search(r": 0 error\(s\), \d+ note\(s\)\n$", err) and "error:" not in out
    # absent batch keys are filled in by the recipe: a note, not an error
    assert "no batch sizes given" in out


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
    assert any("optimizer.params.momentm is not a parameter of LARS (did you mean 'momentum'?)" in m for m in found)
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
    assert main(["check", str(tmp_path / "nope.json")]) == 2
    assert "nope.json is not a file; give the path of a DeepSpeed JSON" in capsys.readouterr().err


# Corpora of real-world and broken configs: `public` resembles DeepSpeedExamples' (bing_bert's 64K LAMB, cifar,
# Megatron-LM, Hugging Face "auto" files, 1-bit Adam, compression, MoQ, curriculum); `broken` is malformed on purpose.
# expected.json says, for every file, the exit code and sentences the output must hold.
CORPORA = [Path(__file__).parent / "data" / d for d in ("ds_configs_public", "ds_configs_broken")]
SUMMARY = re.compile(r".*: \d+ error\(s\), \d+ note\(s\)$")


def check_output(argv):
    """bigbatch check in this process: (exit code, stdout, stderr), whatever happens."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["check", *argv])
    return code, out.getvalue(), err.getvalue()


def assert_well_formed(code, out, err):
    """Exit 0 or 2; stdout holds one `error:` or `note:` line per finding and nothing else; stderr ends with their
    count, or with the one sentence for a file that is no DeepSpeed config (DeepSpeed's import may log there too)."""
    assert code in (0, 2)
    lines = out.splitlines()
    assert all(line.startswith(("error: ", "note: ")) for line in lines), out
    last = (err.splitlines() or [""])[-1]
    if SUMMARY.match(last):
        errors = sum(line.startswith("error: ") for line in lines)
        assert last.endswith(f": {errors} error(s), {len(lines) - errors} note(s)") and code == (2 if errors else 0)
    else:
        sentences = [line for line in err.splitlines() if line.startswith("bigbatch: error: ")]
        assert code == 2 and not lines and sentences == [last], err
    assert "Traceback" not in out + err


def corpus_files():
    shipped = [(p, None) for p in sorted(DS_CONFIGS.glob("*.json"))]
    listed = []
    for corpus in CORPORA:
        expected = json.loads((corpus / "expected.json").read_text())
        files = sorted(p.name for p in corpus.glob("*.json") if p.name != "expected.json")
        assert files == sorted(expected), f"{corpus}: every file needs an entry in expected.json"
        listed += [(corpus / name, expected[name]) for name in files]
    return shipped + listed


@pytest.mark.parametrize("path,expected", corpus_files(), ids=lambda v: v.name if isinstance(v, Path) else "")
def test_every_config_of_the_corpora_ends_in_sentences(path, expected):
    code, out, err = check_output([str(path)])
    assert_well_formed(code, out, err)
    if expected is not None:
        assert code == expected["exit"], out + err
        for text in expected["says"]:
            assert text in out + err, f"missing: {text}\n{out}{err}"


def test_a_removed_block_names_itself_what_deepspeed_does_and_the_fix():
    (found,) = messages({"gradient_clipping": 1.0, "train_batch_size": 8, "sparse_attention": {"mode": "fixed"}})
    assert found.startswith("sparse_attention: DeepSpeed Sparse Attention has been removed in DeepSpeed ")
    assert "refuses any config that still holds it; delete sparse_attention" in found
    assert found.count(". ") == 0 and found.endswith(".")  # one sentence


@pytest.mark.parametrize("kind,params,key", [
    ("LAMB", {"lr": "fast"}, "lr"), ("LAMB", {"betas": [0.9, 1.5]}, "betas"), ("LAMB", {"eps": 0}, "eps"),
    ("LAMB", {"min_coeff": 0.3, "max_coeff": 0.01}, "min_coeff"), ("LAMB", {"weight_decay": -1e-4}, "weight_decay"),
    ("lars", {"lr": "fast"}, "lr"), ("lars", {"momentum": 1.2}, "momentum"), ("lars", {"eps": -1.0}, "eps"),
    ("lars", {"trust_coefficient": 0}, "trust_coefficient"), ("lars", {"weight_decay": -1e-4}, "weight_decay")])
def test_lamb_and_lars_values_that_cannot_work_are_errors(kind, params, key):
    config = {"gradient_clipping": 1.0, "zero_optimization": {"stage": 1},
              "optimizer": {"type": kind, "params": {"lr": 0.01, **params}}}
    found = messages(config)
    value = repr(params[key])
    assert any(m.startswith(f"optimizer.params.{key}={value} ") for m in found), found


finite = st.floats(allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=150, deadline=None)
@given(lr=finite, b1=finite, b2=finite, eps=finite, wd=finite, momentum=finite, trust=finite, low=finite,
       high=finite)
def test_optimizer_ranges_match_the_issue(lr, b1, b2, eps, wd, momentum, trust, low, high):
    """lr > 0; 0 <= beta < 1; eps > 0 (LARS: >= 0); weight_decay >= 0; 0 <= momentum < 1; trust_coefficient > 0;
    min_coeff <= max_coeff: an error exactly when a bound is broken."""
    lamb = {"type": "LAMB", "params": {"lr": lr, "betas": [b1, b2], "eps": eps, "weight_decay": wd,
                                       "min_coeff": abs(low), "max_coeff": abs(high)}}
    lars = {"type": "LARS", "params": {"lr": 0.1, "eps": eps, "momentum": momentum, "trust_coefficient": trust}}
    found, found_lars = (" ".join(messages({"optimizer": o, "zero_optimization": {"stage": 1}})) for o in (lamb, lars))
    assert ("optimizer.params.lr=" in found) == (not lr > 0)
    assert ("optimizer.params.betas=" in found) == (not (0 <= b1 < 1 and 0 <= b2 < 1))
    assert ("optimizer.params.eps=" in found) == (not eps > 0)
    assert ("optimizer.params.weight_decay=" in found) == (not wd >= 0)
    assert ("exceeds optimizer.params.max_coeff" in found) == (abs(low) > abs(high) > 0)
    assert ("optimizer.params.eps=" in found_lars) == (not eps >= 0)
    assert ("optimizer.params.momentum=" in found_lars) == (not 0 <= momentum < 1)
    assert ("optimizer.params.trust_coefficient=" in found_lars) == (not trust > 0)


def test_settings_deepspeed_ignores_at_the_stage():
    stage0 = {"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}
    (found,) = messages(stage0)
    assert found.startswith("zero_optimization.offload_optimizer.device='cpu' does nothing at "
                            "zero_optimization.stage=0")
    assert messages({"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}}) == []
    assert messages({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}) == []
    stage1 = {"zero_optimization": {"stage": 1, "stage3_max_live_parameters": 1e9}}
    assert messages(stage1) == []
    assert any("DeepSpeed ignores stage3_max_live_parameters" in n for n in messages(stage1, level="note"))


def test_deepspeed_parser_failures_name_the_key_they_were_reading():
    (found,) = messages({"gradient_clipping": 1.0, "vocabulary_size": "big"})
    assert found.startswith("DeepSpeed's parser fails on vocabulary_size='big' (TypeError")
    (found,) = messages({"gradient_clipping": 1.0, "fp16": {"enabled": True, "fp16_master_weights_and_grads": True}})
    assert found.startswith("DeepSpeed rejects the combination: Fp16_master_weights_and_grads is only supported")


def _known_paths():
    """Every key the checker has a rule for, every section, and a few that only DeepSpeed's parser reads."""
    from bigbatch.check.rules import OPTIMIZER_PARAMS, SCHEDULER_PARAMS, SECTIONS

    paths = [f"{s}.{k}" if s else k for s, rules in SECTIONS.items() for k in rules]
    paths += [f"optimizer.params.{k}" for k in OPTIMIZER_PARAMS] + [f"scheduler.params.{k}" for k in SCHEDULER_PARAMS]
    return sorted({*paths, *SECTIONS, "optimizer", "scheduler", "optimizer.params", "scheduler.params",
                   "optimizer.type", "scheduler.type", "train_batch_size", "train_micro_batch_size_per_gpu",
                   "gradient_accumulation_steps", "sparse_attention", "zero_optimization.mics_shard_size", "pipeline",
                   "vocabulary_size", "checkpoint", "aio", "compile", "timers", "comet", "torch_autocast"} - {""})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.sampled_from(
        ["auto", "", "cpu", "LAMB", "lars", "Adam", "SGD", "WarmupLR", "OneCycle", "log", "fp16", "yes"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=st.lists(st.tuples(st.sampled_from(_known_paths()), json_values), max_size=8),
       world=st.none() | st.integers(1, 16))
def test_fuzz_never_raises(tmp_path_factory, entries, world):
    """Random JSON values under random known keys: exit 0 or 2, one `error:`/`note:` line each, never a traceback."""
    config: dict = {}
    for path, value in entries:
        *parents, last = path.split(".")
        node = config
        for p in parents:
            node = node.setdefault(p, {}) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node[last] = value
    path = tmp_path_factory.mktemp("fuzz") / "ds.json"
    path.write_text(json.dumps(config))
    code, out, err = check_output([str(path)] + (["--world", str(world)] if world else []))
    assert_well_formed(code, out, err)


def test_an_unreadable_file_is_one_sentence(tmp_path, monkeypatch):
    path = tmp_path / "ds.json"
    path.write_text("{}")

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refuse)  # as root, chmod 000 would not stop the read
    code, out, err = check_output([str(path)])
    assert code == 2 and out == ""
    sentence = f"bigbatch: error: DeepSpeed config {path} cannot be read (Permission denied); check its permissions."
    assert sentence in err.splitlines() and "Traceback" not in err


def test_every_scalar_field_of_deepspeeds_models_has_a_rule():
    """The sections bigbatch knows are type-checked key by key: every scalar field DeepSpeed's own pydantic models
    define for them, and every key of the sections it reads with dict.get, has a rule in check_values (a new
    DeepSpeed may add some)."""
    from deepspeed.comm.config import CommsLoggerConfig
    from deepspeed.monitor.config import CSVConfig, TensorBoardConfig, WandbConfig
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.zero.offload_config import (
        DeepSpeedZeroOffloadOptimizerConfig,
        DeepSpeedZeroOffloadParamConfig,
    )

    from bigbatch.check.rules import SECTIONS

    models = {"fp16": DeepSpeedFP16Config, "bf16": DeepSpeedBF16Config, "zero_optimization": DeepSpeedZeroConfig,
              "zero_optimization.offload_optimizer": DeepSpeedZeroOffloadOptimizerConfig,
              "zero_optimization.offload_param": DeepSpeedZeroOffloadParamConfig, "tensorboard": TensorBoardConfig,
              "wandb": WandbConfig, "csv_monitor": CSVConfig, "comms_logger": CommsLoggerConfig}
    scalars = (bool, int, float, str, Optional[bool], Optional[str], list)
    missing = [f"{section}.{info.alias or name}" for section, model in models.items()
               for name, info in model.model_fields.items()
               if info.annotation in scalars and (info.alias or name) not in SECTIONS[section]]
    assert missing == []
    # the sections DeepSpeed reads key by key: their keys are its named constants
    from deepspeed.profiling import constants
    from deepspeed.runtime.activation_checkpointing.config import ACT_CHKPT_DEFAULT

    profiler = {v for k, v in vars(constants).items()
                if k.startswith("FLOPS_PROFILER_") and not k.endswith(("_DEFAULT", "_FORMAT"))}
    assert set(ACT_CHKPT_DEFAULT) <= set(SECTIONS["activation_checkpointing"])
    assert profiler and profiler <= set(SECTIONS["flops_profiler"])


def test_torch_optimizers_are_built_by_their_exact_name():
    """DeepSpeed builds an unknown type as getattr(torch.optim, type): "SGD" works, "sgd" fails at initialize."""
    assert messages({"gradient_clipping": 1.0, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}) == []
    (found,) = messages({"gradient_clipping": 1.0, "optimizer": {"type": "sgd", "params": {"lr": 0.1}}})
    assert found.startswith("optimizer.type='sgd' is not an optimizer DeepSpeed or bigbatch knows "
                            "(did you mean 'SGD'?)")
