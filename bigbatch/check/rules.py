"""What DeepSpeed's config parser does not check, for `bigbatch check`: types and ranges of the keys bigbatch
knows, the shape of each section, settings the ZeRO stage ignores, blocks DeepSpeed has removed, optimizer and
scheduler parameters (by each constructor's signature), and bigbatch's own LAMB/LARS rules.

Why: DeepSpeed reads the top level, `activation_checkpointing`, `flops_profiler` and the optimizer's and scheduler's
`params` with a plain `dict.get` and checks none of them: `"partition_activations": "yes"` is a true flag, betas of
1.5 diverge, a warmup_type it does not know silently becomes "log". Its pydantic sections (fp16, bf16,
zero_optimization, the monitors) coerce `"yes"` to true and `"16"` to 16, but bigbatch's own readers
(`dsconfig.precision`, `engine.refuse_16bit_stage0`) do not, so JSON booleans and numbers are required throughout.
Whole numbers may be written as `5e8` (JSON then holds a float), as DeepSpeedExamples' configs do.

Each check appends `Finding`s and deletes the offending key from the (copied) config, so that later checks and
DeepSpeed's parser see only what is left.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
import re
import reprlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from bigbatch.config import ConfigError
from bigbatch.engine import OPTIMIZERS, refuse_16bit_stage0, refuse_offload


@dataclass(frozen=True)
class Finding:
    level: str  # "error" | "note"
    message: str

    def __str__(self) -> str:
        # Keys and values come from the user's JSON: a line break inside one must not start a line of its own.
        text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in self.message)
        return f"{self.level}: {text}"


def errors(findings: Iterable[Finding]) -> list[Finding]:
    """The findings that are errors: a note never stops a run or fails `bigbatch check`."""
    return [f for f in findings if f.level == "error"]


def value_at(config: dict[str, Any], path: str) -> Any:
    """The value at a dotted path ("" is the config itself), or None."""
    node: Any = config
    for p in filter(None, path.split(".")):
        node = node.get(p) if isinstance(node, dict) else None
    return node


def has_path(config: dict[str, Any], path: str) -> bool:
    parent, _, key = path.rpartition(".")
    node = value_at(config, parent)
    return isinstance(node, dict) and key in node


def delete_path(config: dict[str, Any], path: str) -> None:
    parent, _, key = path.rpartition(".")
    node = value_at(config, parent)
    if isinstance(node, dict):
        node.pop(key, None)


def one_line(text: str) -> str:
    """One line: DeepSpeed's and pydantic's messages may span several."""
    return " ".join(text.split()).rstrip(".")


def hint(word: str, choices: Any, otherwise: str = "") -> str:
    """` (did you mean 'x'?)` for the closest choice, else `otherwise`; a dict maps the form compared to the form
    shown."""
    shown = choices if isinstance(choices, dict) else {c: c for c in choices}
    match = difflib.get_close_matches(word, list(shown), n=1, cutoff=0.6)
    return f" (did you mean {shown[match[0]]!r}?)" if match else otherwise


@dataclass(frozen=True)
class Rule:
    must: str  # completes "<key>=<value> must be ..."
    test: Callable[[Any], bool]


def _real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v))


def _finite(v: Any) -> bool:
    """Python ints are unbounded (JSON may hold 10**400, which float() and math.isfinite reject)."""
    return isinstance(v, numbers.Integral) or math.isfinite(v)


def _bound(low: Optional[float], high: Optional[float], low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high:g}"
    return ""


def number(low: Optional[float] = None, high: Optional[float] = None, *, low_open: bool = False,
           high_open: bool = False, inf: bool = False, null: bool = False) -> Rule:
    """A real number within the bounds (finite unless `inf`); `null` also allows JSON null."""

    def test(v: Any) -> bool:
        if v is None:
            return null
        return (_real(v) and (inf or _finite(v))
                and (low is None or (v > low if low_open else v >= low))
                and (high is None or (v < high if high_open else v <= high)))

    return Rule(f"{'null or ' if null else ''}a number{_bound(low, high, low_open, high_open)}", test)


def whole(low: int, high: Optional[int] = None, *, null: bool = False) -> Rule:
    """A whole number in [low, high] (5e8, a float, counts: DeepSpeedExamples write bucket sizes so)."""

    def test(v: Any) -> bool:
        if v is None:
            return null
        return (_real(v) and _finite(v) and (isinstance(v, numbers.Integral) or float(v).is_integer()) and v >= low
                and (high is None or v <= high))

    return Rule(f"{'null or ' if null else ''}a whole number{_bound(low, high, False, False)}", test)


def choice(*values: Any) -> Rule:
    return Rule(f"one of {', '.join(map(repr, values))}", lambda v: any(v == c and type(v) is type(c) for c in values))


BOOL = Rule("true or false", lambda v: isinstance(v, bool))
OPTIONAL_BOOL = Rule("null, true or false", lambda v: v is None or isinstance(v, bool))
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
        "stage3_module_granularity_threshold": whole(0),
        "zero_hpz_partition_size": whole(1), "overlap_comm": OPTIONAL_BOOL,
        **flags("contiguous_gradients", "reduce_scatter", "allgather_partitions", "load_from_fp32_weights",
                "elastic_checkpoint", "round_robin_gradients", "ignore_unused_parameters", "cpu_offload",
                "cpu_offload_param", "cpu_offload_use_pin_memory", "stage3_gather_16bit_weights_on_model_save",
                "stage3_gather_fp16_weights_on_model_save", "zero_quantized_weights", "zero_quantized_gradients",
                "zero_quantized_nontrainable_weights", "use_multi_rank_bucket_allreduce", "compute_grad_norm",
                "stage3_use_all_reduce_for_fetch_params", "stage3_allgather_sequential", "legacy_stage1",
                "parameter_alignment", "memory_efficient_linear", "pipeline_loading_checkpoint",
                "override_module_apply", "log_trace_cache_warnings", "enable_sanity_checks",
                "save_muon_momentum_buffer_in_memory"),
    },
    "zero_optimization.offload_optimizer": {
        "device": OFFLOAD_DEVICE, "nvme_path": OPTIONAL_STRING, "buffer_count": whole(0), "ratio": number(0, 1),
        "cpuadam_cores_perc": number(0, 1), **flags("pin_memory", "pipeline_read", "pipeline_write", "fast_init",
                                                     "super_offload"),
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
    "fused": OPTIONAL_BOOL,
    **flags("bias_correction", "amsgrad", "nesterov", "torch_adam", "adam_w_mode", "maximize"),
}
# LARS as You et al. (2017) define it has no eps: 0 is bigbatch's default.
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
    return [(key, f"{prefix}{key}={reprlib.repr(node[key])} must be {rule.must}.")
            for key, rule in rules.items() if key in node and not rule.test(node[key])]


def misordered(params: dict[str, Any], prefix: str) -> list[str]:
    """A sentence for each ORDERED pair whose (already valid) values are the wrong way round."""
    out = []
    for low, high in ORDERED:
        a, b = params.get(low), params.get(high)
        if _real(a) and _real(b) and a > b:
            out.append(f"{prefix}{low}={reprlib.repr(a)} exceeds {prefix}{high}={reprlib.repr(b)}; "
                       f"make {low} <= {high}.")
    return out


# The optimizer types bigbatch.engine.initialize builds itself (any casing).
BIGBATCH_OPTIMIZERS = tuple(OPTIMIZERS)
# Sections DeepSpeed reads as JSON objects (a list or a number there fails inside its parser); `zero_optimization`
# may also be DeepSpeed's deprecated true/false, and an offload block null.
OBJECT_SECTIONS = (*(s for s in SECTIONS if s), "optimizer", "scheduler", "optimizer.params", "scheduler.params",
                   "checkpoint", "aio", "autotuning", "compile", "timers", "comet", "pipeline")
NULLABLE_SECTIONS = ("zero_optimization.offload_optimizer", "zero_optimization.offload_param")
# ZeRO keys that only stage 3 reads (besides the stage3_* ones).
STAGE3_KEYS = ("sub_group_size", "zero_hpz_partition_size", "zero_quantized_weights",
               "zero_quantized_nontrainable_weights")


# What bigbatch offers in place of a removed DeepSpeed block.
INSTEAD = {"compression_training": "bigbatch distils with a recipe's distill section (`bigbatch train tiny_distil "
                                   "--distill.teacher=<run>`) and prunes and quantizes with `bigbatch compress <run> "
                                   "--out DIR --prune 0.5 --quantize int8-dynamic`"}


def _removed_sentence(path: str, message: str, version: str) -> str:
    """DeepSpeed's own words for a removed block, as one sentence that ends with the fix."""
    sentences = [s.strip() for s in message.split(". ") if s.strip()]
    what = sentences[0].split(";")[0].rstrip(".")
    instead = [s.rstrip(". ") for s in sentences[1:] if s.startswith(("Use ", "Set "))]
    alternative = f" and {instead[0][0].lower()}{instead[0][1:]}" if instead else ""
    link = re.search(r"https://\S+", message)
    see = f" (see {link.group(0).rstrip('.')})" if link else ""
    instead_here = f"; {INSTEAD[path]}" if path in INSTEAD else ""
    return (f"{path}: {what} in DeepSpeed {version}, which refuses any config that still holds it; "
            f"delete {path}{alternative}{see}{instead_here}.")


