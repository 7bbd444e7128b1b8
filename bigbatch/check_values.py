"""Types and ranges of the DeepSpeed keys bigbatch knows, for `bigbatch check`.

Why: DeepSpeed reads the top level, `activation_checkpointing`, `flops_profiler` and the optimizer's and scheduler's
`params` with a plain `dict.get` and checks none of them: `"partition_activations": "yes"` is a true flag, betas of
1.5 diverge, a warmup_type it does not know silently becomes "log". Its pydantic sections (fp16, bf16,
zero_optimization, the monitors) coerce `"yes"` to true and `"16"` to 16, but bigbatch's own readers
(`dsconfig.precision`, `engine.refuse_16bit_stage0`) do not, so JSON booleans and numbers are required throughout.
Whole numbers may be written as `5e8` (JSON then holds a float), as DeepSpeedExamples' configs do.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class Rule:
    must: str  # completes "<key>=<value> must be ..."
    test: Callable[[Any], bool]


def _real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isnan(v)


def _bound(low: Optional[float], high: Optional[float], low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low:g}"
    return ""


def number(low: Optional[float] = None, high: Optional[float] = None, *, low_open: bool = False,
           high_open: bool = False, inf: bool = False, null: bool = False) -> Rule:
    """A real number within the bounds (finite unless `inf`); `null` also allows JSON null."""

    def test(v: Any) -> bool:
        if v is None:
            return null
        return (_real(v) and (inf or math.isfinite(v))
                and (low is None or (v > low if low_open else v >= low))
                and (high is None or (v < high if high_open else v <= high)))

    return Rule(f"{'null or ' if null else ''}a number{_bound(low, high, low_open, high_open)}", test)


def whole(low: int, high: Optional[int] = None, *, null: bool = False) -> Rule:
    """A whole number in [low, high] (5e8, a float, counts: DeepSpeedExamples write bucket sizes so)."""

    def test(v: Any) -> bool:
        if v is None:
            return null
        return (_real(v) and math.isfinite(v) and float(v).is_integer() and v >= low
                and (high is None or v <= high))

    return Rule(f"{'null or ' if null else ''}a whole number{_bound(low, high, False, False)}", test)


def choice(*values: Any) -> Rule:
    return Rule(f"one of {', '.join(map(repr, values))}", lambda v: any(v == c and type(v) is type(c) for c in values))


BOOL = Rule("true or false", lambda v: isinstance(v, bool))
STRING = Rule("a string", lambda v: isinstance(v, str))
OPTIONAL_STRING = Rule("null or a string", lambda v: v is None or isinstance(v, str))
STRINGS = Rule("a list of strings", lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v))
BETAS = Rule("two numbers in [0, 1), as [0.9, 0.999]",
             lambda v: isinstance(v, list) and len(v) == 2 and all(number(0, 1, high_open=True).test(b) for b in v))
OFFLOAD_DEVICE = choice("none", "cpu", "nvme", None)
MONITOR = {"enabled": BOOL, "output_path": STRING, "job_name": STRING}


def flags(*keys: str) -> dict[str, Rule]:
    return {k: BOOL for k in keys}


# The sections bigbatch knows, by dotted path ("" is the top level); the batch keys are checked with their arithmetic.
SECTIONS: dict[str, dict[str, Rule]] = {
    "": {
        "steps_per_print": whole(1),
        "gradient_clipping": Rule("a number >= 0 (0 disables clipping)", number(0).test),
        "gradient_predivide_factor": number(0, low_open=True),
        "communication_data_type": choice("fp32", "fp16", "bf16", None),
        "gradient_allreduce_op": choice("mean", "sum"),
        **flags("prescale_gradients", "wall_clock_breakdown", "memory_breakdown", "zero_allow_untested_optimizer",
                 "zero_force_ds_cpu_optimizer", "dump_state", "disable_allgather", "dataloader_drop_last"),
    },
    "fp16": {
        "loss_scale": number(0), "initial_scale_power": whole(0, 64), "loss_scale_window": whole(1),
        "hysteresis": whole(1), "min_loss_scale": number(0, low_open=True),
        **flags("enabled", "auto_cast", "consecutive_hysteresis", "fp16_master_weights_and_grads"),
    },
    "bf16": flags("enabled", "immediate_grad_update", "check_grad_overflow", "bf16_master_weights_and_grads",
                   "bf16_optimizer_states"),
    "zero_optimization": {
        "stage": whole(0, 3), "reduce_bucket_size": whole(1), "allgather_bucket_size": whole(0),
        "sub_group_size": whole(0), "stage3_prefetch_bucket_size": whole(0),
        "stage3_param_persistence_threshold": whole(0), "stage3_model_persistence_threshold": whole(0),
        "stage3_max_live_parameters": whole(0), "stage3_max_reuse_distance": whole(0),
        "zero_hpz_partition_size": whole(1), "overlap_comm": Rule("null, true or false", lambda v: v in (None, True,
                                                                                                        False)),
        **flags("contiguous_gradients", "reduce_scatter", "allgather_partitions", "load_from_fp32_weights",
                 "elastic_checkpoint", "round_robin_gradients", "ignore_unused_parameters", "cpu_offload",
                 "cpu_offload_param", "cpu_offload_use_pin_memory", "stage3_gather_16bit_weights_on_model_save",
                 "stage3_gather_fp16_weights_on_model_save", "zero_quantized_weights", "zero_quantized_gradients"),
    },
    "zero_optimization.offload_optimizer": {
        "device": OFFLOAD_DEVICE, "nvme_path": OPTIONAL_STRING, "buffer_count": whole(0), "ratio": number(0, 1),
        **flags("pin_memory", "pipeline_read", "pipeline_write", "fast_init"),
    },
    "zero_optimization.offload_param": {
        "device": OFFLOAD_DEVICE, "nvme_path": OPTIONAL_STRING, "buffer_count": whole(0), "buffer_size": whole(0),
        "max_in_cpu": whole(0), "pin_memory": BOOL,
    },
    "activation_checkpointing": {
        "number_checkpoints": whole(1, null=True),
        **flags("partition_activations", "contiguous_memory_optimization", "cpu_checkpointing",
                 "synchronize_checkpoint_boundary", "profile"),
    },
    "flops_profiler": {
        "enabled": BOOL, "recompute_fwd_factor": number(0), "profile_step": whole(1), "module_depth": whole(-1),
        "top_modules": whole(1), "detailed": BOOL, "output_file": OPTIONAL_STRING,
    },
    "tensorboard": MONITOR,
    "csv_monitor": MONITOR,
    "wandb": {"enabled": BOOL, "group": OPTIONAL_STRING, "team": OPTIONAL_STRING, "project": STRING},
    "comms_logger": {"prof_ops": STRINGS, **flags("enabled", "prof_all", "verbose", "debug")},
    "data_types": {k: choice("fp32", "fp16", "bf16", None) for k in ("grad_accum_dtype", "param_dtype",
                                                                      "buffer_dtype")},
}
SECTIONS["bfloat16"] = SECTIONS["bf16"]  # DeepSpeed's older name for the same section

# Optimizer parameters by name, for every type (bigbatch's LAMB and LARS, DeepSpeed's, torch.optim's): they go
# straight to the constructor, which for DeepSpeed's fused kernels checks nothing.
OPTIMIZER_PARAMS: dict[str, Rule] = {
    "lr": number(0, low_open=True), "betas": BETAS, "eps": number(0, low_open=True), "weight_decay": number(0),
    "momentum": number(0, 1, high_open=True), "dampening": number(0), "trust_coefficient": number(0, low_open=True),
    "min_coeff": number(0), "max_coeff": number(0, low_open=True, inf=True),
    "fused": Rule("null, true or false", lambda v: v in (None, True, False)),
    **flags("bias_correction", "amsgrad", "nesterov", "torch_adam", "adam_w_mode", "maximize"),
}
# LARS without eps is the paper's (You et al. 2017, eq. 6): eps = 0 is its default.
PER_OPTIMIZER = {"lars": {"eps": number(0)}}

SCHEDULER_PARAMS: dict[str, Rule] = {
    "warmup_min_lr": number(0), "warmup_max_lr": number(0, low_open=True), "warmup_num_steps": whole(1),
    "warmup_type": choice("log", "linear"), "total_num_steps": whole(1), "last_batch_iteration": whole(-1),
    "warmup_min_ratio": number(0, 1), "cos_min_ratio": number(0, 1),
    "cycle_min_lr": number(0), "cycle_max_lr": number(0, low_open=True), "decay_lr_rate": number(0),
    "cycle_first_step_size": number(0, low_open=True), "cycle_second_step_size": number(0, null=True),
    "cycle_first_stair_count": whole(0), "cycle_second_stair_count": whole(0, null=True),
    "decay_step_size": whole(0), "cycle_momentum": BOOL, "cycle_min_mom": number(0, 1, high_open=True),
    "cycle_max_mom": number(0, 1, high_open=True), "decay_mom_rate": number(0),
    "lr_range_test_min_lr": number(0, low_open=True), "lr_range_test_step_size": whole(1),
    "lr_range_test_step_rate": number(0, low_open=True), "lr_range_test_staircase": BOOL,
}
# (low, high): the first may not exceed the second.
ORDERED = (("min_coeff", "max_coeff"), ("warmup_min_lr", "warmup_max_lr"), ("cycle_min_lr", "cycle_max_lr"),
           ("cycle_min_mom", "cycle_max_mom"), ("warmup_num_steps", "total_num_steps"))


def bad_values(node: dict[str, Any], rules: dict[str, Rule], prefix: str) -> list[tuple[str, str]]:
    """(key, sentence) for each key of `node` whose value breaks its rule."""
    return [(key, f"{prefix}{key}={node[key]!r} must be {rule.must}.")
            for key, rule in rules.items() if key in node and not rule.test(node[key])]


def misordered(params: dict[str, Any], prefix: str) -> list[str]:
    """A sentence for each ORDERED pair whose (already valid) values are the wrong way round."""
    out = []
    for low, high in ORDERED:
        a, b = params.get(low), params.get(high)
        if _real(a) and _real(b) and a > b:
            out.append(f"{prefix}{low}={a!r} exceeds {prefix}{high}={b!r}; make {low} <= {high}.")
    return out
