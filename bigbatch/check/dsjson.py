"""Every problem of a DeepSpeed JSON, one sentence each (`check_config`): what DeepSpeed's parser rejects and what it
lets through.

Why by hand: DeepSpeed's parser (`deepspeed.runtime.config.DeepSpeedConfig`) silently ignores top-level typos and
unknown optimizer or scheduler types, accepts `"gradient_clipping": "big"`, and reports the rest as raw pydantic,
assertion or TypeError tracebacks, one at a time. Here the JSON still goes through DeepSpeed's own classes (so what
DeepSpeed rejects is rejected), and around them:
- unknown keys: the config is handed to DeepSpeed as a dict that records which keys DeepSpeed asks for. DeepSpeed
  asks for every top-level key it knows (`param_dict.get(KEY, default)`), so a key it never asked for is one it
  ignores. Nested sections parsed by pydantic models reject unknown keys themselves (`extra="forbid"`); sections
  read key by key are checked the same way as the top level.
- each DeepSpeed error is turned into one sentence, the offending key is dropped, and the parse runs again, so that
  one run reports every problem. Blocks DeepSpeed has removed (it raises on them) are reported up front, all at once.
- values DeepSpeed never checks (types, ranges, settings its ZeRO stage ignores): see `bigbatch.check.rules`.
No input ends in a traceback: whatever DeepSpeed's parser raises becomes a sentence naming the key it was reading.
"""

from __future__ import annotations

import copy
import json
import logging
import numbers
import reprlib
from typing import Any, Iterator, Optional

from bigbatch.check.rules import (
    Finding,
    bigbatch_rules,
    check_shapes,
    check_stage_context,
    check_types,
    check_value_rules,
    delete_path,
    has_path,
    hint,
    one_line,
    removed_blocks,
    value_at,
)

MAX_PASSES = 20  # DeepSpeed stops at its first error; each pass removes one offending key
DEEPSPEED_AUTO = ("data_types.keep_in_fp32_modules", "pipeline.stages")  # "auto" is DeepSpeed's own value here
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
# The sections DeepSpeed 0.19 reads through a pydantic DeepSpeedConfigModel: it drops "auto" values there silently
# (`DeepSpeedConfigModel.__init__`, runtime/config_utils.py) and refuses keys the model does not know.
MODEL_SECTIONS = {"fp16": "DeepSpeedFP16Config", "bf16": "DeepSpeedBF16Config", "bfloat16": "DeepSpeedBF16Config",
                  "zero_optimization": "DeepSpeedZeroConfig",
                  "zero_optimization.offload_optimizer": "DeepSpeedZeroOffloadOptimizerConfig",
                  "zero_optimization.offload_param": "DeepSpeedZeroOffloadParamConfig",
                  "tensorboard": "TensorBoardConfig", "wandb": "WandbConfig", "csv_monitor": "CSVConfig",
                  "comet": "CometConfig", "comms_logger": "CommsLoggerConfig"}


class _Recording(dict):
    """A dict that records which keys are asked for (get, [], in), under a dotted prefix, into a shared dict used as
    an ordered set whose last entry is the key read last (to name the key DeepSpeed's parser was reading when it
    failed).

    Nested dicts are handed out as _Recording too, so sections that DeepSpeed reads key by key are covered.
    `copy.copy` (DeepSpeed copies the top-level dict) keeps the shared record.
    """

    def __init__(self, data: dict[str, Any], seen: dict[str, None], prefix: str = "") -> None:
        super().__init__(data)
        self.seen, self.prefix = seen, prefix

    def _record(self, key: Any) -> None:
        path = f"{self.prefix}{key}"
        self.seen.pop(path, None)
        self.seen[path] = None

    def _wrap(self, key: Any, value: Any) -> Any:
        if isinstance(value, dict) and not isinstance(value, _Recording):
            return _Recording(value, self.seen, f"{self.prefix}{key}.")
        return value

    def __getitem__(self, key: Any) -> Any:
        self._record(key)
        return self._wrap(key, super().__getitem__(key))

    def get(self, key: Any, default: Any = None) -> Any:
        self._record(key)
        return self._wrap(key, super().get(key, default))

    def __contains__(self, key: Any) -> bool:
        self._record(key)
        return super().__contains__(key)


