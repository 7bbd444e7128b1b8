"""Fused element-wise passes of LAMB and LARS, compiled with `torch.compile` for large parameter groups.

Why by hand: an optimizer step is bound by memory bandwidth. Written as foreach ops, LAMB streams about 116 bytes
per fp32 parameter (every op reads and writes whole tensors), LARS about 60. Fused, LAMB needs two passes (the
trust ratio needs the whole update's norm before any weight moves): pass 1 updates the moments and returns the
squared norms of the update and the weight (reads g, m, v, w; writes m, v: 24 B), pass 2 recomputes the update and
applies it (reads m, v, w; writes w: 16 B), 40 B in all. LARS: foreach norms of w and g (8 B), then one fused pass
(reads g, w, buf; writes buf, w: 20 B). DeepSpeed's fused Lamb is CUDA-only and torch has no LAMB or LARS.

Scalars go in as 0-d tensors, not Python floats, so a new learning rate or bias correction each step does not
recompile; `dynamic=True` gives one kernel for every parameter size. A segment is a contiguous 1-D view (a whole
parameter, or its slice of a flat ZeRO partition).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# Below this many elements in a group the foreach path is faster than one compiled call per segment, and compiling
# (tens of seconds on a CPU, once per process) does not pay off.
AUTO_FUSE_NUMEL = 1 << 22


def lamb_moments_and_norms(
    g: Tensor,
    m: Tensor,
    v: Tensor,
    w: Tensor,
    beta1: Tensor,
    one_minus_beta1: Tensor,
    beta2: Tensor,
    one_minus_beta2: Tensor,
    c: Tensor,
    e: Tensor,
    wd: Tensor,
) -> tuple[Tensor, Tensor]:
    """Pass 1: m, v updated in place; returns (sum u^2, sum w^2) with u = c * m / (sqrt(v) + e) + wd * w.

    With c = sqrt(bc2) / bc1 and e = eps * sqrt(bc2), u equals the paper's (m / bc1) / (sqrt(v / bc2) + eps) + wd * w.
    """
    # 1 - beta comes in precomputed in double: 1 - fp32(0.999) is 1.3e-5 off 0.001, enough to move the trust ratio
    m.mul_(beta1).add_(one_minus_beta1 * g)
    v.mul_(beta2).add_(one_minus_beta2 * g * g)
    u = c * m / (v.sqrt() + e) + wd * w
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32  # squares sum in fp32 at least
    return u.to(acc).square().sum(), w.to(acc).square().sum()


def lamb_apply(m: Tensor, v: Tensor, w: Tensor, c: Tensor, e: Tensor, wd: Tensor, step_size: Tensor) -> None:
    """Pass 2: w -= step_size * u, u recomputed from the moments of pass 1 (step_size = lr * trust ratio)."""
    u = c * m / (v.sqrt() + e) + wd * w
    w.sub_(step_size * u)


def lars_apply(g: Tensor, w: Tensor, buf: Tensor, momentum: Tensor, wd: Tensor, step_size: Tensor) -> None:
    """buf = momentum * buf + step_size * (g + wd * w); w -= buf (step_size = lr * local lr)."""
    buf.mul_(momentum).add_(step_size * (g + wd * w))
    w.sub_(buf)


class Compiled:
    """A function compiled on first use; falls back to eager, once and with a warning, where compiling fails
    (no C++ compiler, an unsupported platform).

    Only Dynamo's own exceptions (`TorchDynamoException`; inductor's `InductorError` is one) fall back: Dynamo raises
    them while tracing or compiling, before the compiled code runs, so no tensor has been written. Any other
    exception comes from running the kernels, which update moments and weights in place; rerunning eagerly would
    apply the update twice, so it propagates.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._compiled: Callable[..., Any] | None = None
        self._eager = False

    def __call__(self, *args: Any) -> Any:
        if self._eager:
            return self.fn(*args)
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
        try:
            return self._compiled(*args)
        # Named through torch's lazy `_dynamo` attribute: importing torch._dynamo takes 1.5 s, which `bigbatch check`
        # (it reads LAMB's and LARS's signatures through bigbatch.engine) need not pay; torch.compile has loaded it.
        except torch._dynamo.exc.TorchDynamoException as err:
            log.warning("torch.compile of %s failed (%s); using the eager version", self.fn.__name__, err)
            self._eager = True
            return self.fn(*args)


LAMB_MOMENTS_AND_NORMS = Compiled(lamb_moments_and_norms)
LAMB_APPLY = Compiled(lamb_apply)
LARS_APPLY = Compiled(lars_apply)


def use_fused(fused: bool | None, params: list[Tensor]) -> bool:
    """`fused=None` (auto) fuses CPU groups of at least AUTO_FUSE_NUMEL elements.

    Only the CPU path is measured (bench/optim_step.py); on a GPU the foreach ops are already one kernel per op and
    list, while the fused path launches two kernels per segment, so auto keeps foreach there until a GPU measures it.
    """
    if fused is not None:
        return fused
    return params[0].device.type == "cpu" and sum(p.numel() for p in params) >= AUTO_FUSE_NUMEL


def scalar(x: float, like: Tensor) -> Tensor:
    """A 0-d tensor on `like`'s device (fp64 for fp64 tensors, else fp32): a kernel argument that does not trigger a
    recompile when its value changes."""
    return torch.tensor(x, dtype=torch.float64 if like.dtype == torch.float64 else torch.float32, device=like.device)
