"""`bigbatch check <recipe | ds_config.json> [--world N]`: every problem of a DeepSpeed JSON, one sentence each.

Why by hand: DeepSpeed's parser (`deepspeed.runtime.config.DeepSpeedConfig`) silently ignores top-level typos and
unknown optimizer or scheduler types, accepts `"gradient_clipping": "big"`, and reports the rest as raw pydantic,
assertion or TypeError tracebacks, one at a time. Here the JSON still goes through DeepSpeed's own classes (so what
DeepSpeed rejects is rejected), and around them:
- unknown keys: the config is handed to DeepSpeed as a dict that records which keys DeepSpeed asks for. DeepSpeed
  asks for every top-level key it knows (`param_dict.get(KEY, default)`), so a key it never asked for is one it
  ignores. Nested sections parsed by pydantic models reject unknown keys themselves (`extra="forbid"`); sections
  read key by key are checked the same way as the top level.
- each DeepSpeed error is turned into one sentence, the offending key is dropped, and the parse runs again, so that
  one run reports every problem.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import logging
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from bigbatch.config import ConfigError

# The optimizer types bigbatch.engine.initialize builds itself (any casing).
BIGBATCH_OPTIMIZERS = ("lamb", "lars")
MAX_PASSES = 20  # DeepSpeed stops at its first error; each pass removes one offending key


@dataclass(frozen=True)
class Finding:
    level: str  # "error" | "note"
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.message}"


class _Recording(dict):
    """A dict that records which keys are asked for (get, [], in), under a dotted prefix, into a shared set.

    Nested dicts are handed out as _Recording too, so sections that DeepSpeed reads key by key are covered.
    `copy.copy` (DeepSpeed copies the top-level dict) keeps the shared set.
    """

    def __init__(self, data: dict[str, Any], seen: set[str], prefix: str = "") -> None:
        super().__init__(data)
        self.seen, self.prefix = seen, prefix

    def _wrap(self, key: Any, value: Any) -> Any:
        if isinstance(value, dict) and not isinstance(value, _Recording):
            return _Recording(value, self.seen, f"{self.prefix}{key}.")
        return value

    def __getitem__(self, key: Any) -> Any:
        self.seen.add(f"{self.prefix}{key}")
        return self._wrap(key, super().__getitem__(key))

    def get(self, key: Any, default: Any = None) -> Any:
        self.seen.add(f"{self.prefix}{key}")
        return self._wrap(key, super().get(key, default))

    def __contains__(self, key: Any) -> bool:
        self.seen.add(f"{self.prefix}{key}")
        return super().__contains__(key)


def _walk(config: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(config, dict):
        for key, value in config.items():
            path = f"{prefix}{key}"
            yield path, value
            yield from _walk(value, f"{path}.")


def _delete(config: dict[str, Any], path: str) -> None:
    *parents, last = path.split(".")
    node: Any = config
    for p in parents:
        node = node.get(p) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(last, None)


def _hint(word: str, choices: Any, otherwise: str = "") -> str:
    """` (did you mean 'x'?)` for the closest choice, else `otherwise`."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else otherwise


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_batch(config: dict[str, Any], world: Optional[int], out: list[Finding]) -> None:
    keys = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    values = {}
    for key in keys:
        if key in config:
            v = config[key]
            if not _is_int(v) or v < 1:
                out.append(Finding("error", f"{key}={v!r} must be a whole number >= 1."))
                _delete(config, key)
            else:
                values[key] = v
    tb, mb, gas = (values.get(k) for k in keys)
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
    if not values:
        out.append(Finding("note", "no batch sizes given: bigbatch fills train_batch_size, "
                                   "train_micro_batch_size_per_gpu and gradient_accumulation_steps from the recipe."))


def _check_types(config: dict[str, Any], out: list[Finding]) -> None:
    """What DeepSpeed reads with a plain `get` and never validates."""
    clip = config.get("gradient_clipping")
    if "gradient_clipping" in config and (not _is_number(clip) or clip < 0):
        out.append(Finding("error", f"gradient_clipping={clip!r} must be a number >= 0 (0 disables clipping)."))
        _delete(config, "gradient_clipping")
    elif "gradient_clipping" not in config:
        out.append(Finding("note", "gradient_clipping is absent: DeepSpeed then clips gradients at global norm 1.0 "
                                   "(bigbatch always writes the recipe's optimizer.grad_clip)."))
    spp = config.get("steps_per_print")
    if "steps_per_print" in config and (not _is_int(spp) or spp < 1):
        out.append(Finding("error", f"steps_per_print={spp!r} must be a whole number >= 1."))
        _delete(config, "steps_per_print")


