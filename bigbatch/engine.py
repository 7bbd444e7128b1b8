"""`bigbatch.engine.initialize`: `deepspeed.initialize` that understands `"optimizer": {"type": "LAMB" | "LARS"}`.

DeepSpeed lowercases optimizer types and maps "lamb" to its CUDA-only fused Lamb, which (like any client optimizer
under ZeRO) takes trust ratios over flat partitions. Here any casing of lamb or lars builds bigbatch's optimizer,
the section is removed from the config DeepSpeed sees, and the optimizer's flat-partition layouts are attached
after DeepSpeed has built its ZeRO wrapper. Every other key goes to DeepSpeed untouched.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import math
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
from torch import nn

from bigbatch.config import ConfigError
from bigbatch.config.dsconfig import load_fragment
from bigbatch.optim import LAMB, LARS
from bigbatch.optim.layerwise import LayerwiseOptimizer
from bigbatch.optim.zero import UnsupportedLayout, attach_layouts

OPTIMIZERS = {"lamb": LAMB, "lars": LARS}


def _load(config: Union[str, Path, dict[str, Any], None]) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, (str, Path)):
        return load_fragment(Path(config))
    return copy.deepcopy(dict(config))


def build_optimizer_kwargs(section: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of LAMB or LARS from a DeepSpeed-style `{"type": ..., "params": {...}}` section;
    an unknown or missing parameter raises ConfigError naming the fix."""
    cls = OPTIMIZERS[str(section.get("type", "")).lower()]
    kwargs = dict(section.get("params", {}))
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params")]
    for key in kwargs:
        if key not in allowed:
            hint = difflib.get_close_matches(key, allowed, n=1)
            extra = f"did you mean {hint[0]!r}? " if hint else ""
            raise ConfigError(
                f"optimizer.params.{key} is not a {cls.__name__} parameter; {extra}allowed: {', '.join(allowed)}."
            )
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    if cls is LARS and "lr" not in kwargs:
        raise ConfigError("optimizer.params.lr is missing for LARS; add it to the optimizer section.")
    return kwargs


def build_optimizer(section: dict[str, Any], params: Any) -> LayerwiseOptimizer:
    """LAMB or LARS from a DeepSpeed-style `{"type": ..., "params": {...}}` section."""
    return OPTIMIZERS[str(section.get("type", "")).lower()](params, **build_optimizer_kwargs(section))


def refuse_offload(config: dict[str, Any]) -> None:
    zero = config.get("zero_optimization", {}) or {}
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none")
        if device not in (None, "none"):
            raise ConfigError(
                f"zero_optimization.{key}.device={device!r} is not supported with bigbatch's LAMB/LARS (their "
                f"exactness under offload is untested); remove {key} or use AdamW."
            )


def refuse_16bit_stage0(config: dict[str, Any], what: str = "bigbatch's LAMB/LARS") -> None:
    """Why: in DeepSpeed 0.19 a client optimizer under fp16/bf16 at stage 0 is wrapped in `FP16_UnfusedOptimizer`,
    which (a) calls the optimizer's `step()` once on zero gradients at start-up (a real LAMB/LARS update: weight decay
    moves the weights, the step counter advances) and (b) divides gradients by the loss scale that
    `engine.backward` never applied (it scales only for `ZeROOptimizer`s), so LARS sees gradients 1/scale too small.
    Measured: trust ratios off by 40% (LAMB) and 130x (LARS). ZeRO-1 holds no more memory than stage 0 and is exact.
    """
    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    for key in ("fp16", "bf16", "bfloat16"):
        if (config.get(key) or {}).get("enabled", False) and stage == 0:
            raise ConfigError(_UNFUSED_16BIT.format(key=key, what=what, stage=stage))


_UNFUSED_16BIT = ("{key}.enabled=true with {what} needs zero_optimization.stage >= 1, not {stage} (DeepSpeed's stage-0 "
                  "16-bit wrapper steps on zero gradients and never scales the loss); set zero_optimization.stage to "
                  "1, which uses no more memory.")


def refuse_unfused_16bit(engine: Any, config: dict[str, Any]) -> None:
    """The same refusal for any optimizer DeepSpeed wraps in `FP16_UnfusedOptimizer` (its stage-0 16-bit path for an
    optimizer it has no fused kernel for, such as torch's AdamW, which bigbatch's `adamw` is): measured against fp32,
    DeepSpeed's AdamW there is 0.97 of an update off in fp16 and 0.21 in bf16 (tests/test_ds_configs.py)."""
    if type(engine.optimizer).__name__ != "FP16_UnfusedOptimizer":
        return
    key = "fp16" if (config.get("fp16") or {}).get("enabled") else "bf16"
    section = config.get("optimizer")
    named = section.get("type") if isinstance(section, dict) else type(engine.optimizer.optimizer).__name__
    what = f"optimizer {named!r}"
    engine.destroy()
    raise ConfigError(_UNFUSED_16BIT.format(key=key, what=what, stage=0))


