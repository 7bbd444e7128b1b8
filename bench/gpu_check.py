"""The GPU acceptance check: on one CUDA GPU, in under 8 minutes, what `bigbatch plan` and `auto` promise against what
the GPU does, and bigbatch's optimizers against DeepSpeed's fused LAMB.

    .venv/bin/python bench/gpu_check.py                      # one CUDA GPU: bench/results/gpu_check-<device>.md
    .venv/bin/python bench/gpu_check.py --device cpu --tiny  # every code path on the CPU at tiny shapes (CI runs it)

Rows, each a ratio of measured to planned (or to a reference):
- `bert_large` and `gpt2_medium` shapes cut to --layers layers (the recipes' widths, vocabularies and sequence
  lengths), first phase only, at the micro-batch and checkpointing `auto` picks in this GPU's free memory
  (`bigbatch.plan.advice.choose_auto`, as `bigbatch train` does), run through `bigbatch.engine.initialize` at the
  recipe's ZeRO stage and precision, two micro-batches a step: peak memory (`torch.cuda.max_memory_allocated` over
  model, engine and steps) against the planner's peak less its fixed CUDA allowance (context, workspaces and
  fragmentation, which the allocator's counter does not see); the median step time against the time model with the
  catalogue's efficiency; MFU measured and modelled.
- The fp16 overflow sequence through a real engine (ZeRO-1, LAMB): an inf gradient at one step must skip that step,
  halve the loss scale, and the scale must double again after `loss_scale_window` clean steps.
- One optimizer step over the parameters of the cut `bert_large`, fp32: bigbatch's LAMB and LARS, DeepSpeed's
  `FusedLamb` (a CUDA kernel it builds on first use) and `torch_optimizer.Lamb` when installed; LAMB's weights after
  two steps against the paper's formula in fp64 on the CPU (per tensor max|a - b| / max|b|, the worst tensor).

On the CPU (--device cpu): memory is the bytes every tensor of the engine holds before a step plus the most the step
allocates on top (torch.profiler's memory events, as bench/memory_worker.py counts them); the time model runs on the
`cpu` device probed on the spot; DeepSpeed refuses fp16 on a CPU, so the overflow row runs in fp32, where a
non-finite gradient is skipped with no loss scale to halve (the scale stays 1); FusedLamb is skipped (CUDA only).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import re
import statistics
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.profiler import ProfilerActivity, profile

from bigbatch.config import Recipe
from bigbatch.config.files import find_recipe, load_recipe, load_recipe_file
from bigbatch.config.overrides import apply_overrides
from bigbatch.engine import initialize
from bigbatch.models.build import build_model
from bigbatch.optim import LAMB, LARS, param_groups
from bigbatch.plan import hardware
from bigbatch.plan.advice import choose_auto, device_memory, plan, with_batches
from bigbatch.plan.memory import CUDA_ALLOWANCE
from bigbatch.plan.timing import Cluster, step_time, workload
from bigbatch.resolve import resolve
from bigbatch.run import distributed

from common import machine, write_results
from memory_worker import Inventory, live_at_peak

SHAPES = ("bert_large", "gpt2_medium")
# --tiny: the shapes' architectures at the tiny recipe's size, so the CPU runs every path in seconds
TINY = {"model.hidden_size": "64", "model.num_heads": "2", "model.intermediate_size": "256", "model.max_position": "64",
        "data.seq_len": "32", "data.vocab_size": "512", "batch.global_batch": "64", "cluster.gpu_memory": "2.5GiB"}
LAMB_KW = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, max_coeff=10.0, min_coeff=0.01)
ACCUM = 2  # micro-batches a timed step: the time model's accumulation term is exercised too


@dataclass
class Row:
    check: str
    measured: Optional[float] = None
    reference: Optional[float] = None
    unit: str = ""
    note: str = ""
    seconds: float = 0.0
    deviation: Optional[float] = None  # LAMB: its weights after two steps against the fp64 reference

    @property
    def ratio(self) -> Optional[float]:
        if self.measured is None or not self.reference:
            return None
        return self.measured / self.reference


class Budget:
    """Seconds left of --budget-s: a check that would start after it is recorded as skipped, not run."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def spent(self) -> bool:
        return time.perf_counter() > self.end

    def run(self, rows: list[Row], names: list[str], check: Callable[[], list[Row]]) -> None:
        start = time.perf_counter()
        if self.spent():
            rows.extend(Row(n, note="skipped: --budget-s spent") for n in names)
            return
        try:
            out = check()
        except torch.cuda.OutOfMemoryError as err:  # the planner promised a fit that was not: the finding itself
            out = [Row(n, note=f"out of memory: {str(err).splitlines()[0]}") for n in names]
        except Exception as err:  # one failed check must not cost the others their rows (a GPU is lent for minutes)
            traceback.print_exc()
            out = [Row(n, note=f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
                   for n in names]
        for r in out:
            r.seconds = time.perf_counter() - start
        rows.extend(out)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------- memory and step time
def shape_recipe(name: str, layers: int, tiny: bool) -> Recipe:
    """The recipe `name` cut to its first phase and `layers` layers (at tiny widths with --tiny)."""
    recipe = dataclasses.replace(load_recipe_file(find_recipe(name)), phases=())
    return apply_overrides(recipe, {"model.num_layers": str(layers), **(TINY if tiny else {})}).validate()


def batch(recipe: Recipe, micro: int, step: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Random tokens; BERT's labels at exactly round(15%) of the positions (as the planner counts), GPT's all."""
    g = torch.Generator().manual_seed(step)
    vocab, seq = recipe.data.vocab_size, recipe.data.seq_len
    ids = torch.randint(5, vocab, (micro, seq), generator=g)
    labels = ids.clone()
    if recipe.model.arch == "bert":
        labels = torch.full_like(ids, -100).view(-1)
        picked = torch.randperm(ids.numel(), generator=g)[: round(recipe.data.mlm_probability * ids.numel())]
        labels[picked] = ids.view(-1)[picked]
    return tuple(t.to(device) for t in (ids, torch.ones_like(ids), labels.view_as(ids)))


def train_step(engine: Any, batches: list[tuple[torch.Tensor, ...]]) -> None:
    """One optimizer step: a forward and backward per micro-batch, DeepSpeed's step at the last."""
    for b in batches:
        engine.backward(engine(*b))
        engine.step()


def cpu_peak(engine: Any, batches: list[tuple[torch.Tensor, ...]]) -> int:
    """Bytes held before a step plus the most the step allocates on top (torch.profiler's memory events)."""
    held = Inventory(engine).held()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(engine, batches)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        return held + live_at_peak(json.loads(trace.read_text())["traceEvents"])[0]


def shape_check(name: str, args: argparse.Namespace, device: torch.device, dev: hardware.Device) -> list[Row]:
    """Memory, step time and MFU of shape `name` at the micro-batch and checkpointing `auto` picks."""
    recipe = shape_recipe(name, args.layers, args.tiny)
    memory, words, _ = device_memory(recipe, 1)
    cluster = Cluster(1, 1, dev, hardware.INTERCONNECTS[dev.interconnect])
    _, change = choose_auto(recipe, cluster, memory, words)
    if change is None:
        raise SystemExit(f"{name} no longer ships with an 'auto' micro-batch: gpu_check checks auto's choice")
    micro, ckpt = change.micro_batches[0], change.checkpointing
    two = dataclasses.replace(recipe.batch, global_batch=ACCUM * micro)  # auto's micro-batch, ACCUM of them a step
    timed = with_batches(dataclasses.replace(recipe, batch=two), [micro], ckpt)
    run = resolve(timed, 1)
    planned = plan(timed, 1, 1, memory).own.total - CUDA_ALLOWANCE
    model_s = step_time(workload(run), cluster, recipe.data.seq_len, micro, ACCUM)
    release()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = build_model(recipe.model, recipe.data.vocab_size, pad_id=0, checkpointing=ckpt)
    engine, *_ = initialize(model=model, config=run.ds_config,
                            model_parameters=param_groups(model, recipe.optimizer.weight_decay))
    batches = [batch(recipe, micro, k, device) for k in range(ACCUM)]  # made before the clock runs
    try:
        times = []
        for _ in range(args.warmup + args.steps):
            sync(device)
            t0 = time.perf_counter()
            train_step(engine, batches)
            sync(device)
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else cpu_peak(engine, batches)
        reserved = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else 0
    finally:
        engine.destroy()
        del engine, model, batches
        release()
    measured = statistics.median(times[args.warmup:])
    peak_flops = dev.peak_flops[run.ds.precision]
    mfu, model_mfu = (model_s.model_flops / (t * peak_flops) for t in (measured, model_s.step_s))
    chose = (f"auto: {change.what}; ZeRO-{run.ds.stage} {run.ds.precision}, {micro} x {ACCUM} a step, "
             f"{args.layers} layers")
    return [Row(f"{name} peak memory", peak / 2**30, planned / 2**30, "GiB",
                f"{chose}; planned less the {CUDA_ALLOWANCE / 2**30:.0f} GiB CUDA allowance"
                + (f"; allocator reserved {reserved / 2**30:.2f} GiB" if reserved else "")),
            Row(f"{name} step time", measured, model_s.step_s, "s",
                f"MFU {mfu:.1%} measured, {model_mfu:.1%} modelled ({dev.name}, efficiency {dev.efficiency:.3f}); "
                f"median of {args.steps} steps after {args.warmup}")]


# ------------------------------------------------------------------------------------------------ fp16 overflow
def expected_scales(initial: float, window: int, overflows: set[int], steps: int, dynamic: bool) -> list[float]:
    """The loss scale after each step by DeepSpeed's documented rule with hysteresis 1: halve on an overflow, double
    after `window` clean steps since the last one; 1 throughout without a dynamic scale."""
    if not dynamic:
        return [1.0] * steps
    scale, last, out = initial, -1, []
    for i in range(steps):
        if i + 1 in overflows:
            scale, last = scale / 2, i
        elif (i - last - 1) > 0 and (i - last - 1) % window == 0:
            scale *= 2
        out.append(scale)
    return out


def overflow_check(args: argparse.Namespace, device: torch.device) -> list[Row]:
    """An inf in one gradient at step 2 of 7 through a ZeRO-1 LAMB engine: fp16 with a window of 2 on CUDA (skip,
    halve, regrow twice), fp32 on the CPU (skip; no scale)."""
    fp16 = device.type == "cuda"
    recipe = load_recipe("tiny", {"batch.global_batch": "4", "batch.micro_batch": "4", "data.vocab_size": "512",
                                  "data.seq_len": "32", "deepspeed.configs": "zero1.json,"
                                  + ("fp16.json" if fp16 else "fp32.json")})
    config = resolve(recipe, 1).ds_config
    initial, window, steps, overflows = 2.0**8, 2, 7, {2}
    if fp16:
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 8, "loss_scale_window": window,
                          "hysteresis": 1, "min_loss_scale": 1}
    torch.manual_seed(0)
    model = build_model(recipe.model, 512, pad_id=0)
    engine, *_ = initialize(model=model, config=config, model_parameters=param_groups(model, 0.01))
    first = next(p for p in engine.module.parameters() if p.requires_grad)
    at = {"step": 0}
    first.register_hook(lambda g: g * math.inf if at["step"] in overflows else g)
    scales, skipped, unchanged = [], [], []
    try:
        for step in range(1, steps + 1):
            at["step"], before, count = step, first.detach().clone(), engine.skipped_steps
            engine.backward(engine(*batch(recipe, 4, step, engine.device)))
            engine.step()
            skipped.append(engine.skipped_steps > count)
            unchanged.append(bool(torch.equal(before, first.detach())))
            scales.append(float(getattr(engine.optimizer, "cur_scale", 1.0) or 1.0))
    finally:
        engine.destroy()
        del engine, model
        release()
    expected = expected_scales(initial, window, overflows, steps, fp16)
    right = sum(s == e for s, e in zip(scales, expected)) + sum(
        (skip, same) == (i + 1 in overflows,) * 2 for i, (skip, same) in enumerate(zip(skipped, unchanged)))
    what = ("fp16, ZeRO-1" if fp16 else "fp32, ZeRO-1 (DeepSpeed refuses fp16 on a CPU: skip only, no scale to "
            "halve or regrow)")
    return [Row("fp16 overflow: skip, halve, regrow", right, 2 * steps, "checks",
                f"{what}; inf gradient at step {sorted(overflows)}; scales {[f'{s:g}' for s in scales]} against "
                f"{[f'{e:g}' for e in expected]}; skipped at {[i + 1 for i, s in enumerate(skipped) if s]}, weights "
                f"unchanged at {[i + 1 for i, u in enumerate(unchanged) if u]}")]


# ---------------------------------------------------------------------------------------------------- optimizers
def lamb_reference(weights: list[torch.Tensor], grads: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """LAMB (You et al. 2020, Algorithm 2) in fp64 on the CPU, written out: the weights after one step per entry of
    `grads`. u = m_hat / (sqrt(v_hat) + eps) + wd w; ratio = clamp(||w|| / ||u||, min, max), 1 if either is 0."""
    b1, b2 = LAMB_KW["betas"]
    out = []
    for i, w0 in enumerate(weights):
        w = w0.detach().cpu().double().clone()
        m, v = torch.zeros_like(w), torch.zeros_like(w)
        for t, step_grads in enumerate(grads, 1):
            g = step_grads[i].cpu().double()
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            u = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + LAMB_KW["eps"]) + LAMB_KW["weight_decay"] * w
            wn, un = w.norm().item(), u.norm().item()
            ratio = min(max(wn / un, LAMB_KW["min_coeff"]), LAMB_KW["max_coeff"]) if wn > 0 and un > 0 else 1.0
            w = w - LAMB_KW["lr"] * ratio * u
        out.append(w)
    return out


def deviation(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """The acceptance checks' relative deviation: per tensor max|a - b| / max|b|, the worst tensor. (The weights, not
    the updates: an fp32 weight holds its update only to ulp(w) / |update|, about 1e-4 at lr 1e-3. At LAMB_KW's lr
    an update 1% off shows: measured at --tiny, 1.2e-4 for a 1% larger lr against 1e-7 for the right one.)"""
    return max((a.detach().cpu().double() - b).abs().max().item() / max(b.abs().max().item(), 1e-300)
               for a, b in zip(got, want))


def peer_optimizers(device: torch.device) -> dict[str, Callable[[list[torch.Tensor]], Any] | str]:
    """Each optimizer's factory, or why it cannot run here (the row's note)."""
    peers: dict[str, Callable[[list[torch.Tensor]], Any] | str] = {
        "bigbatch LAMB": lambda ps: LAMB(ps, **LAMB_KW),  # foreach: what fused=None picks on a GPU
        "bigbatch LARS": lambda ps: LARS(ps, lr=0.1),
    }
    if device.type != "cuda":
        peers["DeepSpeed FusedLamb"] = "skipped: needs CUDA (deepspeed.ops.lamb is a CUDA kernel)"
    else:
        try:
            from deepspeed.ops.lamb import FusedLamb

            peers["DeepSpeed FusedLamb"] = lambda ps: FusedLamb(ps, **LAMB_KW)
        except Exception as err:  # an import that fails to build its kernel: the row says why
            peers["DeepSpeed FusedLamb"] = f"{type(err).__name__}: {err}"
    try:
        import torch_optimizer

        # its own definition: no trust-ratio floor, ratio capped at clamp_value, bias correction only with debias
        peers["torch_optimizer.Lamb"] = lambda ps: torch_optimizer.Lamb(
            ps, lr=LAMB_KW["lr"], betas=LAMB_KW["betas"], eps=LAMB_KW["eps"], weight_decay=LAMB_KW["weight_decay"],
            clamp_value=LAMB_KW["max_coeff"], debias=True)
    except ImportError:
        peers["torch_optimizer.Lamb"] = "not installed (bench/requirements.txt)"
    # last, as they compile first (torch.compile); on the CPU that alone would take longer than the rest of --tiny
    fused = {"bigbatch LAMB (fused)": lambda ps: LAMB(ps, fused=True, **LAMB_KW),
             "bigbatch LARS (fused)": lambda ps: LARS(ps, lr=0.1, fused=True)}
    for name, factory in fused.items():
        peers[name] = factory if device.type == "cuda" else \
            "skipped: needs CUDA here (the CPU's fused path is timed by bench/optim_step.py)"
    return peers


def optimizer_check(args: argparse.Namespace, device: torch.device, budget: Budget) -> list[Row]:
    """One step of each optimizer over the cut bert_large's parameters (fp32), median of --steps after --warmup;
    LAMB's two first updates against `lamb_reference`."""
    recipe = shape_recipe("bert_large", args.layers, args.tiny)
    with torch.device("meta"):
        shapes = [p.shape for p in build_model(recipe.model, recipe.data.vocab_size, pad_id=0).parameters()]
    g = torch.Generator().manual_seed(0)
    start = [(torch.randn(s, generator=g) * 0.02).to(device) for s in shapes]
    grads = [[(torch.randn(s, generator=g) * 1e-3).to(device) for s in shapes] for _ in range(2)]
    reference = lamb_reference(start, grads)
    times: dict[str, float] = {}
    rows = []
    for name, factory in peer_optimizers(device).items():
        if isinstance(factory, str) or budget.spent():
            rows.append(Row(f"optimizer step: {name}", note=factory if isinstance(factory, str)
                            else "skipped: --budget-s spent"))
            continue
        params = [torch.nn.Parameter(w.clone()) for w in start]
        try:
            opt = factory(params)
            for step_grads in grads:
                for p, gr in zip(params, step_grads):
                    p.grad = gr
                opt.step()
        except Exception as err:  # FusedLamb builds its kernel at the first step
            rows.append(Row(f"optimizer step: {name}", note=f"{type(err).__name__}: {err}"))
            continue
        dev = deviation(params, reference) if "lamb" in name.lower() else None
        times[name] = timed(opt.step, device, args.warmup, args.steps)
        rows.append(Row(f"optimizer step: {name}", times[name] * 1e3, unit="ms", deviation=dev,
                        note=f"{sum(p.numel() for p in params) / 1e6:.1f}M fp32 parameters in {len(params)} tensors"
                        + (f"; weights after 2 steps vs fp64 LAMB: max relative deviation {dev:.2e}" if dev is not None
                           else "")))
        del opt, params
        release()
    against = "DeepSpeed FusedLamb" if "DeepSpeed FusedLamb" in times else "bigbatch LAMB"
    for r in rows:
        if r.measured is not None:
            r.reference, r.note = times[against] * 1e3, f"against {against}; {r.note}"
    return rows


def timed(step: Callable[[], Any], device: torch.device, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        step()
    out = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


# ---------------------------------------------------------------------------------------------------------- report
def device_label(device: torch.device) -> tuple[str, hardware.Device]:
    """(the name in the result file, the catalogue device the time model runs on: the cpu probed now)."""
    if device.type == "cuda":
        cuda = torch.cuda.get_device_name(device)
        name = hardware.catalogue_name(cuda)
        dev = hardware.DEVICES[name or hardware.DEFAULT_GPU]
        return name or re.sub(r"[^A-Za-z0-9]+", "-", cuda).strip("-"), dev
    return "cpu", hardware.measure_cpu(1)


def report(rows: list[Row], label: str, dev: hardware.Device, args: argparse.Namespace, wall: float) -> str:
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device == "cuda" else "none"
    lines = [
        f"# GPU check on {label}",
        "",
        f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC by `bench/gpu_check.py --device "
        f"{args.device}{' --tiny' if args.tiny else ''} --layers {args.layers}` in {wall:.0f} s. CUDA device: {cuda}. "
        f"Time model on {dev.name} (efficiency {dev.efficiency:.3f}: {dev.efficiency_source}).",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in machine().items()),
        "",
        "| check | measured | planned / reference | ratio | note |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r.check} | {_figure(r.measured, r.unit)} | {_figure(r.reference, r.unit)} | "
                     f"{'' if r.ratio is None else f'{r.ratio:.3f}'} | {r.note} |")
    return "\n".join(lines) + "\n"


def _figure(x: Optional[float], unit: str) -> str:
    return "" if x is None else f"{x:.4g} {unit}"


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny widths, sequence 32: every path in seconds (CI)")
    ap.add_argument("--layers", type=int, default=None, help="layers of each shape (default 4; 2 with --tiny)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2; 1 with --tiny)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 5; 2 with --tiny)")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="no check starts after this many seconds (default 420: the whole run stays under 8 min)")
    ap.add_argument("--out", type=Path, default=None, help="markdown table path (default bench/results/...)")
    args = ap.parse_args(argv)
    args.layers = args.layers or (2 if args.tiny else 4)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    args.steps = args.steps or (2 if args.tiny else 5)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/gpu_check.py: no CUDA device here; run it with --device cpu --tiny on a CPU.")
    started = time.perf_counter()
    distributed.init()  # a world of one: DeepSpeed's engine wants a process group
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    label, dev = device_label(device)
    budget, rows = Budget(args.budget_s), []
    for name in SHAPES:
        budget.run(rows, [f"{name} peak memory", f"{name} step time"], lambda: shape_check(name, args, device, dev))
    budget.run(rows, ["fp16 overflow: skip, halve, regrow"], lambda: overflow_check(args, device))
    budget.run(rows, [f"optimizer step: {n}" for n in peer_optimizers(device)],
               lambda: optimizer_check(args, device, budget))
    wall = time.perf_counter() - started
    figures = {"device": label, "cuda_name": torch.cuda.get_device_name() if device.type == "cuda" else None,
               "tiny": args.tiny, "layers": args.layers, "wall_s": wall, "machine": machine(),
               "rows": [{**dataclasses.asdict(r), "ratio": r.ratio} for r in rows]}
    write_results("gpu_check", report(rows, label, dev, args, wall), figures,
                  args.out or Path(__file__).resolve().parent / "results" / f"gpu_check-{label}.md")
    distributed.shutdown()


if __name__ == "__main__":
    main()
