"""LAMB: You et al. 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes", Algorithm 2.

Written here rather than taken from DeepSpeed because DeepSpeed's `Lamb` is a CUDA-only fused kernel and, as a
client optimizer under ZeRO, any per-tensor LAMB computes its trust ratio over a flat partition instead of a layer.
This one takes whole-parameter norms over ZeRO partitions (see `bigbatch.optim.layerwise`).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from bigbatch.optim.layerwise import LayerwiseOptimizer


class LAMB(LayerwiseOptimizer):
    """Adam moments with bias correction; u = m_hat / (sqrt(v_hat) + eps) + weight_decay * w;
    ratio = ||w|| / ||u|| per parameter, clamped to [min_coeff, max_coeff], 1 when either norm is 0;
    w -= lr * ratio * u. A group with `adapt=False` uses ratio 1 (plain AdamW-style update with decoupled decay).

    Moments are named `exp_avg` and `exp_avg_sq`, as in Adam, so DeepSpeed's universal checkpoint converts them.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        bias_correction: bool = True,
        max_coeff: float = 10.0,
        min_coeff: float = 0.01,
    ) -> None:
        if lr < 0:
            raise ValueError(f"LAMB lr={lr} must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"LAMB betas={betas} must lie in [0, 1)")
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"LAMB eps={eps} and weight_decay={weight_decay} must be >= 0")
        if min_coeff > max_coeff:
            raise ValueError(f"LAMB min_coeff={min_coeff} exceeds max_coeff={max_coeff}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            max_coeff=max_coeff,
            min_coeff=min_coeff,
            adapt=True,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            params, layouts = self._group_tensors(group, gi)
            if not params:
                continue
            beta1, beta2 = group["betas"]
            grads = [p.grad for p in params]
            exp_avgs, exp_avg_sqs = [], []
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
            step = self.state[params[0]]["step"]

            torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)

            bc1 = 1.0 - beta1**step if group["bias_correction"] else 1.0
            bc2 = 1.0 - beta2**step if group["bias_correction"] else 1.0
            # u = (m / bc1) / (sqrt(v / bc2) + eps) + wd * w
            denom = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denom, math.sqrt(bc2))
            torch._foreach_add_(denom, group["eps"])
            update = torch._foreach_div(exp_avgs, denom)
            del denom
            if bc1 != 1.0:
                torch._foreach_div_(update, bc1)
            if group["weight_decay"]:
                torch._foreach_add_(update, params, alpha=group["weight_decay"])

            lr = group["lr"]
            if group["adapt"]:
                norms = self._param_norms([params, update], layouts)
                ratios = []
                for n in norms:
                    w_norm, u_norm = n[0], n[1]
                    ratio = (w_norm / u_norm).clamp(group["min_coeff"], group["max_coeff"])
                    ratios.append(torch.where((w_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio)))
                self._record(layouts, ratios)
                self._scale_segments(update, layouts, [-lr * r for r in ratios])
                torch._foreach_add_(params, update)
            else:
                torch._foreach_add_(params, update, alpha=-lr)
        return loss
