"""bigbatch/plan/memory.py against independent numbers: what autograd saves, DeepSpeed's estimators, the ZeRO paper,
bytes counted by hand."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import NamedTuple

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from bigbatch.config import ConfigError, ModelConfig
from bigbatch.config.files import load_recipe
from bigbatch.models.build import CausalLM, MaskedLM, hf_config
from bigbatch.plan.advice import plan
from bigbatch.plan.memory import (
    CUDA_ALLOWANCE,
    Footprint,
    Row,
    activation_bytes,
    buffer_bytes,
    model_size,
    model_state_bytes,
    sdpa_backend,
)

from conftest import pinned

VOCAB = 1000


class Shape(NamedTuple):
    arch: str
    hidden: int
    layers: int
    heads: int
    seq: int
    micro: int
    kv_heads: int = 0  # llama: grouped-query k/v heads, 0 = heads
    intermediate: int = 0  # 0: 4 x hidden

    def __str__(self) -> str:
        kv = f"-kv{self.kv_heads}" if self.kv_heads else ""
        inter = f"-I{self.intermediate}" if self.intermediate else ""
        return f"{self.arch}-h{self.hidden}-L{self.layers}-a{self.heads}{kv}{inter}-s{self.seq}-b{self.micro}"


SHAPES = [
    Shape("bert", 64, 2, 2, 64, 4),
    Shape("bert", 128, 3, 4, 128, 2),
    Shape("gpt2", 96, 2, 3, 64, 4),
    Shape("llama", 64, 2, 4, 64, 4, kv_heads=2, intermediate=172),  # grouped-query: 2 k/v heads for 4 q heads
    Shape("llama", 96, 2, 6, 32, 4, kv_heads=6, intermediate=256),  # k/v heads = q heads
]
LLAMA_GQA = SHAPES[3]


def _cfg(shape, dropout=0.0):
    return ModelConfig(arch=shape.arch, hidden_size=shape.hidden, num_layers=shape.layers, num_heads=shape.heads,
                       num_kv_heads=shape.kv_heads, intermediate_size=shape.intermediate or 4 * shape.hidden,
                       max_position=shape.seq, dropout=dropout)


def _model(shape, *, dropout=0.0, attention="sdpa", attention_dropout=None):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    arch, cfg = shape.arch, _cfg(shape, dropout)
    config = hf_config(cfg, VOCAB, pad_id=0)
    if attention_dropout is not None:
        name = {"bert": "attention_probs_dropout_prob", "gpt2": "attn_pdrop", "llama": "attention_dropout"}[arch]
        setattr(config, name, attention_dropout)
    torch.manual_seed(0)
    if arch == "bert":
        model = MaskedLM(AutoModelForMaskedLM.from_config(config, attn_implementation=attention))
    else:
        model = CausalLM(AutoModelForCausalLM.from_config(config, attn_implementation=attention))
    assert model.hf.config._attn_implementation == attention
    return cfg, model.train()


def _batch(arch, seq, micro):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (micro, seq), generator=g)
    if arch != "bert":  # causal LMs: the model shifts the labels itself
        labels = ids.clone()
    else:  # exactly round(15%) masked positions, as activation_bytes assumes
        labels = torch.full_like(ids, -100).view(-1)
        picked = torch.randperm(ids.numel(), generator=g)[: round(0.15 * ids.numel())]
        labels[picked] = ids.view(-1)[picked]
        labels = labels.view_as(ids)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _saved_bytes(model, batch, checkpointing=False):
    """Bytes autograd keeps after the forward pass, each storage once, parameters left out. With checkpointing, plus
    the largest one-layer recomputation of the backward pass (when the last layer is recomputed, every other layer's
    input is still kept: the same sum activation_bytes makes)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def counter(store):
        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                store.setdefault(ptr, t.untyped_storage().nbytes())
            return t
        return pack

    saved: dict[int, int] = {}
    with saved_tensors_hooks(counter(saved), lambda t: t):
        loss = model(**batch)
    forward = sum(saved.values())
    if not checkpointing:
        return forward
    # Reentrant recomputation calls the layer's forward function, not the module, so a layer's start is marked by
    # the first submodule its forward calls.
    first = {"BertLayer": "attention", "GPT2Block": "ln_1", "LlamaDecoderLayer": "input_layernorm"}
    layers = [m for m in model.modules() if type(m).__name__ in first]
    recomputed: list[dict[int, int]] = []
    hooks = [getattr(layer, first[type(layer).__name__]).register_forward_pre_hook(lambda *_: recomputed.append({}))
             for layer in layers]
    with saved_tensors_hooks(lambda t: counter(recomputed[-1])(t), lambda t: t):
        loss.backward()
    for hook in hooks:
        hook.remove()
    assert len(recomputed) == len(layers)
    return forward + max(sum(r.values()) for r in recomputed)


