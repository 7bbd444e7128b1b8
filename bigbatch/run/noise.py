"""The gradient noise scale, estimated online at no extra backward pass (McCandlish et al. 2018, "An Empirical Model
of Large-Batch Training", appendix A.1).

For a batch of B samples, E|G_B|^2 = |G|^2 + tr(Sigma) / B. Two batch sizes give unbiased estimates of both terms:

    |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

Small batch: each micro-batch on each rank (B_small = micro-batch), its squared gradient norm taken by tensor hooks
as backward produces it, before DeepSpeed reduces anything across ranks (under ZeRO-2/3 the full local gradient is
never held after the reduce-scatter); the average over every micro-batch of the step on every rank. Big batch: the
step's all-reduced, accumulated gradient (B_big = global batch), whose norm DeepSpeed computes anyway for clipping.
Each estimate is noisy, so the two are smoothed separately by exponential moving averages and the simple noise scale
B_simple = tr(Sigma) / |G|^2 is the ratio of the averages, not an average of ratios. B_simple estimates the critical
batch: well above it, a larger batch buys little besides more samples per step.

A world of one without accumulation has one batch size only; no estimate then.
"""

from __future__ import annotations

from typing import Any, Optional

import torch


class GradientNoiseScale:
    def __init__(self, module: torch.nn.Module, ema: float = 0.95) -> None:
        self.ema = ema
        self._norms: list[torch.Tensor] = []  # this micro-batch's per-parameter gradient norms
        self._sum = torch.zeros((), dtype=torch.float64)  # squared norms over the step's micro-batches on this rank
        self._count = 0
        self.g2: Optional[float] = None  # the moving averages
        self.trace: Optional[float] = None
        for p in module.parameters():
            if p.requires_grad:
                p.register_hook(self._hook)

    def _hook(self, grad: torch.Tensor) -> None:
        # one kernel per parameter: the squares are summed once per micro-batch (bench/loop_overhead.py)
        self._norms.append(torch.linalg.vector_norm(grad.detach(), dtype=torch.float32))

    @property
    def estimate(self) -> Optional[float]:
        """B_simple from the moving averages; None before a positive |G|^2 estimate."""
        return self.trace / self.g2 if self.g2 is not None and self.trace is not None and self.g2 > 0 else None

    def state(self) -> dict[str, Optional[float]]:
        """The moving averages, saved with a checkpoint so a resume estimates (and adapts) as if never stopped."""
        return {"g2": self.g2, "trace": self.trace}

    def load_state(self, state: dict[str, Optional[float]]) -> None:
        self.g2, self.trace = state.get("g2"), state.get("trace")

    def micro_batch_done(self, grad_multiplier: float) -> None:
        """After each backward. `grad_multiplier` undoes what the engine applied to the loss (loss scale, division by
        the accumulation steps), so the norm is that of the micro-batch's mean-loss gradient."""
        if self._norms:
            micro = torch.linalg.vector_norm(torch.stack(self._norms).double()) ** 2
            self._sum = self._sum.to(micro.device) + micro * grad_multiplier**2
        self._norms = []
        self._count += 1

    def take_local(self) -> tuple[float, float]:
        """(sum of the step's micro-batch squared norms on this rank, their count), for the caller's all-reduce."""
        out = (float(self._sum), float(self._count))
        self._sum, self._count = torch.zeros_like(self._sum), 0
        return out

    def update(self, total: float, count: float, micro_batch: int, global_batch: int, big_norm: Optional[float],
               applied: bool) -> dict[str, Any]:
        """At a step's end with the all-reduced sums of `take_local`. Returns the metrics to log (empty without an
        estimate: a skipped step, no big-batch norm, or one batch size only)."""
        if not applied or big_norm is None or global_batch <= micro_batch or count == 0:
            return {}
        small, big = total / count, float(big_norm) ** 2
        b_s, b_b = float(micro_batch), float(global_batch)
        g2 = (b_b * big - b_s * small) / (b_b - b_s)
        trace = (small - big) / (1.0 / b_s - 1.0 / b_b)
        self.g2 = g2 if self.g2 is None else self.ema * self.g2 + (1 - self.ema) * g2
        self.trace = trace if self.trace is None else self.ema * self.trace + (1 - self.ema) * trace
        out = {"gns_grad_sq": self.g2, "gns_trace": self.trace}
        if self.g2 > 0:
            out["noise_scale"] = self.trace / self.g2
        return out


def loss_multiplier(engine: Any) -> float:
    """1 / (what `engine.backward` multiplied the loss by): DeepSpeed divides it by the accumulation steps and, for
    its ZeRO optimizers, multiplies it by their loss scaler's current scale (1 outside fp16)."""
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    scale = 1.0
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if isinstance(engine.optimizer, ZeROOptimizer) and scaler is not None:
        scale = float(scaler.cur_scale)
    return engine.gradient_accumulation_steps() / scale


def held_gradient_norm(module: torch.nn.Module) -> float:
    """The norm of the gradients the parameters hold. At ZeRO stage 0, between the boundary backward and the step,
    that is the all-reduced mean gradient of the global batch; DeepSpeed reports no norm there (FusedAdam path)."""
    norms = [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32) for p in module.parameters()
             if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
