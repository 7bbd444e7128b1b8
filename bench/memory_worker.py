"""Worker of bench/memory.py, started by it under `deepspeed --num_gpus N`: every ZeRO stage x precision x
activation checkpointing combination in one launch, each through bigbatch.engine.initialize, measured per rank.

Per combination: a warm-up step (where ZeRO-3 has no module trace to prefetch by yet: the most whole parameter data
present at once is recorded), one measured step, one profiled step, and with checkpointing, timed pairs of steps with
it on and off. The measured step records
- the bytes of every tensor DeepSpeed holds, each storage once, by category: the model's parameters as the rank holds
  them (ZeRO-3: the `ds_tensor` partition, and the most whole parameter data present at any module's forward), fp32
  master weights (what the base optimizer steps, when not the model's own parameters), gradients after the boundary
  backward (model `.grad`s and the wrapper's tensors whose attribute path names a gradient), the fp32 gradient
  partitions built inside the step (the `.grad` of what the base optimizer steps, read by a step pre-hook), the base
  optimizer's state tensors, and everything else the wrapper holds (its buckets); gradients and buckets are also
  sampled at every gradient accumulation of the backward, where the transient ones live;
- the bytes autograd saves for one micro-batch (saved-tensor hooks; with checkpointing, plus the largest one-layer
  recomputation of the backward pass, as tests/test_plan_memory.py counts them);
- the process's peak resident memory growth during the step (VmHWM reset through /proc/self/clear_refs).
The profiled step records the most a plain step allocates on top of what is held: torch.profiler's memory events on
the CPU, torch.cuda.max_memory_allocated on CUDA.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import gc
import itertools
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import deepspeed
import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.profiler import ProfilerActivity, profile

from bigbatch.config import ConfigError
from bigbatch.config.files import load_recipe
from bigbatch.engine import client_optimizer, initialize, refuse_16bit_stage0
from bigbatch.models.build import build_model
from bigbatch.optim import param_groups
from bigbatch.plan.memory import PRECISIONS, STAGES
from bigbatch.resolve import DeepSpeedView
from bigbatch.resolve import resolve as resolve_run
from bigbatch.run.distributed import gather_objects, init, shutdown

# Timed pairs of steps, checkpointing on then off. None for fp16 on the CPU: its matrix products are emulated there
# (~15x slower than fp32), its timings mean nothing.
TIMED_PAIRS = {"fp32": 6, "bf16": 3, "fp16": 3 if torch.cuda.is_available() else 0}


def model_overrides(args: argparse.Namespace) -> dict[str, str]:
    """The benchmark's model as overrides of the tiny recipe (shared with bench/memory.py's planner column)."""
    return {"model.arch": "bert", "model.hidden_size": str(args.hidden), "model.num_layers": str(args.layers),
            "model.num_heads": str(args.hidden // 64), "model.intermediate_size": str(4 * args.hidden),
            "model.max_position": str(args.seq), "model.dropout": "0.0", "data.vocab_size": str(args.vocab),
            "data.seq_len": str(args.seq)}


def batch(args: argparse.Namespace, step: int, rank: int) -> tuple[torch.Tensor, ...]:
    """Exactly round(15%) masked positions, as the planner assumes (tests/test_plan_memory.py builds its batches
    alike)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(5, args.vocab, (args.micro, args.seq), generator=g)
    labels = torch.full_like(ids, -100).view(-1)
    picked = torch.randperm(ids.numel(), generator=g)[: round(0.15 * ids.numel())]
    labels[picked] = ids.view(-1)[picked]
    return ids, torch.ones_like(ids), labels.view_as(ids)


# ---------------------------------------------------------------------------------------------------------------------
# Tensors held, by storage


def storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def wrapper_tensors(root: Any) -> dict[int, tuple[int, str]]:
    """Every tensor reachable from DeepSpeed's optimizer wrapper through attributes, lists and dicts (the model and
    the engine left out): storage pointer -> (bytes, an attribute path that reached it). A path that names no
    gradient wins: a communication bucket is also reached through the gradients DeepSpeed points into it."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    found: dict[int, tuple[int, str]] = {}
    seen: set[int] = set()
    stack: list[tuple[Any, str]] = [(root, type(root).__name__)]
    while stack:
        obj, path = stack.pop()
        if id(obj) in seen or isinstance(obj, (nn.Module, DeepSpeedEngine)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            ptr, nbytes = storage(obj)
            if nbytes and (ptr not in found or "grad" in found[ptr][1].lower() and "grad" not in path.lower()):
                found[ptr] = (nbytes, path)
            if obj.grad is not None:
                stack.append((obj.grad, f"{path}.grad"))
            continue
        if isinstance(obj, dict):
            for i, (key, value) in enumerate(obj.items()):
                label = f"[{key!r}]" if isinstance(key, (str, int)) else f"[#{i}]"
                stack.append((value, path + label))
                if isinstance(key, torch.Tensor):
                    stack.append((key, f"{path}.key#{i}"))
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(obj))
        elif type(obj).__module__.startswith(("deepspeed", "bigbatch", "torch.optim")) and hasattr(obj, "__dict__"):
            stack.extend((value, f"{path}.{name}") for name, value in vars(obj).items())
    return found


def unique_bytes(tensors: list[torch.Tensor]) -> dict[int, int]:
    out: dict[int, int] = {}
    for t in tensors:
        ptr, nbytes = storage(t)
        if nbytes:
            out[ptr] = nbytes
    return out


class Inventory:
    """The measured step's categories, each a {storage pointer: bytes} so that nothing counts twice."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.client = client_optimizer(engine)
        self.params = list(engine.module.parameters())
        self.full_peak = 0  # the most full parameter data present at any module's forward
        self.stepped: dict[int, int] = {}  # what the base optimizer steps
        self.step_grads_peak: dict[int, int] = {}  # its gradients, at the step pre-hook call holding the most
        self.backward_peaks = {"grads": 0, "other": 0}  # sampled at every gradient accumulation of the backward
        self.after_backward: dict[int, tuple[int, str]] = {}
        self.held_params: dict[int, int] = {}
        self.partitions: dict[int, int] = {}  # ZeRO-3: the ds_tensor shards
        self.grads: dict[int, int] = {}

    def param_storages(self) -> dict[int, int]:
        return unique_bytes([p.data for p in self.params])

    def live(self) -> tuple[dict[int, tuple[int, str]], dict[int, int], dict[int, int], dict[int, int]]:
        """Now: (the wrapper's tensors, and of them and the model's: the parameters, the gradients, the buffers).
        ZeRO-3 keeps the partition, and whole the parameters under stage3_param_persistence_threshold. A buffer is
        a wrapper tensor that is no parameter, optimizer state or master and whose attribute path names no gradient;
        gradients that DeepSpeed points into it (its reduce buckets) count as the buffer."""
        found = wrapper_tensors(self.engine.optimizer)
        params = {**self.param_storages(),
                  **unique_bytes([p.ds_tensor for p in self.params if hasattr(p, "ds_tensor")])}
        state, keys = self.optimizer_state()
        optimizer = {**state, **keys}
        buffers = {ptr: b for ptr, (b, path) in found.items()
                   if "grad" not in path.lower() and ptr not in params and ptr not in optimizer}
        named = {ptr: b for ptr, (b, path) in found.items() if "grad" in path.lower()}
        model = unique_bytes([p.grad for p in self.params if p.grad is not None])
        grads = {ptr: b for ptr, b in {**named, **model}.items() if ptr not in params and ptr not in buffers}
        return found, params, grads, buffers

    def held(self) -> int:
        """Bytes of every tensor the wrapper and the model hold now, each storage once."""
        found, params, grads, _ = self.live()
        return sum({**{ptr: b for ptr, (b, _) in found.items()}, **params, **grads}.values())

    def optimizer_state(self) -> tuple[dict[int, int], dict[int, int]]:
        """(The base optimizer's state tensors, the tensors it keeps them for: fp32 masters or the parameters.)"""
        state = unique_bytes([t for s in self.client.state.values() for t in s.values() if isinstance(t, torch.Tensor)])
        return state, unique_bytes([p for p in self.client.state if isinstance(p, torch.Tensor)])

    def sample(self, *_: Any) -> None:
        _, _, grads, buffers = self.live()
        self.backward_peaks["grads"] = max(self.backward_peaks["grads"], sum(grads.values()))
        self.backward_peaks["other"] = max(self.backward_peaks["other"], sum(buffers.values()))

    def on_forward(self, *_: Any) -> None:
        self.full_peak = max(self.full_peak, sum(self.param_storages().values()))

    def on_step(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        stepped = [p for group in optimizer.param_groups for p in group["params"]]
        self.stepped.update(unique_bytes(stepped))
        grads = unique_bytes([p.grad for p in stepped if p.grad is not None])
        if sum(grads.values()) > sum(self.step_grads_peak.values()):
            self.step_grads_peak = grads

    def snapshot_after_backward(self) -> None:
        self.sample()
        self.after_backward, self.held_params, self.grads, _ = self.live()
        self.partitions = unique_bytes([p.ds_tensor for p in self.params if hasattr(p, "ds_tensor")])

    def categories(self) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
        """(bytes by category, and by where each came from); called after the step. A storage counts once, in the
        first category that claims it, in the order below."""
        state, keys = self.optimizer_state()
        claims = [  # (category, storages, label where the wrapper walk did not reach them)
            ("params", self.held_params, "model parameters"),
            ("master", {**keys, **self.stepped}, "stepped by the base optimizer"),
            ("grads_after_backward", self.grads, "model .grad"),
            ("fp32_grads_in_step", self.step_grads_peak, ".grad of what the base optimizer steps"),
            ("optimizer_states", state, "base optimizer state"),
            ("other", {ptr: b for ptr, (b, _) in self.after_backward.items()}, ""),
        ]
        counted: set[int] = set()
        where: dict[str, dict[str, int]] = {}
        for category, storages, fallback in claims:
            mine = where.setdefault(category, {})
            for ptr, nbytes in storages.items():
                if ptr in counted:
                    continue
                counted.add(ptr)
                label = re.sub(r"\[#?\d+\]", "[*]", self.after_backward.get(ptr, (0, fallback))[1])
                mine[label] = mine.get(label, 0) + nbytes
        totals = {category: sum(labels.values()) for category, labels in where.items()}
        totals["params_partition"] = sum(self.partitions.values())
        totals["params_full_peak"] = self.full_peak
        totals["grads_peak_backward"] = self.backward_peaks["grads"]
        totals["other_peak_backward"] = self.backward_peaks["other"]
        return totals, where


# ---------------------------------------------------------------------------------------------------------------------
# Activations


class SavedBytes:
    """Bytes autograd keeps: each storage once, parameters (and their views, ZeRO-3's gathered data) left out."""

    def __init__(self, model: nn.Module) -> None:
        self.params = list(model.parameters())
        self.forward: dict[int, int] = {}
        self.recomputed: list[dict[int, int]] = []

    def pack(self, store: Callable[[], dict[int, int]]) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(t: torch.Tensor) -> torch.Tensor:
            ptr, nbytes = storage(t)
            if not isinstance(t, nn.Parameter) and ptr not in {p.untyped_storage().data_ptr() for p in self.params}:
                store().setdefault(ptr, nbytes)
            return t
        return hook

    def forward_hooks(self) -> saved_tensors_hooks:
        return saved_tensors_hooks(self.pack(lambda: self.forward), lambda t: t)

    def backward_hooks(self) -> saved_tensors_hooks:
        return saved_tensors_hooks(self.pack(lambda: self.recomputed[-1]), lambda t: t)

    def mark_layers(self, model: nn.Module) -> list[Any]:
        """Reentrant recomputation calls a layer's forward function, not the module: a layer's start is marked by
        the first submodule its forward calls (BertLayer -> attention)."""
        return [m.attention.register_forward_pre_hook(lambda *_: self.recomputed.append({}))
                for m in model.modules() if type(m).__name__ == "BertLayer"]

    def result(self) -> dict[str, int]:
        forward = sum(self.forward.values())
        recompute = max((sum(r.values()) for r in self.recomputed), default=0)
        return {"forward": forward, "recompute": recompute, "total": forward + recompute}


# ---------------------------------------------------------------------------------------------------------------------
# Resident memory


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------------------------
# One combination


def set_reentrant(model: nn.Module, reentrant: bool) -> None:
    model.hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train_step(engine: Any, args: argparse.Namespace, step: int, rank: int) -> dict[str, float]:
    """Seconds of the forward, the backward (gradient all-reduce or reduce-scatter included) and the step."""
    ids, mask, labels = (t.to(engine.device) for t in batch(args, step, rank))
    sync()
    t0 = time.perf_counter()
    loss = engine(ids, mask, labels)
    sync()
    t1 = time.perf_counter()
    engine.backward(loss)
    sync()
    t2 = time.perf_counter()
    engine.step()
    sync()
    t3 = time.perf_counter()
    return {"forward": t1 - t0, "backward": t2 - t1, "step": t3 - t2, "total": t3 - t0}


def timed_pairs(engine: Any, args: argparse.Namespace, first: int, rank: int, n: int) -> list[dict[str, Any]]:
    """Step times with checkpointing on, then off, in turn on one engine: neighbouring steps share the machine's load
    (others' work on a shared machine drifts over minutes), so each pair compares like with like. At ZeRO-3 every
    switch changes the order of module calls, so DeepSpeed drops its prefetch trace and both run without prefetch."""
    model = engine.module
    pairs = []
    for i in range(n):
        on = train_step(engine, args, first + 2 * i, rank)
        model.hf.activation_checkpointing_disable()
        off = train_step(engine, args, first + 2 * i + 1, rank)
        set_reentrant(model, False)  # build_model's checkpointing
        pairs.append({"on": on, "off": off})
    return pairs


def measured_step(engine: Any, args: argparse.Namespace, step: int, rank: int, checkpointing: bool) -> dict[str, Any]:
    model = engine.module
    inventory = Inventory(engine)
    saved = SavedBytes(model)
    handles = [m.register_forward_pre_hook(inventory.on_forward) for m in model.modules()]
    handles.append(inventory.client.register_step_pre_hook(inventory.on_step))
    if checkpointing:  # reentrant: the layer inputs and the recomputation pass through the hooks; the same memory
        set_reentrant(model, True)
        handles += saved.mark_layers(model)
    ids, mask, labels = (t.to(engine.device) for t in batch(args, step, rank))
    handles += [p.register_post_accumulate_grad_hook(inventory.sample) for p in model.parameters()]
    skipped = engine.skipped_steps
    gc.collect()
    rss_before = status_kib("VmRSS")
    rss_reset = reset_peak_rss()
    started = time.perf_counter()
    with saved.forward_hooks():
        loss = engine(ids, mask, labels)
    with saved.backward_hooks() if checkpointing else contextlib.nullcontext():
        engine.backward(loss)
    inventory.snapshot_after_backward()
    engine.step()
    sync()
    seconds = time.perf_counter() - started
    result: dict[str, Any] = {
        "seconds_measured_step": seconds, "step_skipped": engine.skipped_steps > skipped,
        "rss_before": rss_before * 1024,
        "rss_peak_growth": (status_kib("VmHWM") - rss_before) * 1024 if rss_reset else None,
    }
    for handle in handles:
        handle.remove()
    if checkpointing:
        set_reentrant(model, False)
    result["bytes"], where = inventory.categories()
    result["where"] = {category: dict(sorted(labels.items(), key=lambda kv: -kv[1])[:6])
                       for category, labels in where.items()}
    result["activations"] = saved.result()
    return result


def allocated_peak(engine: Any, args: argparse.Namespace, step: int, rank: int) -> dict[str, int]:
    """A plain training step: the tensor bytes held before it, and the most it allocates on top. CUDA: the caching
    allocator's counters. CPU: torch.profiler's memory events, whose "Total Allocated" runs from zero at the start of
    the window (frees of older tensors count negative)."""
    gc.collect()
    held = Inventory(engine).held()
    if torch.cuda.is_available():
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        train_step(engine, args, step, rank)
        return {"held_before": held, "allocated_peak_growth": torch.cuda.max_memory_allocated() - before,
                "cuda_allocated_before": before, "cuda_max_allocated": torch.cuda.max_memory_allocated()}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(engine, args, step, rank)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    growth, live_total, live = live_at_peak(events)
    return {"held_before": held, "allocated_peak_growth": growth, "live_at_peak_bytes": live_total,
            "live_at_peak": live}


def live_at_peak(events: list[dict[str, Any]], top: int = 6) -> tuple[int, int, list[tuple[int, int, str]]]:
    """From a CPU profile's chrome trace: the peak of "Total Allocated"; the bytes of the window's allocations the
    events show alive at that moment (an allocation at an address whose free has no event replaces it); and those
    allocations grouped by the innermost two operators that made them: (bytes, count, operators), largest first."""
    memory = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
                    key=lambda e: e["ts"])
    if not memory:
        return 0, 0, []
    peak = max(range(len(memory)), key=lambda i: memory[i]["args"]["Total Allocated"])
    live: dict[int, dict[str, Any]] = {}
    for e in memory[: peak + 1]:
        if e["args"]["Bytes"] > 0:
            live[e["args"]["Addr"]] = e
        else:
            live.pop(e["args"]["Addr"], None)
    ops = sorted((e for e in events if e.get("ph") == "X" and not e["name"].startswith("PyTorch Profiler")),
                 key=lambda o: o["ts"])
    starts = [o["ts"] for o in ops]
    groups: dict[str, list[int]] = {}
    for e in live.values():
        names = []  # operators are nested: walk back from the last one started until two enclose the allocation
        i = bisect.bisect_right(starts, e["ts"]) - 1
        while i >= 0 and len(names) < 2:
            if ops[i]["ts"] + ops[i].get("dur", 0) >= e["ts"]:
                names.append(ops[i]["name"])
            i -= 1
        group = groups.setdefault(" > ".join(reversed(names)) or "(no operator)", [0, 0])
        group[0] += e["args"]["Bytes"]
        group[1] += 1
    ranked = sorted(((b, n, label) for label, (b, n) in groups.items()), reverse=True)[:top]
    return memory[peak]["args"]["Total Allocated"], sum(e["args"]["Bytes"] for e in live.values()), ranked