def _check_types_of_sections(config: dict[str, Any], out: list[Finding]) -> None:
    import deepspeed.runtime.lr_schedules as lr_schedules
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    opt = config.get("optimizer")
    if isinstance(opt, dict) and "type" in opt:
        kind = str(opt["type"])
        known = sorted(set(DEEPSPEED_OPTIMIZERS) | set(BIGBATCH_OPTIMIZERS))
        if kind.lower() not in known:
            out.append(Finding("error", f"optimizer.type={kind!r} is not an optimizer DeepSpeed or bigbatch knows"
                                        f"{_hint(kind.lower(), known)}; known: {', '.join(known)}."))
            _delete(config, "optimizer")
        elif kind.lower() in BIGBATCH_OPTIMIZERS:
            from bigbatch.engine import build_optimizer_kwargs

            try:
                build_optimizer_kwargs(opt)
            except ConfigError as err:
                out.append(Finding("error", str(err)))
            plain = ("would pick DeepSpeed's CUDA-only FusedLamb" if kind.lower() == "lamb"
                     else "does not know LARS")
            out.append(Finding("note", f"optimizer.type={kind!r} is bigbatch's {kind.upper()} when the config goes "
                                       f"through bigbatch.engine.initialize (deepspeed.initialize {plain})."))
    sched = config.get("scheduler")
    if isinstance(sched, dict) and "type" in sched:
        known = list(lr_schedules.VALID_LR_SCHEDULES)
        if sched["type"] not in known:
            out.append(Finding("error", f"scheduler.type={sched['type']!r} is not a DeepSpeed LR schedule"
                                        f"{_hint(str(sched['type']), known)}; known: {', '.join(known)}."))
            _delete(config, "scheduler")


def _bigbatch_rules(config: dict[str, Any], out: list[Finding]) -> None:
    """What bigbatch.engine.initialize refuses for LAMB/LARS, reported before a run starts."""
    from bigbatch.engine import refuse_16bit_stage0, refuse_offload

    opt = config.get("optimizer")
    if isinstance(opt, dict) and str(opt.get("type", "")).lower() in BIGBATCH_OPTIMIZERS:
        for rule in (refuse_offload, refuse_16bit_stage0):
            try:
                rule(config)
            except ConfigError as err:
                out.append(Finding("error", str(err)))


def _pydantic_findings(err: Any, config: dict[str, Any]) -> list[tuple[str, str]]:
    """(dotted path, sentence) for each error of a pydantic ValidationError raised inside DeepSpeed's parser."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    models = {cls.__name__: cls for cls in _subclasses(DeepSpeedConfigModel)}
    model = models.get(err.title)
    results = []
    for e in err.errors():
        loc = [str(x) for x in e["loc"]]
        path = ".".join(loc)
        if loc and loc[0] not in config:  # the model was built from one section: find which holds the key
            for section, value in config.items():
                if isinstance(value, dict) and loc[0] in value:
                    path = f"{section}.{path}"
                    break
        if e["type"] == "extra_forbidden":
            fields = list(model.model_fields) if model else []
            hint = _hint(loc[-1], fields) or _hint(loc[-1], _pydantic_keys(), "; remove it")
            results.append((path, f"{path} is not a DeepSpeed key{hint}."))
        else:
            results.append((path, f"{path}={e.get('input')!r} is invalid: {e['msg']}."))
    return results


def _subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _parse_with_deepspeed(config: dict[str, Any], out: list[Finding]) -> tuple[set[str], set[str]]:
    """Runs DeepSpeed's parser until it accepts what is left; returns the dotted keys it asked for and the paths
    already reported."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.utils import logger as ds_logger
    from pydantic import ValidationError

    work = copy.deepcopy(config)
    # DeepSpeed checks the batch product against the world it sees (1 here); bigbatch checked it above.
    for key in ("train_batch_size", "gradient_accumulation_steps"):
        work.pop(key, None)
    work["train_micro_batch_size_per_gpu"] = 1
    level = ds_logger.level
    ds_logger.setLevel(logging.ERROR)
    seen: set[str] = set()
    reported: set[str] = set()
    try:
        for _ in range(MAX_PASSES):
            seen = set()
            try:
                DeepSpeedConfig(_Recording(work, seen))
                break
            except ValidationError as err:
                for path, sentence in _pydantic_findings(err, work):
                    out.append(Finding("error", sentence))
                    _delete(work, path)
                    reported.add(path)
            except (AssertionError, TypeError, ValueError, KeyError, AttributeError) as err:
                out.append(Finding("error", f"DeepSpeed rejects the config: {str(err).strip() or type(err).__name__}."))
                break
        return seen, reported
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
        if key not in top_known:
            out.append(Finding("error", f"{key} is not a DeepSpeed key and DeepSpeed would ignore it silently"
                                        f"{_hint(key, top_known, '; remove it')}."))
    for path, _ in _walk(config):
        parent, _, key = path.rpartition(".")
        if not parent or parent in ("optimizer", "scheduler") or "." in parent or path in reported:
            continue  # optimizer/scheduler params are checked by the optimizer's own signature
        section_known = {k[len(parent) + 1:] for k in seen if k.startswith(f"{parent}.") and
                         "." not in k[len(parent) + 1:]}
        # A section read key by key asks for every key it knows. Sections handed to a pydantic model (which forbids
        # unknown keys and raised above if it met one) may be asked for a few keys only: their fields count as known.
        if section_known and key not in section_known and key not in pydantic_keys:
            out.append(Finding("error", f"{path} is not a key of DeepSpeed's {parent} section and would be ignored"
                                        f"{_hint(key, section_known, '; remove it')}."))


