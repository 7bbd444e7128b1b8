"""The step-time model behind `bigbatch plan --gpu NAME`: compute, communication and optimizer time per step, and
the time to train a recipe's whole schedule.

Compute. Model FLOPs are counted matmul by matmul at the real shapes, as Megatron-LM does (Narayanan et al. 2021,
"Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM", appendix: per layer and token a
forward pass costs 24h^2 + 4sh for a 4h MLP, the logits 2hV; backward twice forward, so training is 3x forward,
F = 72 B s l h^2 (1 + s/6h + V/12lh)). Generalised here to any MLP width, SwiGLU's three matrices, grouped-query
k/v widths, and BERT's MLM head, which bigbatch runs only at the masked positions (transform h x h, then decoder
h x V; `bigbatch.models.build.MaskedLM`). Attention is counted at full s x s (no causal halving), as Megatron-LM and
PaLM (Chowdhery et al. 2022, appendix B: 6N + 12 l h s per token) both do. Activation checkpointing recomputes every
layer's forward once more (hardware FLOPs: 4x the layers); MFU counts model FLOPs only (PaLM's definition).
Time = hardware FLOPs / (dense peak of the precision x efficiency). On a GPU elementwise work is not counted: the
efficiency factor (bigbatch.plan.hardware, calibrated on published figures) absorbs it. The measured cpu device times
attention and elementwise passes at their own measured rates instead (`elementwise_passes`).

Communication (DeepSpeed 0.19, checked in its source). Ψ parameters, e bytes per element of the communication
dtype (DeepSpeed's default `communication_data_type` is the model's: 2 in fp16/bf16, 4 in fp32), n ranks, a
accumulation steps:
- stage 0: one all-reduce of Ψe after the step's last backward (engine.allreduce_gradients; not overlapped);
- stage 1: gradients reduced once a step, in the last micro-step's backward (stage_1_and_2.py
  reduce_ready_partitions_and_remove_grads: only at the accumulation boundary), as a reduce-scatter
  (`reduce_scatter`, default true; an all-reduce when false), then an all-gather of Ψe updated weights;
- stage 2: a reduce-scatter of Ψe in every micro-step's backward (partitioned gradients are reduced as produced),
  and the all-gather once a step;
- stage 3: a reduce-scatter in every micro-step, and all-gathers of the weights in every micro-step: forward and
  backward (2Ψe), or once (Ψe) when the whole model fits within stage3_max_live_parameters (default 1e9), whose
  gathered weights then stay for the backward (measured: bench/results/zero3_checkpointing-vm.md, one all-gather
  a step under the default limits); checkpointing adds a third when they do not stay.
Ring times: all-reduce 2(n-1)/n x bytes / B, reduce-scatter and all-gather (n-1)/n x bytes / B, plus a latency
per hop (2(n-1) and n-1 hops). B is the bus bandwidth: NVLink one way within a node; across nodes the ring's
traffic leaves each node through its NICs, so B = min(NVLink one way, the node's NIC bandwidth: one NIC per GPU x
G, or the node's one port), as NCCL's rings over rail-optimised NICs run.
Overlap (`overlap_comm`, default only at stage 3): a reduction overlaps the backward pass of its micro-step; what
exceeds that backward is exposed, and at least the last bucket (reduce_bucket_size / Ψ of it) always is. Stage-3
all-gathers are prefetched behind compute the same way (stage3_prefetch_bucket_size). The stage 1-2 all-gather
after the optimizer step is never overlapped.

Optimizer step: bytes moved per parameter over HBM bandwidth, on the rank's partition (Ψ/n at stages 1-3, Ψ at 0).
bigbatch's fused LAMB moves 40 B (bigbatch/optim/kernels.py: 24 + 16), LARS 28 (8 + 20), torch's fused AdamW 28
(reads g, w, m, v; writes w, m, v). Around it DeepSpeed reads the gradients for the clipping norm (4 B); in 16-bit
it also copies 16-bit gradients into the fp32 partition (2 + 4 B) and casts the updated masters back (4 + 2 B).

Gradient accumulation: a micro-steps of compute; stage 0-1 communicate once a step, stage 2-3 every micro-step.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from bigbatch.config import ConfigError, ModelConfig, Recipe
from bigbatch.models.build import padded_vocab
from bigbatch.plan.hardware import Device, Interconnect

# bytes per parameter of the optimizer's own passes (see the module docstring)
OPTIMIZER_BYTES = {"lamb": 40, "lars": 28, "adamw": 28}
MAX_LIVE_PARAMETERS = 1_000_000_000  # DeepSpeed's default stage3_max_live_parameters
INTRA_LATENCY = 2e-6  # seconds per ring hop over NVLink (NCCL's LL protocol: a few microseconds)
DEFAULT_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size and stage3_prefetch_bucket_size


# ---------------------------------------------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class Flops:
    """Forward FLOPs of one micro-batch, by part."""

    layers: float  # every transformer layer: projections, MLP, attention scores and context
    attention: float  # of which the s x s terms (QK^T and probabilities x V)
    head: float  # the LM or MLM head

    @property
    def model(self) -> float:
        """Training FLOPs without recompute: forward and a backward of twice the forward."""
        return 3 * (self.layers + self.head)

    def hardware(self, checkpointing: bool) -> float:
        """What runs: activation checkpointing repeats every layer's forward in the backward pass."""
        return self.model + (self.layers if checkpointing else 0)