def removed_blocks(config: dict[str, Any], out: list[Finding]) -> None:
    """Blocks DeepSpeed has removed: its parser raises DeepSpeedConfigError on the first one; here all are named."""
    import deepspeed
    from deepspeed.runtime.config import _REMOVED_TOP_LEVEL_CONFIG_KEYS, _REMOVED_ZERO_CONFIG_KEYS

    for prefix, table in (("", _REMOVED_TOP_LEVEL_CONFIG_KEYS), ("zero_optimization.", _REMOVED_ZERO_CONFIG_KEYS)):
        for key, message in table.items():
            if has_path(config, prefix + key):
                out.append(Finding("error", _removed_sentence(prefix + key, message, deepspeed.__version__)))
                delete_path(config, prefix + key)


def check_shapes(config: dict[str, Any], out: list[Finding]) -> None:
    """Every section bigbatch or DeepSpeed reads as a JSON object is one (the checks after this rely on it)."""
    for path in OBJECT_SECTIONS:
        if not has_path(config, path):
            continue
        value = value_at(config, path)
        if (isinstance(value, dict) or (value is None and path in NULLABLE_SECTIONS)
                or (isinstance(value, bool) and path == "zero_optimization")):
            continue
        out.append(Finding("error", f"{path}={reprlib.repr(value)} must be a JSON object {{...}} of its settings; "
                                    f"write it as one or remove {path}."))
        delete_path(config, path)


