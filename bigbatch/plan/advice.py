"""What the planner advises: the largest micro-batch that fits (the memory table's verdict), node scaling, and the
global batch and node count that train fastest or cheapest given a pilot run's gradient noise scale."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

from bigbatch.config import BatchConfig, ConfigError, DeepSpeedSection, Recipe
from bigbatch.config.schedule import BatchSplit, solve_batch
from bigbatch.plan.memory import PRECISIONS, STAGES, Footprint, Row, model_size
from bigbatch.plan.timing import Cluster, Estimate, estimate
from bigbatch.resolve import phase_recipe, resolve

MIN_SPEEDUP = 1.01  # a change worth naming: the time model is not finer than this
CHECKPOINTING_CONFIG = "act_ckpt.json"  # the ds_configs/ fragment that switches activation checkpointing on


# ----------------------------------------------------------------------------------------------- the micro-batch
def largest_micro_batch(fits: Callable[[int], bool], global_batch: int, world: int) -> tuple[int, int]:
    """(the largest micro-batch that `fits`, the largest that fits and splits `global_batch` over `world` ranks);
    0: none. Memory grows with the micro-batch, so the first is a bisection on [1, global_batch / world]."""
    lo, hi = 0, max(global_batch // world, 1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo, next((m for m in range(lo, 0, -1) if _splits(global_batch, world, m)), 0)


def _splits(global_batch: int, world: int, micro_batch: int) -> bool:
    try:
        solve_batch(global_batch, world, micro_batch=micro_batch)
        return True
    except ConfigError:
        return False


def phase_batches(batch: BatchConfig) -> list[int]:
    """Every global batch a phase runs: the ramp's, from ramp_start by ramp_increment, then global_batch."""
    if not batch.ramp_increment:
        return [batch.global_batch]
    return [*range(batch.ramp_start, batch.global_batch, batch.ramp_increment), batch.global_batch]


def largest_dividing(fitting: int, batches: list[int], world: int) -> int:
    """The largest micro-batch up to `fitting` that splits every one of `batches` over `world` ranks; 0: none (a
    batch ramp keeps its micro-batch, so each ramp batch must split too)."""
    return next((m for m in range(fitting, 0, -1) if all(_splits(b, world, m) for b in batches)), 0)


def _without_ramp(batch: BatchConfig, **changes: int) -> BatchConfig:
    return dataclasses.replace(batch, ramp_start=0, ramp_increment=0, ramp_samples=0, **changes)


def check_world(nodes: int, gpus_per_node: int) -> int:
    """The world size of nodes x gpus_per_node; ConfigError below 1 of either."""
    for key, value in (("--nodes", nodes), ("--gpus-per-node", gpus_per_node)):
        if value < 1:
            raise ConfigError(f"{key}={value} must be at least 1; give the number of machines and GPUs per machine.")
    return nodes * gpus_per_node


@dataclass(frozen=True)
class PlanResult:
    recipe: str
    world: int
    gpu_memory: int
    num_params: int
    stage: int  # the recipe's own, from its deepspeed.configs
    precision: str
    checkpointing: bool
    global_batch: int
    micro_batch: int  # the recipe's; the table is at this micro-batch
    batch_error: str  # why the recipe's batch does not solve on `world`; empty when it does
    rows: tuple[Row, ...]
    largest_fitting: int  # 0: not even micro-batch 1 fits
    largest_valid: int  # the largest fitting micro-batch that also divides the global batch (and the ramp's); 0: none
    largest_other_checkpointing: int  # the largest fitting micro-batch with checkpointing switched the other way
    largest_valid_other_checkpointing: int  # of those, the largest that divides the global batch; 0: none
    seq_len: int = 0  # the phase's

    @property
    def own(self) -> Row:
        return next(r for r in self.rows if (r.stage, r.precision) == (self.stage, self.precision))

    @property
    def fits(self) -> bool:
        return self.own.fits and not self.batch_error