def forward_flops(model: ModelConfig, vocab_size: int, seq_len: int, micro_batch: int = 1,
                  mlm_probability: float = 0.15) -> Flops:
    """Megatron-LM's count, matmul by matmul, for one micro-batch of `micro_batch` sequences of `seq_len`."""
    h, s, a = model.hidden_size, seq_len, model.num_heads
    kv = h // a * (model.num_kv_heads or a)  # k and v width (grouped-query attention)
    f = model.intermediate_size
    mlp_mats = 3 if model.arch == "llama" else 2  # SwiGLU: gate, up, down
    tokens = s * micro_batch
    attention = tokens * (2 * s * h + 2 * s * h)  # QK^T and probabilities x V, per token: s dot products of width h
    per_token = 2 * h * (h + 2 * kv) + 2 * h * h + mlp_mats * 2 * h * f  # q, k, v; output projection; MLP
    layers = model.num_layers * (tokens * per_token + attention)
    v = padded_vocab(vocab_size, model.pad_vocab_to_multiple)
    if model.arch == "bert":  # at the masked rows only: transform Linear h x h, then the decoder h x V
        head = round(mlm_probability * tokens) * (2 * h * h + 2 * h * v)
    else:
        head = tokens * 2 * h * v
    return Flops(float(layers), float(model.num_layers * attention), float(head))


def elementwise_passes(model: ModelConfig, vocab_size: int, seq_len: int, micro_batch: int = 1,
                       mlm_probability: float = 0.15) -> tuple[float, float]:
    """(every layer, the rest): elements written by the forward pass's elementwise ops for one micro-batch, one
    pass per op over its output. Only the measured cpu device times them (`Device.elementwise_s`); on a GPU the
    calibrated efficiency absorbs them. Counted from transformers' BERT, GPT-2 and Llama code: LayerNorm (GPT-2,
    BERT) or RMSNorm (Llama: square, mean, scale, weight), residual adds, the MLP activation (GELU one op; GPT-2's
    gelu_new seven; SwiGLU's silu and product), q/k/v/context head reshapes, rotary embeddings (five passes over q
    and k), dropouts, and the loss's log-softmax (three passes over the logits)."""
    h, s, f, a = model.hidden_size, seq_len, model.intermediate_size, model.num_heads
    kv = h // a * (model.num_kv_heads or a)
    tokens = s * micro_batch
    drop = 2 * h if model.dropout > 0 else 0
    v = padded_vocab(vocab_size, model.pad_vocab_to_multiple)
    if model.arch == "llama":
        layer = 2 * 4 * h + 2 * h + 2 * f + 5 * (h + kv) + 4 * h
        rest = tokens * (4 * h + 3 * v)
    elif model.arch == "gpt2":
        layer = 2 * h + 2 * h + 7 * f + 4 * h + drop
        rest = tokens * (h + h + 3 * v)  # position add, ln_f, loss
    else:
        layer = 2 * h + 2 * h + f + 4 * h + drop
        rest = tokens * (3 * h) + round(mlm_probability * tokens) * (2 * h + 3 * v)  # embeddings, MLM head
    return float(model.num_layers * tokens * layer), float(rest)


# ---------------------------------------------------------------------------------------------------- collectives
def bus_bandwidth(dev: Device, net: Interconnect, nodes: int, gpus_per_node: int) -> float:
    """Bytes/s a ring moves per rank: NVLink one way in a node; across nodes, capped by the node's NICs."""
    if nodes == 1:
        return dev.intra_node_bandwidth
    nic = net.bandwidth * gpus_per_node if net.per == "gpu" else net.bandwidth
    return min(dev.intra_node_bandwidth, nic)


def collective_time(kind: str, nbytes: float, n: int, bandwidth: float, latency: float) -> float:
    """Ring all-reduce: 2(n-1)/n x bytes / B; reduce-scatter and all-gather: (n-1)/n x bytes / B; plus a latency per
    hop. `nbytes`: the whole buffer (every rank's gradients, or the whole gathered model)."""
    if n == 1:
        return 0.0
    if kind == "all_reduce":
        return 2 * (n - 1) / n * nbytes / bandwidth + 2 * (n - 1) * latency
    if kind in ("reduce_scatter", "all_gather"):
        return (n - 1) / n * nbytes / bandwidth + (n - 1) * latency
    raise ValueError(f"unknown collective {kind!r}")


@dataclass(frozen=True)
class Comm:
    """Per-step collectives of one ZeRO stage: (kind, bytes, how many per step, overlappable) rows."""

    per_micro: tuple[tuple[str, float, bool], ...]  # every micro-step: (kind, bytes, overlaps backward/compute)
    per_step: tuple[tuple[str, float, bool], ...]  # once a step


def zero_collectives(stage: int, num_params: int, comm_bytes: int, zero: dict[str, Any],
                     checkpointing: bool) -> Comm:
    """What DeepSpeed sends per step at `stage` (see the module docstring)."""
    psi = num_params * comm_bytes
    overlap = zero.get("overlap_comm")
    overlap = (stage == 3) if overlap is None else bool(overlap)
    reduce = "reduce_scatter" if zero.get("reduce_scatter", True) else "all_reduce"
    if stage == 0:
        return Comm((), (("all_reduce", psi, False),))
    if stage == 1:
        return Comm((), ((reduce, psi, overlap), ("all_gather", psi, False)))
    if stage == 2:
        return Comm(((reduce, psi, overlap),), (("all_gather", psi, False),))
    if stage == 3:
        live = int(zero.get("stage3_max_live_parameters", MAX_LIVE_PARAMETERS))
        gathers = 1 if num_params <= live else (3 if checkpointing else 2)
        return Comm((("reduce_scatter", psi, overlap),) + (("all_gather", psi, True),) * gathers, ())
    raise ConfigError(f"zero_optimization.stage={stage} is not one of 0, 1, 2, 3.")


def optimizer_bytes_per_param(optimizer: str, precision: str) -> int:
    if optimizer not in OPTIMIZER_BYTES:
        raise ConfigError(f"optimizer.type={optimizer!r} has no step-time model; use one of "
                          f"{', '.join(OPTIMIZER_BYTES)}.")
    return OPTIMIZER_BYTES[optimizer] + 4 + (12 if precision != "fp32" else 0)


# ------------------------------------------------------------------------------------------------------- one step
@dataclass(frozen=True)
class StepTime:
    compute_s: float  # micro-steps x hardware FLOPs / (peak x efficiency)
    comm_s: float  # exposed communication (what overlap does not hide)
    comm_total_s: float  # all communication, hidden or not
    optimizer_s: float
    model_flops: float  # per step, all ranks
    hardware_flops: float

    @property
    def step_s(self) -> float:
        return self.compute_s + self.comm_s + self.optimizer_s


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    device: Device
    net: Interconnect

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Workload:
    """What the step-time model reads from a recipe: shape, precision, ZeRO settings, optimizer."""

    model: ModelConfig
    vocab_size: int
    mlm_probability: float
    num_params: int
    stage: int
    precision: str
    checkpointing: bool
    zero: dict[str, Any]
    optimizer: str


