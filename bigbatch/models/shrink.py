"""Whole rows and columns cut out of a transformers model's layers: MLP neurons, attention heads, and a model built
with fewer heads in some layers (the shape a head-pruned model was saved with).

By hand, because nothing maintained does it for these models: transformers 5 removed `prune_heads` (and the
`config.pruned_heads` that rebuilt a pruned model on loading), `torch.nn.utils.prune` only masks (the shapes and the
FLOPs stay), and torch-pruning rewrites a model through a dependency graph it traces, where each attention here is
three (GPT-2: one fused) input projections and one output projection whose head blocks we can slice directly.

A transformers config has one head count for every layer, and BERT and GPT-2 derive the head width from it, so the
per-layer counts go into the config under HEADS_KEY and `from_pretrained` here rebuilds those shapes before the
weights load (a recipe carries the same counts as `model.heads_per_layer`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

HEADS_KEY = "heads_per_layer"  # the query heads of each layer, in the config of a head-pruned model

# One side of one projection: (the module, "out" when heads are its outputs or "in" when they are its inputs,
# the width of one pruning unit there, where each of its blocks of units starts: GPT-2's fused q, k, v are three).
Slice = tuple[nn.Module, str, int, tuple[int, ...]]


def out_weight(m: nn.Module) -> torch.Tensor:
    """The weight as [outputs, inputs] (transformers' GPT-2 Conv1D stores its transpose)."""
    return m.weight if isinstance(m, nn.Linear) else m.weight.T


def keep_outputs(m: nn.Module, keep: torch.Tensor) -> None:
    """Keeps the output features `keep` (indices) of a Linear or Conv1D, with their biases."""
    if isinstance(m, nn.Linear):
        m.weight = nn.Parameter(m.weight.data[keep].clone())
        m.out_features = len(keep)
    else:
        m.weight = nn.Parameter(m.weight.data[:, keep].clone())
        m.nf = len(keep)
    if m.bias is not None:
        m.bias = nn.Parameter(m.bias.data[keep].clone())


def keep_inputs(m: nn.Module, keep: torch.Tensor) -> None:
    """Keeps the input features `keep` (indices) of a Linear or Conv1D."""
    if isinstance(m, nn.Linear):
        m.weight = nn.Parameter(m.weight.data[:, keep].clone())
        m.in_features = len(keep)
    else:
        m.weight = nn.Parameter(m.weight.data[keep].clone())
        m.nx = len(keep)


def attention_modules(hf: nn.Module, arch: str) -> list[nn.Module]:
    """Each layer's module that holds the head-count attributes."""
    if arch == "bert":
        return [layer.attention for layer in hf.bert.encoder.layer]
    if arch == "gpt2":
        return [block.attn for block in hf.transformer.h]
    return [layer.self_attn for layer in hf.model.layers]


def units(attention: nn.Module, arch: str) -> tuple[int, int]:
    """(the pruning units of one layer's attention, query heads per unit). A unit is a head, or for Llama's
    grouped-query attention a key-value head with the query heads that share it (so the groups stay whole)."""
    if arch == "bert":
        return attention.self.num_attention_heads, 1
    if arch == "gpt2":
        return attention.num_heads, 1
    return attention.k_proj.out_features // attention.head_dim, attention.num_key_value_groups


def slices(attention: nn.Module, arch: str) -> list[Slice]:
    """Where one layer's units sit in its projections."""
    if arch == "bert":
        d = attention.self.attention_head_size
        return [(attention.self.query, "out", d, (0,)), (attention.self.key, "out", d, (0,)),
                (attention.self.value, "out", d, (0,)), (attention.output.dense, "in", d, (0,))]
    if arch == "gpt2":  # c_attn's outputs: all query heads, then all keys, then all values
        d, width = attention.head_dim, attention.split_size
        return [(attention.c_attn, "out", d, (0, width, 2 * width)), (attention.c_proj, "in", d, (0,))]
    d, group = attention.head_dim, attention.num_key_value_groups
    return [(attention.q_proj, "out", d * group, (0,)), (attention.k_proj, "out", d, (0,)),
            (attention.v_proj, "out", d, (0,)), (attention.o_proj, "in", d * group, (0,))]


def unit_features(keep: torch.Tensor, width: int, starts: Sequence[int]) -> torch.Tensor:
    """The feature indices of the units `keep`, in each block that starts at `starts`."""
    within = torch.arange(width, device="cpu")  # from_pretrained builds under a meta default device
    return torch.cat([start + (u * width + within) for start in starts for u in keep.tolist()])


def keep_heads(hf: nn.Module, arch: str, kept: Sequence[torch.Tensor]) -> None:
    """Keeps, in layer i, the units kept[i] (sorted indices) of its attention: the projections sliced, the module's
    head counts updated, and each layer's query heads written into the config under HEADS_KEY."""
    counts = []
    for attention, keep in zip(attention_modules(hf, arch), kept):
        for module, side, width, starts in slices(attention, arch):
            (keep_outputs if side == "out" else keep_inputs)(module, unit_features(keep, width, starts))
        per_unit = units(attention, arch)[1]
        if arch == "bert":
            attention.self.num_attention_heads = len(keep)
            attention.self.all_head_size = len(keep) * attention.self.attention_head_size
        elif arch == "gpt2":
            attention.num_heads, attention.split_size = len(keep), len(keep) * attention.head_dim
        counts.append(len(keep) * per_unit)
    setattr(hf.config, HEADS_KEY, counts)


def shrink_heads(hf: nn.Module, arch: str, heads_per_layer: Sequence[int]) -> None:
    """Gives a freshly built model the layout of a head-pruned one: layer i keeps its first heads_per_layer[i] query
    heads (a pruned model's kept heads are renumbered from 0, so its weights then load as they were saved)."""
    kept = []
    for attention, heads in zip(attention_modules(hf, arch), heads_per_layer):
        kept.append(torch.arange(heads // units(attention, arch)[1], device="cpu"))
    keep_heads(hf, arch, kept)


def from_pretrained(cls: Any, directory: Any, **kwargs: Any) -> nn.Module:
    """`cls.from_pretrained(directory, **kwargs)` that also loads a head-pruned model: when the directory's config
    records HEADS_KEY, the model is built through a subclass whose constructor shrinks the attention first, so
    transformers' own loading (quantization included) fills the smaller shapes."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory)
    heads = getattr(config, HEADS_KEY, None)
    if not heads:
        return cls.from_pretrained(directory, **kwargs)
    # an Auto class (AutoModelForMaskedLM): the model class it would pick for this config, to subclass
    model_class = cls._model_mapping[type(config)] if hasattr(cls, "_model_mapping") else cls

    def __init__(self: nn.Module, config: Any, *args: Any, **kw: Any) -> None:
        model_class.__init__(self, config, *args, **kw)
        shrink_heads(self, config.model_type, heads)

    return type(model_class.__name__, (model_class,), {"__init__": __init__}).from_pretrained(directory, **kwargs)