class SkipNonFinite:
    """The optimizer DeepSpeed steps where it checks nothing itself (ZeRO stage 0 in fp32): a step whose global
    gradient norm is not finite is skipped, weights and optimizer state untouched.

    Why: there DeepSpeed calls the optimizer with no overflow check, and its clipping multiplies an inf gradient by
    0, making NaN: one bad batch made every weight NaN. The skip signal is the norm DeepSpeed's clipping computes (it
    discards it; `clip` keeps it), or without clipping the norm of the gradients about to be applied. `overflow` is
    the attribute DeepSpeed's engine reads after a step, as from its own wrappers: it then counts the step in
    `skipped_steps` and holds the LR schedule. Everything else is the wrapped optimizer's.
    """

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer
        self.overflow = False
        self._global_grad_norm: Optional[float] = None  # the engine reports it as get_global_grad_norm()
        self._clip_norm: Optional[torch.Tensor] = None

    def __getattr__(self, name: str) -> Any:
        if name == "optimizer":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def clip(self, parameters: Iterable[torch.Tensor], max_norm: float, mpu: Any) -> None:
        """DeepSpeed's fp32 gradient clipping, keeping the global norm it computes (before clipping)."""
        from deepspeed.runtime.utils import clip_grad_norm_

        self._clip_norm = clip_grad_norm_(parameters=parameters, max_norm=max_norm, mpu=mpu)

    def step(self, closure: Any = None) -> Any:
        norm = self._clip_norm
        if norm is None:  # no clipping: stage 0 has all-reduced the gradients already, so every rank agrees
            norm = torch.nn.utils.get_total_norm(
                [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None])
        self._clip_norm = None
        self._global_grad_norm = float(norm)
        self.overflow = not math.isfinite(self._global_grad_norm)
        return None if self.overflow else self.optimizer.step(closure)


def skip_non_finite(engine: Any) -> None:
    """Where DeepSpeed steps an optimizer with no overflow check (no `overflow` attribute for the engine to read: ZeRO
    stage 0 in fp32), put `SkipNonFinite` around it; DeepSpeed's ZeRO, fp16 and bf16 wrappers skip such steps."""
    if engine.optimizer is None or hasattr(engine.optimizer, "overflow"):
        return
    guard = SkipNonFinite(engine.optimizer)
    # the engine calls its own clip_fp32_gradients() just before the step; this one also keeps the norm
    engine.clip_fp32_gradients = lambda: guard.clip(engine.module.parameters(), engine.gradient_clipping(), engine.mpu)
    engine.optimizer = guard


def initialize(
    model: Optional[nn.Module] = None,
    config: Union[str, Path, dict[str, Any], None] = None,
    model_parameters: Any = None,
    optimizer: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any, Any, Any]:
    """Drop-in for `deepspeed.initialize`: returns (engine, optimizer, dataloader, lr_scheduler).

    With `"optimizer": {"type": "LAMB" | "LARS", "params": {...}}` in `config`, the optimizer is bigbatch's,
    built over `model_parameters` (None: `model.parameters()`; param-group dicts such as `param_groups(model, wd)`
    work too) and exact under ZeRO stages 0-3. At every stage and precision a step whose gradient is not finite is
    skipped, weights and optimizer state untouched, and counted in `engine.skipped_steps` (see `SkipNonFinite`).
    """
    import deepspeed

    cfg = _load(config)
    section = cfg.get("optimizer")
    kind = str(section.get("type", "")).lower() if isinstance(section, dict) else ""
    if kind in OPTIMIZERS:
        if optimizer is not None:
            raise ConfigError(
                "both an optimizer object and config optimizer.type="
                f"{section.get('type')!r} were given; pass one of them."
            )
        if model is None:
            raise ConfigError("model is required to build bigbatch's LAMB/LARS; pass model=<nn.Module>.")
        refuse_offload(cfg)
        refuse_16bit_stage0(cfg)
        params = model_parameters if model_parameters is not None else model.parameters()
        optimizer = build_optimizer(section, params)
        cfg = {k: v for k, v in cfg.items() if k != "optimizer"}
        cfg["zero_allow_untested_optimizer"] = True
        model_parameters = None
    engine, ds_optimizer, loader, scheduler = deepspeed.initialize(
        model=model, config=cfg, model_parameters=model_parameters, optimizer=optimizer, **kwargs
    )
    if isinstance(optimizer, LayerwiseOptimizer):
        try:
            attach_layouts(engine.optimizer, optimizer, model)
        except UnsupportedLayout as err:
            raise ConfigError(
                f"bigbatch's {type(optimizer).__name__} does not support DeepSpeed's {err} layout; use ZeRO stages "
                "0-3 without offload, or a DeepSpeed version bigbatch was tested with (see constraints.txt)."
            ) from None
    refuse_unfused_16bit(engine, cfg)
    skip_non_finite(engine)
    return engine, ds_optimizer, loader, scheduler


def client_optimizer(engine: Any) -> Any:
    """The optimizer bigbatch built (unwrapping DeepSpeed's ZeRO or fp16 wrapper, or `SkipNonFinite`)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)
