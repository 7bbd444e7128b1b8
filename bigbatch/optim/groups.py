"""Parameter groups as the BERT LAMB recipes use them: no decay and no trust ratio for biases and norm weights."""

from __future__ import annotations

from typing import Any

from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: matrices (decayed, adapted) and 1-D tensors, i.e. biases and LayerNorm/RMSNorm weights (neither).

    Each group records `param_names`, so `trust_ratios()` reports ratios by parameter name.
    """
    decay: tuple[list[Any], list[str]] = ([], [])
    plain: tuple[list[Any], list[str]] = ([], [])
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Under deepspeed.zero.Init every parameter is a 1-D placeholder; ds_shape is its real shape.
        target = plain if len(getattr(p, "ds_shape", p.shape)) < 2 else decay
        target[0].append(p)
        target[1].append(name)
    groups = []
    if decay[0]:
        groups.append({"params": decay[0], "param_names": decay[1], "weight_decay": weight_decay})
    if plain[0]:
        groups.append({"params": plain[0], "param_names": plain[1], "weight_decay": 0.0, "adapt": False})
    return groups
