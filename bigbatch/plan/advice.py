"""What the planner advises: the largest micro-batch that fits (the memory table's verdict), node scaling, and the
global batch and node count that train fastest or cheapest given a pilot run's gradient noise scale."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from bigbatch.config import BatchConfig, ConfigError, DeepSpeedSection, ModelConfig, Recipe
from bigbatch.config.adaptive import carry, decide
from bigbatch.config.schedule import BatchSplit, solve_batch
from bigbatch.plan import hardware
from bigbatch.plan.memory import PRECISIONS, STAGES, Footprint, Row, model_size
from bigbatch.plan.teacher import teacher_shape
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
    """The batch fixed: no ramp, no adaptive steering (a grid point runs one batch throughout)."""
    return dataclasses.replace(batch, ramp_start=0, ramp_increment=0, ramp_samples=0, adaptive=False, **changes)


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
    footprint = Footprint(recipe, world, ds.zero, gpu_memory_bytes, _teacher(recipe))

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


def _teacher(recipe: Recipe) -> Optional[tuple[ModelConfig, int]]:
    """A distillation's teacher (shape, vocabulary), whose memory counts on every GPU; None without one."""
    return teacher_shape(recipe.distill.teacher) if recipe.distill.teacher else None


# ------------------------------------------------------------------------------------------- the change that helps
def with_batches(recipe: Recipe, micros: list[int], checkpointing: Optional[bool] = None) -> Recipe:
    """`recipe` with micro-batch micros[i] in phase i (accumulation solved) and activation checkpointing on or off
    (the act_ckpt.json fragment added or left out; None: as the configs say)."""
    batch = dataclasses.replace(recipe.batch, micro_batch=micros[0], grad_accum=0)
    phases = tuple(dataclasses.replace(ph, micro_batch=m) for ph, m in zip(recipe.phases, micros[1:]))
    configs = recipe.deepspeed.configs
    if checkpointing is not None:
        configs = tuple(c for c in configs if c != CHECKPOINTING_CONFIG) + (CHECKPOINTING_CONFIG,) * checkpointing
    return dataclasses.replace(recipe, batch=batch, phases=phases,
                               deepspeed=DeepSpeedSection(configs, activation_checkpointing=""))


@dataclass(frozen=True)
class Change:
    """A change to the recipe, its time to train on the same cluster, and how much faster than as written."""

    what: str  # in words, with the override that makes it
    estimate: Estimate
    speedup: float  # the recipe's time to train / this one's
    micro_batches: tuple[int, ...] = ()  # per phase
    checkpointing: bool = False
    peak: int = 0  # bytes per GPU at the worst phase's peak


def fastest_batches(recipe: Recipe, cluster: Cluster, memory: int, checkpointing: tuple[bool, ...],
                    keep: tuple[int, ...] = ()) -> list[Change]:
    """For each way of checkpointing, the largest micro-batch that fits and splits every batch of each phase (the
    fastest the time model has: a larger micro-batch never costs time, and a tie goes to less accumulation), timed;
    `keep`: per phase, a micro-batch to keep (0: choose). Fastest first; none where a phase has no such micro-batch."""
    options = []
    n = len(recipe.phases) + 1
    own = _configs_checkpointing(recipe, cluster.world)
    for ckpt in checkpointing:
        base = with_batches(recipe, [k or 1 for k in (keep or (0,) * n)], ckpt)
        results = [plan(phase_recipe(base, i), cluster.nodes, cluster.gpus_per_node, memory) for i in range(n)]
        micros = [k or r.largest_valid for k, r in zip(keep or (0,) * n, results)]
        if not all(micros):
            continue
        variant = with_batches(recipe, micros, ckpt)
        try:
            est = estimate(variant, cluster)
        except ConfigError:  # a micro-batch the recipe's own ramp or phases do not split
            continue
        peak = max(plan(phase_recipe(variant, i), cluster.nodes, cluster.gpus_per_node, memory).own.total
                   for i in range(n))
        overrides = f"--batch.micro_batch={micros[0]}" + "".join(
            f" --phases.{i}.micro_batch={m}" for i, m in enumerate(micros[1:], 1))
        if ckpt != own:
            overrides += f", {CHECKPOINTING_CONFIG} {'added to' if ckpt else 'left out of'} deepspeed.configs"
        what = f"micro-batch {' / '.join(map(str, micros))}, checkpointing {'on' if ckpt else 'off'} ({overrides})"
        options.append(Change(what, est, 1.0, tuple(micros), ckpt, peak))
    return sorted(options, key=lambda c: (c.estimate.time_to_train_s, sum(p.grad_accum for p in c.estimate.phases)))


def _configs_checkpointing(recipe: Recipe, world: int) -> bool:
    """Whether the recipe's DeepSpeed fragments switch activation checkpointing on."""
    numbers = with_batches(recipe, [1] * (len(recipe.phases) + 1))
    return resolve(dataclasses.replace(numbers, phases=(), batch=_without_ramp(numbers.batch, global_batch=world)),
                   world).ds.checkpointing


def best_change(recipe: Recipe, cluster: Cluster, memory: int, current: Optional[Estimate]) -> Optional[Change]:
    """The fastest of `fastest_batches` with checkpointing as written or switched the other way. None when neither
    runs, or neither is MIN_SPEEDUP faster than `current` (the recipe as written; None when it does not fit or
    run)."""
    own = _configs_checkpointing(recipe, cluster.world)
    options = fastest_batches(recipe, cluster, memory, (own, not own))
    if not options:
        return None
    best = options[0]
    time_s = best.estimate.time_to_train_s
    if current is not None and time_s >= current.time_to_train_s / MIN_SPEEDUP:
        return None
    return dataclasses.replace(best, speedup=current.time_to_train_s / time_s if current else float("inf"))


def choose_auto(recipe: Recipe, cluster: Cluster, memory: int, memory_words: str = "") -> tuple[Recipe,
                                                                                          Optional[Change]]:
    """`recipe` with its "auto" micro-batches (per phase) and checkpointing chosen: the fastest of `fastest_batches`
    in `memory` bytes per GPU (an explicit number wins); the recipe unchanged, and None, when nothing is "auto".
    The choice's `what` says why, against the runner-up when there is one; `memory_words` say what `memory` is."""
    first = recipe.batch.micro_batch
    wanted = [first, *(ph.micro_batch or first for ph in recipe.phases)]
    ckpt_auto = recipe.deepspeed.activation_checkpointing == "auto"
    if "auto" not in wanted and not ckpt_auto:
        return recipe, None
    keep = tuple(0 if m == "auto" else int(m) for m in wanted)
    own = _configs_checkpointing(with_batches(recipe, [k or 1 for k in keep]), cluster.world)
    options = fastest_batches(recipe, cluster, memory, (own, not own) if ckpt_auto else (own,), keep)
    if not options:
        raise ConfigError(f"recipe {recipe.name}: no micro-batch fits in {memory / 2**30:.2f} GiB per GPU and "
                          f"splits every batch of each phase on {cluster.world} GPUs; pick a higher ZeRO stage, "
                          "16-bit precision, activation checkpointing or more GPUs.")
    best = options[0]
    micros = " / ".join(map(str, best.micro_batches))
    why = (f"micro-batch {micros}, checkpointing {'on' if best.checkpointing else 'off'}: fits in "
           f"{best.peak / 2**30:.1f} of {memory / 2**30:.1f} GiB{' ' + memory_words if memory_words else ''}")
    if len(options) > 1:
        other = options[1]
        why += (f", {other.estimate.time_to_train_s / best.estimate.time_to_train_s:.2f}x faster than "
                f"{' / '.join(map(str, other.micro_batches))} with checkpointing "
                f"{'on' if other.checkpointing else 'off'}")
    chosen = with_batches(recipe, list(best.micro_batches), best.checkpointing)
    return chosen, dataclasses.replace(best, what=why)


def device_memory(recipe: Recipe, world: int, agree: Optional[Callable[[int], int]] = None) -> tuple[int, str, str]:
    """(bytes per GPU that "auto" fits in, what they are in words, the catalogue device it ranks on). On a GPU: the
    free memory `torch.cuda.mem_get_info` reports, through `agree` (the least over the ranks, an all-reduce MIN once
    the process group exists); on more ranks than one without `agree`, the total, the same on every rank (free
    memory differs by the moment each rank asks, and ranks that chose differently would not agree on a batch).
    Without a GPU: the recipe's cluster.gpu_memory."""
    if not torch.cuda.is_available():
        return hardware.parse_memory(recipe.cluster.gpu_memory), "", hardware.DEFAULT_GPU
    name = hardware.catalogue_name(torch.cuda.get_device_name()) or hardware.DEFAULT_GPU
    free, total = torch.cuda.mem_get_info()
    if agree is not None:
        return agree(free), f"free (the least of {world} ranks)" if world > 1 else "free", name
    if world == 1:
        return free, "free", name
    return total, f"in all (free memory is agreed over the {world} ranks once they start)", name


