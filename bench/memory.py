"""Memory and speed per rank, ZeRO 0-3 x fp32/fp16/bf16 x activation checkpointing, measured beside the planner.

    .venv/bin/python bench/memory.py          # writes bench/results/memory-<host>.md and .json

One `deepspeed --num_gpus 2` launch of bench/memory_worker.py runs all 24 combinations on a BERT of width 384, 4
layers, sequence 128, micro-batch 4 (about 10M parameters: model states and activations of the same order), each
through bigbatch.engine.initialize with the shipped ds_configs/ fragments. Measured per rank: the bytes of the
tensors DeepSpeed holds by category (each storage once), the bytes autograd saves for one micro-batch, the process's
peak resident memory growth during one step, and step times with and without checkpointing. Beside them, the
planner's figures (bigbatch/plan/memory.py) for the same model, world, stage and precision, and their ratio; a ratio
off by more than 15% is flagged and its cause written under the table.

On the CPU, DeepSpeed's accelerator reports no fp16 support; fp16 runs through the test-only patch of
tests/workers/ds_configs_matrix.py and its matrix products are emulated, so its timings mean nothing. On CUDA the
worker also records torch.cuda.max_memory_allocated per combination and the table names the device.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bigbatch.config.files import load_recipe  # noqa: E402
from bigbatch.plan.memory import (  # noqa: E402
    CUDA_ALLOWANCE,
    activation_bytes,
    buffer_bytes,
    logits_grad_bytes,
    model_size,
    model_state_bytes,
    zero3_live_params,
)
from bigbatch.run.distributed import free_port  # noqa: E402

from common import deepspeed_launch, machine, write_results  # noqa: E402
from memory_worker import model_overrides, resolve  # noqa: E402

MiB = 2**20
TOLERANCE = 0.15
CATEGORIES = ("params", "grads", "optimizer", "buffers", "activations")  # the planner's, per rank


def launch(args: argparse.Namespace, out: Path) -> None:
    """The worker under the deepspeed launcher; each rank gets an equal share of the cores."""
    def echo(line: str) -> None:
        if "[memory]" in line:
            print(line.split("[memory]", 1)[1].strip()[:110], flush=True)

    argv = ["--out", str(out), "--hidden", str(args.hidden), "--layers", str(args.layers), "--seq", str(args.seq),
            "--micro", str(args.micro), "--vocab", str(args.vocab)]
    # glibc keeps freed blocks below its (growing) mmap threshold in the heap, where they stay resident: a fixed
    # 64 KiB threshold returns every freed tensor above that size, so the step's RSS growth is this step's own.
    deepspeed_launch(Path(__file__).with_name("memory_worker.py"), argv, args.ranks, free_port(), echo,
                     {"MALLOC_MMAP_THRESHOLD_": "65536"})


def planner(args: argparse.Namespace, world: int, r: dict[str, Any]) -> dict[str, int]:
    """bigbatch/plan/memory.py's bytes per rank for the combination `r`; buffers without the fixed CUDA allowance."""
    recipe = load_recipe("tiny", model_overrides(args))
    num_params, largest, attention = model_size(recipe.model, args.vocab)
    stage, precision, ckpt = r["stage"], r["precision"], r["checkpointing"]
    zero = resolve(args, stage, precision, ckpt, r["optimizer"], world)[1].get("zero_optimization") or {}
    live = zero3_live_params(num_params, zero, ckpt) if stage == 3 else 0
    out: dict[str, int] = model_state_bytes(num_params, stage, precision, r["optimizer"], world, largest, live)
    out["buffers"] = buffer_bytes(zero, stage, precision, num_params) - CUDA_ALLOWANCE
    out["activations"] = activation_bytes(recipe.model, args.vocab, args.seq, args.micro, precision, ckpt,
                                          attention, recipe.data.mlm_probability)
    out["logits_grad"] = logits_grad_bytes(recipe.model, args.vocab, args.seq, args.micro,
                                           recipe.data.mlm_probability)
    out["num_params"], out["largest_layer"] = num_params, largest
    return out


