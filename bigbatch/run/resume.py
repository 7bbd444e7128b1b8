"""What a resume keeps from the checkpoint and what it takes from the recipe as given at this start.

Kept from the checkpoint: the weights, the optimizer's moments and step counts, the loss scaler, the LR scheduler's
position, and the data position. Taken from this start's recipe: every optimizer hyper-parameter (LR table, weight
decay, betas, eps, clamp, momentum, trust coefficient) and gradient clipping, from the resumed step on.

Why this needs code: DeepSpeed's `load_checkpoint` loads the optimizer and LR scheduler state dicts whole. torch's
`Optimizer.load_state_dict` overwrites every param group's hyper-parameters with the saved ones, and
`LambdaLR.load_state_dict` restores the saved `base_lrs`, so a `--resume --optimizer.lr=<half>` would train on at the
old LR while recipe.json shows the new one (and the overflow stop's advice "a lower --optimizer.lr ... then
--resume" would do nothing). Gradient clipping is read from the DeepSpeed JSON, which each start writes anew.

Some settings cannot change within a run, because the checkpoint's data position or shapes depend on them (the
batch, the sequence lengths, the seed, the data and its blend, the model, the optimizer type): a resume that changes
one is refused, naming the key.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

from bigbatch.config import ConfigError

# Recipe keys fixed for the life of a run (dotted paths into recipe.json's "recipe"); `phases.*` covers each phase.
FIXED = (
    "model.arch", "model.hidden_size", "model.num_layers", "model.num_heads", "model.num_kv_heads",
    "model.intermediate_size", "model.max_position", "model.pad_vocab_to_multiple",
    "data.sources", "data.weights", "data.tokenizer", "data.vocab_size", "data.seq_len", "data.eval_fraction",
    "data.eval_samples", "data.streaming", "data.shuffle_buffer",
    "optimizer.type",
    "batch.global_batch", "batch.ramp_start", "batch.ramp_increment", "batch.ramp_samples",
    "run.seed",
    "phases.global_batch", "phases.seq_len",
)


def _flat(tree: dict[str, Any]) -> dict[str, Any]:
    """Dotted key -> value, as recipe.json holds them (a JSON round trip: tuples become lists)."""
    return dict(_leaves(json.loads(json.dumps(tree))))


def _leaves(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) for every leaf; list positions of `phases` become `phases.<n>.` (1-based, as overrides)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, f"{prefix}{key}.")
    elif prefix == "phases." and isinstance(tree, list):
        yield "phases", len(tree)
        for n, phase in enumerate(tree, start=1):
            yield from _leaves(phase, f"phases.{n}.")
    else:
        yield prefix[:-1], tree


def _fixed(key: str) -> bool:
    parts = key.split(".")
    generic = ".".join(p for p in parts if not p.isdigit())
    return generic in FIXED or key == "phases"


def refuse_changes(previous: dict[str, Any], current: dict[str, Any], run_dir: Any) -> None:
    """Raises ConfigError when this start's recipe changes a key that cannot change within a run."""
    before, now = _flat(previous), _flat(current)
    for key in sorted(set(before) | set(now)):
        if _fixed(key) and before.get(key) != now.get(key):
            option = "--phases.N.seq_len and the other phase keys" if key == "phases" else f"--{key}"
            raise ConfigError(
                f"{key} is {now.get(key)!r} at this start but the run in {run_dir} was started with "
                f"{before.get(key)!r}, and it cannot change within a run (the checkpoint's data position and shapes "
                f"depend on it); resume with {option}={_override(before.get(key))} or start a new --run-dir.")


def _override(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def changed_keys(previous: dict[str, Any], current: dict[str, Any]) -> dict[str, list[Any]]:
    """{key: [before, now]} for every recipe key this start changes (recorded in recipe.json)."""
    before, now = _flat(previous), _flat(current)
    return {k: [before.get(k), now.get(k)] for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)}


def hyperparameters(optimizer: Any) -> list[dict[str, Any]]:
    """Each param group's settings, as this start built them from its recipe (taken before the checkpoint loads)."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def restore(optimizer: Any, scheduler: Any, groups: list[dict[str, Any]], base_lrs: list[float]) -> None:
    """After `load_checkpoint`: this start's hyper-parameters and LR table back in place, the loaded moments, step
    counts and scheduler position kept. The LR of the resumed step is this start's table at that position."""
    if len(groups) != len(optimizer.param_groups):
        raise ConfigError(f"the checkpoint has {len(optimizer.param_groups)} optimizer param groups and this start "
                          f"builds {len(groups)}; resume with the recipe the run started with, or start a new run.")
    for group, settings in zip(optimizer.param_groups, groups):
        group.update(settings)
    if scheduler is not None:
        scheduler.base_lrs = list(base_lrs)
        # LambdaLR's own formula (torch.optim.lr_scheduler.LambdaLR.get_lr) at the loaded position
        lrs = [base * factor(scheduler.last_epoch) for base, factor in zip(base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs
