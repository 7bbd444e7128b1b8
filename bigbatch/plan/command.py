"""`bigbatch plan <recipe>`: the command line, and the planner's reports as text and JSON."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

from bigbatch.config import ConfigError, Recipe
from bigbatch.config.files import load_recipe
from bigbatch.config.overrides import parse_override_args
from bigbatch.plan import hardware
from bigbatch.plan.advice import (
    Change,
    PlanResult,
    best_change,
    check_world,
    choose_auto,
    node_scaling,
    noise_grid,
    plan,
    with_batches,
)
from bigbatch.plan.hardware import DEFAULT_GPU, parse_memory
from bigbatch.plan.memory import CUDA_ALLOWANCE, GiB, Row
from bigbatch.plan.teacher import teacher_cost
from bigbatch.plan.timing import Cluster, Estimate, estimate
from bigbatch.resolve import phase_recipe, resolve
from bigbatch.run.metrics import read_metrics


def cmd_plan(args: list[str]) -> int:
    """`bigbatch plan`: memory per phase, then time per phase on the named device; 0 when every phase fits as
    written, 1 when one does not."""
    overrides, rest = parse_override_args(args)
    known, unknown = _parser().parse_known_args(rest)
    if unknown:
        raise ConfigError(f"unknown argument {unknown[0]!r}; recipe keys look like --batch.global_batch=8192, "
                          "see `bigbatch plan --help`.")
    # stdout carries the answer alone: DeepSpeed's import-time "Setting accelerator" warning (its logger writes to
    # the sys.stdout of the moment it is imported) and any other chatter go to stderr
    with contextlib.redirect_stdout(sys.stderr):
        out, fits = _plan_and_time(known, overrides)
    print(json.dumps(out, indent=1) if known.json else out["text"])
    return 0 if fits else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bigbatch plan",
        description="Memory per GPU of a recipe for each ZeRO stage and precision, and the largest micro-batch "
                    "that fits; then step time, throughput, MFU and time to train on a device from the catalogue. "
                    "Override any recipe key as --section.key=value.")
    parser.add_argument("recipe", help="a shipped recipe name (tiny, ...), a recipes/*.py path, or a run's recipe.json")
    parser.add_argument("--nodes", type=int, default=None, help="default: the recipe's cluster.nodes")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="default: the recipe's cluster.gpus_per_node")
    parser.add_argument("--gpu-memory", default=None,
                        help="per GPU: 80GB (10^9 bytes), 80GiB, 80 (GiB) or a card (A100-80GB); default: the --gpu's "
                             "memory when --gpu is given, else the recipe's cluster.gpu_memory")
    parser.add_argument("--gpu", default=None, help=f"one of {', '.join(hardware.DEVICE_NAMES)} (cpu is measured "
                        f"now); default {DEFAULT_GPU}")
    parser.add_argument("--interconnect", default=None,
                        help=f"between nodes: one of {', '.join(hardware.INTERCONNECTS)}; default: the GPU's")
    parser.add_argument("--efficiency", type=float, default=None,
                        help="share of the dense peak the matmuls reach; default: the catalogue's calibrated factor")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the device's dense peak")
    parser.add_argument("--memory-bandwidth", type=float, default=None, help="override HBM bandwidth, GB/s")
    parser.add_argument("--intra-node-bandwidth", type=float, default=None,
                        help="override NVLink bandwidth one way per GPU, GB/s")
    parser.add_argument("--inter-node-bandwidth", type=float, default=None,
                        help="override the network's bandwidth one way (per GPU or per node, as the entry), GB/s")
    parser.add_argument("--scan-nodes", default=None, help="comma-separated node counts: adds a scaling table")
    parser.add_argument("--noise-scale", default=None, metavar="RUN_DIR",
                        help="a pilot run whose metrics.jsonl logged noise_scale: time and GPU-hours over a grid of "
                             "global batches x node counts (McCandlish et al. 2018)")
    parser.add_argument("--detail", action="store_true",
                        help="add each phase's memory table at every ZeRO stage and precision")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    return parser


def _plan_and_time(known: argparse.Namespace, overrides: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Everything `bigbatch plan` prints, as one JSON-ready dict ("text": the human report, unless --json), and
    whether every phase fits."""
    recipe = load_recipe(known.recipe, overrides)
    cluster, memory = _cluster(known, recipe)
    try:
        recipe, auto = choose_auto(recipe, cluster, memory)  # what `bigbatch train` would pick for an "auto"
        auto_line = [f"auto chose {auto.what}."] if auto else []
    except ConfigError as err:  # nothing fits: reported at micro-batch 1, as not fitting
        recipe, auto, auto_line = with_batches(recipe, [1] * (len(recipe.phases) + 1)), None, [f"auto: {err}"]
    scan = parse_nodes("--scan-nodes", known.scan_nodes) if known.scan_nodes else None
    pilot = read_noise_scale(known.noise_scale) if known.noise_scale else None
    # every phase: a later one's longer sequences need more activation memory (a batch ramp keeps the micro-batch,
    # so the first phase's table already holds the ramp's largest batch)
    results = [plan(phase_recipe(recipe, i), cluster.nodes, cluster.gpus_per_node, memory)
               for i in range(len(recipe.phases) + 1)]
    fits = all(r.fits for r in results)
    out: dict[str, Any] = {"recipe": recipe.name, "nodes": cluster.nodes, "gpus_per_node": cluster.gpus_per_node,
                           "world": cluster.world, "device": dataclasses.asdict(cluster.device),
                           "interconnect": dataclasses.asdict(cluster.net)}
    est = None
    try:
        if not fits:  # a time for a run that cannot start would read as a promise
            raise ConfigError(f"{recipe.name} does not fit as written in {_size(memory)} per GPU; no time for a "
                              "run that cannot start.")
        est = estimate(recipe, cluster)
        out.update(phases=[est.phase_dict(p) for p in est.phases], time_to_train_s=est.time_to_train_s,
                   gpu_hours=est.gpu_hours)
    except ConfigError as err:
        out.update(phases=[], time_to_train_s=None, time_error=str(err))
    change = best_change(recipe, cluster, memory, est)
    out["best_change"] = change and {"change": change.what, "time_to_train_s": change.estimate.time_to_train_s,
                                     "gpu_hours": change.estimate.gpu_hours, "speedup": change.speedup}
    out["auto"] = auto and {"micro_batches": list(auto.micro_batches), "checkpointing": auto.checkpointing,
                            "reason": auto.what}
    text = [*answer_lines(recipe.name, results, est, out.get("time_error", ""), change, cluster),
            *auto_line, *memory_lines(results, memory)]
    if est is not None:
        text.extend(["", ("" if known.gpu else f"(--gpu not given: {DEFAULT_GPU}.) ") + time_report(est)])
    if known.detail:
        for i, result in enumerate(results):
            text.extend(["", f"phase {i + 1}, every ZeRO stage and precision:", memory_report(result)])
    if scan:
        out["scaling"] = node_scaling(recipe, cluster, scan)
        text.extend(["", node_scaling_report(out["scaling"])])
    if pilot is not None:
        out["noise_scale"] = noise_grid(recipe, cluster, pilot, memory, scan)
        text.extend(["", noise_report(out["noise_scale"])])
    out["memory"] = {"fits": fits, "gpu_memory": memory,
                     "phases": [{**dataclasses.asdict(r), "fits": r.fits} for r in results]}
    if recipe.distill.teacher:
        out["teacher"] = _teacher(recipe, cluster.world, text)
    if not known.json:
        out["text"] = "\n".join(text)
    return out, fits


def _teacher(recipe: Recipe, world: int, text: list[str]) -> dict[str, Any]:
    """A distillation's teacher, per GPU (bigbatch.plan.teacher), as JSON and one line of the report."""
    run = resolve(recipe, world)
    cost = teacher_cost(recipe, run.batch.micro_batch, run.batch.grad_accum, run.ds.precision)
    weights, activations = _size(cost["weight_bytes"]), _size(cost["forward_activation_bytes"])
    text.extend(["", f"teacher ({recipe.distill.teacher}): {cost['parameters'] / 1e6:.1f}M params, {weights} of "
                     f"{run.ds.precision} weights + {activations} of forward activations per GPU (no gradients, no "
                     "optimizer state; counted in the memory above), "
                     f"{cost['forward_flops_per_step'] / 1e12:.2f} TFLOPs of forward per GPU and step"])
    return cost


def _cluster(known: argparse.Namespace, recipe: Recipe) -> tuple[Cluster, int]:
    """The cluster the flags name (the recipe's own otherwise), and the memory of one of its GPUs in bytes."""
    c = recipe.cluster
    nodes, per_node = known.nodes or c.nodes, known.gpus_per_node or c.gpus_per_node
    check_world(nodes, per_node)
    m = recipe.model
    micro = recipe.batch.micro_batch if isinstance(recipe.batch.micro_batch, int) else 0  # 0 also for "auto"
    shapes = hardware.CpuShapes(micro * recipe.data.seq_len or 4096, m.hidden_size,
                                m.intermediate_size, m.num_heads, recipe.data.seq_len)
    device = hardware.device(known.gpu or DEFAULT_GPU, per_node, peak_tflops=known.peak_tflops,
                             memory_bandwidth_gbps=known.memory_bandwidth,
                             intra_node_gbps=known.intra_node_bandwidth, efficiency=known.efficiency, shapes=shapes)
    net = hardware.interconnect(known.interconnect or device.interconnect, known.inter_node_bandwidth)
    if known.gpu_memory:
        memory = parse_memory(known.gpu_memory)
    else:
        memory = device.memory_bytes if known.gpu else parse_memory(c.gpu_memory)
    return Cluster(nodes, per_node, device, net), memory


def answer_lines(name: str, results: list[PlanResult], est: Estimate | None, time_error: str,
                 change: Change | None, cluster: Cluster) -> list[str]:
    """The answer, three lines: whether the recipe fits as written; its time to train and GPU-hours on `cluster`;
    the change that helps most."""
    first = results[0]
    setting = (f"ZeRO-{first.stage} {first.precision}, checkpointing {'on' if first.checkpointing else 'off'}, "
               f"micro-batch {' / '.join(str(r.micro_batch) for r in results)}")
    worst = max(results, key=lambda r: r.own.total)
    where = f"{cluster.world} GPUs ({cluster.nodes} x {cluster.gpus_per_node}) of {_size(first.gpu_memory)} each"
    broken = next((r for r in results if r.batch_error), None)
    if broken:
        fit = f"{name} does not run as written on {where}: {broken.batch_error}"
    elif all(r.fits for r in results):
        fit = f"{name} fits as written on {where}: {setting} needs {_size(worst.own.total)} per GPU at its peak."
    else:
        fit = (f"{name} does not fit as written on {where}: {setting} needs {_size(worst.own.total)} per GPU at its "
               "peak.")
    if est is not None:
        time = (f"Time to train on {cluster.nodes} x {cluster.gpus_per_node} {cluster.device.name}: "
                f"{duration(est.time_to_train_s)}, {est.gpu_hours:,.0f} GPU-hours "
                f"({sum(p.steps for p in est.phases):,} steps).")
    else:
        time = f"Time to train: none. {time_error}"
    if change is None:
        helps = ("Helps most: nothing faster among the largest micro-batch that fits, with checkpointing on or off."
                 if est is not None else "Helps most: no micro-batch fits and divides every phase's batch, with "
                 "checkpointing on or off; try a higher ZeRO stage, 16-bit precision or more GPUs.")
    else:
        gain = (f"{change.speedup:.2f}x faster" if est is not None else "the change that makes it run")
        helps = (f"Helps most: {change.what}: {duration(change.estimate.time_to_train_s)}, "
                 f"{change.estimate.gpu_hours:,.0f} GPU-hours, {gain}.")
    return [fit, time, helps]


def _step_only(row: Row) -> str:
    """What the peak leaves out: fp32 gradients that live only in the optimizer step, after the activations."""
    if not row.step_grads:
        return ""
    return f" - {_size(min(row.activations, row.step_grads))} (fp32 gradients live only in the step)"


def memory_lines(results: list[PlanResult], memory: int) -> list[str]:
    """One line per phase at the recipe's own stage and precision: bytes per GPU by kind, and the largest
    micro-batch that fits either way of checkpointing."""
    first = results[0]
    lines = [f"Memory per GPU at ZeRO-{first.stage} {first.precision} (buffers: DeepSpeed's buckets and a "
             f"{_size(CUDA_ALLOWANCE)} CUDA allowance; --detail: every stage and precision):"]
    for i, r in enumerate(results, 1):
        own = r.own
        ckpt = "on" if r.checkpointing else "off"
        largest = (f"largest that fits {r.largest_fitting} (divides the batch: {r.largest_valid or 'none'}), "
                   f"{r.largest_other_checkpointing} with checkpointing {'off' if r.checkpointing else 'on'}"
                   if r.largest_fitting else "not even micro-batch 1 fits")
        lines.append(f"  phase {i} of {len(results)} (sequence length {r.seq_len}, global batch {r.global_batch}), "
                     f"micro-batch {r.micro_batch}: {_size(own.total)} of {_size(memory)}"
                     f"{'' if own.fits else ' (does not fit)'} = params {_size(own.params)} + grads "
                     f"{_size(own.grads)} + optimizer {_size(own.optimizer)} + activations {_size(own.activations)} "
                     f"(checkpointing {ckpt}) + buffers {_size(own.buffers)}"
                     f"{f' + teacher {_size(own.teacher)}' if own.teacher else ''}{_step_only(own)}; {largest}.")
    return lines


def parse_nodes(key: str, text: str) -> list[int]:
    """`1,2,4` -> [1, 2, 4], sorted and without repeats."""
    try:
        nodes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        nodes = []
    if not nodes or min(nodes) < 1:
        raise ConfigError(f"{key}={text!r} is not a list of node counts; write it as {key}=1,2,4,8.")
    return sorted(set(nodes))


def read_noise_scale(run_dir: str) -> dict[str, Any]:
    """The last `noise_scale` a run logged in its metrics.jsonl (a last line cut short by a kill is left out)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"--noise-scale={run_dir!r} holds no metrics.jsonl; give the directory of a pilot run "
                          "(bigbatch train writes runs/<recipe>-<time>/metrics.jsonl).")
    try:
        records = read_metrics(path)
    except json.JSONDecodeError as err:  # err.doc: the line that does not parse
        number = path.read_text().splitlines().index(err.doc) + 1
        raise ConfigError(f"--noise-scale={run_dir!r}: line {number} of metrics.jsonl is not JSON; give a run "
                          "directory bigbatch train wrote.") from None
    last = None
    for record in records:
        value = record.get("noise_scale") if isinstance(record, dict) else None
        if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
            last = {"run_dir": str(run_dir), "step": record.get("step"), "noise_scale": float(value)}
    if last is None:
        raise ConfigError(f"--noise-scale={run_dir!r}: its metrics.jsonl has no positive noise_scale; run the pilot "
                          "with gradient accumulation or more than one rank and --run.noise_scale_ema above 0.")
    return last


def _size(n: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def memory_report(result: PlanResult) -> str:
    """The table, then what it means for the recipe as written."""
    r = result
    head = ("", "stage", "precision", "params", "grads", "optimizer", "activations", "buffers", "total", "fits")
    lines = [head]
    for row in r.rows:
        mark = "*" if (row.stage, row.precision) == (r.stage, r.precision) else ""
        lines.append((mark, str(row.stage), row.precision, _size(row.params), _size(row.grads), _size(row.optimizer),
                      _size(row.activations), _size(row.buffers), _size(row.total), "yes" if row.fits else "no"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    table = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines]
    ckpt = "with" if r.checkpointing else "without"
    setting = f"ZeRO-{r.stage} {r.precision} {ckpt} activation checkpointing"
    out = [f"{r.recipe}: {r.num_params / 1e6:.2f}M parameters on {r.world} GPUs of {_size(r.gpu_memory)}; "
           f"micro-batch {r.micro_batch}; buffers: DeepSpeed's buckets and a {_size(CUDA_ALLOWANCE)} CUDA allowance "
           f"(* = the recipe's own stage and precision).", *table, ""]
    own = r.own
    if r.batch_error:
        out.append(f"{r.recipe} does not run as written on {r.world} GPUs: {r.batch_error}")
    elif own.fits:
        out.append(f"{r.recipe} fits as written: {setting} at micro-batch {r.micro_batch} needs {_size(own.total)} "
                   f"of {_size(r.gpu_memory)} per GPU.")
    else:
        out.append(f"{r.recipe} does not fit as written: {setting} at micro-batch {r.micro_batch} needs "
                   f"{_size(own.total)} per GPU, more than the {_size(r.gpu_memory)} given.")

    def capped(micro: int) -> str:
        whole = micro == max(r.global_batch // r.world, 1)
        return f"{micro} (global batch / GPUs: no accumulation)" if whole else str(micro)

    largest = f"The largest micro-batch that fits with {setting} is {capped(r.largest_fitting)}"
    if not r.largest_fitting:
        out.append(f"Not even micro-batch 1 fits with {setting}; pick a higher ZeRO stage, 16-bit precision, "
                   "activation checkpointing or more GPUs.")
    elif r.largest_valid == r.largest_fitting:
        out.append(f"{largest}, and it divides the global batch {r.global_batch} on {r.world} GPUs.")
    else:
        valid = (f"the largest that does is {r.largest_valid} (--batch.micro_batch={r.largest_valid})"
                 if r.largest_valid else "no micro-batch that fits does")
        out.append(f"{largest}, but it does not divide the global batch {r.global_batch} on {r.world} GPUs; {valid}.")
    other = "without" if r.checkpointing else "with"
    out.append(f"{other.capitalize()} activation checkpointing the largest micro-batch that fits would be "
               f"{capped(r.largest_other_checkpointing)}.")
    return "\n".join(out)


def time_report(est: Estimate) -> str:
    """The step-time table per phase, then the time to train."""
    c, w = est.cluster, est.workload
    dev = c.device
    head = ("phase", "seq", "global", "micro x accum", "steps", "step s", "samples/s", "tokens/s", "tokens/s/GPU",
            "MFU",
            "compute", "comm", "optimizer", "time")
    rows = [head]
    for p in est.phases:
        step = p.step_time_s
        rows.append((str(p.phase), str(p.seq_len), f"{p.global_batch:,}", f"{p.micro_batch} x {p.grad_accum}",
                     f"{p.steps:,}", f"{step:.3g}", _rate(p.samples_per_s), _rate(p.tokens_per_s),
                     _rate(p.tokens_per_s / c.world),
                     f"{est.mfu(p):.1%}", f"{p.compute_s / step:.0%}", f"{p.comm_s / step:.0%}",
                     f"{p.optimizer_s / step:.0%}", duration(p.time_s)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    table = ["  ".join(cell.rjust(wd) for cell, wd in zip(r, widths)) for r in rows]
    net = "" if c.nodes == 1 else f", {c.net.name} between nodes"
    return "\n".join([
        f"Time on {c.nodes} x {c.gpus_per_node} {dev.name}{net}: {dev.peak_flops[w.precision] / 1e12:,.1f} TFLOP/s "
        f"{w.precision} peak x efficiency {dev.efficiency:.2f} ({dev.efficiency_source}); ZeRO-{w.stage}, "
        f"{w.optimizer}, checkpointing {'on' if w.checkpointing else 'off'}. samples/s and tokens/s: all "
        f"{c.world} GPUs together; compute/comm/optimizer: share of the step; comm is what overlap leaves exposed.",
        *table,
        f"Time to train: {duration(est.time_to_train_s)} ({est.gpu_hours:,.0f} GPU-hours) for "
        f"{sum(p.steps for p in est.phases):,} steps."])


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def duration(seconds: float) -> str:
    """Seconds in the unit a reader takes in at a glance: s, min, h or d."""
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 86400:.1f} d"


def node_scaling_report(rows: list[dict[str, Any]]) -> str:
    """`node_scaling`'s rows, one line a node count."""
    lines = ["Scaling (whole schedule): nodes, GPUs, samples/s, scaling efficiency, time to train"]
    for r in rows:
        if r["samples_per_s"] is None:
            lines.append(f"  {r['nodes']:>5}  {r['world']:>6}  does not run: {r['error']}")
        else:
            lines.append(f"  {r['nodes']:>5}  {r['world']:>6}  {r['samples_per_s']:>12,.0f}  "
                         f"{r['scaling_efficiency']:>6.1%}  {duration(r['time_to_train_s'])}")
    return "\n".join(lines)


