"""Memory per GPU: model states (parameters, gradients, optimizer states, split by the ZeRO stage) + the activations
of one micro-batch + DeepSpeed's communication buckets + a fixed CUDA allowance. Every count is per GPU.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Optional

import torch

from bigbatch.config import ConfigError, ModelConfig, Recipe
from bigbatch.models.build import build_model, padded_vocab

STAGES = (0, 1, 2, 3)
PRECISIONS = ("fp32", "fp16", "bf16")
GiB = 2**30
# Not from the recipe: ~0.5 GiB of CUDA context and kernel images (lazy loading), ~0.5 GiB of cuBLAS workspaces and
# NCCL communicator buffers, ~1 GiB for the caching allocator's fragmentation. A magnitude, not a measurement.
CUDA_ALLOWANCE = 2 * GiB
# fp32 moments each optimizer keeps per parameter: Adam and LAMB m and v (bigbatch/optim/lamb.py), LARS momentum.
MOMENTS = {"adamw": 2, "lamb": 2, "lars": 1}
# Elements saved by the MLP activation per intermediate element: BERT's `gelu` is one ATen op (saves its input);
# GPT-2's `gelu_new` is written out in Python, 0.5*x*(1+tanh(c*(x+0.044715*x^3))), whose muls and tanh save 4 tensors;
# Llama's SwiGLU `silu(gate(x)) * up(x)`: `silu` (one ATen op) saves its input, the gate output, and the product saves
# both factors, silu(gate) and up(x). The second Linear's input (the product) is counted apart.
ACT_SAVES = {"bert": 1, "gpt2": 4, "llama": 3}
MAX_REUSE_DISTANCE = 1_000_000_000  # DeepSpeed's default stage3_max_reuse_distance (zero/config.py)


def _element_bytes(precision: str) -> int:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}.")
    return 4 if precision == "fp32" else 2


def model_state_bytes(num_params: int, stage: int, precision: str, optimizer: str, world: int,
                      largest_layer_params: int = 0, live_params: int = 0) -> dict[str, int]:
    """Bytes per GPU of parameters, gradients and optimizer states under ZeRO `stage` on `world` data-parallel GPUs.

    ZeRO paper (Rajbhandari et al. 2020, sec. 3.1 and Fig. 1): mixed-precision Adam holds 2 + 2 + K bytes per
    parameter, 16-bit weights and gradients plus K = 12 of fp32 master weights, momentum and variance; stage 1
    partitions the K bytes, stage 2 the gradients too, stage 3 the weights too. LAMB keeps what Adam keeps, LARS one
    fp32 moment instead of two; fp32 training has 4-byte weights and gradients and no masters. DeepSpeed 0.19 adds:
    - a 4-byte fp32 gradient partition built for the optimizer step (`single_grad_partition` in stage_1_and_2.py and
      stage3.py; at stage 0, only the fp16/bf16 wrappers keep fp32 gradients). Its own estimator counts it:
      estimate_zero2_model_states_mem_needs = 2 + 18/N, "18 = 2_grads_16bit + 4_grads_32bit + 4_params_32bit + 8";
    - in fp32 at stages 1-3, a "master" partition anyway: stage_1_and_2.py clones it whatever the dtype, and
      stage3.py's `_create_fp32_partitions` would alias it only when the partition's `torch.device` equals
      `current_device_name()`, a string, which it never does (measured: bench/results/memory-vm.md);
    - at stage 3, the largest layer's weights and gradients gathered whole (its estimator: 4 x largest_layer_params),
      and the weights that stay gathered between their forward and backward use, `live_params` of them
      (`zero3_live_params`): the weights count whichever of the two is larger.
    Its stage-3 estimator counts 18/N where this counts 20/N = 2 + 2 + 4 + 4 + 8: the 16-bit gradient partition
    (stage3.py `grad_partitions_flat_buffer`, in the model's dtype by default) is the difference.
    """
    if optimizer not in MOMENTS:
        raise ConfigError(f"optimizer.type={optimizer!r} is not one of {', '.join(MOMENTS)}.")
    if stage not in STAGES:
        raise ConfigError(f"zero_optimization.stage={stage} is not one of 0, 1, 2, 3.")
    w = _element_bytes(precision)
    half = w == 2
    part = num_params / world  # one rank's partition
    master = 4 if half or stage >= 1 else 0
    fp32_grad = 4 if half or stage >= 1 else 0
    gathered = w * largest_layer_params if stage == 3 else 0
    params = w * (part if stage == 3 else num_params) + (w * max(largest_layer_params, live_params) if stage == 3
                                                         else 0)
    grads = w * (part if stage >= 2 else num_params) + gathered + fp32_grad * (part if stage >= 1 else num_params)
    optim = (master + 4 * MOMENTS[optimizer]) * (part if stage >= 1 else num_params)
    return {"params": int(params), "grads": int(grads), "optimizer": int(optim)}


def zero3_kept_share(num_params: int, zero: dict[str, Any], checkpointing: bool) -> float:
    """Share of the weights ZeRO-3 keeps gathered from one use to the next within a micro-step.

    DeepSpeed 0.19 (partitioned_param_coordinator.py, `__params_to_release`, ~lines 656-662) releases a module's
    weights after use unless they recur within the next stage3_max_reuse_distance parameters of the recorded
    forward+backward trace; stage3_max_live_parameters only bounds prefetching. Layer i's reuse lies 2 S_i further
    on (S_i: the parameters after it in the forward, met again in the backward), or 3 S_i with checkpointing (each
    later layer's recompute too, after which its backward follows at once). So the last R / 2 (R / 3) parameters
    stay gathered and the rest is gathered again: the whole model stays only below R / 2 = 5e8 by default. Read,
    not measured: it assumes a layer is well below R, as with the default 1e9."""
    reuse = int(zero.get("stage3_max_reuse_distance", MAX_REUSE_DISTANCE))
    return min(1.0, reuse / ((3 if checkpointing else 2) * max(num_params, 1)))


def zero3_live_params(num_params: int, zero: dict[str, Any], checkpointing: bool) -> int:
    """Parameters ZeRO-3 holds gathered whole where the forward pass turns into the backward (see
    `zero3_kept_share`): the whole 16-bit model below the reuse distance, R / 2 (R / 3) of it above."""
    return round(num_params * zero3_kept_share(num_params, zero, checkpointing))


def step_grad_bytes(num_params: int, stage: int, precision: str) -> int:
    """Bytes of fp32 gradients that exist only inside the optimizer step, when the activations are already freed:
    at stage 0 in fp16, DeepSpeed's FP16_Optimizer builds them in step() and drops them after it
    (runtime/fp16/fused_optimizer.py ~lines 285-291 and 355). bf16 at stage 0 (BF16_Optimizer) allocates its fp32
    gradients once, at start (bf16_optimizer.py `_setup_for_real_optimizer`), so they count all along."""
    return 4 * num_params if stage == 0 and precision == "fp16" else 0


def sdpa_backend(model_cfg: ModelConfig, precision: str, attention: str = "sdpa") -> str:
    """What keeps the attention probabilities for the backward pass on CUDA: "fused" (flash, memory-efficient or
    cuDNN kernels keep a log-sum-exp and recompute them), "math" (torch's composite SDPA, which keeps them) or
    "eager" (transformers' Python attention, which keeps them).

    transformers passes Llama's grouped-query k and v to SDPA with fewer heads and enable_gqa=True (when there is no
    padding mask: bigbatch packs sequences without padding). In torch 2.13 only the flash and cuDNN kernels accept
    enable_gqa, and both take only fp16/bf16 (memory-efficient attention is compiled without GQA support,
    sdp_utils.cpp check_batch_size_and_num_heads_dense<false>), so fp32 GQA falls back to the math kernel."""
    if attention == "eager":
        return "eager"
    kv_heads = model_cfg.num_kv_heads or model_cfg.num_heads
    if (attention == "sdpa" and model_cfg.arch == "llama" and kv_heads < model_cfg.num_heads
            and _element_bytes(precision) == 4):
        return "math"
    return "fused"


def activation_bytes(model_cfg: ModelConfig, vocab_size: int, seq_len: int, micro_batch: int, precision: str,
                     checkpointing: bool = False, attention: str = "sdpa", mlm_probability: float = 0.15) -> int:
    """Bytes autograd keeps for the backward pass of one micro-batch (`vocab_size` unpadded, as in the recipe).

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", eq. 1) count
    s*b*h*(34 + 5*a*s/h) bytes per layer in 16-bit. The terms below are theirs, checked against what bigbatch's
    BERT, GPT-2 and Llama (transformers 5) really save (tests/test_plan_memory.py counts it with
    saved_tensors_hooks); sizes of ops that keep fp32 whatever the precision (LayerNorm statistics, RMSNorm's upcast
    input, log-sum-exp, the loss) stay fp32. With checkpointing (transformers' per-layer recomputation) a layer keeps
    only its input, and one layer at a time is recomputed in full during the backward pass.
    """
    if attention not in ("sdpa", "flash_attention_2", "eager"):
        raise ConfigError(f"attention {attention!r} is not one of sdpa, flash_attention_2, eager.")
    e = _element_bytes(precision)
    s, b, h = seq_len, micro_batch, model_cfg.hidden_size
    t = s * b  # tokens in the micro-batch
    vocab = padded_vocab(vocab_size, model_cfg.pad_vocab_to_multiple)
    arch = model_cfg.arch
    if arch not in ACT_SAVES:
        raise ConfigError(f"model.arch={arch!r} is not one of {', '.join(ACT_SAVES)}.")
    ffn = t * model_cfg.intermediate_size * e * (ACT_SAVES[arch] + 1)  # activation + 2nd Linear input
    backend = sdpa_backend(model_cfg, precision, attention)
    if arch == "llama":
        embeddings, layer, head = _llama_parts(model_cfg, s, b, e, vocab, backend)
    else:
        embeddings, layer, head = _bert_gpt2_parts(model_cfg, s, b, e, vocab, backend, mlm_probability)
    layer += ffn
    layers = model_cfg.num_layers * t * h * e + layer if checkpointing else model_cfg.num_layers * layer
    return embeddings + layers + head


def _llama_parts(model_cfg: ModelConfig, s: int, b: int, e: int, vocab: int, backend: str) -> tuple[int, int, int]:
    """Llama's (embeddings, one layer without its MLP, head) for `activation_bytes`."""
    t, h, a = s * b, model_cfg.hidden_size, model_cfg.num_heads
    # No hidden dropout in Llama: `dropout` is only its attention_dropout, on the probabilities.
    dropout = model_cfg.dropout > 0
    h_kv = h // a * (model_cfg.num_kv_heads or a)  # k and v width: num_kv_heads heads of h / a
    # LlamaRMSNorm: `x.to(float32)` is saved by pow and by the multiply with rsqrt, 4 bytes whatever the precision
    # (in 16-bit a new fp32 copy; in fp32 the residual stream itself, which nothing else keeps); the fp32 rsqrt per
    # token; the normalised x cast back to the model's dtype, kept by `weight * x`; then its output, kept by the
    # Linear(s) it feeds (q/k/v, gate/up, or lm_head).
    rms = 4 * t * h + 4 * t + 2 * t * h * e
    layer = 2 * rms  # input_layernorm and post_attention_layernorm
    # Rotary embeddings: q*cos + rotate_half(q)*sin saves only cos and sin (they need no gradient), so q and k
    # before rotation are not kept; cos and sin are one (1, s, head_dim) pair shared by all layers (below).
    if backend == "fused":  # q (rotated), k (rotated) and v with num_kv_heads heads (enable_gqa: no copies),
        # the output (o_proj's input is the same storage), fp32 log-sum-exp per head and token
        layer += t * (2 * h + 2 * h_kv) * e + 4 * a * t
    else:  # k and v repeated to all heads (eager: repeat_kv; math: repeat_interleave) and kept by q @ k^T and
        # probs @ v, q (math: scaled by sqrt(scale), a copy), and o_proj's input (transpose().contiguous())
        layer += 4 * t * h * e
        if backend == "eager":  # softmax(dtype=float32) keeps its fp32 result; in 16-bit its cast copy is
            # kept by probs @ v, unless dropout's output is kept instead (then a 1-byte mask, CUDA)
            probs = 4 + (e if e != 4 or dropout else 0) + (1 if dropout else 0)
        else:  # math (fp32 only): _safe_softmax's result, kept by probs @ v too; dropout mask and output
            probs = e + (1 + e if dropout else 0)
        layer += a * s * s * b * probs
    # the MLP (added by the caller), SwiGLU: gate output, silu(gate), up output, and the product (down_proj's input)
    embeddings = 8 * t + 2 * s * (h // a) * e  # int64 token ids for the embedding backward; rotary cos and sin
    head = rms + 4 * t * vocab + 8 * t  # final norm; fp32 log-probabilities (the loss upcasts); int64 labels
    return embeddings, layer, head


def _bert_gpt2_parts(model_cfg: ModelConfig, s: int, b: int, e: int, vocab: int, backend: str,
                     mlm_probability: float) -> tuple[int, int, int]:
    """BERT's or GPT-2's (embeddings, one layer without its MLP, head) for `activation_bytes`."""
    t, h, a = s * b, model_cfg.hidden_size, model_cfg.num_heads
    ln = 8 * t  # per LayerNorm: fp32 mean and rstd per token
    mask = t * h if model_cfg.dropout > 0 else 0  # per dropout: CUDA's native_dropout keeps a 1-byte mask
    layer = 8 * t * h * e  # Korthikanti's 5 (attention input, q, k, v, output) + 1 (MLP input) + 2 (LN inputs):
    # BERT (post-LN): input, q, k, v, attention output, LN1 input, LN1 output, LN2 input;
    # GPT-2 (pre-LN): input, ln_1 output, q, k, v (views of one qkv tensor), attention output, ln_2 in and out.
    layer += 2 * ln + 2 * mask  # two LayerNorms; dropout after the attention projection and after the MLP
    if backend == "eager":  # Korthikanti's 5*a*s^2*b: softmax output, then dropout mask and dropped probs
        layer += a * s * s * b * (e + (1 + e if mask else 0))
    else:  # fused kernels recompute the probabilities (and their dropout mask, from the RNG seed) in backward
        layer += 4 * a * t  # fp32 log-sum-exp per head and token
    embeddings = 8 * (t + s) + mask  # int64 token and position ids for the embedding backward; embedding dropout
    if model_cfg.arch == "gpt2":  # ln_f input and output and its statistics, fp32 log-probabilities at every
        # position, int64 labels
        head = 2 * t * h * e + ln + 4 * t * vocab + 8 * t
    else:
        embeddings += t * h * e + ln  # BERT's embedding LayerNorm
        # MaskedLM keeps a bool mask to gather the masked rows, then per row: 4 hidden-sized inputs (transform
        # Linear, GELU, LayerNorm, decoder), LayerNorm statistics, fp32 log-probabilities (the loss upcasts), an
        # int64 label.
        m = round(mlm_probability * t)
        head = t + m * (4 * h * e + 8 + 4 * vocab + 8)
    return embeddings, layer, head


def logits_grad_bytes(model_cfg: ModelConfig, vocab_size: int, seq_len: int, micro_batch: int,
                      mlm_probability: float = 0.15) -> int:
    """The first backward step's transient: nll_loss's and log_softmax's fp32 gradients, each as large as the logits,
    alive while every activation still is (for GPT-2 at vocabulary 50k this rivals several layers). GPT-2 and Llama
    (causal LMs, transformers' ForCausalLMLoss upcasts the logits) have a row per position, BERT per masked position.
    In 16-bit, the cast of log_softmax's gradient back to the logits' dtype (2 bytes) comes after nll_loss's is freed,
    so the peak stays these two."""
    t = seq_len * micro_batch
    rows = round(mlm_probability * t) if model_cfg.arch == "bert" else t
    return 2 * 4 * rows * padded_vocab(vocab_size, model_cfg.pad_vocab_to_multiple)


def buffer_bytes(zero_section: dict[str, Any], stage: int, precision: str, num_params: int) -> int:
    """DeepSpeed's communication buckets at `stage` (sizes from the resolved JSON, DeepSpeed's defaults otherwise)
    plus CUDA_ALLOWANCE. allgather_bucket_size is not counted: DeepSpeed 0.19 gathers updated partitions in place,
    into the flat 16-bit buffer (runtime/utils.py all_gather_dp_groups), so it allocates nothing."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero = DeepSpeedZeroConfig(**{**zero_section, "stage": stage})
    e = _element_bytes(precision)
    if stage == 0:  # engine.allreduce_gradients flattens gradients into buckets of 5e8 elements
        buckets = min(500_000_000, num_params)
    elif stage in (1, 2):  # stage_1_and_2.setup_buckets: torch.empty(reduce_bucket_size), a second with overlap_comm
        buckets = zero.reduce_bucket_size * (2 if zero.overlap_comm else 1)
    else:  # stage3: one reduce bucket, and parameters prefetched ahead of the layer being computed
        buckets = zero.reduce_bucket_size + min(zero.prefetch_bucket_size, num_params)
    return buckets * e + CUDA_ALLOWANCE


@functools.cache  # the planner asks again for every phase, node count and batch; a build takes a second
def model_size(model_cfg: ModelConfig, vocab_size: int) -> tuple[int, int, str]:
    """(parameters, largest layer's parameters, attention implementation) of the recipe's model, built on the meta
    device so no memory is allocated. Tied embeddings count once."""
    with torch.device("meta"):
        model = build_model(model_cfg, vocab_size, pad_id=0)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest, model.hf.config._attn_implementation


def teacher_bytes(shape: ModelConfig, vocab_size: int, seq_len: int, micro_batch: int, precision: str,
                  mlm_probability: float = 0.15) -> tuple[int, int]:
    """(weight bytes, peak forward activation bytes) per GPU of a distillation's teacher of `shape`: every weight on
    every GPU in the run's precision (it stays outside DeepSpeed, so ZeRO partitions none of it), and under no_grad one
    layer's live tensors and the head (nothing kept for a backward pass); no gradients, no optimizer state."""
    params = model_size(shape, vocab_size)[0]
    one_layer = dataclasses.replace(shape, num_layers=1)
    activations = activation_bytes(one_layer, vocab_size, seq_len, micro_batch, precision,
                                   mlm_probability=mlm_probability)
    return params * _element_bytes(precision), activations


@dataclass(frozen=True)
class Row:
    """Bytes per GPU at one ZeRO stage and precision, and whether they fit."""

    stage: int
    precision: str
    params: int
    grads: int
    optimizer: int
    activations: int
    buffers: int
    total: int  # the peak: backward's (activations) or the optimizer step's (step_grads), whichever is larger
    fits: bool
    step_grads: int = 0  # of `grads`, the fp32 gradients alive only inside the optimizer step (`step_grad_bytes`)
    teacher: int = 0  # a distillation's teacher: its weights and forward activations (`teacher_bytes`), in `total`


@dataclass(frozen=True)
class Footprint:
    """What a recipe's first phase needs per GPU on `world` GPUs of `gpu_memory` bytes, at any stage, precision,
    micro-batch and checkpointing; `zero`: the resolved DeepSpeed JSON's zero_optimization section; `teacher`: a
    distillation's teacher (shape, vocabulary), whose bytes every row adds."""

    recipe: Recipe
    world: int
    zero: dict[str, Any]
    gpu_memory: int
    teacher: Optional[tuple[ModelConfig, int]] = None

    def row(self, stage: int, precision: str, micro_batch: int, checkpointing: bool) -> Row:
        """Bytes per GPU at `stage` and `precision`, `micro_batch` sequences a micro-step."""
        r, d = self.recipe, self.recipe.data
        num_params, largest_layer, attention = model_size(r.model, d.vocab_size)
        live = zero3_live_params(num_params, self.zero, checkpointing) if stage == 3 else 0
        states = model_state_bytes(num_params, stage, precision, r.optimizer.type.lower(), self.world, largest_layer,
                                   live)
        acts = (activation_bytes(r.model, d.vocab_size, d.seq_len, micro_batch, precision, checkpointing, attention,
                                 d.mlm_probability)
                + logits_grad_bytes(r.model, d.vocab_size, d.seq_len, micro_batch, d.mlm_probability))
        buffers = buffer_bytes(self.zero, stage, precision, num_params)
        step_grads = step_grad_bytes(num_params, stage, precision)
        # The teacher's whole forward counted at the student's peak: an upper bound (its activations are freed but
        # for its logits before the student's backward), the safe side for a verdict of "fits".
        tutor = sum(teacher_bytes(*self.teacher, d.seq_len, micro_batch, precision, d.mlm_probability)) \
            if self.teacher else 0
        # the step-only gradients and the activations are never alive together: the larger of the two sets the peak
        total = sum(states.values()) + acts + buffers + tutor - min(acts, step_grads)
        return Row(stage, precision, states["params"], states["grads"], states["optimizer"], acts, buffers, total,
                   total <= self.gpu_memory, step_grads, tutor)
