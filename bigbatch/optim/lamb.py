"""LAMB: You et al. 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes", Algorithm 2.

Written here rather than taken from DeepSpeed because DeepSpeed's `Lamb` is a CUDA-only fused kernel and, as a
client optimizer under ZeRO, any per-tensor LAMB computes its trust ratio over a flat partition instead of a layer.
This one takes whole-parameter norms over ZeRO partitions (see `bigbatch.optim.layerwise`).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor

from bigbatch.optim.kernels import LAMB_APPLY, LAMB_MOMENTS_AND_NORMS, scalar, use_fused
from bigbatch.optim.layerwise import FlatLayout, LayerwiseOptimizer


class LAMB(LayerwiseOptimizer):
    """Adam moments with bias correction; u = m_hat / (sqrt(v_hat) + eps) + weight_decay * w;
    ratio = ||w|| / ||u|| per parameter, clamped to [min_coeff, max_coeff], 1 when either norm is 0;
    w -= lr * ratio * u. A group with `adapt=False` uses ratio 1 (plain AdamW-style update with decoupled decay).

    Moments are named `exp_avg` and `exp_avg_sq`, as in Adam, so DeepSpeed's universal checkpoint converts them.
    `fused`: True runs adapted groups as two compiled passes (`bigbatch.optim.kernels`), False as foreach ops, None
    (default) fuses CPU groups of at least 4M elements. Both compute the same update.
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
        fused: bool | None = None,
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
        super().__init__(params, defaults, fused)

    def _step_group(self, group: dict[str, Any], params: list[Tensor], layouts: list[FlatLayout]) -> None:
        beta1, beta2 = group["betas"]
        grads = [p.grad for p in params]
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        bc1, bc2 = _bias_corrections(group, steps)
        if group["adapt"] and use_fused(self.fused, params):
            self._fused_step(group, params, layouts, grads, exp_avgs, exp_avg_sqs, bc1, bc2)
            return

        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)

        # u = (m / bc1) / (sqrt(v / bc2) + eps) + wd * w
        denom = torch._foreach_sqrt(exp_avg_sqs)
        if group["bias_correction"]:
            torch._foreach_div_(denom, [math.sqrt(b) for b in bc2])
        torch._foreach_add_(denom, group["eps"])
        update = torch._foreach_div(exp_avgs, denom)
        del denom
        if group["bias_correction"]:
            torch._foreach_div_(update, bc1)
        if group["weight_decay"]:
            torch._foreach_add_(update, params, alpha=group["weight_decay"])

        lr = group["lr"]
        if group["adapt"]:
            norms = self._param_norms([params, update], layouts)
            ratios = [_trust_ratio(n[0], n[1], group) for n in norms]
            self._record(layouts, ratios)
            self._scale_segments(update, layouts, [-lr * r for r in ratios])
            torch._foreach_add_(params, update)
        else:
            torch._foreach_add_(params, update, alpha=-lr)

    def _fused_step(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        layouts: list[FlatLayout],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        bc1: list[float],
        bc2: list[float],
    ) -> None:
        """The same update in two compiled passes over each segment (see `bigbatch.optim.kernels`)."""
        beta1, beta2 = group["betas"]
        like = params[0]
        b1, b2 = (scalar(beta1, like), scalar(1.0 - beta1, like)), (scalar(beta2, like), scalar(1.0 - beta2, like))
        wd = scalar(group["weight_decay"], like)
        # per tensor: c = sqrt(bc2) / bc1, e = eps * sqrt(bc2) (each tensor has its own step count)
        ces = [(scalar(math.sqrt(c2) / c1, like), scalar(group["eps"] * math.sqrt(c2), like))
               for c1, c2 in zip(bc1, bc2)]
        partials = []
        for p, g, m, v, lay, (c, e) in zip(params, grads, exp_avgs, exp_avg_sqs, layouts, ces):
            flat = [t.view(-1) for t in (g, m, v, p)]
            rows = [
                LAMB_MOMENTS_AND_NORMS(*(t.narrow(0, s, n) for t in flat), *b1, *b2, c, e, wd)
                for s, n, _ in lay.segments
            ]
            # (w^2, u^2) per segment, the order _reduce_squares and _trust_ratio expect
            partials.append(torch.stack([torch.stack((w2, u2)) for u2, w2 in rows], dim=1) if rows
                            else torch.zeros(2, 0, device=like.device))
        norms = self._reduce_squares(partials, layouts)
        ratios = [_trust_ratio(n[0], n[1], group) for n in norms]
        self._record(layouts, ratios)
        lr = group["lr"]
        for p, m, v, lay, r, (c, e) in zip(params, exp_avgs, exp_avg_sqs, layouts, ratios, ces):
            flat = [t.view(-1) for t in (m, v, p)]
            for s, n, i in lay.segments:
                LAMB_APPLY(*(t.narrow(0, s, n) for t in flat), c, e, wd, lr * r[i])


def _bias_corrections(group: dict[str, Any], steps: list[int]) -> tuple[list[float], list[float]]:
    """Adam's 1 - beta^t for each tensor's own step count t (a tensor without a gradient skips a step)."""
    if not group["bias_correction"]:
        return [1.0] * len(steps), [1.0] * len(steps)
    beta1, beta2 = group["betas"]
    return [1.0 - beta1**t for t in steps], [1.0 - beta2**t for t in steps]


def _trust_ratio(w_norm: Tensor, u_norm: Tensor, group: dict[str, Any]) -> Tensor:
    """||w|| / ||u|| clamped to [min_coeff, max_coeff]; 1 where either norm is 0 (vectors over parameters)."""
    ratio = (w_norm / u_norm).clamp(group["min_coeff"], group["max_coeff"])
    return torch.where((w_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio))