def resolve(args: argparse.Namespace, stage: int, precision: str, checkpointing: bool, optimizer: str,
            world: int) -> tuple[Any, dict[str, Any]]:
    """The recipe and the resolved DeepSpeed JSON, composed from the shipped ds_configs/ fragments."""
    configs = [f"zero{stage}.json", f"{precision}.json"] + (["act_ckpt.json"] if checkpointing else [])
    recipe = load_recipe("tiny", {**model_overrides(args), "deepspeed.configs": ",".join(configs),
                                  "optimizer.type": optimizer, "optimizer.lr": "1e-4", "optimizer.lr_rule": "none",
                                  "batch.global_batch": str(args.micro * world), "batch.micro_batch": str(args.micro)})
    return recipe, resolve_run(recipe, world).ds_config


def run(args: argparse.Namespace, stage: int, precision: str, checkpointing: bool, optimizer: str,
        world: int, rank: int) -> dict[str, Any]:
    recipe, ds_config = resolve(args, stage, precision, checkpointing, optimizer, world)
    torch.manual_seed(0)
    model = build_model(recipe.model, args.vocab, pad_id=0, checkpointing=DeepSpeedView.of(ds_config).checkpointing)
    # ZeRO-0 in 16 bits: bigbatch refuses every optimizer there (bigbatch.engine.refuse_unfused_16bit); its bytes
    # are still measured, on DeepSpeed's own initialize
    init = deepspeed.initialize if stage == 0 and precision != "fp32" else initialize
    engine, *_ = init(model=model, config=ds_config,
                      model_parameters=param_groups(model, recipe.optimizer.weight_decay))
    first = Inventory(engine)  # ZeRO-3 has no module trace to prefetch by in its first step
    handles = [m.register_forward_pre_hook(first.on_forward) for m in model.modules()]
    warmup = train_step(engine, args, 0, rank)
    for handle in handles:
        handle.remove()
    result = {"stage": stage, "precision": precision, "checkpointing": checkpointing, "optimizer": optimizer,
              "wrapper": type(engine.optimizer).__name__, "client": type(client_optimizer(engine)).__name__,
              "warmup_seconds": warmup["total"], "params_full_peak_first_step": first.full_peak}
    for attempt in range(3):  # fp16: a step skipped for overflow never calls the base optimizer; measure another
        result.update(measured_step(engine, args, 1 + attempt, rank, checkpointing))
        if not result["step_skipped"]:
            break
    result.update(allocated_peak(engine, args, 2 + attempt, rank))
    if checkpointing:
        result["pairs"] = timed_pairs(engine, args, 3 + attempt, rank, TIMED_PAIRS[precision])
    result["skipped_steps"] = engine.skipped_steps
    engine.destroy()
    del engine, model
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--hidden", type=int, required=True)
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--seq", type=int, required=True)
    parser.add_argument("--micro", type=int, required=True)
    parser.add_argument("--vocab", type=int, required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    on_cpu = not torch.cuda.is_available()
    if on_cpu:  # fp16 on the CPU: DeepSpeed's CPU accelerator reports no fp16; the table says it ran through this
        from deepspeed.accelerator import get_accelerator

        type(get_accelerator()).is_fp16_supported = lambda self: True
    rank, world = init()
    results = []
    for stage, precision, checkpointing in itertools.product(STAGES, PRECISIONS, (False, True)):
        optimizer = "lamb"
        if stage == 0 and precision != "fp32":  # bigbatch refuses LAMB here by design; DeepSpeed's AdamW runs it
            try:  # what bigbatch.engine.initialize checks before it calls DeepSpeed
                refuse_16bit_stage0(resolve(args, stage, precision, checkpointing, "lamb", world)[1])
                refused = ""
            except ConfigError as err:
                refused = str(err)
            results.append({"stage": stage, "precision": precision, "checkpointing": checkpointing,
                            "optimizer": "lamb", "refused": refused})
            optimizer = "adamw"
        started = time.perf_counter()
        results.append(run(args, stage, precision, checkpointing, optimizer, world, rank))
        if rank == 0:
            r = results[-1]
            print(f"[memory] ZeRO-{stage} {precision} ckpt={checkpointing} {optimizer} ({r['wrapper']}): "
                  f"{time.perf_counter() - started:.0f} s, {json.dumps(r['bytes'])}", flush=True)
    ranks = gather_objects(results)
    if rank == 0:
        device = torch.cuda.get_device_name() if not on_cpu else "cpu"
        Path(args.out).write_text(json.dumps({"world": world, "device": device, "fp16_emulated_on_cpu": on_cpu,
                                              "ranks": ranks}, indent=1) + "\n")


if __name__ == "__main__":
    main()
    shutdown()
