"""Tells a LAMB/LARS which parameter owns which elements of the flat tensors DeepSpeed hands it.

DeepSpeed internals relied on (read from DeepSpeed 0.19.8; `check_layouts` fails loudly if they move):
- ZeRO 1/2 (`runtime/zero/stage_1_and_2.py`, `DeepSpeedZeroOptimizer`) and the bf16 optimizer
  (`runtime/bf16_optimizer.py`, `BF16_Optimizer`): the client steps `single_partition_of_fp32_groups[i]`
  (resp. `fp32_groups_flat_partition[i]`), this rank's slice of group i's flat fp32 master. Each model parameter in
  `bit16_groups[i]` (resp. `bf16_groups[i]`) that overlaps the slice carries `_hp_mapping` (`utils/tensor_fragment.py`)
  whose `hp_fragment_address.start/numel` place its piece inside that slice; the slice is reduced over
  `real_dp_process_group[i]`. This is the mapping DeepSpeed's own `safe_get_full_fp32_param` and universal
  checkpoints use.
- ZeRO 3 (`runtime/zero/stage3.py`, `DeepSpeedZeroOptimizer_Stage3`): the client steps
  `fp32_partitioned_groups_flat[s]`, the concatenation, in order, of the local shards (`partition_numel()` elements
  each) of the parameters in `fp16_groups[s]`, over `sub_group_process_groups[s]`. The shard of the rank r of that
  group starts at element r * partition_numel() of the parameter (`partition_parameters.py`, `_partition_param`);
  past the parameter's `ds_numel` elements it holds padding that is not zeroed and must stay out of every norm.
  `groups_padding[s][j]` reports that padding on the last rank only, but a parameter of fewer than about world^2
  elements pads the ends of earlier ranks too, so the real elements are counted from the shard's position.
- fp16/bf16 at stage 0 (`FP16_UnfusedOptimizer`) is refused before this point: see `bigbatch.engine`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bigbatch.optim.layerwise import FlatLayout, LayerwiseOptimizer, whole_tensor_layout


class UnsupportedLayout(RuntimeError):
    """DeepSpeed wrapped the optimizer in a way whose partition layout bigbatch does not know."""


def _names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def _name(names: dict[int, str], p: Any, fallback: str) -> str:
    return names.get(id(p), fallback)


def _hp_mapped_layout(flat: Any, params: list[Any], names: dict[int, str], group: Any, gi: int) -> FlatLayout:
    """ZeRO 1/2 and BF16_Optimizer: segments from each parameter's `_hp_mapping` into this rank's flat slice."""
    ordered = [_name(names, p, f"group{gi}.{j}") for j, p in enumerate(params)]
    segments = []
    for j, p in enumerate(params):
        if not hasattr(p, "_hp_mapping"):
            raise UnsupportedLayout(
                "DeepSpeed parameters carry no _hp_mapping; this DeepSpeed version is not supported")
        mapping = p._hp_mapping
        if mapping is None:
            continue  # no element of this parameter lives in this rank's slice
        address = mapping.get_hp_fragment_address()
        fragment = mapping.get_hp_fragment()
        expected = flat.data_ptr() + address.start * flat.element_size()
        if fragment.data_ptr() != expected or fragment.numel() != address.numel:
            raise UnsupportedLayout(
                f"DeepSpeed's _hp_mapping of {ordered[j]} does not point into the flat partition the optimizer steps"
            )
        segments.append((address.start, address.numel, j))
    segments.sort()
    return FlatLayout(tuple(ordered), tuple(segments), group)


def shard_real_numel(numel: int, shard_numel: int, rank: int) -> int:
    """Real (non-padding) elements of a `numel`-element parameter in the shard of `rank`, when every rank holds
    `shard_numel` elements and rank r's shard starts at element r * shard_numel (ZeRO-3)."""
    return min(max(numel - rank * shard_numel, 0), shard_numel)


def _stage3_segments(flat: Tensor, params: list[Any], group: Any, padding: list[int], s: int
                     ) -> tuple[tuple[int, int, int], ...]:
    """(start, numel, index) of the real elements of each shard in ZeRO-3 sub-group `s`'s flat master.

    Checked against DeepSpeed's own bookkeeping, so a change of layout fails here rather than in the norms: the
    shards fill the flat master, DeepSpeed's padding agrees on the last rank, and the real elements of each
    parameter add up to its size over the group (one all-reduce at start-up).
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    segments, start, real = [], 0, []
    for j, p in enumerate(params):
        n = p.partition_numel()
        count = shard_real_numel(p.ds_numel, n, rank)
        if rank == world - 1 and count != max(n - padding[j], 0):
            raise UnsupportedLayout(f"ZeRO-3 sub-group {s}: padding of parameter {j} disagrees with groups_padding")
        if count:
            segments.append((start, count, j))
        real.append(count)
        start += n
    if start != flat.numel():
        raise UnsupportedLayout(
            f"ZeRO-3 sub-group {s}: shards add up to {start} elements but the flat master holds {flat.numel()}")
    totals = torch.tensor(real, dtype=torch.int64, device=flat.device)
    dist.all_reduce(totals, group=group)
    if totals.tolist() != [p.ds_numel for p in params]:
        raise UnsupportedLayout(f"ZeRO-3 sub-group {s}: shards' real elements do not add up to the parameters' sizes")
    return tuple(segments)


def attach_layouts(ds_optimizer: Any, client: LayerwiseOptimizer, model: nn.Module) -> str:
    """Registers a layout for every tensor DeepSpeed will hand `client.step()`; returns the wrapper's class name."""
    names = _names(model)
    kind = type(ds_optimizer).__name__
    if ds_optimizer is client:  # stage 0 in fp32: the client steps the model's own parameters
        for gi, group in enumerate(client.param_groups):
            for j, p in enumerate(group["params"]):
                if id(p) in names:
                    client.set_layout(p, whole_tensor_layout(p, names[id(p)]))
    elif kind == "DeepSpeedZeroOptimizer":
        if getattr(ds_optimizer, "cpu_offload", False):
            raise UnsupportedLayout("offload_optimizer")
        for gi, flat in enumerate(ds_optimizer.single_partition_of_fp32_groups):
            group = ds_optimizer.real_dp_process_group[gi]
            layout = _hp_mapped_layout(flat, ds_optimizer.bit16_groups[gi], names, group, gi)
            client.set_layout(flat, layout)
    elif kind == "BF16_Optimizer":
        for gi, flat in enumerate(ds_optimizer.fp32_groups_flat_partition):
            group = ds_optimizer.real_dp_process_group[gi]
            layout = _hp_mapped_layout(flat, ds_optimizer.bf16_groups[gi], names, group, gi)
            client.set_layout(flat, layout)
    elif kind == "DeepSpeedZeroOptimizer_Stage3":
        if getattr(ds_optimizer, "offload_optimizer", False) or getattr(ds_optimizer, "offload_param", False):
            raise UnsupportedLayout("offload_optimizer")
        for s, params in enumerate(ds_optimizer.fp16_groups):
            flat = ds_optimizer.fp32_partitioned_groups_flat[s]
            group = ds_optimizer.sub_group_process_groups[s]
            ordered = tuple(_name(names, p, f"subgroup{s}.{j}") for j, p in enumerate(params))
            segments = _stage3_segments(flat, params, group, ds_optimizer.groups_padding[s], s)
            client.set_layout(flat, FlatLayout(ordered, segments, group))
    else:
        raise UnsupportedLayout(kind)
    return kind