def step_time(w: Workload, cluster: Cluster, seq_len: int, micro_batch: int, grad_accum: int) -> StepTime:
    dev, n = cluster.device, cluster.world
    flops = forward_flops(w.model, w.vocab_size, seq_len, micro_batch, w.mlm_probability)
    rate = dev.peak_flops[w.precision] * dev.efficiency
    micro_s = flops.hardware(w.checkpointing) / rate
    if dev.attention_flops:  # a measured device: attention at its own measured rate
        attention = flops.attention * (3 + w.checkpointing)
        micro_s += attention / (dev.attention_flops * dev.efficiency) - attention / rate
    if dev.elementwise_s:
        layers, rest = elementwise_passes(w.model, w.vocab_size, seq_len, micro_batch, w.mlm_probability)
        micro_s += (layers * (3 + w.checkpointing) + 3 * rest) * dev.elementwise_s
    backward_s = micro_s * (2 + w.checkpointing) / (3 + w.checkpointing)  # the window a reduction overlaps
    bw = bus_bandwidth(dev, cluster.net, cluster.nodes, cluster.gpus_per_node)
    e = 4 if w.precision == "fp32" else 2
    comm = zero_collectives(w.stage, w.num_params, e, w.zero, w.checkpointing)
    bucket = int(w.zero.get("reduce_bucket_size", DEFAULT_BUCKET))
    prefetch = int(w.zero.get("stage3_prefetch_bucket_size", DEFAULT_BUCKET))

    def exposed(rows: tuple[tuple[str, float, bool], ...], window: float) -> tuple[float, float]:
        """(all of it, what shows): overlappable time hides behind `window` except its last (for a prefetch: first)
        bucket; the rest shows whole."""
        total = shown = hideable = 0.0
        for kind, nbytes, overlaps in rows:
            t = collective_time(kind, nbytes, n, bw, cluster.net.latency if cluster.nodes > 1 else INTRA_LATENCY)
            total += t
            if overlaps:
                unhidden = t * min(1.0, (prefetch if kind == "all_gather" else bucket) / max(w.num_params, 1))
                shown += unhidden
                hideable += t - unhidden
            else:
                shown += t
        return total, shown + max(0.0, hideable - window)

    micro_total, micro_shown = exposed(comm.per_micro, backward_s)
    last_window = backward_s if not comm.per_micro else max(0.0, backward_s - micro_shown)
    step_total, step_shown = exposed(comm.per_step, last_window)
    local = w.num_params / n if w.stage >= 1 else w.num_params
    optimizer_s = optimizer_bytes_per_param(w.optimizer, w.precision) * local / dev.memory_bandwidth
    return StepTime(compute_s=grad_accum * micro_s, comm_s=grad_accum * micro_shown + step_shown,
                    comm_total_s=grad_accum * micro_total + step_total, optimizer_s=optimizer_s,
                    model_flops=n * grad_accum * flops.model, hardware_flops=n * grad_accum *
                    flops.hardware(w.checkpointing))


# ------------------------------------------------------------------------------------------------- whole schedule
def workload(recipe: Recipe, world: int) -> tuple[Workload, Any]:
    """(the workload, the resolved run) of `recipe` on `world` ranks; ConfigError when its batch does not solve."""
    from bigbatch.resolve import resolve

    run = resolve(recipe, world)
    num_params = _model_size(recipe.model, recipe.data.vocab_size)[0]
    ds = run.ds
    return Workload(recipe.model, recipe.data.vocab_size, recipe.data.mlm_probability, num_params, ds.stage,
                    ds.precision, ds.checkpointing, ds.zero, recipe.optimizer.type.lower()), run


@dataclass(frozen=True)
class PhaseTime:
    phase: int  # 1-based
    seq_len: int
    global_batch: int  # the phase's largest (a ramp's target)
    micro_batch: int
    grad_accum: int  # at that batch
    steps: int
    samples: int
    time_s: float
    compute_s: float  # per step, averaged over the phase's steps
    comm_s: float
    comm_total_s: float
    optimizer_s: float
    model_flops: float  # the whole phase, all ranks

    @property
    def step_time_s(self) -> float:
        return self.time_s / self.steps

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.time_s

    @property
    def tokens_per_s(self) -> float:
        return self.samples * self.seq_len / self.time_s


