"""Resuming a run, in one place: choose the checkpoint, load it, put this start's settings back, refuse what a run
fixes (as torchtitan's `CheckpointManager.load` owns its resume).

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
one is refused, naming the key. A checkpoint written on another number of ranks under ZeRO loads through DeepSpeed's
universal checkpoint, converted once by the writer rank.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from bigbatch.config import ConfigError, adaptive
from bigbatch.config.adaptive import Decision
from bigbatch.config.errors import StorageFault
from bigbatch.config.schedule import samples_before, step_table
from bigbatch.engine import client_optimizer
from bigbatch.resolve import ResolvedRun
from bigbatch.run import checkpoint, distributed
from bigbatch.run.metrics import say, truncate_metrics
from bigbatch.run.rundir import RunDir

# Recipe keys fixed for the life of a run (dotted paths into recipe.json's "recipe"); `phases.*` covers each phase.
FIXED = (
    "model.arch", "model.hidden_size", "model.num_layers", "model.num_heads", "model.num_kv_heads",
    "model.intermediate_size", "model.max_position", "model.pad_vocab_to_multiple", "model.init_from",
    "model.hold_zeros", "model.heads_per_layer",
    "data.sources", "data.weights", "data.tokenizer", "data.vocab_size", "data.seq_len", "data.eval_fraction",
    "data.eval_samples", "data.streaming", "data.shuffle_buffer",
    "optimizer.type",
    "batch.global_batch", "batch.ramp_start", "batch.ramp_increment", "batch.ramp_samples", "batch.adaptive",
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
        if _fixed(key) and before.get(key) != now.get(key) and not _same_file(key, before.get(key), now.get(key)):
            option = "--phases.N.seq_len and the other phase keys" if key == "phases" else f"--{key}"
            raise ConfigError(
                f"{key} is {now.get(key)!r} at this start but the run in {run_dir} was started with "
                f"{before.get(key)!r}, and it cannot change within a run (the checkpoint's data position and shapes "
                f"depend on it); resume with {option}={_override(before.get(key))} or start a new --run-dir.")


def _same_file(key: str, before: Any, now: Any) -> bool:
    """A tokenizer is fixed by what it holds, not where it lies: a copy at another path (a distillation's teacher
    moved with its tokenizer, a run directory copied to another file system) is the same tokenizer."""
    if key != "data.tokenizer" or not before or not now:
        return False
    old, new = Path(before), Path(now)
    return old.is_file() and new.is_file() and old.read_bytes() == new.read_bytes()


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
        lr_at_position(scheduler, optimizer)


def lr_at_position(scheduler: Any, optimizer: Any = None) -> None:
    """The LR of the scheduler's current position put in the groups of `optimizer` (default: the scheduler's):
    LambdaLR's own formula (torch.optim.lr_scheduler.LambdaLR.get_lr), for when the step table under it has changed
    (a resume, a decision of the adaptive batch)."""
    lrs = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip((optimizer or scheduler.optimizer).param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def restore_clipping(engine: Any) -> None:
    """After `load_checkpoint`: this start's gradient clipping back in place. Why: DeepSpeed 0.19's ZeRO-1/2, bf16
    and fp16 wrappers load `clip_grad` from the checkpoint (`_load_global_state` in stage_1_and_2.py), so the JSON's
    new `gradient_clipping` would be ignored for the rest of the run."""
    if hasattr(engine.optimizer, "clip_grad"):
        engine.optimizer.clip_grad = engine.gradient_clipping()


@dataclass(frozen=True)
class Resumed:
    """Where a start continues: the step (0 for a new run), and the overflow guard's count, the adaptive batch's
    decisions and the noise scale's moving averages saved with it."""

    step: int = 0
    overflow_in_a_row: int = 0
    decisions: tuple[Decision, ...] = ()
    noise: dict[str, Optional[float]] = field(default_factory=dict)


def choose(run: ResolvedRun, root: Path, rank: int) -> Optional[str]:
    """Every rank: the checkpoint to resume from, chosen by the writer before DeepSpeed starts (one written on another
    number of ranks under ZeRO loads through DeepSpeed's universal checkpoint, which the engine must be set for)."""
    tag = None
    if rank == 0:
        try:
            tag = _choose_on_writer(run, root)
        except Exception as err:  # the others wait in the broadcast below: they raise it too
            distributed.broadcast(RuntimeError(f"choosing the checkpoint to resume on rank 0 failed: {err}"))
            raise
    tag = distributed.broadcast(tag)
    if isinstance(tag, Exception):
        raise tag
    return tag


def _choose_on_writer(run: ResolvedRun, root: Path) -> Any:
    """Writer rank: the newest complete tag (None without one), converted to a universal checkpoint when it was
    written on another number of ranks under ZeRO; a ConfigError, for every rank to raise, when it cannot be resumed
    here."""
    tag = checkpoint.newest_complete(root)  # verifies the manifests once
    if tag is None and checkpoint.list_tags(root):  # a start from step 0 would prune them: stop, keep them all
        return StorageFault(
            f"every checkpoint in {root} ({', '.join(checkpoint.list_tags(root))}) is damaged (each failed its "
            "manifest check, named in the warnings above); nothing was deleted: restore one from a copy, then "
            "--resume, or start the run over with --overwrite")
    stage, world = run.ds.stage, run.world
    if not (tag and stage and checkpoint.saved_world(root / tag) not in (None, world)):
        return tag
    lars = run.recipe.optimizer.type.lower() == "lars"
    if lars and stage == 3:
        return ConfigError(
            f"{root / tag} was written by {checkpoint.saved_world(root / tag)} ranks and this start has {world}: a "
            "LARS run under ZeRO-3 resumes on the same number of ranks only (its momentum has no universal-checkpoint "
            "path there yet).")
    return to_universal(root, tag, lars=lars)


