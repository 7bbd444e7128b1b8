"""Step time on a device (`bigbatch plan --gpu NAME`): compute + exposed communication + the optimizer step.

Compute: model FLOPs counted matmul by matmul (Narayanan et al. 2021, Megatron-LM, appendix; training = 3 x forward;
attention at full s x s, as PaLM, Chowdhery et al. 2022, appendix B, counts it) over the dense peak x a calibrated
efficiency; checkpointing adds a forward of every layer. MFU counts model FLOPs only (PaLM's definition).
Communication: what DeepSpeed 0.19 sends per ZeRO stage, as ring collective times, partly hidden behind the backward
pass. Optimizer: bytes moved per parameter over HBM bandwidth. The derivation, with the DeepSpeed source it rests on,
heads tests/test_plan_timing.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from bigbatch.config import ConfigError, ModelConfig, Recipe
from bigbatch.config.schedule import BatchSplit
from bigbatch.models.build import padded_vocab
from bigbatch.plan.hardware import Device, Interconnect
from bigbatch.plan.memory import model_size, zero3_kept_share
from bigbatch.resolve import ResolvedRun, resolve

# bytes per parameter of the optimizer's own passes: bigbatch's fused LAMB 24 + 16 and LARS 8 + 20
# (bigbatch/optim/kernels.py); torch's fused AdamW reads g, w, m, v and writes w, m, v
OPTIMIZER_BYTES = {"lamb": 40, "lars": 28, "adamw": 28}
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


def model_flops_per_sample(model: ModelConfig, vocab_size: int, seq_len: int, micro_batch: int = 1,
                           mlm_probability: float = 0.15) -> float:
    """Model FLOPs of training on one sequence of `seq_len` (forward and backward, no recompute): the numerator of
    MFU, as `Estimate.mfu` counts it. A micro-batch of `micro_batch` sequences rounds its masked rows (BERT) once."""
    return forward_flops(model, vocab_size, seq_len, micro_batch, mlm_probability).model / micro_batch


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
    """What DeepSpeed 0.19 sends per step at `stage`, `comm_bytes` per element (its communication_data_type
    defaults to the model's dtype). The source each row is read from: tests/test_plan_timing.py."""
    psi = num_params * comm_bytes
    overlap = zero.get("overlap_comm")
    overlap = (stage == 3) if overlap is None else bool(overlap)
    reduce = "reduce_scatter" if zero.get("reduce_scatter", True) else "all_reduce"
    if stage == 0:  # one all-reduce after the last backward, not overlapped
        return Comm((), (("all_reduce", psi, False),))
    if stage == 1:  # gradients reduced at the accumulation boundary only; the updated weights gathered after the step
        return Comm((), ((reduce, psi, overlap), ("all_gather", psi, False)))
    if stage == 2:  # partitioned gradients reduced in every micro-step's backward
        return Comm(((reduce, psi, overlap),), (("all_gather", psi, False),))
    if stage == 3:  # weights gathered in every micro-step: all in the forward, then again (in the backward, or in
        # checkpointing's recompute) those stage3_max_reuse_distance let go in between (memory.zero3_kept_share)
        again = 1 - zero3_kept_share(num_params, zero, checkpointing)
        regather = (("all_gather", again * psi, True),) if again > 0 else ()
        return Comm((("reduce_scatter", psi, overlap), ("all_gather", psi, True)) + regather, ())
    raise ConfigError(f"zero_optimization.stage={stage} is not one of 0, 1, 2, 3.")


def optimizer_bytes_per_param(optimizer: str, precision: str) -> int:
    """HBM bytes per parameter of the optimizer step: the optimizer's own passes, DeepSpeed's read of the gradients
    for the clipping norm (4), and in 16-bit the copy of the gradients into fp32 (2 + 4) and of the masters back (4 +
    2)."""
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
    """One optimizer step of `grad_accum` micro-batches. A reduction overlaps (`overlap_comm`) the backward pass of
    its micro-step except its last bucket; what exceeds that backward shows."""
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
def workload(run: ResolvedRun) -> Workload:
    """What the step-time model reads from a resolved run."""
    r, ds = run.recipe, run.ds
    return Workload(r.model, r.data.vocab_size, r.data.mlm_probability, model_size(r.model, r.data.vocab_size)[0],
                    ds.stage, ds.precision, ds.checkpointing, ds.zero, r.optimizer.type.lower())


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
        """Model FLOPs utilization of phase `p`: its model FLOPs per second over every rank's peak."""
        return p.model_flops / (p.time_s * self.cluster.world * self.cluster.device.peak_flops[self.workload.precision])

    def phase_dict(self, p: PhaseTime) -> dict[str, Any]:
        """Phase `p` as `bigbatch plan --json` writes it."""
        step = p.time_s / p.steps
        return {"phase": p.phase, "seq_len": p.seq_len, "global_batch": p.global_batch, "micro_batch": p.micro_batch,
                "grad_accum": p.grad_accum, "steps": p.steps, "step_time_s": step, "samples_per_s": p.samples_per_s,
                "tokens_per_s": p.tokens_per_s, "mfu": self.mfu(p), "compute_s": p.compute_s, "comm_s": p.comm_s,
                "comm_total_s": p.comm_total_s, "optimizer_s": p.optimizer_s,
                "compute_share": p.compute_s / step, "comm_share": p.comm_s / step,
                "optimizer_share": p.optimizer_s / step, "time_s": p.time_s}


def estimate(recipe: Recipe, cluster: Cluster, batch: Optional[BatchSplit] = None) -> Estimate:
    """Step time of every step in the recipe's step table (phases, ramp), summed per phase; `batch`: the first
    phase's batch factors in place of the recipe's (see `resolve`). ConfigError when the batch does not solve."""
    run = resolve(recipe, cluster.world, batch)
    w = workload(run)
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