def noise_report(grid: dict[str, Any]) -> str:
    """`noise_grid`'s points, the fastest and cheapest marked."""
    lines = [f"Gradient noise scale {grid['noise_scale']:,.0f} (step {grid['step']} of {grid['run_dir']}): "
             f"S_min {grid['s_min']:,.0f} steps, E_min {grid['e_min']:,.0f} samples (McCandlish et al. 2018: "
             "S = S_min (1 + B_noise/B), E = E_min (1 + B/B_noise)); first phase's steps from these, later phases "
             "as written. F = fastest, C = cheapest of those that fit.",
             f"  {'global':>8}  {'steps':>8}  {'nodes':>5}  {'micro x accum':>13}  {'time':>9}  {'GPU-hours':>10}"]
    for p in grid["points"]:
        mark = ("F" if p["fastest"] else "") + ("C" if p["cheapest"] else "")
        if p["fits"]:
            lines.append(f"{mark:>2}{p['global_batch']:>8,}  {p['steps']:>8,}  {p['nodes']:>5}  "
                         f"{str(p['micro_batch']) + ' x ' + str(p['grad_accum']):>13}  "
                         f"{duration(p['time_to_train_s']):>9}  {p['gpu_hours']:>10,.1f}")
        else:
            lines.append(f"  {p['global_batch']:>8,}  {p['steps']:>8,}  {p['nodes']:>5}  -- {p['why']}")
    a = grid.get("adaptive")
    if a:
        when = (f"{duration(a['time_to_train_s'])}, {a['gpu_hours']:,.1f} GPU-hours" if a["fits"]
                else f"does not fit: {a['why']}")
        lines.append(f"Adaptive batch (batch.adaptive, factor {a['factor']:g}): {grid['recipe_batch']:,} "
                     f"-> {a['adapted_batch']:,} at its first decision; {a['steps']:,} steps, {a['samples']:,} "
                     f"samples on {a['nodes']} node(s): {when} (the pilot's noise scale taken as constant).")
        for p in a.get("phases", []):
            lines.append(f"  phase {p['phase']} starts from {p['start_batch']:,} (batch_from={p['batch_from']}) -> "
                         f"{p['adapted_batch']:,} at its first decision.")
    return "\n".join(lines)
