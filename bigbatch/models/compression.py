"""Model compression after pretraining: magnitude pruning (global unstructured over the Linear weights, whole MLP
neurons or whole attention heads removed) and post-training int8 quantization with torchao, on a transformers model.

Unstructured pruning is torch's own (`torch.nn.utils.prune.global_unstructured`, L1 magnitude), made permanent. Neuron
and head pruning choose by hand what `bigbatch.models.shrink` cuts out (why by hand is said there). Quantization is
torchao's `quantize_` (the eager `torch.ao.quantization` API is deprecated); torchao 0.18.0 with torch 2.13 runs both
int8 configurations on CPU."""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from bigbatch.config import ConfigError
from bigbatch.models.shrink import (
    HEADS_KEY,
    attention_modules,
    from_pretrained,
    keep_heads,
    keep_inputs,
    keep_outputs,
    out_weight,
    slices,
    units,
)

PRUNE_KINDS = ("unstructured", "heads", "neurons")
QUANTIZE = ("none", "int8-weight", "int8-dynamic")


def prunable_linears(hf: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The Linear layers pruning may cut: all but an output projection tied to the input embedding (pruning it would
    prune the embedding too)."""
    tied = hf.get_input_embeddings().weight
    return [(n, m) for n, m in hf.named_modules() if isinstance(m, nn.Linear) and m.weight is not tied]


def prune_unstructured(hf: nn.Module, sparsity: float) -> None:
    """Zeroes the `sparsity` share of smallest-magnitude weights, counted over all prunable Linear weights at once."""
    targets = [(m, "weight") for _, m in prunable_linears(hf)]
    torch_prune.global_unstructured(targets, pruning_method=torch_prune.L1Unstructured, amount=sparsity)
    for module, name in targets:
        torch_prune.remove(module, name)  # the mask folded into the weight: a plain tensor with zeros


def _mlp_layers(hf: nn.Module, arch: str) -> list[tuple[list[nn.Module], list[nn.Module]]]:
    """Per transformer layer: (the modules whose outputs are the MLP neurons, the modules whose inputs are)."""
    if arch == "bert":
        return [([layer.intermediate.dense], [layer.output.dense]) for layer in hf.bert.encoder.layer]
    if arch == "gpt2":  # Conv1D: weight [in, out]
        return [([block.mlp.c_fc], [block.mlp.c_proj]) for block in hf.transformer.h]
    return [([layer.mlp.gate_proj, layer.mlp.up_proj], [layer.mlp.down_proj]) for layer in hf.model.layers]


def prune_neurons(hf: nn.Module, arch: str, sparsity: float) -> list[torch.Tensor]:
    """Removes the `sparsity` share of MLP neurons in every layer (the same count in each, so the model's config
    still describes it), scored by the L2 norm of each neuron's input row(s) and output column; returns each layer's
    kept neuron indices (sorted)."""
    kept = []
    for outs, ins in _mlp_layers(hf, arch):
        width = out_weight(outs[0]).shape[0]
        n_keep = max(1, width - int(round(sparsity * width)))
        score = sum(out_weight(m).float().pow(2).sum(1) for m in outs) + sum(
            out_weight(m).float().pow(2).sum(0) for m in ins)
        keep = torch.sort(torch.topk(score, n_keep).indices).values
        for m in outs:
            keep_outputs(m, keep)
        for m in ins:
            keep_inputs(m, keep)
        kept.append(keep)
    name = "n_inner" if arch == "gpt2" else "intermediate_size"
    setattr(hf.config, name, len(kept[0]))
    return kept


def head_scores(hf: nn.Module, arch: str) -> list[torch.Tensor]:
    """Per layer, each head's (Llama: key-value group's) squared L2 norm: its rows of the query, key and value
    weights plus its columns of the output projection's."""
    scores = []
    for attention in attention_modules(hf, arch):
        n = units(attention, arch)[0]
        total = torch.zeros(n)
        for module, side, width, starts in slices(attention, arch):
            w = out_weight(module).detach().float()
            rows = w if side == "out" else w.T  # one row per feature of the heads' side
            for start in starts:
                total += rows[start:start + n * width].pow(2).sum(1).view(n, width).sum(1)
        scores.append(total)
    return scores