@dataclass(frozen=True)
class Estimate:
    cluster: Cluster
    workload: Workload
    phases: tuple[PhaseTime, ...]

    @property
    def time_to_train_s(self) -> float:
        return sum(p.time_s for p in self.phases)

    @property
    def gpu_hours(self) -> float:
        return self.time_to_train_s * self.cluster.world / 3600

    def mfu(self, p: PhaseTime) -> float:
        return p.model_flops / (p.time_s * self.cluster.world * self.cluster.device.peak_flops[self.workload.precision])

    def phase_dict(self, p: PhaseTime) -> dict[str, Any]:
        step = p.time_s / p.steps
        return {"phase": p.phase, "seq_len": p.seq_len, "global_batch": p.global_batch, "micro_batch": p.micro_batch,
                "grad_accum": p.grad_accum, "steps": p.steps, "step_time_s": step, "samples_per_s": p.samples_per_s,
                "tokens_per_s": p.tokens_per_s, "mfu": self.mfu(p), "compute_s": p.compute_s, "comm_s": p.comm_s,
                "comm_total_s": p.comm_total_s, "optimizer_s": p.optimizer_s,
                "compute_share": p.compute_s / step, "comm_share": p.comm_s / step,
                "optimizer_share": p.optimizer_s / step, "time_s": p.time_s}


def estimate(recipe: Recipe, cluster: Cluster) -> Estimate:
    """Step time of every step in the recipe's step table (phases, ramp), summed per phase."""
    w, run = workload(recipe, cluster.world)
    cache: dict[tuple[int, int, int], StepTime] = {}
    sums: dict[int, dict[str, Any]] = {}
    for sp in run.steps:
        key = (sp.seq_len, sp.micro_batch, sp.grad_accum)
        if key not in cache:
            cache[key] = step_time(w, cluster, *key)
        st = cache[key]
        acc = sums.setdefault(sp.phase, {"seq": sp.seq_len, "top": sp, "steps": 0, "samples": 0, "time": 0.0,
                                         "compute": 0.0, "comm": 0.0, "comm_total": 0.0, "opt": 0.0, "flops": 0.0})
        if sp.global_batch > acc["top"].global_batch:
            acc["top"] = sp
        acc["steps"] += 1
        acc["samples"] += sp.global_batch
        acc["time"] += st.step_s
        acc["compute"] += st.compute_s
        acc["comm"] += st.comm_s
        acc["comm_total"] += st.comm_total_s
        acc["opt"] += st.optimizer_s
        acc["flops"] += st.model_flops
    phases = tuple(PhaseTime(phase + 1, a["seq"], a["top"].global_batch, a["top"].micro_batch, a["top"].grad_accum,
                             a["steps"], a["samples"], a["time"], a["compute"] / a["steps"], a["comm"] / a["steps"],
                             a["comm_total"] / a["steps"], a["opt"] / a["steps"], a["flops"])
                   for phase, a in sorted(sums.items()))
    return Estimate(cluster, w, phases)