def _check(measured, estimated, what):
    error = (estimated - measured) / measured
    assert abs(error) <= 0.15, f"{what}: measured {measured} B, estimated {estimated} B ({error:+.1%})"


def _cuda_kernel(shape, precision):
    """The SDPA kernel CUDA would pick, forced on CPU where it differs. Llama's grouped-query k/v reach SDPA with
    enable_gqa=True; on CUDA (torch 2.13) only flash and cuDNN accept that and only in fp16/bf16, so fp32 runs the
    math kernel, which keeps the probabilities. torch's CPU flash kernel accepts GQA in fp32, so it is switched off."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if shape.arch == "llama" and 0 < shape.kv_heads < shape.heads and precision == "fp32":
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["full", "checkpointed"])
def test_activation_estimate_matches_saved_tensors(shape, precision, checkpointing):
    cfg, model = _model(shape)
    if precision == "bf16":  # DeepSpeed's bf16 mode casts the module's parameters (not autocast); so does this
        model.to(torch.bfloat16)
    if checkpointing:  # reentrant, so that the layer inputs are saved where the hooks see them; same memory
        model.hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    with _cuda_kernel(shape, precision):
        measured = _saved_bytes(model, _batch(shape.arch, shape.seq, shape.micro), checkpointing)
    estimated = activation_bytes(cfg, VOCAB, shape.seq, shape.micro, precision, checkpointing)
    _check(measured, estimated, f"{shape} {precision} checkpointing={checkpointing}")


def test_llama_fp32_grouped_query_attention_runs_the_math_kernel():
    """What _cuda_kernel forces is what the planner assumes, and it costs the probabilities."""
    cfg = _cfg(LLAMA_GQA)
    assert sdpa_backend(cfg, "fp32") == "math" and sdpa_backend(cfg, "bf16") == "fused"
    assert sdpa_backend(dataclasses.replace(cfg, num_kv_heads=0), "fp32") == "fused"  # no GQA: memory-efficient
    assert sdpa_backend(cfg, "fp32", "flash_attention_2") == "fused"
    s, b = LLAMA_GQA.seq, LLAMA_GQA.micro
    extra = activation_bytes(cfg, VOCAB, s, b, "fp32") - activation_bytes(
        cfg, VOCAB, s, b, "fp32", attention="flash_attention_2")
    # per layer: fp32 probabilities, and k and v repeated to all heads, in place of the log-sum-exp and k/v heads
    h, a, kv = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads
    assert extra == cfg.num_layers * (a * s * s * b * 4 - 4 * a * s * b + 2 * s * b * (h - h // a * kv) * 4)


@pytest.mark.parametrize("shape,precision", [(SHAPES[0], "fp32"), (LLAMA_GQA, "fp32"), (LLAMA_GQA, "bf16")],
                         ids=["bert-fp32", "llama-gqa-fp32", "llama-gqa-bf16"])
def test_eager_attention_keeps_the_probabilities(shape, precision):
    cfg, model = _model(shape, attention="eager")
    if precision == "bf16":
        model.to(torch.bfloat16)
    s, b = shape.seq, shape.micro
    measured = _saved_bytes(model, _batch(shape.arch, s, b))
    estimated = activation_bytes(cfg, VOCAB, s, b, precision, attention="eager")
    _check(measured, estimated, f"{shape} {precision} eager attention")
    assert estimated > activation_bytes(cfg, VOCAB, s, b, precision, attention="flash_attention_2")


def test_dropout_masks_one_per_dropout_element():
    """On CUDA, dropout keeps a bool mask (1 byte an element); the CPU kernel keeps its float scaling mask in the
    input's dtype (4 bytes in fp32). So CPU bytes = estimate + 3 bytes per mask element: the element count is what
    is checked. Attention dropout is off here because CPU SDPA with dropout falls back to the math kernel, which
    keeps the probabilities that CUDA's fused kernels recompute."""
    shape = SHAPES[0]
    arch, h, layers, heads, seq, micro = shape[:6]
    cfg, model = _model(shape, dropout=0.1, attention_dropout=0.0)
    without = activation_bytes(dataclasses.replace(cfg, dropout=0.0), VOCAB, seq, micro, "fp32")
    with_masks = activation_bytes(cfg, VOCAB, seq, micro, "fp32")
    mask_elements = with_masks - without
    assert mask_elements == (1 + 2 * layers) * seq * micro * h  # embeddings, then 2 per layer
    measured = _saved_bytes(model, _batch(arch, seq, micro))
    _check(measured, with_masks + 3 * mask_elements, "dropout masks as float on CPU")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_llama_dropout_only_on_attention_probabilities(precision):
    """Llama's only dropout is on the attention probabilities: nothing to keep with SDPA's fused kernels (they
    recompute the mask from the RNG seed), and with eager attention a mask and the dropped probabilities. On CPU the
    mask is a float in the model's dtype (see above), e - 1 bytes an element more than CUDA's bool."""
    shape = LLAMA_GQA
    s, b, e = shape.seq, shape.micro, 4 if precision == "fp32" else 2
    cfg, model = _model(shape, dropout=0.1, attention="eager")
    assert activation_bytes(cfg, VOCAB, s, b, "bf16") == activation_bytes(
        dataclasses.replace(cfg, dropout=0.0), VOCAB, s, b, "bf16")
    if precision == "bf16":
        model.to(torch.bfloat16)
    with_masks = activation_bytes(cfg, VOCAB, s, b, precision, attention="eager")
    mask_elements = shape.layers * shape.heads * s * s * b
    # fp32: the dropped probabilities (e) and the mask (1) on top of the softmax output; bf16: the mask only, as the
    # dropped probabilities replace the bf16 copy of the fp32 softmax output
    added = mask_elements * (1 + e if precision == "fp32" else 1)
    assert with_masks - activation_bytes(dataclasses.replace(cfg, dropout=0.0), VOCAB, s, b, precision,
                                         attention="eager") == added
    measured = _saved_bytes(model, _batch(shape.arch, s, b))
    _check(measured, with_masks + (e - 1) * mask_elements, f"{precision} attention dropout masks as float on CPU")