def choose_at_start(recipe: Recipe, world: int, kept: Optional[dict[str, Any]] = None,
                    agree: Optional[Callable[[int], int]] = None) -> tuple[Recipe, str]:
    """`bigbatch train` and `check`: `choose_auto` on `world` ranks of this machine's GPU, in the memory
    `device_memory` reads (`agree`: the ranks' least free memory). `kept`: the previous start's choice ({"world",
    "micro_batches", "checkpointing"}), kept at the same world size. The recipe with numbers, and the choice in
    words ("" when nothing is "auto")."""
    first = recipe.batch.micro_batch
    if "auto" not in (first, recipe.deepspeed.activation_checkpointing, *(ph.micro_batch for ph in recipe.phases)):
        return recipe, ""
    if kept and kept.get("world") == world:
        chosen = with_batches(recipe, list(kept["micro_batches"]), bool(kept["checkpointing"]))
        return chosen, str(kept["reason"])
    memory, words, name = device_memory(recipe, world, agree)
    per_node = recipe.cluster.gpus_per_node if world % recipe.cluster.gpus_per_node == 0 else world
    device = hardware.DEVICES[name]
    cluster = Cluster(world // per_node, per_node, device, hardware.INTERCONNECTS[device.interconnect])
    chosen, change = choose_auto(recipe, cluster, memory, words)
    return chosen, change.what if change else ""


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
    tutor = _teacher(recipe)  # read from its files once, not at every point
    points = [_grid_point(recipe, dataclasses.replace(cluster, nodes=n), batch,
                          math.ceil(mccandlish_steps(s_min, b_noise, batch)), memory, tutor)
              for batch in batches for n in nodes]
    ok = [p for p in points if p["fits"]]
    fastest = min(ok, key=lambda p: (p["time_to_train_s"], p["gpu_hours"])) if ok else None
    cheapest = min(ok, key=lambda p: (p["gpu_hours"], p["time_to_train_s"])) if ok else None
    for p in points:
        p["fastest"], p["cheapest"] = p is fastest, p is cheapest
    out = {**pilot, "recipe_batch": b0, "recipe_steps": s0, "s_min": s_min, "e_min": e_min, "points": points}
    if recipe.batch.adaptive:
        out["adaptive"] = adaptive_prediction(recipe, cluster, b_noise, s_min, memory)
    return out


def adaptive_prediction(recipe: Recipe, cluster: Cluster, b_noise: float, s_min: float,
                        memory: int) -> dict[str, Any]:
    """An adaptive run (`batch.adaptive`) by the same laws, taking the pilot's B_noise as constant: `adaptive_every`
    steps at the recipe's batch, then the batch its first decision sets (bigbatch.config.adaptive.decide); steps
    until S_min's progress is made, each step at batch B counting 1 / (1 + B_noise / B) of a step at infinite batch.
    Later phases keep their steps and are timed at the batch `adapted_phases` predicts for them."""
    b = recipe.batch
    first = solve_batch(b.global_batch, cluster.world, b.micro_batch, b.grad_accum)
    batch = decide(first.global_batch, b_noise, b, first.micro_batch * cluster.world)
    early = min(b.adaptive_every, math.ceil(mccandlish_steps(s_min, b_noise, first.global_batch)))
    left = max(s_min - early / (1 + b_noise / first.global_batch), 0.0)
    steps = early + math.ceil(left * (1 + b_noise / batch))
    phases = adapted_phases(recipe, b_noise, batch, first.micro_batch, cluster.world)
    steered = dataclasses.replace(recipe, phases=tuple(
        dataclasses.replace(ph, global_batch=p["adapted_batch"], steps=ph.num_steps(), samples=0)
        for ph, p in zip(recipe.phases, phases)))
    point = _grid_point(steered, cluster, batch, steps, memory, _teacher(recipe))
    samples = early * first.global_batch + (steps - early) * batch
    return {**point, "adapted_batch": batch, "factor": b.adaptive_factor, "samples": samples, "phases": phases}


def adapted_phases(recipe: Recipe, b_noise: float, reached: int, micro: int, world: int) -> list[dict[str, Any]]:
    """Each later phase's batch under `batch.adaptive` with B_noise constant, after a first phase that `reached` its
    batch: where the phase starts (its own batch, or with `batch_from="adapted"` the one the phase before reached,
    bigbatch.config.adaptive.carry) and the batch its first decision sets."""
    b, out = recipe.batch, []
    for n, ph in enumerate(recipe.phases, start=2):
        unit = (ph.micro_batch if isinstance(ph.micro_batch, int) and ph.micro_batch else micro) * world
        start = carry(reached, unit, b.max) if ph.batch_from == "adapted" else ph.global_batch
        reached = decide(start, b_noise, b, unit)
        out.append({"phase": n, "batch_from": ph.batch_from, "start_batch": start, "adapted_batch": reached})
    return out


def _grid_point(recipe: Recipe, c: Cluster, batch: int, steps: int, memory: int,
                tutor: Optional[tuple[ModelConfig, int]]) -> dict[str, Any]:
    """One point of the grid: the recipe's first phase at global batch `batch` for `steps` steps on `c`, at its own
    micro-batch when that splits the batch and fits, else at the largest that does; `why` when none does. `tutor`:
    the recipe's teacher (`_teacher`), whose bytes every GPU holds."""
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
    footprint = Footprint(dataclasses.replace(variant, phases=()), c.world, ds.zero, memory, tutor)

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