def plan(recipe: Recipe, nodes: int, gpus_per_node: int, gpu_memory_bytes: int) -> PlanResult:
    """The memory table of `recipe`'s first phase on nodes x gpus_per_node GPUs of `gpu_memory_bytes` each, and the
    largest micro-batches that fit."""
    world = check_world(nodes, gpus_per_node)
    batch = recipe.batch
    try:
        split, batch_error = solve_batch(batch.global_batch, world, batch.micro_batch, batch.grad_accum), ""
    except ConfigError as err:
        micro = batch.micro_batch or max(batch.global_batch // (world * max(batch.grad_accum, 1)), 1)
        # still tabulated at the recipe's micro-batch: only the DeepSpeed JSON built at this split is read
        split, batch_error = BatchSplit(micro * world, micro, 1, world), str(err)
    # Later phases and the ramp change no byte of that JSON: left out, they cannot fail to solve where this one does.
    ds = resolve(dataclasses.replace(recipe, phases=(), batch=_without_ramp(batch)), world, batch=split).ds
    footprint = Footprint(recipe, world, ds.zero, gpu_memory_bytes)

    def fits(checkpointing: bool) -> Callable[[int], bool]:
        return lambda micro: footprint.row(ds.stage, ds.precision, micro, checkpointing).fits

    rows = tuple(footprint.row(st, pr, split.micro_batch, ds.checkpointing) for st in STAGES for pr in PRECISIONS)
    fitting = largest_micro_batch(fits(ds.checkpointing), batch.global_batch, world)[0]
    other = largest_micro_batch(fits(not ds.checkpointing), batch.global_batch, world)[0]
    valid, other_valid = (largest_dividing(m, phase_batches(batch), world) for m in (fitting, other))
    num_params = model_size(recipe.model, recipe.data.vocab_size)[0]
    return PlanResult(recipe.name, world, gpu_memory_bytes, num_params, ds.stage, ds.precision, ds.checkpointing,
                      batch.global_batch, split.micro_batch, batch_error, rows, fitting, valid, other, other_valid,
                      recipe.data.seq_len)


# ------------------------------------------------------------------------------------------- the change that helps
def with_batches(recipe: Recipe, micros: list[int], checkpointing: bool) -> Recipe:
    """`recipe` with micro-batch micros[i] in phase i (accumulation solved) and activation checkpointing on or off
    (the act_ckpt.json fragment added or left out)."""
    batch = dataclasses.replace(recipe.batch, micro_batch=micros[0], grad_accum=0)
    phases = tuple(dataclasses.replace(ph, micro_batch=m) for ph, m in zip(recipe.phases, micros[1:]))
    configs = tuple(c for c in recipe.deepspeed.configs if c != CHECKPOINTING_CONFIG)
    configs += (CHECKPOINTING_CONFIG,) * checkpointing
    return dataclasses.replace(recipe, batch=batch, phases=phases, deepspeed=DeepSpeedSection(configs))


@dataclass(frozen=True)
class Change:
    """A change to the recipe, its time to train on the same cluster, and how much faster than as written."""

    what: str  # in words, with the override that makes it
    estimate: Estimate
    speedup: float  # the recipe's time to train / this one's


def best_change(recipe: Recipe, cluster: Cluster, memory: int, current: Optional[Estimate]) -> Optional[Change]:
    """The fastest of: the largest micro-batch that fits and divides each phase's batch, with checkpointing as
    written or switched the other way (ties: less accumulation first). None when neither runs, or neither is
    MIN_SPEEDUP faster than `current` (the recipe as written; None when it does not fit or run)."""
    results = [plan(phase_recipe(recipe, i), cluster.nodes, cluster.gpus_per_node, memory)
               for i in range(len(recipe.phases) + 1)]
    own = results[0].checkpointing
    options = []
    for ckpt in (own, not own):
        micros = [r.largest_valid if ckpt == own else r.largest_valid_other_checkpointing for r in results]
        if not all(micros):
            continue
        variant = with_batches(recipe, micros, ckpt)
        try:
            est = estimate(variant, cluster)
        except ConfigError:  # a ramp batch the micro-batch does not divide
            continue
        words = "checkpointing " + ("on" if ckpt else "off")
        overrides = f"--batch.micro_batch={micros[0]}" + "".join(
            f" --phases.{i}.micro_batch={m}" for i, m in enumerate(micros[1:], 1))
        if ckpt != own:
            overrides += f", {CHECKPOINTING_CONFIG} {'added to' if ckpt else 'left out of'} deepspeed.configs"
        options.append((est.time_to_train_s, sum(p.grad_accum for p in est.phases),
                        f"micro-batch {' / '.join(map(str, micros))}, {words} ({overrides})", est))
    if not options:
        return None
    time_s, _, what, est = min(options, key=lambda o: o[:2])
    if current is not None and time_s >= current.time_to_train_s / MIN_SPEEDUP:
        return None
    return Change(what, est, current.time_to_train_s / time_s if current else float("inf"))


# ------------------------------------------------------------------------------------------------- node scaling
def node_scaling(recipe: Recipe, cluster: Cluster, nodes: list[int]) -> list[dict[str, Any]]:
    """Samples/s over the whole schedule at each node count, and the scaling efficiency against the first that runs:
    (samples/s per node) / (the first's samples/s per node)."""
    rows: list[dict[str, Any]] = []
    base = None
    for n in nodes:
        c = dataclasses.replace(cluster, nodes=n)
        try:
            est = estimate(recipe, c)
        except ConfigError as err:
            rows.append({"nodes": n, "world": c.world, "samples_per_s": None, "scaling_efficiency": None,
                         "error": str(err)})
            continue
        sps = sum(p.samples for p in est.phases) / est.time_to_train_s
        base = base or (n, sps)
        rows.append({"nodes": n, "world": c.world, "samples_per_s": sps,
                     "scaling_efficiency": (sps / n) / (base[1] / base[0]), "time_to_train_s": est.time_to_train_s,
                     "gpu_hours": est.gpu_hours})
    return rows


# ------------------------------------------------------------------------------------- the batch that finishes first
def mccandlish_steps(s_min: float, b_noise: float, batch: float) -> float:
    """McCandlish et al. 2018, eq. 2.11: steps to a given loss, S = S_min (1 + B_noise / B)."""
    return s_min * (1 + b_noise / batch)


def mccandlish_samples(e_min: float, b_noise: float, batch: float) -> float:
    """The same paper: samples to that loss, E = E_min (1 + B / B_noise)."""
    return e_min * (1 + batch / b_noise)


def noise_grid(recipe: Recipe, cluster: Cluster, pilot: dict[str, Any], memory: int,
               nodes: Optional[list[int]] = None) -> dict[str, Any]:
    """Time to train and GPU-hours over global batches x node counts for the first phase, its steps predicted from
    the recipe's by McCandlish's S = S_min (1 + B_noise / B) (later phases as written); the fastest and cheapest
    points whose micro-batch fits in `memory`. `pilot`: the run's last noise scale (`noise_scale`, `step`,
    `run_dir`)."""
    b_noise = pilot["noise_scale"]
    b0, s0 = recipe.batch.global_batch, recipe.schedule.steps
    s_min = s0 / (1 + b_noise / b0)  # the recipe's own steps at its batch fix S_min
    e_min = s_min * b_noise  # B_crit = E_min / S_min, estimated by B_noise
    lo, hi = math.floor(math.log2(max(b_noise / 8, 1))), math.ceil(math.log2(max(b_noise * 8, 2)))
    batches = sorted({2**k for k in range(lo, hi + 1)} | {b0})
    nodes = nodes or [2**k for k in range(0, int(math.log2(max(cluster.nodes, 1) * 4)) + 1)]
    points = [_grid_point(recipe, dataclasses.replace(cluster, nodes=n), batch,
                          math.ceil(mccandlish_steps(s_min, b_noise, batch)), memory)
              for batch in batches for n in nodes]
    ok = [p for p in points if p["fits"]]
    fastest = min(ok, key=lambda p: (p["time_to_train_s"], p["gpu_hours"])) if ok else None
    cheapest = min(ok, key=lambda p: (p["gpu_hours"], p["time_to_train_s"])) if ok else None
    for p in points:
        p["fastest"], p["cheapest"] = p is fastest, p is cheapest
    return {**pilot, "recipe_batch": b0, "recipe_steps": s0, "s_min": s_min, "e_min": e_min, "points": points}


def _grid_point(recipe: Recipe, c: Cluster, batch: int, steps: int, memory: int) -> dict[str, Any]:
    """One point of the grid: the recipe's first phase at global batch `batch` for `steps` steps on `c`, at its own
    micro-batch when that splits the batch and fits, else at the largest that does; `why` when none does."""
    point: dict[str, Any] = {"global_batch": batch, "nodes": c.nodes, "world": c.world, "steps": steps,
                             "samples": steps * batch, "fits": False}
    try:
        ones = solve_batch(batch, c.world, micro_batch=1)
    except ConfigError:
        point["why"] = f"global batch {batch} does not divide over {c.world} GPUs"
        return point
    variant = dataclasses.replace(
        recipe, batch=_without_ramp(recipe.batch, global_batch=batch, micro_batch=0, grad_accum=0),
        schedule=dataclasses.replace(recipe.schedule, steps=steps, warmup=min(recipe.schedule.warmup, 0.5)
                                     if recipe.schedule.warmup < 1 else 0.1))
    try:
        ds = resolve(variant, c.world, batch=ones).ds  # its DeepSpeed JSON; later phases must solve on c.world too
    except ConfigError as err:
        point["why"] = str(err)
        return point
    footprint = Footprint(dataclasses.replace(variant, phases=()), c.world, ds.zero, memory)

    def fits(micro: int) -> bool:
        return footprint.row(ds.stage, ds.precision, micro, ds.checkpointing).fits

    own = recipe.batch.micro_batch
    micro = own if own and _splits(batch, c.world, own) and fits(own) else largest_micro_batch(fits, batch,
                                                                                               c.world)[1]
    if not micro:
        point["why"] = "not even micro-batch 1 fits in memory"
        return point
    split = solve_batch(batch, c.world, micro_batch=micro)
    try:
        est = estimate(variant, c, batch=split)
    except ConfigError as err:
        point["why"] = str(err)
        return point
    point.update(fits=True, micro_batch=micro, grad_accum=split.grad_accum, step_time_s=est.phases[0].step_time_s,
                 time_to_train_s=est.time_to_train_s, gpu_hours=est.gpu_hours)
    return point
