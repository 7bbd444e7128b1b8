"""LARS: You, Gitman, Ginsburg 2017, "Large Batch Training of Convolutional Networks", Algorithm 1.

Written here because neither torch nor DeepSpeed ships LARS, and a per-tensor LARS under ZeRO would take its local
LR over a flat partition instead of a layer (see `bigbatch.optim.layerwise`).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from bigbatch.optim.kernels import LARS_APPLY, scalar, use_fused
from bigbatch.optim.layerwise import FlatLayout, LayerwiseOptimizer


class LARS(LayerwiseOptimizer):
    """local_lr = trust_coefficient * ||w|| / (||g|| + weight_decay * ||w|| + eps) per parameter (1 when a norm is 0);
    v = momentum * v + lr * local_lr * (g + weight_decay * w); w -= v.
    A group with `adapt=False` uses local_lr 1 (heavy-ball SGD with L2 decay). The momentum is `momentum_buffer`.
    `fused`: True applies adapted groups in one compiled pass (`bigbatch.optim.kernels`), False as foreach ops, None
    (default) fuses CPU groups of at least 4M elements.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        trust_coefficient: float = 0.001,
        eps: float = 0.0,
        fused: bool | None = None,
    ) -> None:
        if lr < 0:
            raise ValueError(f"LARS lr={lr} must be >= 0")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"LARS momentum={momentum} must lie in [0, 1)")
        if weight_decay < 0 or eps < 0 or trust_coefficient <= 0:
            raise ValueError("LARS weight_decay and eps must be >= 0 and trust_coefficient > 0")
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient, eps=eps,
            adapt=True,
        )
        super().__init__(params, defaults, fused)

    def _step_group(self, group: dict[str, Any], params: list[Tensor], layouts: list[FlatLayout]) -> None:
        grads = [p.grad for p in params]
        lr, wd = group["lr"], group["weight_decay"]
        if group["adapt"]:
            norms = self._param_norms([params, grads], layouts)
            local = []
            for n in norms:
                w_norm, g_norm = n[0], n[1]
                ratio = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"])
                local.append(torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio)))
            self._record(layouts, local)
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        if group["adapt"] and use_fused(self.fused, params):
            mom, decay = scalar(group["momentum"], params[0]), scalar(wd, params[0])
            for p, g, buf, lay, r in zip(params, grads, bufs, layouts, local):
                flat = [t.view(-1) for t in (g, p, buf)]
                for s, n, i in lay.segments:
                    LARS_APPLY(*(t.narrow(0, s, n) for t in flat), mom, decay, lr * r[i])
            return
        # d = g + wd * w, scaled by lr * local_lr per parameter
        step_dir = torch._foreach_add(grads, params, alpha=wd) if wd else torch._foreach_mul(grads, 1.0)
        if group["adapt"]:
            self._scale_segments(step_dir, layouts, [lr * r for r in local])
        else:
            torch._foreach_mul_(step_dir, lr)
        torch._foreach_mul_(bufs, group["momentum"])
        torch._foreach_add_(bufs, step_dir)
        torch._foreach_sub_(params, bufs)