def _walk(config: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(config, dict):
        for key, value in config.items():
            path = f"{prefix}{key}"
            yield path, value
            yield from _walk(value, f"{path}.")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_batch(config: dict[str, Any], world: Optional[int], out: list[Finding]) -> None:
    values = {}
    for key in BATCH_KEYS:
        if key in config:
            v = config[key]
            if isinstance(v, float) and v.is_integer() and v >= 1:
                out.append(Finding("error", f"{key}={v!r} must be written as an integer: {int(v)}."))
                delete_path(config, key)
            elif not _is_int(v) or v < 1:
                out.append(Finding("error", f"{key}={reprlib.repr(v)} must be a whole number >= 1."))
                delete_path(config, key)
            else:
                values[key] = v
    tb, mb, gas = (values.get(k) for k in BATCH_KEYS)
    if tb and mb and gas:
        unit = mb * gas
        if world is not None and tb != unit * world:
            out.append(Finding("error", f"train_batch_size={tb} != micro {mb} x accumulation {gas} x world {world} = "
                                        f"{unit * world}; change one of the three (or let the recipe fill them)."))
        elif world is None and tb % unit:
            out.append(Finding("error", f"train_batch_size={tb} is not micro {mb} x accumulation {gas} = {unit} "
                                        f"times a whole number of ranks; make it a multiple of {unit}."))
    elif world is not None and tb and (mb or gas):
        unit = (mb or gas) * world
        if tb % unit:
            known = "train_micro_batch_size_per_gpu" if mb else "gradient_accumulation_steps"
            out.append(Finding("error", f"train_batch_size={tb} is not divisible by {known} {mb or gas} x world "
                                        f"{world} = {unit}."))


def _model_fields(section: str) -> dict[str, Any]:
    """Every key (field name and alias) of the DeepSpeed model that reads `section`, with its pydantic FieldInfo."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    models = {cls.__name__: cls for cls in _subclasses(DeepSpeedConfigModel)}
    model = models.get(MODEL_SECTIONS.get(section, ""))
    fields: dict[str, Any] = {}
    for name, info in (model.model_fields.items() if model else ()):
        fields.update({k: info for k in (name, info.alias) if k})
    return fields


def _auto_sentence(path: str) -> str:
    """What DeepSpeed does with `"auto"` at `path`: the batch keys fail with a TypeError; inside a section read by a
    pydantic model the value is dropped and the default applies; elsewhere the string stays as it is."""
    placeholder = f'{path}="auto" is a placeholder only the Hugging Face Trainer fills in'
    if path in BATCH_KEYS:
        return (f"{placeholder} (DeepSpeed fails on it with a TypeError); give a value, or leave batch keys out and "
                "let bigbatch fill them from the recipe.")
    section, _, key = path.rpartition(".")
    if not any(path.startswith(f"{s}.") for s in MODEL_SECTIONS):
        return f"{placeholder}; DeepSpeed takes the string as it is: give a value."
    info = _model_fields(section).get(key)
    default = info.get_default(call_default_factory=True) if info else None
    shown = json.dumps(default) if isinstance(default, (bool, int, float, str, type(None))) else "its default"
    effect = f"its default {shown}" if info else "its default"
    if key == "enabled" and section in ("fp16", "bf16", "bfloat16"):
        effect += f", so {section} is off and the run is in fp32 unless another precision is on"
    return f"{placeholder}; DeepSpeed drops it silently and uses {effect}: give a value."


def _extra_key_sentence(path: str, key: str, fields: list[str]) -> str:
    """Why: difflib would suggest a sibling section's key under its own name ("bf16.loss_scale: did you mean
    'loss_scale'?"), and field names but not their stage3_ aliases."""
    section = path.rpartition(".")[0]
    if key.startswith("_"):
        return (f"{path} is refused: DeepSpeed's {section} section takes no comment keys; move it to the top level, "
                "where DeepSpeed ignores keys starting with _.")
    owners = [s for s in MODEL_SECTIONS if s not in (section, "bfloat16") and s.count(".") == section.count(".")
              and key in _model_fields(s)]
    if owners:
        article = "an" if owners[0][0] in "aefhilmnorsx" else "a"
        return f"{path} is {article} {owners[0]}-only key, which DeepSpeed's {section} section refuses; remove it."
    return f"{path} is not a DeepSpeed key{hint(key, fields) or hint(key, _pydantic_keys(), '; remove it')}."


def _pydantic_findings(err: Any, config: dict[str, Any], section: str) -> list[tuple[str, str]]:
    """(dotted path, sentence) for each error of a pydantic ValidationError raised inside DeepSpeed's parser while it
    read `section`."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    models = {cls.__name__: cls for cls in _subclasses(DeepSpeedConfigModel)}
    model = models.get(err.title)
    results = []
    for e in err.errors():
        loc = [str(x) for x in e["loc"]]
        # a model built from one section (fp16, zero_optimization) reports keys relative to it
        path = ".".join(loc if loc and loc[0] in config else [section, *loc])
        if e["type"] == "extra_forbidden":
            fields = [k for n, f in (model.model_fields.items() if model else ()) for k in (n, f.alias) if k]
            results.append((path, _extra_key_sentence(path, loc[-1], fields)))
        else:
            results.append((path, f"{path}={reprlib.repr(e.get('input'))} is invalid: {one_line(e['msg'])}; "
                                  f"fix or remove {path}."))
    return results


def _subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _parse_with_deepspeed(config: dict[str, Any], out: list[Finding]) -> tuple[Optional[set[str]], set[str]]:
    """Runs DeepSpeed's parser until it accepts what is left; returns the dotted keys it asked for (None when it
    never got through) and the paths already reported."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.utils import logger as ds_logger
    from pydantic import ValidationError

    work = copy.deepcopy(config)
    # DeepSpeed checks the batch product against the world it sees (1 here); bigbatch checked it above.
    for key in ("train_batch_size", "gradient_accumulation_steps"):
        work.pop(key, None)
    work["train_micro_batch_size_per_gpu"] = 1
    level = ds_logger.level
    ds_logger.setLevel(logging.CRITICAL)
    reported: set[str] = set()
    try:
        for _ in range(MAX_PASSES):
            seen: dict[str, None] = {}
            try:
                DeepSpeedConfig(_Recording(work, seen))
                return set(seen), reported
            except ValidationError as err:
                section = next(reversed(seen), "").split(".")[0]
                findings = _pydantic_findings(err, work, section)
            except Exception as err:  # DeepSpeed's parser raises whatever its readers raise: each is one finding
                path = next(reversed(seen), "")
                if not has_path(work, path):  # raised after reading, by a check across keys
                    out.append(Finding("error", f"DeepSpeed rejects the combination: {one_line(str(err))}; "
                                                "change one of the keys it names."))
                    return None, reported
                findings = [(path, f"DeepSpeed's parser fails on {path}={reprlib.repr(value_at(work, path))} "
                                   f"({type(err).__name__}: {one_line(str(err))}); fix or remove {path}.")]
            for path, sentence in findings:
                out.append(Finding("error", sentence))
                reported.add(path)
            if not any(has_path(work, path) for path, _ in findings):
                return None, reported  # nothing to drop: another pass would fail the same way
            for path, _ in findings:
                delete_path(work, path)
        return None, reported
    finally:
        ds_logger.setLevel(level)


