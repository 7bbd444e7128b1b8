"""`bigbatch.check.rules`: the values DeepSpeed's parser never checks (types, ranges, removed blocks, settings the
ZeRO stage ignores, optimizer and scheduler types and parameters, bigbatch's LAMB/LARS rules), through check_config."""

from __future__ import annotations

import math
from typing import Optional

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from conftest import check_messages


def test_values_deepspeed_never_validates():
    found = check_messages({"gradient_clipping": "big", "steps_per_print": 0, "train_batch_size": 0})
    assert "gradient_clipping='big' must be a number >= 0 (0 disables clipping)." in found
    assert "steps_per_print=0 must be a whole number >= 1." in found
    assert "train_batch_size=0 must be a whole number >= 1." in found


def test_lamb_and_lars_rules_of_bigbatch_engine():
    base = {"gradient_clipping": 1.0, "optimizer": {"type": "lars", "params": {"lr": 0.1, "momentm": 0.9}},
            "bf16": {"enabled": True}, "zero_optimization": {"stage": 0}}
    found = check_messages(base)
    assert any("optimizer.params.momentm is not a parameter of LARS (did you mean 'momentum'?)" in m for m in found)
    refusal = "bf16.enabled=true with bigbatch's LAMB/LARS needs zero_optimization.stage >= 1"
    assert any(m.startswith(refusal) for m in found)
    offload = {"gradient_clipping": 1.0, "optimizer": {"type": "LAMB"},
               "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    assert any("offload_optimizer.device='cpu' is not supported" in m for m in check_messages(offload))


def test_a_removed_block_names_itself_what_deepspeed_does_and_the_fix():
    (found,) = check_messages({"gradient_clipping": 1.0, "train_batch_size": 8, "sparse_attention": {"mode": "fixed"}})
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
    found = check_messages(config)
    value = repr(params[key])
    assert any(m.startswith(f"optimizer.params.{key}={value} ") for m in found), found


# Floats, with the bounds themselves (0, 1, their neighbours, negative zero) drawn often: a bound made open or closed
# by mistake shows only there.
BOUNDS = (0.0, -0.0, 1.0, math.nextafter(1.0, 0.0), math.nextafter(1.0, 2.0), 5e-324, -5e-324, 0.5, -1.0)
finite = st.one_of(st.sampled_from(BOUNDS), st.floats(allow_nan=False, allow_infinity=False, width=32))
AT_BOUNDS = [dict(lr=0.0), dict(lr=5e-324), dict(b1=0.0), dict(b1=1.0), dict(b2=1.0), dict(b2=math.nextafter(1.0, 0)),
             dict(eps=0.0), dict(eps=5e-324), dict(wd=0.0), dict(wd=-5e-324), dict(momentum=0.0),
             dict(momentum=1.0), dict(momentum=-5e-324), dict(trust=0.0), dict(trust=5e-324), dict(low=-0.1),
             dict(low=0.0), dict(low=1.0, high=1.0), dict(low=1.0, high=math.nextafter(1.0, 0)), dict(high=0.0)]
DEFAULTS = dict(lr=0.1, b1=0.9, b2=0.999, eps=1e-6, wd=0.01, momentum=0.9, trust=1e-3, low=0.01, high=10.0)


def _at(**case):
    return {**DEFAULTS, **case}


def _with_examples(test):
    for case in AT_BOUNDS:
        test = example(**_at(**case))(test)
    return test


@settings(max_examples=150, deadline=None)
@given(lr=finite, b1=finite, b2=finite, eps=finite, wd=finite, momentum=finite, trust=finite, low=finite,
       high=finite)
@_with_examples
def test_optimizer_ranges_match_the_issue(lr, b1, b2, eps, wd, momentum, trust, low, high):
    """lr > 0; 0 <= beta < 1; eps > 0 (LARS: >= 0); weight_decay >= 0; 0 <= momentum < 1; trust_coefficient > 0;
    0 <= min_coeff <= max_coeff, max_coeff > 0: an error exactly when a bound is broken, LAMB's and LARS's, every
    bound drawn exactly (`@example` at each)."""
    lamb = {"type": "LAMB", "params": {"lr": lr, "betas": [b1, b2], "eps": eps, "weight_decay": wd,
                                       "min_coeff": low, "max_coeff": high}}
    lars = {"type": "LARS", "params": {"lr": lr, "eps": eps, "weight_decay": wd, "momentum": momentum,
                                       "trust_coefficient": trust}}
    found, found_lars = (" ".join(check_messages({"optimizer": o, "zero_optimization": {"stage": 1}}))
                         for o in (lamb, lars))
    for text in (found, found_lars):
        assert ("optimizer.params.lr=" in text) == (not lr > 0)
        assert ("optimizer.params.weight_decay=" in text) == (not wd >= 0)
    assert ("optimizer.params.betas=" in found) == (not (0 <= b1 < 1 and 0 <= b2 < 1))
    assert ("optimizer.params.eps=" in found) == (not eps > 0)
    assert (f"optimizer.params.min_coeff={low!r} must" in found) == (not low >= 0)
    assert (f"optimizer.params.max_coeff={high!r} must" in found) == (not high > 0)
    assert ("exceeds optimizer.params.max_coeff" in found) == (low > high > 0)
    assert ("optimizer.params.eps=" in found_lars) == (not eps >= 0)
    assert ("optimizer.params.momentum=" in found_lars) == (not 0 <= momentum < 1)
    assert ("optimizer.params.trust_coefficient=" in found_lars) == (not trust > 0)


def test_settings_deepspeed_ignores_at_the_stage():
    stage0 = {"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}
    (found,) = check_messages(stage0)
    assert found.startswith("zero_optimization.offload_optimizer.device='cpu' does nothing at "
                            "zero_optimization.stage=0")
    assert check_messages({"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}}) == []
    assert check_messages({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}) == []
    stage1 = {"zero_optimization": {"stage": 1, "stage3_max_live_parameters": 1e9}}
    assert check_messages(stage1) == []
    assert any("DeepSpeed ignores stage3_max_live_parameters" in n for n in check_messages(stage1, level="note"))


def test_every_scalar_field_of_deepspeeds_models_has_a_rule():
    """The sections bigbatch knows are type-checked key by key: every scalar field DeepSpeed's own pydantic models
    define for them, and every key of the sections it reads with dict.get, has a rule in check.rules (a new
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
    assert check_messages({"gradient_clipping": 1.0, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}) == []
    (found,) = check_messages({"gradient_clipping": 1.0, "optimizer": {"type": "sgd", "params": {"lr": 0.1}}})
    assert found.startswith("optimizer.type='sgd' is not an optimizer DeepSpeed or bigbatch knows "
                            "(did you mean 'SGD'?)")


def _oracle(v, low=None, high=None, low_open=False, high_open=False, inf=False, null=False):
    """number()'s contract written out: JSON null only when allowed; a real number (not a bool, not NaN), finite
    unless `inf`; each bound open or closed as asked."""
    if v is None:
        return null
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        return False
    if not inf and isinstance(v, float) and abs(v) == math.inf:
        return False
    return ((low is None or (v > low if low_open else v >= low))
            and (high is None or (v < high if high_open else v <= high)))


VALUES = (None, True, False, "1", [1], -1.0, -5e-324, -0.0, 0, 0.0, 5e-324, 0.5, math.nextafter(1.0, 0.0), 1, 1.0,
          math.nextafter(1.0, 2.0), 3, 10**400, math.inf, -math.inf, math.nan)
BUILT = [
    (dict(), "a number"), (dict(low=0), "a number >= 0"), (dict(low=0, low_open=True), "a number > 0"),
    (dict(low=0, high=1), "a number in [0, 1]"), (dict(low=0, high=1, high_open=True), "a number in [0, 1)"),
    (dict(low=0, high=1, low_open=True), "a number in (0, 1]"), (dict(high=1), "a number <= 1"),
    (dict(high=1, high_open=True), "a number < 1"), (dict(low=0, low_open=True, inf=True), "a number > 0"),
    (dict(low=0, null=True), "null or a number >= 0"), (dict(low=-1, high=1, null=True), "null or a number in [-1, 1]"),
]


@pytest.mark.parametrize("kw,must", BUILT, ids=[m for _, m in BUILT])
def test_number_rules_built_at_any_bounds_say_and_test_exactly_them(kw, must):
    """The rule builders called here, not through the module's tables (built at import, which mutation testing does
    not see again): each bound open or closed, `inf`, `null`, and the sentence that names them."""
    from bigbatch.check.rules import number

    rule = number(kw.get("low"), kw.get("high"), **{k: v for k, v in kw.items() if k not in ("low", "high")})
    assert rule.must == must
    for v in VALUES:
        assert rule.test(v) == _oracle(v, **kw), v


def test_whole_and_choice_rules_built_here():
    from bigbatch.check.rules import choice, whole

    for rule, must, good, bad in (
            (whole(0), "a whole number >= 0", (0, 5, 5e8, 10**400), (-1, 0.5, True, None, math.inf, math.nan, "1")),
            (whole(0, 3), "a whole number in [0, 3]", (0, 3, 3.0), (4, 3.5, -1)),
            (whole(-1, null=True), "null or a whole number >= -1", (None, -1, 2), (-2, 1.5, False))):
        assert rule.must == must
        assert all(rule.test(v) for v in good) and not any(rule.test(v) for v in bad), must
    rule = choice("fp32", None, 2)
    assert rule.must == "one of 'fp32', None, 2"
    assert rule.test("fp32") and rule.test(None) and rule.test(2)
    assert not any(rule.test(v) for v in ("FP32", "fp16", 2.0, True, 0, ""))


def test_offload_and_stage3_settings_at_each_stage_in_full_sentences():
    (found,) = check_messages({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}})
    assert found == ("zero_optimization.offload_optimizer.device='cpu' does nothing at zero_optimization.stage=0: "
                     "DeepSpeed offloads optimizer states only at stage 1 or above; set zero_optimization.stage to 1 "
                     "or remove it.")
    (found,) = check_messages({"zero_optimization": {"stage": 2, "cpu_offload_param": True}})
    assert found == ("zero_optimization.cpu_offload_param=True does nothing at zero_optimization.stage=2: DeepSpeed "
                     "offloads parameters only at stage 3; set zero_optimization.stage to 3 or remove it.")
    for zero in ({"stage": 1}, {"stage": 3, "stage3_max_live_parameters": 1e9}):
        assert not any("DeepSpeed ignores" in n for n in check_messages({"zero_optimization": zero}, level="note"))


def test_a_null_section_is_refused_unless_deepspeed_takes_null_there():
    assert check_messages({"zero_optimization": {"stage": 1, "offload_optimizer": None, "offload_param": None}}) == []
    (found,) = check_messages({"fp16": None})
    assert found == "fp16=None must be a JSON object {...} of its settings; write it as one or remove fp16."


def test_unknown_types_are_one_error_each_and_the_lists_they_name():
    import torch

    (found,) = check_messages({"optimizer": {"type": "sgd", "params": {"lr": -1}}})  # its params are not judged too
    names = sorted(n for n, c in vars(torch.optim).items()
                   if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer)
    assert found.endswith(f", or a torch.optim class ({', '.join(names)}).")
    assert "known: adagrad, adam, " in found
    (found,) = check_messages({"optimizer": {"type": "lr_scheduler"}})  # a module of torch.optim, not an optimizer
    assert found.startswith("optimizer.type='lr_scheduler' is not an optimizer")
    (found,) = check_messages({"scheduler": {"type": "WarmupLr", "params": {"warmup_num_steps": 0}}})
    assert found.startswith("scheduler.type='WarmupLr' is not a DeepSpeed LR schedule (did you mean 'WarmupLR'?); "
                            "known: LRRangeTest, OneCycle, WarmupLR, ")
    (found,) = check_messages({"optimizer": {"type": "lars", "params": {"lr": 0.1, "betas": [0.9, 0.99]}}})
    assert "; allowed: lr, momentum, weight_decay, " in found
    assert check_messages({"gradient_clipping": 1.0, "optimizer": {"type": "SGD"}}) == []  # torch's defaults


def test_bigbatchs_optimizers_are_noted_as_such():
    notes = [m for kind in ("LAMB", "lars") for m in check_messages(
        {"optimizer": {"type": kind}, "zero_optimization": {"stage": 1}}, level="note")
        if m.startswith("optimizer.type=")]
    assert notes == ["optimizer.type='LAMB' is bigbatch's LAMB when the config goes through bigbatch.engine.initialize "
                     "(deepspeed.initialize would pick DeepSpeed's CUDA-only FusedLamb).",
                     "optimizer.type='lars' is bigbatch's LARS when the config goes through bigbatch.engine.initialize "
                     "(deepspeed.initialize does not know LARS)."]


@pytest.mark.parametrize("kind,torch_adam,zero,refused_as", [
    ("Adam", True, {"stage": 0}, "optimizer 'Adam' (torch_adam)"), ("AdamW", True, {"stage": 0},
                                                                    "optimizer 'AdamW' (torch_adam)"),
    ("AdamW", False, {"stage": 0}, None), ("Adam", True, {"stage": 1}, None), ("lamb", False, False,
                                                                             "bigbatch's LAMB/LARS"),
    ("lamb", False, True, None), ("Adam", True, False, "optimizer 'Adam' (torch_adam)")])
def test_16_bit_at_stage_0_is_refused_for_every_unfused_optimizer(kind, torch_adam, zero, refused_as):
    """bf16 at stage 0 with LAMB/LARS or torch's AdamW (`torch_adam`); DeepSpeed's deprecated `zero_optimization:
    true/false` (stage 1 or 0) counts as its stage."""
    config = {"gradient_clipping": 1.0, "bf16": {"enabled": True}, "zero_optimization": zero,
              "optimizer": {"type": kind, "params": {"lr": 0.01, **({"torch_adam": True} if torch_adam else {})}}}
    found = [m for m in check_messages(config) if m.startswith("bf16.enabled=true")]
    if refused_as is None:
        assert found == []
    else:
        assert found == [f"bf16.enabled=true with {refused_as} needs zero_optimization.stage >= 1, not 0 (DeepSpeed's "
                         "stage-0 16-bit wrapper steps on zero gradients and never scales the loss); set "
                         "zero_optimization.stage to 1, which uses no more memory."]


def test_removed_blocks_in_one_sentence_from_deepspeeds_own_words():
    import deepspeed

    from bigbatch.check.rules import INSTEAD, _removed_sentence

    # each part ends in "X." so that only the full stop is stripped, not the letter too
    assert _removed_sentence("foo", "Foo has been removed for X.", "0.19.8") == (
        "foo: Foo has been removed for X in DeepSpeed 0.19.8, which refuses any config that still holds it; delete "
        "foo.")
    assert _removed_sentence("compression_training", "Compression has been removed; see https://deepspeed.ai/X. "
                             "Use API X.", "1.0") == (
        "compression_training: Compression has been removed in DeepSpeed 1.0, which refuses any config that still "
        "holds it; delete compression_training and use API X (see https://deepspeed.ai/X); "
        f"{INSTEAD['compression_training']}.")
    (found,) = check_messages({"gradient_clipping": 1.0, "train_batch_size": 8, "sparse_attention": {}})
    assert f" in DeepSpeed {deepspeed.__version__}, " in found


def test_small_helpers_of_the_checker():
    from bigbatch.check.rules import Finding, delete_path, one_line

    assert str(Finding("error", "a\nb\x00c\u2028d é")) == "error: a\\nb\\x00c\\u2028d é"
    config = {"a": {"b": 1}}
    delete_path(config, "a.c")  # absent: nothing to do
    delete_path(config, "x.y")
    assert config == {"a": {"b": 1}}
    assert one_line("  Set X.\n  then Y. ") == "Set X. then Y"
    assert one_line("Set X.") == "Set X"
