"""bigbatch/plan/timing.py, on bigbatch/plan/hardware.py's devices, against figures written out by hand: Megatron-LM's
and PaLM's FLOP formulas, ring collective times, the ZeRO paper's volumes.

The model, and the sources it rests on.

Compute. Model FLOPs are counted matmul by matmul at the real shapes, as Megatron-LM does (Narayanan et al. 2021,
"Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM", appendix: per layer and token a
forward pass costs 24h^2 + 4sh for a 4h MLP, the logits 2hV; backward twice forward, so training is 3x forward,
F = 72 B s l h^2 (1 + s/6h + V/12lh)). Generalised here to any MLP width, SwiGLU's three matrices, grouped-query
k/v widths, and BERT's MLM head, which bigbatch runs only at the masked positions (transform h x h, then decoder
h x V; `bigbatch.models.build.MaskedLM`). Attention is counted at full s x s (no causal halving), as Megatron-LM and
PaLM (Chowdhery et al. 2022, appendix B: 6N + 12 l h s per token) both do. Activation checkpointing recomputes every
layer's forward once more (hardware FLOPs: 4x the layers); MFU counts model FLOPs only (PaLM's definition).
Time = hardware FLOPs / (dense peak of the precision x efficiency). On a GPU elementwise work is not counted: the
efficiency factor (bigbatch/plan/hardware.py, calibrated on published figures) absorbs it. The measured cpu device times
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
- stage 3: a reduce-scatter in every micro-step, and all-gathers of the weights in every micro-step: all of them in
  the forward (Ψe), then again those that do not stay gathered until their next use. A module's weights stay when
  they recur within stage3_max_reuse_distance R parameters of the forward+backward trace
  (partitioned_param_coordinator.py `__params_to_release`; stage3_max_live_parameters only bounds prefetching). A
  layer with S parameters after it recurs 2S later (3S with checkpointing: its recompute comes after each later
  layer's recompute and backward), so (1 - R / 2Ψ)Ψe (or (1 - R / 3Ψ)Ψe) is gathered again, none below Ψ = R / 2
  (measured: bench/results/zero3_checkpointing-vm.md, one all-gather a step under the default limits).
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

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as hs

from bigbatch.config import ModelConfig
from bigbatch.config.shapes import shape
from bigbatch.plan import hardware, timing
from bigbatch.plan.memory import model_size

from conftest import pinned

A100 = hardware.DEVICES["A100-80GB"]
HDR = hardware.INTERCONNECTS["hdr200"]


def test_gpt2_small_flops_per_token_are_megatrons_formula():
    # Narayanan et al. 2021 (Megatron-LM), appendix: F = 72 B s l h^2 (1 + s/(6h) + V/(12 l h)) per iteration,
    # for B = 1 sequence; GPT-2 small: s 1024, l 12, h 768, V 50,257 padded to 50,264.
    s, layers, h, V = 1024, 12, 768, 50264
    megatron = 72 * 1 * s * layers * h**2 * (1 + s / (6 * h) + V / (12 * layers * h))
    f = timing.forward_flops(shape("gpt2-124m"), 50257, s)
    assert f.model == pytest.approx(megatron, rel=1e-12)
    # the same per token, term by term: 3 x (12 layers x (24h^2 + 4sh) + 2hV)
    per_token = 3 * (12 * (24 * 768 * 768 + 4 * 1024 * 768) + 2 * 768 * 50264)
    assert per_token == 3 * (12 * (14_155_776 + 3_145_728) + 77_205_504)
    assert f.model / s == pytest.approx(per_token, rel=1e-12)


def test_gpt2_small_flops_agree_with_palms_6n_plus_attention():
    # Chowdhery et al. 2022 (PaLM), appendix B: 6N + 12 l h s per token, N every parameter (tied embeddings once).
    # It also counts biases, LayerNorms and position embeddings as matmul weights: within 1%.
    cfg = shape("gpt2-124m")
    n = model_size(cfg, 50257)[0]
    palm = 6 * n + 12 * 12 * 768 * 1024
    assert timing.forward_flops(cfg, 50257, 1024).model / 1024 == pytest.approx(palm, rel=0.01)


def test_bert_base_flops_per_sequence_written_out():
    # BERT-base at seq 128, micro-batch 1: per layer and token q, k, v (2 x 768 x 2304), output (2 x 768^2),
    # MLP (2 x 2 x 768 x 3072), scores and context (4 x 128 x 768); the MLM head at round(0.15 x 128) = 19 masked
    # rows: transform 2 x 768^2 and decoder 2 x 768 x 30,528 (30,522 padded to a multiple of 8).
    layer_token = 3_538_944 + 1_179_648 + 9_437_184 + 393_216
    assert layer_token == 14_548_992
    head_row = 1_179_648 + 46_891_008
    forward = 12 * 128 * layer_token + 19 * head_row
    f = timing.forward_flops(shape("bert-base"), 30522, 128, micro_batch=1, mlm_probability=0.15)
    assert f.layers + f.head == forward
    assert f.model == 3 * forward == 69_781_782_528
    assert f.attention == 12 * 128 * 393_216
    # activation checkpointing runs every layer's forward once more (4x the layers), not the head
    assert f.hardware(True) == 4 * 12 * 128 * layer_token + 3 * 19 * head_row


def test_model_flops_per_sample_written_out():
    """What the trainer logs MFU with: GPT-2 small at seq 1024, 3 x (12 layers x (24h^2 + 4sh) + 2hV) per token (the
    test above); BERT-base at seq 128, 3 x (12 layers x 128 tokens x 14,548,992 + the MLM head's 48,070,656 at each
    masked row): 19 rows for one sequence, 614 for a micro-batch of 32 (round(0.15 x 4,096)), shared by its 32."""
    assert timing.model_flops_per_sample(shape("gpt2-124m"), 50257, 1024) == 1024 * 854_470_656 == 874_977_951_744
    bert = shape("bert-base")
    assert timing.model_flops_per_sample(bert, 30522, 128) == 3 * (12 * 128 * 14_548_992 + 19 * 48_070_656) \
        == 69_781_782_528
    assert timing.model_flops_per_sample(bert, 30522, 128, micro_batch=32) == 69_808_822_272
    # one sequence by default: round(0.15 x 64) = 10 masked rows (a micro-batch of 2 would round 19.2 to 19)
    assert timing.model_flops_per_sample(bert, 30522, 64) == 3 * (12 * 64 * (24 * 768**2 + 4 * 64 * 768)
                                                                  + 10 * 48_070_656)
    # a recipe's own MLM share reaches the head: round(0.3 x 4,096) = 1,229 masked rows of the 32 sequences
    assert timing.model_flops_per_sample(bert, 30522, 128, 32, 0.3) == pytest.approx(
        3 * (12 * 128 * 14_548_992 + 1229 * 48_070_656 / 32), rel=1e-15)


def test_llama_flops_count_grouped_kv_and_swiglu():
    # TinyLlama 1.1B: 32 heads of 64, 4 k/v heads -> k and v 256 wide; SwiGLU three 2048 x 5632 matrices; causal LM
    # head at every position, vocabulary 32,000.
    h, kv, f, s = 2048, 256, 5632, 2048
    per_token_layer = 2 * h * h + 2 * 2 * h * kv + 2 * h * h + 3 * 2 * h * f + 4 * s * h
    assert per_token_layer == 8_388_608 + 2_097_152 + 8_388_608 + 69_206_016 + 16_777_216
    forward = 22 * s * per_token_layer + s * 2 * h * 32000
    assert timing.forward_flops(shape("llama-1.1b"), 32000, s).layers + \
        timing.forward_flops(shape("llama-1.1b"), 32000, s).head == forward


def test_ring_collective_times_written_out():
    # 8 ranks, 1 GB, 100 GB/s, no latency: all-reduce 2 x 7/8 x 1e9 / 1e11 = 17.5 ms; reduce-scatter and all-gather
    # 7/8 x 1e9 / 1e11 = 8.75 ms. A latency of 5 us per hop adds 2 x 7 and 7 hops.
    assert timing.collective_time("all_reduce", 1e9, 8, 1e11, 0) == pytest.approx(0.0175)
    assert timing.collective_time("reduce_scatter", 1e9, 8, 1e11, 0) == pytest.approx(0.00875)
    assert timing.collective_time("all_gather", 1e9, 8, 1e11, 0) == pytest.approx(0.00875)
    assert timing.collective_time("all_reduce", 1e9, 8, 1e11, 5e-6) == pytest.approx(0.0175 + 14 * 5e-6)
    assert timing.collective_time("all_reduce", 1e9, 1, 1e11, 5e-6) == 0


def test_bus_bandwidth_nvlink_in_a_node_nics_across():
    # A100 NVLink 600 GB/s both ways -> 300 one way; 8 HDR NICs x 25 GB/s = 200 GB/s leave a DGX A100.
    assert timing.bus_bandwidth(A100, HDR, 1, 8) == 300e9
    assert timing.bus_bandwidth(A100, HDR, 4, 8) == 8 * 25e9
    assert timing.bus_bandwidth(A100, HDR, 4, 2) == 2 * 25e9
    eth = hardware.INTERCONNECTS["eth100"]  # one 100 Gb/s port per node, shared
    assert timing.bus_bandwidth(A100, eth, 2, 8) == 12.5e9


def _workload(stage: int, zero: dict | None = None, precision: str = "bf16", num_params: int = 100_000_000,
              checkpointing: bool = False) -> timing.Workload:
    return timing.Workload(shape("bert-base"), 30522, 0.15, num_params, stage, precision, checkpointing,
                           zero or {}, "lamb")


@pytest.mark.parametrize("stage,accum,volume", [
    # bytes every rank sends per step, in units of (n-1)/n x Psi x 2 bytes (ZeRO paper, sec. 7: stages 1 and 2 move
    # what data parallelism does, 2 Psi; stage 3 1.5x that). With accumulation a: stages 0-1 reduce once a step,
    # stage 2 reduce-scatters every micro-step, stage 3 also gathers the weights every micro-step.
    (0, 1, 2), (1, 1, 2), (2, 1, 2), (3, 1, 2), (0, 4, 2), (1, 4, 2), (2, 4, 4 + 1), (3, 4, 4 * 2),
])
def test_communication_volume_per_zero_stage(stage, accum, volume):
    n, psi, bw = 16, 100_000_000, 1e11
    w = _workload(stage, {"overlap_comm": False})
    net = dataclasses.replace(HDR, latency=0.0)
    dev = dataclasses.replace(A100, intra_node_bandwidth=bw)
    st = timing.step_time(w, timing.Cluster(1, n, dev, net), 128, 8, accum)
    per_rank_bytes = volume * (n - 1) / n * psi * 2
    hops = volume * (n - 1)  # a ring all-reduce takes 2(n-1) hops, a reduce-scatter or all-gather n-1
    assert st.comm_total_s == pytest.approx(per_rank_bytes / bw + hops * timing.INTRA_LATENCY, rel=1e-9)
    assert st.comm_s == pytest.approx(st.comm_total_s)  # nothing overlaps with overlap_comm false


@pytest.mark.parametrize("num_params,checkpointing,gathers", [
    # the audit's case: 1.1B parameters at DeepSpeed's default R = 1e9 gather 1 + (1 - 1e9 / 2.2e9) = 1.545 models
    (1_100_000_000, False, 1 + (1 - 1e9 / 2.2e9)),
    (1_100_000_000, True, 1 + (1 - 1e9 / 3.3e9)),
    (500_000_000, False, 1.0),  # R / 2: the whole model stays gathered from its forward to its backward use
    (700_000_000, False, 1 + (1 - 1e9 / 1.4e9)),  # within stage3_max_live_parameters' 1e9, yet gathered again
    (333_333_333, True, 1.0),
    (10_000_000_000, False, 1.95),
])
def test_stage3_gathers_again_what_the_reuse_distance_lets_go(num_params, checkpointing, gathers):
    n, bw = 8, 1e11
    c = timing.Cluster(1, n, dataclasses.replace(A100, intra_node_bandwidth=bw), dataclasses.replace(HDR, latency=0))
    zero = {"overlap_comm": False}
    st = timing.step_time(_workload(3, zero, num_params=num_params, checkpointing=checkpointing), c, 128, 8, 1)
    rs = (n - 1) / n * num_params * 2 / bw + (n - 1) * timing.INTRA_LATENCY
    hops = (n - 1) * timing.INTRA_LATENCY * (1 if gathers == 1 else 2)
    assert st.comm_total_s == pytest.approx(rs + gathers * (n - 1) / n * num_params * 2 / bw + hops, rel=1e-9)


def test_stage3_max_live_parameters_does_not_decide_the_gathers():
    c = timing.Cluster(1, 8, dataclasses.replace(A100, intra_node_bandwidth=1e11), HDR)
    base = timing.step_time(_workload(3, {"overlap_comm": False}), c, 128, 8, 1).comm_total_s
    live = timing.step_time(_workload(3, {"overlap_comm": False, "stage3_max_live_parameters": 1000}), c, 128, 8,
                            1).comm_total_s
    short = timing.step_time(_workload(3, {"overlap_comm": False, "stage3_max_reuse_distance": 0}), c, 128, 8,
                             1).comm_total_s
    assert live == base  # 1e8 parameters, below R / 2: one gather a micro-step whatever the live limit
    rs = 7 / 8 * 2e8 / 1e11 + 7 * timing.INTRA_LATENCY
    assert short == pytest.approx(base + (base - rs))  # R = 0: the backward gathers the whole model again


def test_overlap_hides_a_reduction_behind_backward_except_the_last_bucket():
    c = timing.Cluster(1, 8, A100, HDR)
    psi = 100_000_000
    plain = timing.step_time(_workload(2, {"overlap_comm": False}), c, 128, 32, 1)
    hidden = timing.step_time(_workload(2, {"overlap_comm": True, "reduce_bucket_size": psi // 4}), c, 128, 32, 1)
    rs = timing.collective_time("reduce_scatter", psi * 2, 8, 300e9, timing.INTRA_LATENCY)
    ag = timing.collective_time("all_gather", psi * 2, 8, 300e9, timing.INTRA_LATENCY)
    assert plain.comm_s == pytest.approx(rs + ag)
    assert hidden.comm_s == pytest.approx(rs / 4 + ag)  # backward (tens of ms) hides 3 of the 4 buckets
    # a network too slow to hide behind backward: what exceeds the backward shows
    slow = dataclasses.replace(A100, intra_node_bandwidth=1e8)
    st = timing.step_time(_workload(2, {"overlap_comm": True, "reduce_bucket_size": psi // 4}),
                          timing.Cluster(1, 8, slow, HDR), 128, 32, 1)
    rs = timing.collective_time("reduce_scatter", psi * 2, 8, 1e8, timing.INTRA_LATENCY)
    ag = timing.collective_time("all_gather", psi * 2, 8, 1e8, timing.INTRA_LATENCY)
    backward = st.compute_s * 2 / 3
    assert st.comm_s == pytest.approx(rs / 4 + (rs * 3 / 4 - backward) + ag)


def test_compute_and_optimizer_time_written_out():
    # BERT-base, seq 128, micro 32 x accum 4 on one A100, bf16 at 312 TFLOP/s x 0.5; LAMB at stage 1 on 1 rank:
    # 40 B of its two passes + 4 (clipping norm) + 6 (16-bit grads to fp32) + 6 (masters back to 16-bit) a parameter.
    dev = dataclasses.replace(A100, efficiency=0.5)
    w = _workload(1, num_params=110_000_000)
    st = timing.step_time(w, timing.Cluster(1, 1, dev, HDR), 128, 32, 4)
    forward = 32 * 12 * 128 * 14_548_992 + round(0.15 * 128 * 32) * 48_070_656
    assert st.compute_s == pytest.approx(4 * 3 * forward / (312e12 * 0.5), rel=1e-12)
    assert st.optimizer_s == pytest.approx((40 + 4 + 6 + 6) * 110_000_000 / 2039e9, rel=1e-12)
    assert st.comm_total_s == 0
    # ZeRO-1 on 8 ranks: each steps one eighth of the parameters
    st8 = timing.step_time(w, timing.Cluster(1, 8, dev, HDR), 128, 32, 4)
    assert st8.optimizer_s == pytest.approx(st.optimizer_s / 8)
    assert timing.step_time(_workload(0, num_params=110_000_000), timing.Cluster(1, 8, dev, HDR), 128, 32,
                            4).optimizer_s == pytest.approx(st.optimizer_s)


def test_estimate_sums_every_step_of_every_phase_and_mfu_is_model_flops_over_peak():
    recipe = pinned("bert_large")
    est = timing.estimate(recipe, timing.Cluster(8, 8, A100, HDR))
    assert [p.steps for p in est.phases] == [7038, 1563]
    assert [(p.seq_len, p.global_batch) for p in est.phases] == [(128, 65536), (512, 32768)]
    assert est.time_to_train_s == pytest.approx(sum(p.time_s for p in est.phases))
    for p in est.phases:
        d = est.phase_dict(p)
        assert d["step_time_s"] == pytest.approx(d["compute_s"] + d["comm_s"] + d["optimizer_s"])
        assert d["samples_per_s"] == pytest.approx(p.global_batch / d["step_time_s"])
        per_seq = timing.forward_flops(recipe.model, 30522, p.seq_len, p.micro_batch).model / p.micro_batch
        assert d["mfu"] == pytest.approx(d["samples_per_s"] * per_seq / (64 * 312e12))
        assert d["mfu"] <= A100.efficiency
        # the record `bigbatch plan --json` writes: every key, each from the phase it describes
        assert {k: d[k] for k in ("phase", "seq_len", "global_batch", "micro_batch", "grad_accum", "steps",
                                  "time_s", "compute_s", "comm_s", "comm_total_s", "optimizer_s")} == {
            "phase": p.phase, "seq_len": p.seq_len, "global_batch": p.global_batch, "micro_batch": p.micro_batch,
            "grad_accum": p.grad_accum, "steps": p.steps, "time_s": p.time_s, "compute_s": p.compute_s,
            "comm_s": p.comm_s, "comm_total_s": p.comm_total_s, "optimizer_s": p.optimizer_s}
        assert len(d) == 18 and d["step_time_s"] * p.steps == pytest.approx(p.time_s)
        assert d["tokens_per_s"] == pytest.approx(d["samples_per_s"] * p.seq_len)
        shares = [d[f"{k}_share"] for k in ("compute", "comm", "optimizer")]
        assert shares == pytest.approx([d[f"{k}_s"] / d["step_time_s"] for k in ("compute", "comm", "optimizer")])
        assert sum(shares) == pytest.approx(1.0) and min(shares) > 0


def test_every_shipped_recipe_gets_a_time_on_every_gpu():
    for name in ("tiny", "bert_base", "bert_large", "bert_large_32k", "gpt2_small", "gpt2_medium", "gpt2_xl",
                 "llama_1b"):
        r = pinned(name)
        for gpu in hardware.DEVICES:
            est = timing.estimate(r, timing.Cluster(r.cluster.nodes, r.cluster.gpus_per_node,
                                                    hardware.DEVICES[gpu], hardware.INTERCONNECTS["ndr400"]))
            assert est.time_to_train_s > 0 and all(0 < est.mfu(p) < 1 for p in est.phases), (name, gpu)


def test_faster_device_and_network_give_shorter_times():
    r = pinned("gpt2_xl")
    times = [timing.estimate(r, timing.Cluster(16, 8, hardware.DEVICES[g], HDR)).time_to_train_s
             for g in ("A100-40GB", "H100-SXM", "B200")]
    assert times == sorted(times, reverse=True)












def test_cpu_device_from_an_injected_probe():
    # matmuls at 50 GFLOP/s, attention at 20, 1 ns per elementwise pass per element (forward 1, backward 2)
    probe = hardware.CpuProbe(flops=50e9, attention_flops=20e9, elementwise_s=1e-9, bandwidth=10e9, threads=1,
                              seconds=0.0)
    dev = hardware.measure_cpu(2, probe_fn=lambda threads, shapes, ranks: probe)
    assert dev.peak_flops == {"fp32": 50e9, "fp16": 50e9, "bf16": 50e9}
    assert dev.memory_bandwidth == 10e9 and dev.efficiency == 1.0
    w = _workload(1, precision="fp32", num_params=200_000)
    st = timing.step_time(w, timing.Cluster(1, 2, dev, hardware.INTERCONNECTS["loopback"]), 64, 8, 2)
    # BERT-base, 8 x 64 = 512 tokens: per layer and token 768 x (2 LayerNorm + 2 residual + 4 head reshapes + 2
    # dropouts) + 3,072 GELU = 10,752 elements; besides the layers, 3 x 768 per token (embedding sum and LayerNorm)
    # and, at round(0.15 x 512) = 77 masked rows, 2 x 768 (head GELU, LayerNorm) + 3 x 30,528 (log-softmax)
    layers = 12 * 512 * 10_752
    rest = 512 * 3 * 768 + 77 * (2 * 768 + 3 * 30_528)
    f = timing.forward_flops(shape("bert-base"), 30522, 64, 8)
    attention = 3 * 12 * 512 * 4 * 64 * 768
    assert 3 * f.attention == attention
    micro = (f.model - attention) / 50e9 + attention / 20e9 + 3 * (layers + rest) * 1e-9
    assert st.compute_s == pytest.approx(2 * micro, rel=1e-12)


















# Every precision x ZeRO stage x one or several nodes x optimizer, against the model of the module docstring written
# out once more here: ring times over NVLink one way (A100: 300 GB/s, 2 us a hop) in a node, and over the node's
# 8 HDR NICs (8 x 25 GB/s, HDR's 5 us a hop) across nodes; e bytes per element; the optimizer's bytes per parameter.
ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
OPTIMIZER_BYTES = {"lamb": 24 + 16, "lars": 8 + 20, "adamw": 28}


@pytest.mark.parametrize("optimizer", ["lamb", "lars", "adamw"])
@pytest.mark.parametrize("nodes", [1, 2, 4])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_step_time_over_the_whole_domain_written_out(precision, stage, nodes, optimizer):
    psi, accum, n = 100_000_000, 3, nodes * 8
    w = dataclasses.replace(_workload(stage, {"overlap_comm": False}, precision=precision, num_params=psi),
                            optimizer=optimizer)
    st = timing.step_time(w, timing.Cluster(nodes, 8, A100, HDR), 128, 8, accum)
    bandwidth, latency = (300e9, 2e-6) if nodes == 1 else (8 * 25e9, 5e-6)
    one_way = (n - 1) / n * psi * ELEMENT_BYTES[precision] / bandwidth + (n - 1) * latency  # a reduce-scatter
    rounds = {0: 2, 1: 1 + 1, 2: accum + 1, 3: accum * 2}[stage]  # all-reduce = two; stage 3: RS + AG each micro
    assert st.comm_total_s == pytest.approx(rounds * one_way, rel=1e-9)
    assert st.comm_s == pytest.approx(st.comm_total_s, rel=1e-9)
    per_param = OPTIMIZER_BYTES[optimizer] + 4 + (0 if precision == "fp32" else 2 + 4 + 4 + 2)
    local = psi / n if stage else psi
    assert st.optimizer_s == pytest.approx(per_param * local / 2039e9, rel=1e-12)


def test_stage3_all_gathers_are_prefetched_behind_compute():
    """overlap_comm defaults on at stage 3: with a backward far longer than the collectives, only the last bucket of
    the reduce-scatter and the first prefetch bucket of the all-gather show."""
    psi = 100_000_000
    w = _workload(3, {"reduce_bucket_size": psi // 4, "stage3_prefetch_bucket_size": psi // 5}, num_params=psi)
    st = timing.step_time(w, timing.Cluster(1, 8, A100, HDR), 128, 32, 1)
    rs = 7 / 8 * psi * 2 / 300e9 + 7 * 2e-6
    assert st.comm_total_s == pytest.approx(2 * rs, rel=1e-9)
    assert st.comm_s == pytest.approx(rs / 4 + rs / 5, rel=1e-9)


def test_mfu_is_model_flops_written_out_over_peak():
    """BERT-large (l 24, h 1024, MLP 4h, vocabulary padded to 30528), Megatron-LM's count per token and layer
    24h^2 + 4sh, the MLM head (2h^2 + 2hV) at the masked positions only, training 3x forward: MFU = samples/s x that
    / (64 A100s x 312 TFLOP/s), not read back from timing.forward_flops."""
    est = timing.estimate(pinned("bert_large"), timing.Cluster(8, 8, A100, HDR))
    h, layers, vocab = 1024, 24, 30528
    for p in est.phases:
        d = est.phase_dict(p)
        s, mb = p.seq_len, p.micro_batch
        per_seq = 3 * (layers * s * (24 * h * h + 4 * s * h) + round(0.15 * s * mb) / mb * (2 * h * h + 2 * h * vocab))
        assert d["mfu"] == pytest.approx(d["samples_per_s"] * per_seq / (64 * 312e12), rel=1e-9)


def test_zero_collectives_rows_as_deepspeed_sends_them():
    """Each stage's rows (kind, bytes, overlappable) as the module docstring reads them from DeepSpeed 0.19: the
    stage 1-2 all-gather after the step and stage 0's all-reduce never overlap; `reduce_scatter: false` makes the
    reduction an all-reduce; at stage 3 a model within half stage3_max_reuse_distance (a third with checkpointing)
    is gathered once per micro-step, and beyond it the share past R/2 (R/3) is gathered again."""
    psi = 1000
    rows = lambda stage, zero, ckpt=False: timing.zero_collectives(stage, 500, 2, zero, ckpt)  # noqa: E731
    on = {"overlap_comm": True}
    assert rows(0, on) == timing.Comm((), (("all_reduce", psi, False),))
    assert rows(1, on) == timing.Comm((), (("reduce_scatter", psi, True), ("all_gather", psi, False)))
    assert rows(1, {"reduce_scatter": False}) == timing.Comm((), (("all_reduce", psi, False),
                                                                  ("all_gather", psi, False)))
    assert rows(2, on) == timing.Comm((("reduce_scatter", psi, True),), (("all_gather", psi, False),))
    assert rows(3, {"stage3_max_reuse_distance": 1000}) == timing.Comm(
        (("reduce_scatter", psi, True), ("all_gather", psi, True)), ())
    *first, (kind, again, overlapped) = rows(3, {"stage3_max_reuse_distance": 999}, ckpt=True).per_micro
    assert first == [("reduce_scatter", psi, True), ("all_gather", psi, True)]
    assert (kind, overlapped) == ("all_gather", True) and again == pytest.approx((1 - 999 / (3 * 500)) * psi)
    with pytest.raises(ValueError, match=r"^zero_optimization.stage=5 is not one of 0, 1, 2, 3\.$"):
        rows(5, {})


def test_two_ranks_communicate_and_unknown_names_are_refused():
    assert timing.collective_time("all_reduce", 1e9, 2, 1e11, 0) == pytest.approx(1e9 / 1e11)
    assert timing.collective_time("all_gather", 1e9, 2, 1e11, 1e-6) == pytest.approx(0.5e9 / 1e11 + 1e-6)
    with pytest.raises(ValueError, match=r"^unknown collective 'broadcast'$"):
        timing.collective_time("broadcast", 1e9, 2, 1e11, 0)
    with pytest.raises(ValueError, match=r"^optimizer.type='sgd' has no step-time model; use one of lamb, lars, "
                                         r"adamw\.$"):
        timing.optimizer_bytes_per_param("sgd", "fp32")


def test_estimate_of_a_phase_of_one_batch_is_its_step_time_times_its_steps():
    """Per phase of one batch size (bert_large's two, no ramp), every figure of the estimate is the step time model's
    for that phase's batch split, written out: the means per step equal one step's, totals are steps times one
    step; phases are numbered from 1 and the split multiplies to the global batch."""
    from bigbatch.resolve import resolve

    recipe, cluster = pinned("bert_large"), timing.Cluster(8, 8, A100, HDR)
    est = timing.estimate(recipe, cluster)
    w = timing.workload(resolve(recipe, cluster.world))
    assert [p.phase for p in est.phases] == [1, 2]
    for p in est.phases:
        assert p.micro_batch * p.grad_accum * cluster.world == p.global_batch and p.samples == p.steps * p.global_batch
        st = timing.step_time(w, cluster, p.seq_len, p.micro_batch, p.grad_accum)
        assert (p.compute_s, p.comm_s, p.comm_total_s, p.optimizer_s) == pytest.approx(
            (st.compute_s, st.comm_s, st.comm_total_s, st.optimizer_s), rel=1e-12)
        assert p.comm_total_s > 0
        assert (p.time_s, p.model_flops) == pytest.approx((p.steps * st.step_s, p.steps * st.model_flops), rel=1e-9)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compute_with_and_without_checkpointing_written_out(checkpointing):
    """One micro-step's compute on a device with measured attention and elementwise rates: every layer's forward
    (matmuls, the s x s attention terms and the elementwise passes) runs 3 times, 4 with activation checkpointing (its
    forward again in the backward); the head's 3 times; MLM masking as the workload says (0.3 here, not the default)."""
    dev = dataclasses.replace(A100, attention_flops=50e12, elementwise_s=1e-12)
    w = dataclasses.replace(_workload(1, checkpointing=checkpointing), mlm_probability=0.3)
    c = timing.Cluster(1, 8, dev, HDR)
    f = timing.forward_flops(w.model, w.vocab_size, 128, 8, 0.3)
    layers, rest = timing.elementwise_passes(w.model, w.vocab_size, 128, 8, 0.3)
    k = 4 if checkpointing else 3
    rate = dev.peak_flops["bf16"] * dev.efficiency
    micro = ((k * f.layers + 3 * f.head - k * f.attention) / rate + k * f.attention / (50e12 * dev.efficiency)
             + (k * layers + 3 * rest) * 1e-12)
    st = timing.step_time(w, c, 128, 8, 2)
    assert st.compute_s == pytest.approx(2 * micro, rel=1e-12)
    assert st.hardware_flops == pytest.approx(8 * 2 * (k * f.layers + 3 * f.head), rel=1e-12)
    assert st.model_flops == pytest.approx(8 * 2 * 3 * (f.layers + f.head), rel=1e-12)
    assert f.head != timing.forward_flops(w.model, w.vocab_size, 128, 8).head  # the MLM share changes the head


# The forward pass's elementwise passes under the time model's counting rules (`elementwise_passes`' docstring: one
# pass per op over its output; matmuls, views and the s x s attention terms not counted), itemized by transformers'
# module names, per token of every layer and per token (BERT: per masked row) of the rest. Distinct widths, so that
# a wrong coefficient on any one op shows. These are the model's rules, not torch's op count: a trace of one forward
# under TorchDispatchMode differs from them in known ways (bench/results/mutation.md, section 3c).
def _elementwise_written_out(arch: str, h: int, f: int, kv: int, v: int, dropout: float) -> tuple[dict, dict]:
    """(per token of a layer, besides the layers: {name: (elements per row, which rows)}) for one architecture."""
    if arch == "llama":  # LlamaDecoderLayer: RMSNorm = pow(2), mean, x * rsqrt, weight * x; rotary on q and k
        layer = {"input_layernorm": 4 * h, "post_attention_layernorm": 4 * h, "residual adds": 2 * h,
                 "silu(gate_proj)": f, "silu * up_proj": f, "rotary on q (x*cos, rotate_half: slice, neg, cat, "
                 "x*sin, add)": 5 * h, "rotary on k": 5 * kv, "q, k, v, context head reshapes": 4 * h}
        rest = {"final norm": (4 * h, "tokens"), "log-softmax of the loss": (3 * v, "tokens")}
    elif arch == "gpt2":  # GPT2Block: ln_1, attn, resid_dropout + add, ln_2, gelu_new, resid_dropout + add
        layer = {"ln_1": h, "ln_2": h, "residual adds": 2 * h, "gelu_new (0.5x(1+tanh(c(x+0.044715x^3))))": 7 * f,
                 "q, k, v, context head reshapes": 4 * h, "two resid_dropouts": 2 * h if dropout > 0 else 0}
        rest = {"wte + wpe": (h, "tokens"), "ln_f": (h, "tokens"), "log-softmax of the loss": (3 * v, "tokens")}
    else:  # BertLayer: self-attention, output dense + dropout + add + LayerNorm, intermediate GELU, the same again
        layer = {"attention.output.LayerNorm": h, "output.LayerNorm": h, "residual adds": 2 * h, "gelu": f,
                 "q, k, v, context head reshapes": 4 * h, "two hidden dropouts": 2 * h if dropout > 0 else 0}
        rest = {"word + position + token type, LayerNorm": (3 * h, "tokens"),
                "cls.predictions.transform: gelu, LayerNorm": (2 * h, "masked"),
                "log-softmax of the loss": (3 * v, "masked")}
    return layer, rest


@settings(max_examples=60, deadline=None)
@given(arch=hs.sampled_from(["bert", "gpt2", "llama"]), head_dim=hs.integers(1, 13), heads=hs.integers(1, 7),
       kv_heads=hs.integers(0, 7), layers=hs.integers(1, 5), f=hs.integers(1, 97), s=hs.integers(1, 41),
       micro=hs.integers(1, 9), vocab=hs.integers(1, 300), pad=hs.integers(1, 16),
       dropout=hs.sampled_from([0.0, 0.1, 0.5]), mlm=hs.floats(0, 1))
@example("llama", 7, 5, 1, 3, 89, 17, 1, 101, 8, 0.0, 0.15)  # micro-batch 1; grouped-query k/v
@example("llama", 11, 3, 0, 2, 29, 13, 3, 97, 1, 0.1, 0.15)  # num_kv_heads 0: k and v as wide as q
@example("gpt2", 7, 3, 0, 2, 53, 17, 3, 101, 8, 0.0, 0.15)  # dropout 0: no dropout pass
@example("gpt2", 7, 3, 0, 2, 53, 17, 3, 101, 8, 0.1, 0.15)
@example("bert", 5, 3, 0, 2, 43, 19, 3, 101, 8, 0.0, 0.0)  # mlm_probability 0: no MLM head pass
@example("bert", 5, 3, 0, 2, 43, 19, 3, 101, 8, 0.1, 1.0)  # every row masked
@example("bert", 5, 3, 0, 2, 43, 19, 1, 101, 8, 0.1, 0.15)  # the defaults
def test_elementwise_passes_op_by_op(arch, head_dim, heads, kv_heads, layers, f, s, micro, vocab, pad, dropout, mlm):
    h = head_dim * heads
    model = ModelConfig(arch=arch, hidden_size=h, num_layers=layers, num_heads=heads,
                        num_kv_heads=kv_heads if arch == "llama" else 0, intermediate_size=f, dropout=dropout,
                        pad_vocab_to_multiple=pad)
    kv = head_dim * (kv_heads if arch == "llama" and kv_heads else heads)
    v = -(-vocab // pad) * pad  # embedding rows padded up to the multiple
    tokens = s * micro
    rows = {"tokens": tokens, "masked": round(mlm * tokens)}  # BERT's head runs at the masked rows only
    layer, rest = _elementwise_written_out(arch, h, f, kv, v, dropout)
    expected = (layers * tokens * sum(layer.values()), sum(n * rows[which] for n, which in rest.values()))
    assert timing.elementwise_passes(model, vocab, s, micro, mlm) == expected
    if (micro, mlm) == (1, 0.15):  # the defaults: one sequence, BERT's 15% masking
        assert timing.elementwise_passes(model, vocab, s) == expected


def test_estimate_under_a_batch_ramp_sums_each_steps_own_split():
    """gpt2_xl's ramp (512 to 4,096 sequences by 512 over 2M samples, micro-batch 4) on 128 A100s: the phase's time,
    samples, FLOPs and per-step means are sums over its steps, each at its own split (accumulation 1 to 8); the
    phase reports the ramp's target batch and its split."""
    from bigbatch.resolve import resolve

    recipe, cluster = pinned("gpt2_xl"), timing.Cluster(16, 8, A100, HDR)
    w = timing.workload(resolve(recipe, cluster.world))
    # steps per accumulation: each of the 7 ramp batches 512 k takes 2M / 7 samples (rounded up to whole steps)
    steps = {1: 559, 2: 279, 3: 186, 4: 140, 5: 112, 6: 93, 7: 80, 8: 8151}
    one = {k: timing.step_time(w, cluster, 1024, 4, k) for k in steps}
    (p,) = timing.estimate(recipe, cluster).phases
    assert (p.phase, p.seq_len, p.global_batch, p.micro_batch, p.grad_accum) == (1, 1024, 4096, 4, 8)
    assert (p.steps, p.samples) == (9600, sum(n * 512 * k for k, n in steps.items()))
    total = lambda field: sum(n * getattr(one[k], field) for k, n in steps.items())  # noqa: E731
    assert p.time_s == pytest.approx(total("step_s"), rel=1e-12)
    assert p.model_flops == pytest.approx(total("model_flops"), rel=1e-12)
    assert (p.compute_s, p.comm_s, p.comm_total_s, p.optimizer_s) == pytest.approx(
        tuple(total(f) / 9600 for f in ("compute_s", "comm_s", "comm_total_s", "optimizer_s")), rel=1e-12)
    assert p.comm_s != pytest.approx(one[8].comm_s)  # the ramp's short steps count, not only the target's


def test_estimate_takes_the_first_phases_batch_split_as_given():
    """`batch` replaces the recipe's split of the first phase (the planner's tabulated micro-batches)."""
    from bigbatch.config.schedule import BatchSplit

    recipe, cluster = pinned("bert_large"), timing.Cluster(8, 8, A100, HDR)
    first, second = timing.estimate(recipe, cluster, BatchSplit(65536, 128, 8, 64)).phases
    assert (first.global_batch, first.micro_batch, first.grad_accum) == (65536, 128, 8)
    assert (second.micro_batch, second.grad_accum) == (32, 16)  # the recipe's own


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_reduction_overlaps_the_backward_with_its_recompute(checkpointing):
    """The window a stage-2 reduce-scatter hides behind is the micro-step's backward: 2 of its 3 forward-equivalents,
    3 of 4 with checkpointing (the recompute runs in the backward). A network too slow to hide it shows the excess."""
    slow = dataclasses.replace(A100, intra_node_bandwidth=1e8)
    psi = 100_000_000
    w = _workload(2, {"overlap_comm": True, "reduce_bucket_size": psi // 4}, checkpointing=checkpointing)
    st = timing.step_time(w, timing.Cluster(1, 8, slow, HDR), 128, 32, 1)
    rs = 7 / 8 * psi * 2 / 1e8 + 7 * 2e-6
    backward = st.compute_s * (3 / 4 if checkpointing else 2 / 3)
    assert 0 < backward < rs * 3 / 4
    assert st.comm_s == pytest.approx(rs / 4 + (rs * 3 / 4 - backward) + rs, rel=1e-12)  # + the all-gather


def test_a_phases_flops_are_its_steps_exactly_and_the_workload_is_the_recipes():
    """tiny on one GPU: 60 steps of 160 GFLOP, whole numbers far below 2^53, so the phase's sum is exact; the workload
    carries the recipe's settings and its parameter count (the model built on the meta device, counted here)."""
    import torch

    from bigbatch.models.build import build_model
    from bigbatch.resolve import resolve

    recipe, cluster = pinned("tiny"), timing.Cluster(1, 1, A100, HDR)
    w = timing.workload(resolve(recipe, cluster.world))
    with torch.device("meta"):
        params = sum(p.numel() for p in build_model(recipe.model, 2000, pad_id=0).parameters())
    assert (w.model, w.vocab_size, w.mlm_probability, w.num_params, w.optimizer) == (
        recipe.model, 2000, recipe.data.mlm_probability, params, "lamb")
    (p,) = timing.estimate(recipe, cluster).phases
    st = timing.step_time(w, cluster, 64, 256, 16)
    assert p.steps == 60 and p.model_flops == 60 * st.model_flops


def test_stage3_rows_overlap_together_behind_one_backward():
    """At stage 3 a micro-step's reduce-scatter and all-gather hide behind the same backward: on a network too slow
    for it, what of both (less the last bucket and the first prefetch) exceeds the backward shows."""
    slow = dataclasses.replace(A100, intra_node_bandwidth=1e8)
    psi = 100_000_000
    w = _workload(3, {"reduce_bucket_size": psi // 4, "stage3_prefetch_bucket_size": psi // 5}, num_params=psi)
    st = timing.step_time(w, timing.Cluster(1, 8, slow, HDR), 128, 32, 1)
    one = 7 / 8 * psi * 2 / 1e8 + 7 * 2e-6  # a reduce-scatter or an all-gather of the model
    backward = st.compute_s * 2 / 3
    assert st.comm_total_s == pytest.approx(2 * one, rel=1e-12)
    assert st.comm_s == pytest.approx(one / 4 + one / 5 + (one * 3 / 4 + one * 4 / 5 - backward), rel=1e-12)