def report(est: Estimate) -> str:
    c, w = est.cluster, est.workload
    dev = c.device
    head = ("phase", "seq", "global", "micro x accum", "steps", "step s", "samples/s", "tokens/s", "MFU",
            "compute", "comm", "optimizer", "time")
    rows = [head]
    for p in est.phases:
        step = p.step_time_s
        rows.append((str(p.phase), str(p.seq_len), f"{p.global_batch:,}", f"{p.micro_batch} x {p.grad_accum}",
                     f"{p.steps:,}", f"{step:.3g}", _rate(p.samples_per_s), _rate(p.tokens_per_s),
                     f"{est.mfu(p):.1%}", f"{p.compute_s / step:.0%}", f"{p.comm_s / step:.0%}",
                     f"{p.optimizer_s / step:.0%}", duration(p.time_s)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    table = ["  ".join(cell.rjust(wd) for cell, wd in zip(r, widths)) for r in rows]
    net = "" if c.nodes == 1 else f", {c.net.name} between nodes"
    return "\n".join([
        f"Time on {c.nodes} x {c.gpus_per_node} {dev.name}{net}: {dev.peak_flops[w.precision] / 1e12:,.1f} TFLOP/s "
        f"{w.precision} peak x efficiency {dev.efficiency:.2f} ({dev.efficiency_source}); ZeRO-{w.stage}, "
        f"{w.optimizer}, checkpointing {'on' if w.checkpointing else 'off'}. compute/comm/optimizer: share of the "
        "step; comm is what overlap leaves exposed.",
        *table,
        f"Time to train: {duration(est.time_to_train_s)} ({est.gpu_hours:,.0f} GPU-hours) for "
        f"{sum(p.steps for p in est.phases):,} steps."])


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 86400:.1f} d"


def device_dict(dev: Device) -> dict[str, Any]:
    return dataclasses.asdict(dev)


def parse_nodes(key: str, text: str) -> list[int]:
    try:
        nodes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        nodes = []
    if not nodes or min(nodes) < 1:
        raise ConfigError(f"{key}={text!r} is not a list of node counts; write it as {key}=1,2,4,8.")
    return sorted(set(nodes))


def scaling(recipe: Recipe, cluster: Cluster, nodes: list[int]) -> list[dict[str, Any]]:
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


def scaling_report(rows: list[dict[str, Any]]) -> str:
    lines = ["Scaling (whole schedule): nodes, GPUs, samples/s, scaling efficiency, time to train"]
    for r in rows:
        if r["samples_per_s"] is None:
            lines.append(f"  {r['nodes']:>5}  {r['world']:>6}  does not run: {r['error']}")
        else:
            lines.append(f"  {r['nodes']:>5}  {r['world']:>6}  {r['samples_per_s']:>12,.0f}  "
                         f"{r['scaling_efficiency']:>6.1%}  {duration(r['time_to_train_s'])}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- the batch that finishes first
def read_noise_scale(run_dir: str) -> dict[str, Any]:
    """The last `noise_scale` a run logged in its metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"--noise-scale={run_dir!r} holds no metrics.jsonl; give the directory of a pilot run "
                          "(bigbatch train writes runs/<recipe>-<time>/metrics.jsonl).")
    last = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"--noise-scale={run_dir!r}: line {number} of metrics.jsonl is not JSON; give a run "
                              "directory bigbatch train wrote.") from None
        value = record.get("noise_scale") if isinstance(record, dict) else None
        if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
            last = {"run_dir": str(run_dir), "step": record.get("step"), "noise_scale": float(value)}
    if last is None:
        raise ConfigError(f"--noise-scale={run_dir!r}: its metrics.jsonl has no positive noise_scale; run the pilot "
                          "with gradient accumulation or more than one rank and --run.noise_scale_ema above 0.")
    return last


def mccandlish_steps(s_min: float, b_noise: float, batch: float) -> float:
    """McCandlish et al. 2018, eq. 2.11: steps to a given loss, S = S_min (1 + B_noise / B)."""
    return s_min * (1 + b_noise / batch)


def mccandlish_samples(e_min: float, b_noise: float, batch: float) -> float:
    """The same paper: samples to that loss, E = E_min (1 + B / B_noise)."""
    return e_min * (1 + batch / b_noise)


def _fits(recipe: Recipe, world: int, micro: int, memory: int, w: Workload) -> bool:
    from bigbatch.plan.memory import activation_bytes, buffer_bytes, logits_grad_bytes, model_state_bytes

    num_params, largest, attention = _model_size(recipe.model, recipe.data.vocab_size)
    d = recipe.data
    states = model_state_bytes(num_params, w.stage, w.precision, w.optimizer, world, largest)
    acts = (activation_bytes(recipe.model, d.vocab_size, d.seq_len, micro, w.precision, w.checkpointing, attention,
                             d.mlm_probability)
            + logits_grad_bytes(recipe.model, d.vocab_size, d.seq_len, micro, d.mlm_probability))
    return sum(states.values()) + acts + buffer_bytes(w.zero, w.stage, w.precision, num_params) <= memory


_SIZES: dict[tuple[ModelConfig, int], tuple[int, int, str]] = {}


def _model_size(model: ModelConfig, vocab: int) -> tuple[int, int, str]:
    from bigbatch.plan.memory import model_size

    if (model, vocab) not in _SIZES:
        _SIZES[(model, vocab)] = model_size(model, vocab)
    return _SIZES[(model, vocab)]


def noise_grid(recipe: Recipe, cluster: Cluster, pilot: dict[str, Any], memory: int,
               nodes: Optional[list[int]] = None) -> dict[str, Any]:
    """Time to train and GPU-hours over global batches x node counts for the first phase, its steps predicted from
    the recipe's by McCandlish's S = S_min (1 + B_noise / B) (later phases as written); the fastest and cheapest
    points whose micro-batch fits in `memory`."""
    b_noise = pilot["noise_scale"]
    b0, s0 = recipe.batch.global_batch, recipe.schedule.steps
    s_min = s0 / (1 + b_noise / b0)  # the recipe's own steps at its batch fix S_min
    e_min = s_min * b_noise  # B_crit = E_min / S_min, estimated by B_noise
    lo, hi = math.floor(math.log2(max(b_noise / 8, 1))), math.ceil(math.log2(max(b_noise * 8, 2)))
    batches = sorted({2**k for k in range(lo, hi + 1)} | {b0})
    nodes = nodes or [2**k for k in range(0, int(math.log2(max(cluster.nodes, 1) * 4)) + 1)]
    points = []
    for batch in batches:
        steps = math.ceil(mccandlish_steps(s_min, b_noise, batch))
        for n in nodes:
            c = dataclasses.replace(cluster, nodes=n)
            point = {"global_batch": batch, "nodes": n, "world": c.world, "steps": steps,
                     "samples": steps * batch, "fits": False}
            points.append(point)
            if batch % c.world:
                point["why"] = f"global batch {batch} does not divide over {c.world} GPUs"
                continue
            per_gpu = batch // c.world
            variant = dataclasses.replace(
                recipe, batch=dataclasses.replace(recipe.batch, global_batch=batch, micro_batch=0, grad_accum=0,
                                                  ramp_start=0, ramp_increment=0, ramp_samples=0),
                schedule=dataclasses.replace(recipe.schedule, steps=steps, warmup=min(recipe.schedule.warmup, 0.5)
                                             if recipe.schedule.warmup < 1 else 0.1))
            try:
                w, _ = workload(dataclasses.replace(variant, batch=dataclasses.replace(variant.batch,
                                                                                      micro_batch=1)), c.world)
            except ConfigError as err:
                point["why"] = str(err)
                continue
            first = dataclasses.replace(variant, phases=())
            own = recipe.batch.micro_batch
            candidates = [own] if own and per_gpu % own == 0 else []
            candidates += [m for m in range(per_gpu, 0, -1) if per_gpu % m == 0]
            micro = next((m for m in candidates if _fits(first, c.world, m, memory, w)), 0)
            if not micro:
                point["why"] = "not even micro-batch 1 fits in memory"
                continue
            try:
                est = estimate(dataclasses.replace(variant, batch=dataclasses.replace(variant.batch,
                                                                                      micro_batch=micro)), c)
            except ConfigError as err:
                point["why"] = str(err)
                continue
            point.update(fits=True, micro_batch=micro, grad_accum=per_gpu // micro,
                         step_time_s=est.phases[0].step_time_s, time_to_train_s=est.time_to_train_s,
                         gpu_hours=est.gpu_hours)
    ok = [p for p in points if p["fits"]]
    fastest = min(ok, key=lambda p: (p["time_to_train_s"], p["gpu_hours"])) if ok else None
    cheapest = min(ok, key=lambda p: (p["gpu_hours"], p["time_to_train_s"])) if ok else None
    for p in points:
        p["fastest"], p["cheapest"] = p is fastest, p is cheapest
    return {**pilot, "recipe_batch": b0, "recipe_steps": s0, "s_min": s_min, "e_min": e_min, "points": points}


def noise_report(grid: dict[str, Any]) -> str:
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
    return "\n".join(lines)