# ---------------------------------------------------------------------------------------------------------------------
# Model states


@pytest.mark.parametrize("num_params,nodes,gpus", [(340_000_000, 1, 1), (340_000_000, 1, 8), (340_000_000, 32, 8),
                                                   (124_439_808, 2, 8)])
def test_adam_16bit_against_deepspeed_estimators(num_params, nodes, gpus):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    largest = 38_633_472
    world = nodes * gpus
    _, ds2 = estimate_zero2_model_states_mem_needs(num_params, gpus, nodes, cpu_offload=False)
    _, ds3, _ = estimate_zero3_model_states_mem_needs(num_params, largest, gpus, nodes, cpu_offload=False)
    for precision in ("fp16", "bf16"):
        assert sum(model_state_bytes(num_params, 2, precision, "adamw", world).values()) == ds2
        ours3 = sum(model_state_bytes(num_params, 3, precision, "adamw", world, largest).values())
        # DeepSpeed's stage-3 estimate leaves out the 16-bit gradient partition (stage3.py grad_partitions_flat_buffer)
        assert ours3 == ds3 + 2 * num_params // world


def _zero_paper(P, stage, precision, optimizer, N):
    """ZeRO paper Fig. 1 for P parameters on N GPUs: (2 + 2 + K)P, 2P + 2P + KP/N, 2P + (2 + K)P/N, (2 + 2 + K)P/N,
    with the weight and gradient bytes 4 (not 2) in fp32, K = fp32 masters (16-bit only) + 4 bytes per moment,
    plus what DeepSpeed adds: an fp32 gradient partition for the step (16-bit, or any stage >= 1) and an fp32 clone
    of the weights at stages 1-3 in fp32 training."""
    w = 4 if precision == "fp32" else 2
    moments = {"adamw": 2, "lamb": 2, "lars": 1}[optimizer]
    K = (4 if w == 2 else 0) + 4 * moments
    extra = (4 if w == 2 or stage else 0) + (4 if w == 4 and stage else 0)
    return {0: (w + w + K + extra) * P,
            1: w * P + w * P + (K + extra) * P / N,
            2: w * P + (w + K + extra) * P / N,
            3: (w + w + K + extra) * P / N}[stage]