def _pydantic_keys() -> set[str]:
    """Every field name and alias of DeepSpeed's pydantic config models (which reject unknown keys themselves)."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    keys: set[str] = set()
    for cls in _subclasses(DeepSpeedConfigModel):
        for name, info in cls.model_fields.items():
            keys |= {name, info.alias} - {None}
    return keys


def _unknown_keys(config: dict[str, Any], seen: set[str], reported: set[str], out: list[Finding]) -> None:
    top_known = {k for k in seen if "." not in k}
    pydantic_keys = _pydantic_keys()
    for key in config:
        if key not in top_known and key.startswith("_"):
            out.append(Finding("note", f"{key} starts with _, a comment by convention: DeepSpeed ignores it."))
        elif key not in top_known:
            out.append(Finding("error", f"{key} is not a DeepSpeed key and DeepSpeed would ignore it silently"
                                        f"{hint(key, top_known, '; remove it')}."))
    for path, _ in _walk(config):
        parent, _, key = path.rpartition(".")
        if not parent or parent in ("optimizer", "scheduler") or "." in parent or path in reported:
            continue  # optimizer/scheduler params are checked by the optimizer's own signature
        section_known = {k[len(parent) + 1:] for k in seen if k.startswith(f"{parent}.") and
                         "." not in k[len(parent) + 1:]}
        # A section read key by key asks for every key it knows. Sections handed to a pydantic model (which forbids
        # unknown keys and raised above if it met one) may be asked for a few keys only: their fields count as known.
        if section_known and key not in section_known and key.startswith("_"):
            out.append(Finding("note", f"{path} starts with _, a comment by convention: DeepSpeed ignores it."))
        elif section_known and key not in section_known and key not in pydantic_keys:
            out.append(Finding("error", f"{path} is not a key of DeepSpeed's {parent} section and would be ignored"
                                        f"{hint(key, section_known, '; remove it')}."))


def check_config(config: dict[str, Any], world: Optional[int] = None) -> list[Finding]:
    """Every problem of a DeepSpeed config dict (errors) and what DeepSpeed will do silently (notes).

    world: the data-parallel world size; None only requires the batch keys to fit some whole world size.
    """
    out: list[Finding] = []
    config = copy.deepcopy(config)
    if not any(k in config for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                      "gradient_accumulation_steps")):
        out.append(Finding("note", "no batch sizes given: bigbatch fills train_batch_size, "
                                   "train_micro_batch_size_per_gpu and gradient_accumulation_steps from the recipe."))
    if "gradient_clipping" not in config:
        out.append(Finding("note", "gradient_clipping is absent: DeepSpeed then clips gradients at global norm 1.0 "
                                   "(bigbatch always writes the recipe's optimizer.grad_clip)."))
    removed_blocks(config, out)
    check_shapes(config, out)
    check_stage_context(config, out)
    for path, value in list(_walk(config)):
        if value == "auto" and path not in DEEPSPEED_AUTO:
            out.append(Finding("error", _auto_sentence(path)))
            delete_path(config, path)
    fp16 = (config.get("fp16") or {}).get("enabled") is True
    bf16 = any((config.get(k) or {}).get("enabled") is True for k in ("bf16", "bfloat16"))
    if fp16 and bf16:
        out.append(Finding("error", "fp16.enabled and bf16.enabled are both true; enable one precision only."))
        config["bf16"] = {**(config.get("bf16") or {}), "enabled": False}
    _check_batch(config, world, out)
    check_types(config, out)  # names first: a value refused below is not then reported missing
    check_value_rules(config, out)
    bigbatch_rules(config, out)
    seen, reported = _parse_with_deepspeed(config, out)
    if seen is not None:  # a parse that never got through asked for only some of the keys it knows
        _unknown_keys(config, seen, reported, out)
    return out