def prune_heads(hf: nn.Module, arch: str, sparsity: float) -> list[torch.Tensor]:
    """Removes the `sparsity` share of attention heads with the smallest weight norms, counted over all layers at
    once; each layer keeps its strongest head. Llama's grouped-query attention loses whole key-value groups. Returns
    each layer's kept heads (groups), sorted."""
    scores = head_scores(hf, arch)
    total, layers = sum(len(s) for s in scores), len(scores)
    remove = int(round(sparsity * total))
    if remove > total - layers:
        unit = "key-value groups" if units(attention_modules(hf, arch)[0], arch)[1] > 1 else "heads"
        raise ConfigError(f"--prune {sparsity} with --prune-kind heads would remove {remove} of the {total} {unit}, "
                          f"but each of the {layers} layers keeps one; give --prune <= "
                          f"{(total - layers) / total:.3f}.")
    candidates = sorted((float(score), layer, u) for layer, s in enumerate(scores) for u, score in enumerate(s)
                        if u != int(s.argmax()))
    gone = {(layer, u) for _, layer, u in candidates[:remove]}
    kept = [torch.tensor([u for u in range(len(s)) if (layer, u) not in gone]) for layer, s in enumerate(scores)]
    keep_heads(hf, arch, kept)
    return kept


def start_from(model: nn.Module, directory: str, hold_zeros: bool) -> int:
    """Loads a transformers directory's weights into the freshly built `model` (its `hf`); with hold_zeros, every
    Linear weight that is zero there stays zero through training: its gradient is masked by a hook on the parameter,
    so LAMB, LARS and AdamW (zero moments, zero weight decay term) never move it, whichever ZeRO stage partitions the
    optimizer state. Returns how many weights are held."""
    loaded = from_pretrained(type(model.hf), directory)
    heads, mine = (list(getattr(m.config, HEADS_KEY, None) or []) for m in (loaded, model.hf))
    if heads != mine:
        raise ConfigError(f"model.init_from={directory} has {heads or 'all its'} attention heads per layer, the recipe "
                          f"{mine or 'all'}; set --model.heads_per_layer={','.join(map(str, heads))} to give the "
                          "recipe that shape.")
    missing, unexpected = model.hf.load_state_dict(loaded.state_dict(), strict=False)
    if missing or unexpected:
        raise ConfigError(f"model.init_from={directory} does not fit the recipe's model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}); give the recipe that directory's shape.")
    held = 0
    for _, m in prunable_linears(model.hf) if hold_zeros else ():
        keep = m.weight.detach() != 0
        if not keep.all():
            held += int((~keep).sum())
            m.weight.register_hook(lambda grad, keep=keep: grad * keep.to(grad.device, grad.dtype))
    return held


def prune(hf: nn.Module, arch: str, kind: str, sparsity: float) -> None:
    """Prunes `hf` in place; sparsity 0 leaves it as it is."""
    if not sparsity:
        return
    if kind == "unstructured":
        prune_unstructured(hf, sparsity)
    elif kind == "neurons":
        prune_neurons(hf, arch, sparsity)
    else:
        prune_heads(hf, arch, sparsity)


def quiet_torchao() -> Any:
    """torchao's quantization API (its logs are quieted in `bigbatch.models`), with anything it prints on import kept
    off the user's screen."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        import torchao.quantization as quantization
    return quantization


def torchao_config(mode: str) -> Any:
    """transformers' TorchAoConfig for int8 weights (int8-weight), or int8 weights with activations quantized per token
    at run time (int8-dynamic). Quantizing through `from_pretrained(quantization_config=...)` rather than calling
    `quantize_` on a built model is what makes the result save and load back: transformers then records the scheme
    in config.json and serialises torchao's tensors (measured: a model quantized by `quantize_` alone fails in
    `save_pretrained`)."""
    q = quiet_torchao()  # first: transformers imports torchao too
    from transformers import TorchAoConfig

    scheme = q.Int8WeightOnlyConfig() if mode == "int8-weight" else q.Int8DynamicActivationInt8WeightConfig()
    return TorchAoConfig(scheme)


def linear_weight_bytes(hf: nn.Module) -> int:
    """Bytes the prunable Linear layers' weights hold in memory (the tied output projection is the embedding): the
    int8 data and scales of a torchao tensor, else the tensor's own."""
    total = 0
    for _, m in prunable_linears(hf):
        w = m.weight
        parts = [getattr(w, name) for name in getattr(w, "tensor_data_names", ())] or [w]
        parts += [getattr(w, name) for name in getattr(w, "optional_tensor_data_names", ()) if
                  getattr(w, name, None) is not None]
        total += sum(p.numel() * p.element_size() for p in parts)
    return total


def count(hf: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters), counting a quantized tensor by its logical shape."""
    params = nonzero = 0
    with torch.no_grad():
        for p in hf.parameters():
            params += math.prod(p.shape)
            data = p.dequantize() if hasattr(p, "tensor_data_names") else p  # torchao's tensors name their parts
            nonzero += int(torch.count_nonzero(data))
    return params, nonzero