@pytest.mark.parametrize("optimizer", ["adamw", "lamb", "lars"])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_model_states_against_zero_paper(optimizer, precision, stage):
    P, N = 1_000_000, 8
    ours = model_state_bytes(P, stage, precision, optimizer, N)  # largest layer 0: the paper has no gather term
    assert sum(ours.values()) == _zero_paper(P, stage, precision, optimizer, N)
    assert ours["params"] == (4 if precision == "fp32" else 2) * (P // N if stage == 3 else P)


def test_model_states_bad_optimizer():
    with pytest.raises(ConfigError, match="optimizer.type='sgd'"):
        model_state_bytes(10, 1, "fp32", "sgd", 1)


def test_buffers_read_bucket_sizes_from_the_json():
    zero = {"reduce_bucket_size": 50_000_000, "overlap_comm": True}  # two reduce buckets
    assert buffer_bytes(zero, 2, "bf16", 10**9) == 2 * 50_000_000 * 2 + CUDA_ALLOWANCE
    assert buffer_bytes(zero, 2, "fp32", 10**9) == 2 * 50_000_000 * 4 + CUDA_ALLOWANCE
    assert buffer_bytes({"reduce_bucket_size": 1000}, 1, "fp16", 10**9) == 1000 * 2 + CUDA_ALLOWANCE  # DeepSpeed's
    # default stage-3 prefetch bucket (5e7 elements) counts when the JSON gives none
    assert buffer_bytes({"reduce_bucket_size": 1000}, 3, "fp16", 10**9) == (1000 + 50_000_000) * 2 + CUDA_ALLOWANCE


# ---------------------------------------------------------------------------------------------------------------------
# Worked by hand


# tiny, worked by hand: BERT, h = 64, L = 2, a = 2, I = 128, s = 64, vocabulary 2,000 (a multiple of 8 already),
# 2 token types, decoder tied to the word embeddings.
#   embeddings 2000*64 + 64*64 + 2*64 + LayerNorm 2*64                        = 132,352
#   a layer: q, k, v, o 4*(64*64 + 64) + LN 128 + 64*128 + 128 + 128*64 + 64 + LN 128 = 33,472, twice = 66,944
#   MLM head: transform 64*64 + 64 + LN 128 + decoder bias 2,000              = 6,288
TINY_PARAMS = 205_584
# The largest module: the decoder Linear, the tied 2000 x 64 embedding and its 2,000-element bias.
TINY_LARGEST = 130_000


def tiny_activations(micro: int) -> int:
    """tiny's activation bytes (fp32, e = 4, no dropout, SDPA's fused kernels) at `micro` sequences, term by term:
    Korthikanti et al. 2022 eq. 1 without its 5as/h term (SDPA keeps no probabilities), in fp32, written per token
    t = s*b and per masked row m = round(0.15 t)."""
    t = 64 * micro
    m = round(0.15 * t)
    layer = (8 * 64 * 4  # 8 h-wide tensors: input, q, k, v, attention out, LN1 in and out, LN2 in
             + 2 * 128 * 4  # the GELU's input and the second Linear's input, I = 128 wide
             + 2 * 8  # two LayerNorms' fp32 mean and rstd
             + 4 * 2) * t  # fp32 log-sum-exp per head
    embeddings = 8 * t + 8 * 64 + 64 * 4 * t + 8 * t  # int64 token and position ids; LN input and statistics
    head = t + m * (4 * 64 * 4 + 8 + 4 * 2000 + 8)  # bool mask; per masked row 4 h-wide inputs, LN stats, fp32
    # log-probabilities, int64 label
    logits_grad = 2 * 4 * m * 2000  # nll_loss's and log_softmax's fp32 gradients
    return 2 * layer + embeddings + head + logits_grad


def test_tiny_model_size_counted_by_hand():
    recipe = load_recipe("tiny")
    assert model_size(recipe.model, recipe.data.vocab_size)[:2] == (TINY_PARAMS, TINY_LARGEST)




def test_plan_names_the_largest_micro_batch_that_divides():
    recipe = load_recipe("tiny")  # global batch 4096, ZeRO-1 fp32, LAMB, one GPU
    # ZeRO-1 fp32 on one GPU: 4-byte weights, 4-byte gradients plus DeepSpeed's 4-byte fp32 gradient partition, and
    # 4-byte masters + two 4-byte moments: 24 bytes a parameter
    params, grads, optimizer = 4 * TINY_PARAMS, 8 * TINY_PARAMS, 12 * TINY_PARAMS
    assert (params, grads, optimizer) == (822_336, 1_644_672, 2_467_008)
    buffers = 50_000_000 * 4 + 2 * 2**30  # zero1.json's reduce bucket in fp32 (no overlap_comm), CUDA allowance
    assert tiny_activations(256) == 167_471_392 and tiny_activations(300) == 196_243_712
    at_300 = params + grads + optimizer + tiny_activations(300) + buffers
    assert at_300 == 2_548_661_376

    result = plan(recipe, 1, 1, at_300)
    assert (result.largest_fitting, result.largest_valid) == (300, 256)
    assert result.fits  # the recipe's own micro-batch, 256, is below 300
    assert result.own == Row(1, "fp32", params, grads, optimizer, tiny_activations(256), buffers,
                             params + grads + optimizer + tiny_activations(256) + buffers, True)
    assert plan(recipe, 1, 1, at_300 - 1).largest_fitting == 299


def test_bert_large_row_worked_by_hand():
    """bert_large as planned (64 GPUs, ZeRO-1 bf16, micro-batch 256 at sequence 128, dropout 0.1), every byte."""
    # embeddings 30528*1024 (30,522 padded to a multiple of 8) + 512*1024 + 2*1024 + LN 2*1024 = 31,789,056;
    # a layer 4*(1024^2 + 1024) + 2*1024 + 1024*4096 + 4096 + 4096*1024 + 1024 + 2*1024 = 12,596,224, 24 of them;
    # MLM head 1024^2 + 1024 + 2*1024 + 30,528 = 1,082,176
    P = 31_789_056 + 24 * 12_596_224 + 1_082_176
    assert P == 335_180_608
    N, s, b, h, a = 64, 128, 256, 1024, 16
    t, m, vocab = s * b, round(0.15 * s * b), 30528
    # ZeRO-1 bf16: 2-byte weights and gradients whole; the fp32 gradient partition, masters and moments split by N
    params, grads, optimizer = 2 * P, 2 * P + 4 * P // N, 12 * P // N
    # Korthikanti et al. eq. 1 per layer, 16-bit with dropout, I = 4h: s*b*h*(34 + 5as/h); SDPA's fused kernels keep
    # a 4-byte log-sum-exp per head and token instead of the 5as/h probabilities and masks, LayerNorms 2 x 8 bytes
    layer = 34 * s * b * h + 4 * a * t + 16 * t
    embeddings = 8 * (t + s) + t * h + 2 * t * h + 8 * t  # ids, dropout mask, LN input, LN statistics
    head = t + m * (4 * h * 2 + 8 + 4 * vocab + 8)
    logits_grad = 8 * m * vocab
    activations = 24 * layer + embeddings + head + logits_grad
    assert activations == 29_385_436_208
    buffers = 50_000_000 * 2 + 2 * 2**30
    total = params + grads + optimizer + activations + buffers
    assert total == 33_057_437_440  # 33.1 GB of the 80 GB

    result = plan(pinned("bert_large"), 8, 8, 80 * 10**9)
    assert result.num_params == P
    assert result.own == Row(1, "bf16", params, grads, optimizer, activations, buffers, total, True)




@pytest.mark.parametrize("zero,checkpointing,live", [
    ({}, False, TINY_PARAMS),  # far below R / 2 = 5e8 (DeepSpeed's default R = 1e9): the whole model stays gathered
    ({"stage3_max_reuse_distance": 100_000}, False, TINY_LARGEST),  # R / 2 = 50,000 < the largest layer
    ({"stage3_max_reuse_distance": 600_000}, True, 200_000),  # checkpointing: the last R / 3 stay
    ({"stage3_max_reuse_distance": 600_000}, False, TINY_PARAMS),
])
def test_zero3_weights_gathered_whole_are_those_within_the_reuse_distance(zero, checkpointing, live):
    """DeepSpeed 0.19 keeps a module's weights gathered until they recur within stage3_max_reuse_distance
    parameters of the trace (partitioned_param_coordinator.py `__params_to_release`): 2 bytes each in 16-bit beside
    the rank's partition of P / N, or the largest layer (gathered while it computes) when that is more."""
    row = Footprint(load_recipe("tiny"), 4, zero, 80 * 2**30).row(3, "bf16", 8, checkpointing)
    assert row.params == int(2 * TINY_PARAMS / 4 + 2 * live)


def test_stage0_fp16_fp32_gradients_exist_only_inside_the_step():
    """FP16_Optimizer builds its fp32 gradients in step() and drops them after it (fused_optimizer.py ~285-291, 355),
    when the backward pass has freed the activations: the peak is the larger of the two, not their sum. bf16's
    optimizer keeps its fp32 gradients from the start, so they add up."""
    P = TINY_PARAMS
    footprint = Footprint(load_recipe("tiny"), 1, {}, 80 * 2**30)
    for micro in (1, 256):
        row = footprint.row(0, "fp16", micro, False)
        assert (row.grads, row.step_grads) == (2 * P + 4 * P, 4 * P)
        assert row.total == row.params + 2 * P + row.optimizer + row.buffers + max(row.activations, 4 * P)
    bf16 = footprint.row(0, "bf16", 256, False)
    assert bf16.step_grads == 0
    assert bf16.total == bf16.params + bf16.grads + bf16.optimizer + bf16.buffers + bf16.activations