def measured(r: dict[str, Any]) -> dict[str, int]:
    """The worker's categories in the planner's: gradients = those held after the boundary backward + the fp32
    partitions built in the step (the planner adds both); optimizer = fp32 masters + moments; ZeRO-3 parameters =
    the partition + the most full parameter data present at once (the planner: the partition + the largest layer
    gathered); buffers = the most the wrapper held besides, at any gradient accumulation of the backward or after it
    (the planner's communication buckets)."""
    b = r["bytes"]
    params = b["params_partition"] + b["params_full_peak"] if r["stage"] == 3 else b["params"]
    return {"params": params, "grads": b["grads_after_backward"] + b["fp32_grads_in_step"],
            "optimizer": b["master"] + b["optimizer_states"], "buffers": max(b["other"], b["other_peak_backward"]),
            "activations": r["activations"]["total"], "peak": r["held_before"] + r["allocated_peak_growth"]}


def pair_times(rank_results: list[dict[str, Any]]) -> dict[str, float] | None:
    """Over the timed pairs (checkpointing on, then off, on one engine): medians of the slower rank's step (the
    ranks wait for each other in the collectives), of each pair's on/off ratio and of its extra forwards, (on - off)
    / the forward without checkpointing. None without pairs (fp16 on the CPU)."""
    on, off, fwd, ratios, extras = [], [], [], [], []
    for ranks in zip(*(r["pairs"] for r in rank_results)):
        a = max((p["on"] for p in ranks), key=lambda s: s["total"])
        b = max((p["off"] for p in ranks), key=lambda s: s["total"])
        on.append(a["total"])
        off.append(b["total"])
        fwd.append(b["forward"])
        ratios.append(a["total"] / b["total"])
        extras.append((a["total"] - b["total"]) / b["forward"])
    if not on:
        return None
    med = statistics.median
    return {"on": med(on), "off": med(off), "forward_off": med(fwd), "ratio": med(ratios),
            "extra_forwards": med(extras), "extra_min": min(extras), "extra_max": max(extras), "pairs": len(on)}


def mib(n: float) -> str:
    return f"{n / MiB:.1f}"


def ratio(m: float, p: float) -> str:
    if not p:
        return "-" if not m else "n/a"
    text = f"{m / p:.2f}"
    return f"**{text}**" if abs(m / p - 1) > TOLERANCE else text


def held(where: dict[str, int]) -> str:
    return ", ".join(f"`{k}` {mib(v)} MiB" for k, v in where.items() if v >= MiB) or "nothing over 1 MiB"