def check_stage_context(config: dict[str, Any], out: list[Finding]) -> None:
    """Settings DeepSpeed ignores at the configured ZeRO stage: offload (an error, since the memory plan counted on
    it) and stage-3 tuning (a note)."""
    zero = config.get("zero_optimization")
    if not isinstance(zero, dict) or not whole(0, 3).test(zero.get("stage", 0)):
        return  # DeepSpeed's deprecated true/false form, or a stage reported with the other values
    stage = int(zero.get("stage", 0))
    for key, legacy, what, first in (("offload_optimizer", "cpu_offload", "optimizer states", 1),
                                     ("offload_param", "cpu_offload_param", "parameters", 3)):
        section = zero.get(key)
        device = section.get("device") if isinstance(section, dict) else None
        path, value = f"zero_optimization.{key}.device", device
        if zero.get(legacy) is True:
            path, value = f"zero_optimization.{legacy}", True
        if (value is True or value in ("cpu", "nvme")) and stage < first:
            out.append(Finding("error", f"{path}={value!r} does nothing at zero_optimization.stage={stage}: DeepSpeed "
                                        f"offloads {what} only at stage {first}{' or above' if first < 3 else ''}; "
                                        f"set zero_optimization.stage to {first} or remove it."))
    stage3 = [k for k in zero if k.startswith("stage3_") or k in STAGE3_KEYS]
    if stage3 and stage < 3:
        out.append(Finding("note", f"zero_optimization.stage={stage}: DeepSpeed ignores {', '.join(stage3)}, which "
                                   "apply at stage 3 only; remove them or set zero_optimization.stage to 3."))


def check_value_rules(config: dict[str, Any], out: list[Finding]) -> None:
    """The type and range of every key in SECTIONS, OPTIMIZER_PARAMS and SCHEDULER_PARAMS; ORDERED pairs."""
    for section, rules in SECTIONS.items():
        node = value_at(config, section)
        if isinstance(node, dict):
            for key, sentence in bad_values(node, rules, f"{section}." if section else ""):
                out.append(Finding("error", sentence))
                del node[key]
    opt, sched = config.get("optimizer"), config.get("scheduler")
    kind = str(opt.get("type", "")).lower() if isinstance(opt, dict) else ""
    for name, section, rules in (("optimizer", opt, {**OPTIMIZER_PARAMS,
                                                     **PER_OPTIMIZER.get(kind, {})}),
                                 ("scheduler", sched, SCHEDULER_PARAMS)):
        params = section.get("params") if isinstance(section, dict) else None
        if not isinstance(params, dict):
            continue
        for key, sentence in bad_values(params, rules, f"{name}.params."):
            out.append(Finding("error", sentence))
            del params[key]
        out.extend(Finding("error", s) for s in misordered(params, f"{name}.params."))
        if name == "optimizer" and "max_grad_norm" in params:
            out.append(Finding("error", f"optimizer.params.max_grad_norm={params.pop('max_grad_norm')!r} is refused "
                                        "by deepspeed.initialize; remove it and set gradient_clipping instead."))