def load(engine: Any, run: ResolvedRun, run_dir: RunDir, tag: Optional[str], rank: int) -> Resumed:
    """Every rank, on a resume: loads `tag` with this start's hyper-parameters put back, checks the data position,
    and cuts metrics.jsonl back to the checkpoint (the steps after it are recorded again; without one, every step)."""
    resumed = Resumed()
    if tag is not None:
        optimizer = client_optimizer(engine)
        settings, base_lrs = hyperparameters(optimizer), list(engine.lr_scheduler.base_lrs)
        path, state = engine.load_checkpoint(str(run_dir.checkpoints), tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {run_dir.checkpoints / tag}")
        resumed = Resumed(int(state["step"]), int(state.get("overflow_in_a_row", 0)),
                          replay_decisions(run, int(state["step"]), state.get("batch_decisions", []), rank),
                          dict(state.get("noise_scale_state") or {}))
        restore(optimizer, engine.lr_scheduler, settings, base_lrs)
        restore_clipping(engine)
        expected = samples_before(run.steps, resumed.step)
        if int(state["samples"]) != expected:  # the sampler position follows the step table: data would repeat
            raise ConfigError(                 # or be skipped without a word
                f"{run_dir.checkpoints / tag} was saved after {state['samples']} samples, but this recipe "
                f"reaches step {resumed.step} after {expected}: resume with the batch settings and phases the run "
                "started with (its recipe.json), or start a new run directory.")
        if rank == 0:
            say(f"resumed {run_dir} at step {resumed.step} ({state['samples']} samples)"
                + (" through a universal checkpoint (another number of ranks)" if tag.endswith("-universal") else ""))
    elif rank == 0:
        say(f"no checkpoint in {run_dir.checkpoints}; starting from step 0")
    if rank == 0:
        truncate_metrics(run_dir.metrics_file, resumed.step if tag is not None else -1)
    return resumed


def replay_decisions(run: ResolvedRun, step: int, saved: list[Any], rank: int) -> tuple[Decision, ...]:
    """The adaptive batch's decisions of a checkpoint, put back into the run's step table (in place: the LR scheduler
    reads that list). On another world size the batch from `step` on is re-rounded to it, as a decision of its own."""
    decisions = tuple((int(at), int(batch)) for at, batch in saved)
    if not decisions:
        return ()
    run.steps[:] = step_table(run.recipe, run.world, run.batch, decisions)
    fix = adaptive.rerounded(run.steps, step, run.world)
    if fix is not None:
        decisions += (fix,)
        if rank == 0:
            say(f"adaptive batch: global batch {run.steps[step].global_batch} does not divide on {run.world} ranks; "
                f"re-rounded to {fix[1]} from step {step}")
        run.steps[:] = step_table(run.recipe, run.world, run.batch, decisions)
    return decisions


def to_universal(root: Path, tag: str, lars: bool = False) -> str:
    """Writer rank: DeepSpeed's universal checkpoint of `tag` (once), which loads on any number of ranks.

    DeepSpeed's converter carries the fp32 masters and Adam-style moments (`exp_avg`, `exp_avg_sq`, `step`), which is
    why LAMB names its moments so. LARS's `momentum_buffer` takes its own path (`_lars_as_adam`): the converter runs
    on a copy whose optimizer files call it `exp_avg`, and the per-parameter files it writes are renamed back.
    DeepSpeed's loader reads every `<state>.pt` of a parameter, so `momentum_buffer.pt` lands in LARS's state.
    """
    target = f"{tag}-universal"
    if (root / target).is_dir():
        return target
    staging = root / f"{target}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    source = _lars_as_adam(root, tag) if lars else root / tag
    try:
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source),
               "--output_folder", str(staging), "--inject_missing_state", "--num_extract_workers", "1",
               "--num_merge_workers", "1"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"DeepSpeed's ds_to_universal failed on {root / tag}:\n{out.stderr[-3000:]}")
    finally:
        if lars:
            shutil.rmtree(source, ignore_errors=True)
    if lars:
        for param_dir in (staging / "zero").iterdir():
            if (param_dir / "exp_avg.pt").is_file():
                os.replace(param_dir / "exp_avg.pt", param_dir / "momentum_buffer.pt")
                (param_dir / "exp_avg_sq.pt").unlink(missing_ok=True)
    os.replace(staging, root / target)
    (root / "latest_universal").unlink(missing_ok=True)  # the converter points it at the staging name
    return target


def _lars_as_adam(root: Path, tag: str) -> Path:
    """A copy of a ZeRO-1/2 checkpoint of LARS whose optimizer files name the momentum `exp_avg` (and carry a zero
    `exp_avg_sq`), the only per-parameter states DeepSpeed's converter extracts. The files are read with
    weights_only=True, allowing by name only the DeepSpeed classes a ZeRO-1/2 optimizer file holds in any precision
    (checked on 0.19.8), so reading them runs no pickled code; any other class is refused."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    copy = root / f"{tag}-lars-as-adam.tmp"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(root / tag, copy)
    for path in copy.glob("*optim_states.pt"):
        with torch.serialization.safe_globals([ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]):
            sd = torch.load(path, map_location="cpu", weights_only=True)
        groups = sd["optimizer_state_dict"]["base_optimizer_state"]["state"]
        for state in groups.values():
            state["exp_avg"] = state.pop("momentum_buffer")
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        torch.save(sd, path)
    return copy