def explain(category: str, row: dict[str, Any]) -> str:
    """Why a flagged category differs: DeepSpeed 0.19.8's source, and this run's figures."""
    st, pr, meas, plan, b, where = row["stage"], row["precision"], row["meas"], row["plan"], row["bytes"], row["where"]
    if category == "params" and st == 3:
        both_m, both_p = meas["params"] + meas["buffers"], plan["params"] + plan["buffers"]
        e = 4 if pr == "fp32" else 2
        model = " (the whole model)" if b["params_full_peak"] >= plan["num_params"] * e else ""
        first = row["params_full_peak_first_step"]
        largest = " (the largest layer, the planner's term)" if first == plan["largest_layer"] * e else ""
        return (f"ZeRO-3 gathers ahead (stage3_prefetch_bucket_size, 5e7 elements): at peak "
                f"{mib(b['params_full_peak'])} MiB of whole parameters{model} sit beside the "
                f"{mib(b['params_partition'])} MiB partition. In the first step, before DeepSpeed has a module trace "
                f"to prefetch by, the most present at once was {mib(first)} MiB{largest}. The planner books the "
                f"prefetch under buffers; params + buffers: measured {mib(both_m)} MiB, planner {mib(both_p)} MiB "
                f"({both_m / both_p:.2f}).")
    if category == "grads":
        text = (f"Sampled at every gradient accumulation, the rank held up to {mib(b['grads_peak_backward'])} MiB of "
                f"gradients during the backward; after the boundary: {held(where['grads_after_backward'])}; inside "
                f"the step, {mib(b['fp32_grads_in_step'])} MiB of fp32 partitions. ")
        if st == 1:
            return text + ("Stage 1 holds the whole gradients until the boundary's reduction inside "
                           "engine.backward and then keeps only its partition; the planner counts the whole "
                           "gradients, which is what stays between micro-batches under gradient accumulation.")
        if st == 3:
            gathered = plan["largest_layer"] * (4 if pr == "fp32" else 2)
            return text + (f"The planner adds the largest layer's whole gradient ({mib(gathered)} MiB); stage3.py "
                           "copies each whole gradient into its reduce bucket (`ipg_buckets`, under buffers, "
                           "allocated once) and reduce-scatters it from there, so the bucket already holds it.")
        return text
    if category == "optimizer" and st == 3 and pr == "fp32":
        return ("stage3.py `_create_fp32_partitions` would alias the fp32 master to the partition when the "
                "partition is already fp32 on the device, but it tests `tensor.device == self.device` with "
                "`self.device` a str ('cpu', 'cuda:0'), which a torch.device never equals, so it clones: "
                f"`fp32_partitioned_groups_flat` {mib(b['master'])} MiB beside the "
                f"{mib(b['params_partition'])} MiB partition. The planner counts no master at stage 3 in fp32.")
    if category == "buffers" and st == 0:
        return ("At stage 0 the gradient all-reduce (engine.allreduce_gradients -> allreduce_bucket) flattens the "
                "gradients into a temporary outside the optimizer wrapper, which the tensor walk does not see; it is "
                "in the step's allocation peak (table below).")
    if category == "buffers" and st == 3:
        return (f"Held: {held(where['other'])} (the reduce bucket, allocated once); the planner's prefetch bucket "
                "is the gathered parameters of the params row.")
    return (f"Held after the backward: {held(where['other'])}; at most {mib(b['other_peak_backward'])} MiB during "
            "the backward.")


