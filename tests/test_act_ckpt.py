"""Activation checkpointing changes memory, not gradients: fp32 on the CPU, dropout on, BERT, GPT-2 and Llama,
plain PyTorch and under DeepSpeed ZeRO with gradient accumulation (one process).

The recomputation must replay the dropout masks (torch.utils.checkpoint restores the RNG state it saved); the
negative control switches that off and shows the comparison would notice.
"""

from __future__ import annotations

import pytest
import torch

from bigbatch.config import ModelConfig
from bigbatch.models.build import build_model

from conftest import in_fresh_process

VOCAB = 96
SHAPES = {
    "bert": ModelConfig(arch="bert", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position=32,
                        dropout=0.1),
    "gpt2": ModelConfig(arch="gpt2", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position=32,
                        dropout=0.1),
    "llama": ModelConfig(arch="llama", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=64, max_position=32, dropout=0.1),
}


def batch(arch: str, seed: int, n: int = 4, seq: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, seq), generator=g)
    labels = ids.clone()
    if arch == "bert":
        labels[torch.rand(n, seq, generator=g) > 0.3] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def twin_models(arch: str, **kwargs) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    plain = build_model(SHAPES[arch], VOCAB, pad_id=0)
    ckpt = build_model(SHAPES[arch], VOCAB, pad_id=0, checkpointing=True)
    if kwargs:  # the same model with other checkpoint arguments (the negative control)
        ckpt.hf.activation_checkpointing_disable()
        ckpt.hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False, **kwargs})
    ckpt.load_state_dict(plain.state_dict())
    return plain.train(), ckpt.train()


def relative_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-30)) for k in a)


def grads_plain(model: torch.nn.Module, arch: str) -> dict[str, torch.Tensor]:
    model.zero_grad()
    torch.manual_seed(7)  # the dropout masks
    model(**batch(arch, 1)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", sorted(SHAPES))
def test_checkpointed_gradients_equal_plain_ones_with_dropout(arch):
    plain, ckpt = twin_models(arch)
    assert ckpt.hf.is_gradient_checkpointing and not plain.hf.is_gradient_checkpointing
    g_plain, g_ckpt = grads_plain(plain, arch), grads_plain(ckpt, arch)
    assert g_plain.keys() == g_ckpt.keys() and len(g_plain) > 10
    assert relative_gap(g_plain, g_ckpt) <= 1e-6


def test_without_rng_replay_dropout_masks_differ_and_gradients_with_them():
    plain, ckpt = twin_models("bert", preserve_rng_state=False)
    assert relative_gap(grads_plain(plain, "bert"), grads_plain(ckpt, "bert")) > 1e-3


def zero_gaps(stage: int) -> dict[str, float]:
    """DeepSpeed at world 1, ZeRO `stage`, 2 micro-batches accumulated: per architecture, the largest relative gap
    between the boundary gradients with and without checkpointing."""
    from deepspeed.utils import safe_get_full_grad

    from bigbatch.engine import initialize
    from bigbatch.optim import param_groups
    from bigbatch.run import distributed

    distributed.ensure_env()
    distributed.init()
    config = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
              "gradient_clipping": 0.0, "zero_optimization": {"stage": stage},
              "optimizer": {"type": "LAMB", "params": {"lr": 1e-3}}}
    gaps = {}
    for arch in ("bert", "gpt2"):
        grads = []
        for model in twin_models(arch):
            engine, *_ = initialize(model=model, config=config, model_parameters=param_groups(model, 0.01))
            for micro in range(2):
                engine.set_gradient_accumulation_boundary(micro == 1)
                torch.manual_seed(11 + micro)
                engine.backward(engine(**batch(arch, 10 + micro)))
            grads.append({n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()})
            engine.destroy()
        gaps[arch] = relative_gap(*grads)
    return gaps


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_checkpointed_gradients_equal_under_zero_with_accumulation(stage):
    gaps = zero_gaps(stage)
    assert all(g <= 1e-6 for g in gaps.values()), gaps


@pytest.mark.slow
def test_checkpointed_gradients_equal_under_zero3_in_a_process_of_its_own():
    gaps = in_fresh_process("zero_gaps(3)", "test_act_ckpt")
    assert set(gaps) == {"bert", "gpt2"} and all(g <= 1e-6 for g in gaps.values()), gaps
