"""Shared machinery of the layer-wise (trust-ratio) optimizers: per-parameter norms over flat ZeRO partitions.

Why this exists: DeepSpeed's ZeRO optimizers hand a client optimizer one flat fp32 tensor per group, holding this
rank's slice of many parameters laid end to end (DeepSpeed issues #88, #490, #1217, #1285). A trust ratio computed
on that tensor is a ratio over an arbitrary slice of the model, not over a layer. Here every tensor the optimizer
steps carries a `FlatLayout`: which elements belong to which parameter. Norms are taken per segment, the partial
squared norms are summed per parameter, and one all-reduce over the data-parallel group gives every rank the whole
norm of every parameter. `bigbatch.optim.zero` builds the layouts from DeepSpeed's own bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class FlatLayout:
    """Which parameter owns which elements of one (possibly flat) tensor.

    names: every parameter whose norm is reduced over this tensor's group (all ranks list the same names in the
        same order, so the all-reduced vector lines up).
    segments: (start, numel, index into names) for each run of elements this rank holds; elements outside every
        segment (alignment padding) are left untouched by norms.
    group: the process group whose ranks hold the other slices; None when this tensor holds whole parameters.
    """

    names: tuple[str, ...]
    segments: tuple[tuple[int, int, int], ...]
    group: Optional[Any] = None


def _norm_dtype(t: Tensor) -> torch.dtype:
    """Squared norms accumulate in fp32 at least (fp64 stays fp64)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def whole_tensor_layout(tensor: Tensor, name: str) -> FlatLayout:
    return FlatLayout((name,), ((0, tensor.numel(), 0),), None)


class LayerwiseOptimizer(torch.optim.Optimizer):
    """Base of LAMB and LARS: keeps the layouts and the trust ratios of the last step."""

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], fused: Optional[bool] = None) -> None:
        self._built_with: set[int] = set()  # filled by add_param_group, which torch's __init__ calls
        super().__init__(params, defaults)
        self.fused = fused  # None: compiled passes for large groups on a CPU (bigbatch.optim.kernels)
        self._layouts: dict[int, FlatLayout] = {}
        self._last_ratios: dict[tuple[str, ...], Tensor] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._built_with.update(id(p) for p in self.param_groups[-1]["params"])

    # -- layouts ------------------------------------------------------------------------------------------------------
    def set_layout(self, tensor: Tensor, layout: FlatLayout) -> None:
        """Declares which parameters own which elements of `tensor` (called by `bigbatch.optim.zero`)."""
        end = max((s + n for s, n, _ in layout.segments), default=0)
        if end > tensor.numel():
            raise RuntimeError(f"layout reaches element {end} of a tensor with {tensor.numel()} elements")
        self._layouts[id(tensor)] = layout

    def _layout_of(self, p: Tensor, group: dict[str, Any], group_index: int, j: int) -> FlatLayout:
        layout = self._layouts.get(id(p))
        if layout is not None:
            return layout
        if id(p) not in self._built_with:
            # DeepSpeed's ZeRO (or fp16) wrapper swapped in a flat partition that no layout describes: its norms
            # would mix slices of several layers, the per-partition trust ratio bigbatch exists to avoid.
            kind = type(self).__name__
            raise RuntimeError(
                f"{kind} was handed a tensor it was not built with and has no partition layout for (DeepSpeed "
                f"flattens parameters under ZeRO, so its trust ratios would mix layers); build the engine with "
                f"bigbatch.engine.initialize and \"optimizer\": {{\"type\": \"{kind}\"}} instead of "
                "deepspeed.initialize."
            )
        names = group.get("param_names")
        name = names[j] if names is not None and len(names) == len(group["params"]) else f"group{group_index}.{j}"
        return whole_tensor_layout(p, name)

    # -- norms --------------------------------------------------------------------------------------------------------
    @staticmethod
    def _param_norms(kinds: list[list[Tensor]], layouts: list[FlatLayout]) -> list[Tensor]:
        """For each layout: a (len(kinds), len(names)) tensor of whole-parameter L2 norms of each kind (w, u, g ...).

        Partial squared norms of the segments are summed per parameter, then all-reduced where a layout has a group:
        one all-reduce per tensor, carrying every kind at once.
        """
        partials = []
        for t_index, lay in enumerate(layouts):
            rows = []
            for tensors in kinds:
                t = tensors[t_index].view(-1)
                views = [t.narrow(0, s, n) for s, n, _ in lay.segments]
                norms = torch.stack(torch._foreach_norm(views)) if views else t.new_zeros(0)
                rows.append(norms.to(_norm_dtype(t)) ** 2)
            partials.append(torch.stack(rows))
        return LayerwiseOptimizer._reduce_squares(partials, layouts)

    @staticmethod
    def _reduce_squares(partials: list[Tensor], layouts: list[FlatLayout]) -> list[Tensor]:
        """partials[i]: (kinds, segments of layout i) squared norms -> (kinds, names) whole-parameter norms."""
        out = []
        for sq_seg, lay in zip(partials, layouts):
            sq = sq_seg.new_zeros(sq_seg.shape[0], len(lay.names))
            if lay.segments:
                index = torch.tensor([i for _, _, i in lay.segments], device=sq_seg.device)
                sq.index_add_(1, index, sq_seg)
            if lay.group is not None:
                dist.all_reduce(sq, group=lay.group)
            out.append(sq.sqrt())
        return out

    @staticmethod
    def _scale_segments(tensors: list[Tensor], layouts: list[FlatLayout], per_param: list[Tensor]) -> None:
        """Multiplies every segment in place by its parameter's factor (per_param[i][name index])."""
        views, factors = [], []
        for t, lay, f in zip(tensors, layouts, per_param):
            if not lay.segments:
                continue
            index = torch.tensor([i for _, _, i in lay.segments], device=f.device)
            views += [t.view(-1).narrow(0, s, n) for s, n, _ in lay.segments]
            # factors stay in the norms' precision (fp32 for 16-bit tensors), as in the fused kernels: rounded to
            # bf16 first, lr * ratio would move each step by up to 2^-9 of itself
            factors += list(f[index].unbind())
        if views:
            torch._foreach_mul_(views, factors)

    def _record(self, layouts: list[FlatLayout], ratios: list[Tensor]) -> None:
        for lay, r in zip(layouts, ratios):
            self._last_ratios[lay.names] = r.detach()

    def trust_ratios(self) -> dict[str, float]:
        """{parameter name: trust ratio of the last step}, for parameters whose group adapts."""
        result: dict[str, float] = {}
        for names, r in self._last_ratios.items():
            result.update(zip(names, r.tolist()))
        return result

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            params, layouts = self._group_tensors(group, gi)
            if params:
                self._step_group(group, params, layouts)
        return loss

    def _step_group(self, group: dict[str, Any], params: list[Tensor], layouts: list[FlatLayout]) -> None:
        """One param group's update: `params` (those with a gradient) laid out as `layouts` say."""
        raise NotImplementedError

    def _group_tensors(self, group: dict[str, Any], group_index: int) -> tuple[list[Tensor], list[FlatLayout]]:
        params, layouts = [], []
        for j, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            params.append(p)
            layouts.append(self._layout_of(p, group, group_index, j))
        return params, layouts