def report(args: argparse.Namespace, data: dict[str, Any], load: tuple[float, float],
           wall_s: float) -> tuple[str, list[dict[str, Any]]]:
    world, cuda = data["world"], data["device"] != "cpu"
    ranks = data["ranks"]
    refused = [r for r in ranks[0] if "refused" in r]
    rows = []
    for i, r in enumerate(ranks[0]):
        if "refused" in r:
            continue
        per_rank = [rank[i] for rank in ranks]
        plan = planner(args, world, r)
        plan["peak"] = sum(plan[c] for c in CATEGORIES) + plan["logits_grad"]
        rows.append({**r, "meas": measured(r), "plan": plan, "rank_meas": [measured(x) for x in per_rank],
                     "time": pair_times(per_rank) if r["checkpointing"] else None})
    key = {(r["stage"], r["precision"], r["checkpointing"]): r for r in rows}
    off = [r for r in rows if not r["checkpointing"]]
    plan0 = rows[0]["plan"]
    m = machine()
    device = data["device"] if cuda else f"CPU ({m['cpu']}, {m['cores']} cores)"
    lines = [
        f"# Memory per rank: ZeRO 0-3 x fp32/fp16/bf16 x activation checkpointing ({datetime.date.today()})",
        "",
        f"Run by `bench/memory.py` in {wall_s / 60:.1f} min: one `deepspeed --num_gpus {world}` launch, "
        f"{world} ranks on {device}. Machine: " + ", ".join(f"{k} {v}" for k, v in m.items()) +
        f"; load average {load[0]:.1f} before, {load[1]:.1f} after (other work shared these cores: step times "
        "are noisy).",
        "",
        f"Model: BERT (bigbatch.models.build.build_model), hidden {args.hidden}, {args.layers} layers, "
        f"{args.hidden // 64} heads, FFN {4 * args.hidden}, vocabulary {args.vocab}, sequence {args.seq}, "
        f"micro-batch {args.micro} per rank, no gradient accumulation, dropout 0, SDPA attention: "
        f"{plan0['num_params'] / 1e6:.2f}M parameters, largest layer {plan0['largest_layer'] / 1e6:.2f}M (the word "
        "embeddings). Optimizer: bigbatch's LAMB through bigbatch.engine.initialize; at ZeRO-0 in 16 bit, which "
        "bigbatch refuses for every optimizer (below), DeepSpeed's AdamW (torch's) through deepspeed.initialize, "
        "which keeps the same bytes. DeepSpeed "
        "JSON: the shipped ds_configs/ fragments (zero*.json, fp32/fp16/bf16.json, act_ckpt.json) resolved by "
        "bigbatch.config.dsconfig. Planner: bigbatch/plan/memory.py's functions for the same model, world, stage and "
        "precision.",
        "",
    ]
    if not cuda:
        lines += ["fp16 on this CPU ran through the test-only accelerator patch (`is_fp16_supported = True`, as in "
                  "tests/workers/ds_configs_matrix.py): its matrix products are emulated (about 15x slower than "
                  "fp32), so it is not timed; its bytes are real.", ""]
    lines += [
        "## Model states and buffers (MiB per rank, rank 0; checkpointing off: it leaves them unchanged)",
        "",
        "Measured: every tensor reachable from DeepSpeed's optimizer wrapper and from the model, each storage once. "
        "**params**: the model's parameters as the rank holds them (ZeRO-3: the `ds_tensor` partition + the most "
        "whole parameter data present at any module's forward). **grads**: what the rank holds after the boundary "
        "backward (model `.grad`s, ZeRO's partitioned gradients) + the fp32 gradient partition DeepSpeed builds "
        "inside the step (read by a step pre-hook on the base optimizer; the planner adds both). **optimizer**: fp32 "
        "master weights + the base optimizer's state tensors. **buffers**: the most the wrapper held besides, at any "
        "gradient accumulation of the backward or after it (planner: communication buckets, without its fixed 2 GiB "
        f"CUDA allowance). Ratio = measured / planner, **bold** beyond {TOLERANCE:.0%}.",
        "",
        "| ZeRO | precision | wrapper (optimizer) | params | plan | ratio | grads | plan | ratio | optimizer | plan "
        "| ratio | buffers | plan | ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    states = ("params", "grads", "optimizer", "buffers")
    for r in off:
        cells = [f"{mib(r['meas'][c])} | {mib(r['plan'][c])} | {ratio(r['meas'][c], r['plan'][c])}" for c in states]
        lines.append(f"| {r['stage']} | {r['precision']} | {r['wrapper']} ({r['optimizer']}) | " + " | ".join(cells)
                     + " |")
    same = all(key[(r["stage"], r["precision"], True)]["meas"][c] == r["meas"][c]
               for r in off for c in ("grads", "optimizer", "buffers"))
    spread = max(abs(x[c] - r["meas"][c]) / r["meas"][c] for r in rows for x in r["rank_meas"]
                 for c in states if r["meas"][c])
    lines += ["", f"With checkpointing on, gradients, optimizer states and buffers are "
              f"{'byte for byte the same' if same else 'not all the same (see the .json)'}. Rank 1 differs from "
              f"rank 0 by at most {spread:.1%} in any category (alignment padding, parameters straddling the "
              "partition boundary).", ""]

    lines += [
        "## Peak per rank: the whole step against the planner's total (MiB, rank 0)",
        "",
        "Held: every tensor the wrapper and the model hold before a plain training step. Allocated: the most that "
        + ("step allocates on top (torch.cuda.max_memory_allocated minus the allocated bytes before it). "
           if cuda else "step allocates on top, from torch.profiler's memory events (the CPU has no allocator "
           "counters; the profiled step is one extra step, after the measured one). ")
        + "Planner: params + grads + optimizer + buffers + activations + the loss's logits gradient "
        f"({mib(plan0['logits_grad'])} MiB), its total without the CUDA allowance. Peak RSS growth: VmHWM after the "
        "measured step minus VmRSS before it (VmHWM reset through /proc/self/clear_refs): pages a buffer never "
        "writes are not resident, so it stays below the allocation peak where a bucket is larger than the "
        "gradients that fill it.",
        "",
        "| ZeRO | precision | ckpt | held | + allocated | = peak | planner | ratio | peak RSS growth |"
        + (" cuda max allocated |" if cuda else ""),
        "|---|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if cuda else ""),
    ]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['precision']} | {'on' if r['checkpointing'] else 'off'} | "
                     f"{mib(r['held_before'])} | {mib(r['allocated_peak_growth'])} | {mib(r['meas']['peak'])} | "
                     f"{mib(r['plan']['peak'])} | {ratio(r['meas']['peak'], r['plan']['peak'])} | "
                     f"{mib(r['rss_peak_growth'] or 0)} |" + (f" {mib(r['cuda_max_allocated'])} |" if cuda else ""))

    lines += [
        "",
        "## Activations and step time (per rank, rank 0)",
        "",
        "Activations: bytes autograd saves for one micro-batch (saved-tensor hooks, each storage once, parameters "
        "left out; with checkpointing, the kept layer inputs + the largest one-layer recomputation of the backward "
        "pass, as tests/test_plan_memory.py counts them; the measured step switches transformers' checkpointing to "
        "reentrant so that the hooks see both, the same memory). Step time: on the checkpointing engine, steps with "
        "checkpointing on and off in turn (others' work on a shared machine drifts over minutes; neighbouring steps "
        "share it), medians over the pairs of the slower rank's step, of each pair's ratio and of its extra "
        "forwards = (on - off) / forward time off: checkpointing should cost about one forward. At ZeRO-3 each "
        "switch changes the order of module calls, DeepSpeed drops its prefetch trace, and both run without "
        "prefetching.",
        "",
        "| ZeRO | precision | activations off | plan | ratio | activations on | plan | ratio | pairs | step s off "
        "| on | on / off | extra forwards (pairs' range) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in off:
        on = key[(r["stage"], r["precision"], True)]
        t = on["time"]
        lines.append(
            f"| {r['stage']} | {r['precision']} | {mib(r['meas']['activations'])} | {mib(r['plan']['activations'])} "
            f"| {ratio(r['meas']['activations'], r['plan']['activations'])} | {mib(on['meas']['activations'])} | "
            f"{mib(on['plan']['activations'])} | {ratio(on['meas']['activations'], on['plan']['activations'])} | "
            + (f"{t['pairs']} | {t['off']:.2f} | {t['on']:.2f} | {t['ratio']:.2f} | {t['extra_forwards']:.2f} "
               f"({t['extra_min']:.2f} to {t['extra_max']:.2f}) |" if t else "0 | - | - | - | - |"))
    fp32 = {s: key[(s, "fp32", True)]["time"] for s in range(4)}
    lines += ["", "fp32, the meaningful timing on a CPU: extra forwards per step with checkpointing, median of the "
              "pairs, " + ", ".join(f"ZeRO-{s} {t['extra_forwards']:.2f}" for s, t in fp32.items())
              + f"; step time x{min(t['ratio'] for t in fp32.values()):.2f} to "
              f"x{max(t['ratio'] for t in fp32.values()):.2f} (ZeRO-0: step {fp32[0]['off']:.2f} s, forward "
              f"{fp32[0]['forward_off']:.2f} s). Only the transformer layers are recomputed, not the embeddings and "
              "the MLM head, so a little under one forward is the expectation; the pairs' range is the noise of a "
              "shared machine."]
    if fp32[3]["extra_forwards"] > 1.3:
        lines[-1] += (" ZeRO-3 pays more than a forward: its recomputation also gathers each layer's parameters "
                      "again, without a prefetch trace; this benchmark does not break that cost down.")

    flags = [(c, r) for r in rows for c in CATEGORIES + ("peak",)
             if r["plan"][c] and abs(r["meas"][c] / r["plan"][c] - 1) > TOLERANCE]
    lines += ["", f"## Deviations beyond {TOLERANCE:.0%} and their causes", ""]
    done: set[tuple[str, int, str]] = set()
    for category, row in flags:
        label = (category, row["stage"], row["precision"])
        if label in done or category == "peak":
            continue
        done.add(label)
        which = "/".join("on" if x["checkpointing"] else "off" for c, x in flags if (c, x["stage"], x["precision"])
                         == label)
        lines.append(f"- ZeRO-{row['stage']} {row['precision']} {category} (checkpointing {which}): "
                     f"{mib(row['meas'][category])} MiB measured, {mib(row['plan'][category])} MiB planned. "
                     + explain(category, row))
    for r in (r for c, r in flags if c == "peak"):
        q = r["meas"]["peak"] / r["plan"]["peak"]
        if q < 1:
            cause = ("The planner adds every transient (activations, the logits gradient, gradients, buckets) as if "
                     "all were alive at once; in the step they partly follow each other: the backward frees "
                     "activations as it creates gradients, and stage 0's all-reduce bucket is flattened after the "
                     "backward.")
        elif r["stage"] == 3:
            cause = ("ZeRO-3 gathers the prefetched parameters through temporaries (an all-gather output, then "
                     "copies into the parameters) that the planner does not count; how many are alive at once "
                     "depends on how far the prefetch runs ahead, which varies from run to run.")
        else:
            cause = "Not explained here."
        live = ", ".join(f"{mib(b)} MiB in {n} x `{op}`" for b, n, op in r.get("live_at_peak") or [])
        lines.append(f"- Whole step, ZeRO-{r['stage']} {r['precision']} checkpointing "
                     f"{'on' if r['checkpointing'] else 'off'}: peak {mib(r['meas']['peak'])} MiB, planner "
                     f"{mib(r['plan']['peak'])} MiB ({q:.2f}). {cause}"
                     + (f" Alive at the peak, as the profiler's events show them ({mib(r['live_at_peak_bytes'])} "
                        f"of the {mib(r['allocated_peak_growth'])} MiB allocated on top), by the operators that made "
                        f"them: {live}." if live else ""))
    if not flags:
        lines.append("None.")
    if refused:
        lines += ["", "## Refused", ""]
        lines += [f"- ZeRO-{r['stage']} {r['precision']} with LAMB (checkpointing "
                  f"{'on' if r['checkpointing'] else 'off'}): {r['refused']}" for r in refused]
    return "\n".join(lines) + "\n", rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro", type=int, default=4, help="micro-batch per rank")
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--ranks", type=int, default=2, help="deepspeed --num_gpus (CPU ranks, or GPUs where present)")
    ap.add_argument("--worker-json", type=Path, default=None,
                    help="report from a saved worker result instead of launching (its shape must match the flags)")
    ap.add_argument("--out", type=Path, default=None, help="markdown table path (default bench/results/...)")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    if args.worker_json:
        data = json.loads(args.worker_json.read_text())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "worker.json"
            launch(args, out)
            data = json.loads(out.read_text())
    wall = time.perf_counter() - started
    text, rows = report(args, data, (load_before, os.getloadavg()[0]), wall)
    write_results("memory", text, {
        "machine": machine(), "device": data["device"], "world": data["world"], "wall_s": wall,
        "model": {k: getattr(args, k) for k in ("hidden", "layers", "seq", "micro", "vocab")},
        "rows": [{k: r.get(k) for k in ("stage", "precision", "checkpointing", "optimizer", "wrapper", "meas", "plan",
                                    "time", "bytes", "where", "activations", "held_before", "allocated_peak_growth",
                                    "live_at_peak_bytes", "live_at_peak", "rss_peak_growth")}
                 for r in rows],
        "worker": data}, args.out)


if __name__ == "__main__":
    main()