def check_config(config: dict[str, Any], world: Optional[int] = None) -> list[Finding]:
    """Every problem of a DeepSpeed config dict (errors) and what DeepSpeed will do silently (notes).

    world: the data-parallel world size; None only requires the batch keys to fit some whole world size.
    """
    out: list[Finding] = []
    config = copy.deepcopy(config)
    for path, value in list(_walk(config)):
        if value == "auto":
            out.append(Finding("error", f"{path}=\"auto\" is a placeholder only the Hugging Face Trainer fills in "
                                        "(DeepSpeed fails on it with a TypeError); give a value, or leave batch "
                                        "keys out and let bigbatch fill them from the recipe."))
            _delete(config, path)
    fp16 = (config.get("fp16") or {}).get("enabled") is True
    bf16 = any((config.get(k) or {}).get("enabled") is True for k in ("bf16", "bfloat16"))
    if fp16 and bf16:
        out.append(Finding("error", "fp16.enabled and bf16.enabled are both true; enable one precision only."))
        config["bf16"] = {**(config.get("bf16") or {}), "enabled": False}
    _check_batch(config, world, out)
    _check_types(config, out)
    _check_types_of_sections(config, out)
    _bigbatch_rules(config, out)
    seen, reported = _parse_with_deepspeed(config, out)
    _unknown_keys(config, seen, reported, out)
    return out


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.level == "error"]


def raise_on_errors(findings: list[Finding], source: str) -> None:
    """Used by `bigbatch train`: every error of the resolved config, one line each, as one ConfigError."""
    bad = errors(findings)
    if bad:
        lines = "\n  ".join(f.message for f in bad)
        raise ConfigError(f"the DeepSpeed config from {source} has {len(bad)} problem(s):\n  {lines}")


def check_recipe(name: str, overrides: dict[str, str], world: Optional[int]) -> list[Finding]:
    """The recipe's own checks (keys, data files, fragments, batch arithmetic), then its resolved DeepSpeed JSON."""
    from bigbatch import dsconfig
    from bigbatch.config import load_recipe
    from bigbatch.data.corpus import check_sources
    from bigbatch.data.tokenizer import check_tokenizer
    from bigbatch.scaling import plan_steps, scaled_lr, solve_batch

    out: list[Finding] = []
    recipe = load_recipe(name, overrides)
    for step in (lambda: check_sources(recipe.data.sources),
                 lambda: check_tokenizer(recipe.data.tokenizer, recipe.data.vocab_size),
                 lambda: [dsconfig.find_fragment(f) for f in recipe.deepspeed.configs]):
        try:
            step()
        except ConfigError as err:
            out.append(Finding("error", str(err)))
    if out:
        return out
    b = recipe.batch
    world = world or recipe.cluster.nodes * recipe.cluster.gpus_per_node  # the cluster it was planned for
    try:
        plan_steps(recipe, world)  # every phase's and every ramp step's batch arithmetic
    except ConfigError as err:
        return [Finding("error", str(err))]
    plan = solve_batch(b.global_batch, world, b.micro_batch, b.grad_accum)
    lr, _ = scaled_lr(recipe.optimizer, plan.global_batch)
    config = dsconfig.build(recipe, plan, lr)
    return check_config(config, plan.world)


def cmd_check(args: list[str]) -> int:
    """`bigbatch check X [--world N]`: X is a DeepSpeed JSON when it names an existing .json file, else a recipe."""
    from bigbatch.config import parse_override_args

    overrides, rest = parse_override_args(args)
    p = argparse.ArgumentParser(prog="bigbatch check", description=cmd_check.__doc__)
    p.add_argument("target", help="a DeepSpeed JSON file, or a recipe (name, recipes/*.py, recipe.json)")
    p.add_argument("--world", type=int, default=None,
                   help="data-parallel ranks; default: a recipe's cluster, any whole number for a JSON")
    known, unknown = p.parse_known_args(rest)
    if unknown:
        raise ConfigError(f"unknown argument {unknown[0]!r}; see `bigbatch check --help`.")
    if known.world is not None and known.world < 1:
        raise ConfigError(f"--world={known.world} must be at least 1.")
    path = Path(known.target)
    if path.suffix == ".json" and path.is_file() and not _is_recipe_json(path):
        from bigbatch.dsconfig import load_fragment

        findings = check_config(load_fragment(path), known.world)
    else:
        findings = check_recipe(known.target, overrides, known.world)
    for f in findings:
        print(f)
    bad = errors(findings)
    print(f"{known.target}: {len(bad)} error(s), {len(findings) - len(bad)} note(s)")
    return 2 if bad else 0


def _is_recipe_json(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return False
    return isinstance(data, dict) and "recipe" in data and "resolved" in data