def _torch_optimizers() -> dict[str, type]:
    """DeepSpeed builds any other optimizer type as `getattr(torch.optim, type)` (exact casing)."""
    import torch

    return {n: c for n, c in vars(torch.optim).items()
            if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer}


def _check_signature(cls: type, params: dict[str, Any], prefix: str, out: list[Finding]) -> None:
    """Parameters the constructor DeepSpeed calls with `**params` would refuse (TypeError), or miss."""
    sig = [p for p in inspect.signature(cls.__init__).parameters.values()
           if p.name not in ("self", "params", "optimizer") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    names = [p.name for p in sig]
    for key in [k for k in params if k not in names]:
        out.append(Finding("error", f"{prefix}{key} is not a parameter of {cls.__name__}"
                                    f"{hint(key, names)}; allowed: {', '.join(names)}."))
        del params[key]
    for p in sig:
        if p.default is p.empty and p.name not in params:
            out.append(Finding("error", f"{prefix}{p.name} is missing: {cls.__name__} has no default for it; add it."))


def check_types(config: dict[str, Any], out: list[Finding]) -> None:
    """The optimizer and scheduler types DeepSpeed or bigbatch can build, and the parameter names each accepts."""
    import deepspeed.runtime.lr_schedules as lr_schedules
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    opt = config.get("optimizer")
    if isinstance(opt, dict) and "type" in opt:
        kind, torch_optimizers = opt["type"], _torch_optimizers()
        known = sorted(set(DEEPSPEED_OPTIMIZERS) | set(BIGBATCH_OPTIMIZERS))
        if not isinstance(kind, str) or (kind.lower() not in known and kind not in torch_optimizers):
            # compared in lower case: DeepSpeed's and bigbatch's types take any casing, torch.optim's only their own
            spelled = {**{n.lower(): n for n in torch_optimizers}, **{k: k for k in known}}
            out.append(Finding("error", f"optimizer.type={kind!r} is not an optimizer DeepSpeed or bigbatch knows"
                                        f"{hint(str(kind).lower(), spelled)}; "
                                        f"known: {', '.join(known)}, or a torch.optim class "
                                        f"({', '.join(sorted(torch_optimizers))})."))
            delete_path(config, "optimizer")
        elif kind.lower() in BIGBATCH_OPTIMIZERS:
            _check_signature(OPTIMIZERS[kind.lower()], opt.get("params", {}), "optimizer.params.", out)
            plain = ("would pick DeepSpeed's CUDA-only FusedLamb" if kind.lower() == "lamb"
                     else "does not know LARS")
            out.append(Finding("note", f"optimizer.type={kind!r} is bigbatch's {kind.upper()} when the config goes "
                                       f"through bigbatch.engine.initialize (deepspeed.initialize {plain})."))
        elif kind.lower() not in DEEPSPEED_OPTIMIZERS:  # DeepSpeed's own take keys that vary with the device
            _check_signature(torch_optimizers[kind], opt.get("params", {}), "optimizer.params.", out)
    sched = config.get("scheduler")
    if isinstance(sched, dict) and "type" in sched:
        known = list(lr_schedules.VALID_LR_SCHEDULES)
        if sched["type"] not in known:
            out.append(Finding("error", f"scheduler.type={sched['type']!r} is not a DeepSpeed LR schedule"
                                        f"{hint(str(sched['type']), known)}; known: {', '.join(known)}."))
            delete_path(config, "scheduler")
        else:
            _check_signature(getattr(lr_schedules, sched["type"]), sched.get("params", {}), "scheduler.params.", out)


def bigbatch_rules(config: dict[str, Any], out: list[Finding]) -> None:
    """What bigbatch.engine.initialize refuses, reported before a run starts: offload and 16 bits at stage 0 for
    LAMB/LARS, and 16 bits at stage 0 for torch's AdamW (`torch_adam`, bigbatch's `adamw`), which DeepSpeed steps
    through the same unfused wrapper."""
    opt = config.get("optimizer")
    if not isinstance(opt, dict):
        return
    kind = str(opt.get("type", "")).lower()
    torch_adam = kind in ("adam", "adamw") and (opt.get("params") or {}).get("torch_adam") is True
    if kind not in BIGBATCH_OPTIMIZERS and not torch_adam:
        return
    if isinstance(config.get("zero_optimization"), bool):  # DeepSpeed's deprecated form: true means stage 1
        config = {**config, "zero_optimization": {"stage": int(config["zero_optimization"])}}
    rules = [lambda c: refuse_16bit_stage0(c, f"optimizer {opt['type']!r} (torch_adam)")] if torch_adam else \
        [refuse_offload, refuse_16bit_stage0]
    for rule in rules:
        try:
            rule(config)
        except ConfigError as err:
            out.append(Finding("error", str(err)))
