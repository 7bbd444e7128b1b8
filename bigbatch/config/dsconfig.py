"""Builds the resolved DeepSpeed JSON of a run: the recipe's `ds_configs/` fragments, merged, plus the keys the
recipe owns (batch sizes, optimizer, gradient clipping). The result is written to `<run_dir>/ds_config.json`.

Ownership keeps one source per number: the fragments own ZeRO, precision, activation checkpointing and monitors;
the recipe owns the batch arithmetic, the optimizer and the clipping norm. A fragment that states a recipe-owned key
with a different value is refused, naming both.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import hjson

from bigbatch.config import ConfigError, Recipe
from bigbatch.config.files import shipped_dir
from bigbatch.config.schedule import BatchSplit

DS_CONFIGS = shipped_dir("ds_configs")
# DeepSpeed's deepest keys sit 6 levels down (data_efficiency.data_routing.random_ltd...); far deeper input would
# only exhaust Python's recursion in the parser or the checker.
MAX_DEPTH = 32
RECIPE_OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping", "optimizer", "scheduler")


def find_fragment(name: str) -> Path:
    """A path, else `name` (or `name`.json) in the user's own ./ds_configs, else the shipped one."""
    folders = (Path("ds_configs"), DS_CONFIGS)
    for candidate in (Path(name), *(d / n for d in folders for n in (name, f"{name}.json"))):
        if candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(p.name for p in DS_CONFIGS.glob("*.json")))
    raise ConfigError(f"DeepSpeed config {name!r} not found (looked in ., ./ds_configs and the shipped ones); "
                      f"shipped: {shipped}.")


def _depth(value: Any) -> int:
    """How many objects or lists deep `value` nests, counted without recursion."""
    depth, level = 0, [value]
    while level:
        level = [v for x in level if isinstance(x, (dict, list)) for v in (x.values() if isinstance(x, dict) else x)]
        depth += 1
    return depth - 1


class _DuplicateKeys(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Why: json keeps the last of two equal keys silently; DeepSpeed's own file loader refuses them."""
    twice = [k for k, n in collections.Counter(k for k, _ in pairs).items() if n > 1]
    if twice:
        raise _DuplicateKeys(", ".join(map(repr, twice)))
    return dict(pairs)


def load_fragment(path: Path) -> dict[str, Any]:
    """A DeepSpeed JSON file read the way DeepSpeed 0.19 reads it (`hjson.load` in `runtime/config.py`): `//` and `#`
    comments, trailing commas and a UTF-8 byte-order mark are accepted; a key stated twice in one object is not.
    `bigbatch check`, `bigbatch train` and `bigbatch.engine` all read configs through here."""
    too_deep = (f"DeepSpeed config {path} nests more than {MAX_DEPTH} levels of objects or lists, deeper than any "
                "DeepSpeed key; fix the file.")
    try:
        text = path.read_text(encoding="utf-8")
        if not text.strip(" \t\r\n\ufeff"):
            raise ConfigError(f"DeepSpeed config {path} is empty; write a JSON object into it, at least {{}}.")
        data = hjson.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKeys as err:
        raise ConfigError(f"DeepSpeed config {path} states {err} more than once in one object; keep one "
                          "(DeepSpeed refuses duplicate keys).") from None
    except ValueError as err:  # hjson.HjsonDecodeError and UnicodeDecodeError are ValueErrors
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON (nor the hjson DeepSpeed also reads): {err}; "
                          "fix the file.") from None
    except RecursionError:
        raise ConfigError(too_deep) from None
    except OSError as err:
        raise ConfigError(f"DeepSpeed config {path} cannot be read ({err.strerror}); check its permissions.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config {path} must hold a JSON object, not {type(data).__name__}.")
    if _depth(data) > MAX_DEPTH:
        raise ConfigError(too_deep)
    return data


def merge(base: dict[str, Any], extra: dict[str, Any], source: str, origin: dict[str, str], prefix: str = "") -> None:
    """Deep-merges `extra` into `base`; two fragments giving one key different values is an error naming both."""
    for key, value in extra.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(base.setdefault(key, {}), dict):
            merge(base[key], value, source, origin, f"{path}.")
        elif key in base and base[key] != value:
            raise ConfigError(
                f"{path} is {base[key]!r} in {origin.get(path, 'an earlier fragment')} but {value!r} in {source}; "
                "state it in one fragment only."
            )
        else:
            base[key] = value
            origin[path] = source


def optimizer_section(recipe: Recipe, lr: float) -> dict[str, Any]:
    o = recipe.optimizer
    kind = o.type.lower()
    if kind == "lamb":
        params = {"lr": lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
                  "max_coeff": o.max_coeff, "min_coeff": o.min_coeff}
        return {"type": "LAMB", "params": params}
    if kind == "lars":
        params = {"lr": lr, "momentum": o.momentum, "weight_decay": o.weight_decay,
                  "trust_coefficient": o.trust_coefficient}
        return {"type": "LARS", "params": params}
    # DeepSpeed's AdamW: torch's implementation, so it runs on every accelerator.
    return {"type": "AdamW", "params": {"lr": lr, "betas": list(o.betas), "eps": o.eps,
                                         "weight_decay": o.weight_decay, "torch_adam": True}}


def build(recipe: Recipe, split: BatchSplit, lr: float) -> dict[str, Any]:
    """The resolved DeepSpeed config for this recipe on `split.world` ranks."""
    config: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for name in recipe.deepspeed.configs:
        path = find_fragment(name)
        merge(config, load_fragment(path), str(path), origin)
    owned = {
        "train_batch_size": split.global_batch,
        "train_micro_batch_size_per_gpu": split.micro_batch,
        "gradient_accumulation_steps": split.grad_accum,
        "gradient_clipping": recipe.optimizer.grad_clip,
        "optimizer": optimizer_section(recipe, lr),
    }
    for key in RECIPE_OWNED:
        if key in config and (key not in owned or config[key] != owned[key]):
            where = origin.get(key, "a fragment")
            if key in ("optimizer", "scheduler"):
                raise ConfigError(f"{where} sets {key!r}; in bigbatch the recipe owns it: remove it from the JSON "
                                  f"and set --optimizer.* / --schedule.* instead.")
            raise ConfigError(f"{where} sets {key}={config[key]!r} but the recipe gives {owned[key]!r}; remove the key "
                              "from the JSON (the recipe fills it in) or change the recipe's batch/optimizer section.")
    config.update(owned)
    config.setdefault("steps_per_print", 10**9)  # bigbatch logs its own metrics every step
    config.setdefault("wall_clock_breakdown", False)
    return config


def precision(config: dict[str, Any]) -> str:
    """fp16, bf16 or fp32: the training precision a DeepSpeed config selects."""
    if (config.get("fp16") or {}).get("enabled"):
        return "fp16"
    if (config.get("bf16") or config.get("bfloat16") or {}).get("enabled"):
        return "bf16"
    return "fp32"
