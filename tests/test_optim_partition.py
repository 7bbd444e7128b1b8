"""ZeRO-3 partition arithmetic of `bigbatch/optim/zero.py` for every parameter size and world up to 128, no launch.

The real launches (tests/test_optim_zero.py) run a few worlds; this covers the rest of the (numel, world) plane.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from deepspeed.runtime.zero.partition_parameters import Init
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_optim_lamb import lamb_reference

from bigbatch.optim import LAMB, layerwise, zero
from bigbatch.optim.layerwise import FlatLayout
from bigbatch.optim.zero import shard_real_numel


@st.composite
def numel_and_world(draw: st.DrawFn) -> tuple[int, int]:
    """Worlds 1-128; sizes mostly up to world^2 + 1 (where padding spans several ranks), some far beyond."""
    world = draw(st.integers(1, 128))
    numel = draw(st.one_of(st.integers(1, world * world + 1), st.integers(1, 3 * world * world + 1000)))
    return numel, world


def deepspeed_shard_numel(numel: int, world: int) -> int:
    """Elements per rank as DeepSpeed 0.19's `_partition_param` computes them: (numel + padding) // world."""
    fake_init = SimpleNamespace(_partition_world_size=lambda param: world)
    padding = Init._padding_size(fake_init, SimpleNamespace(ds_numel=numel))
    return (numel + padding) // world


@settings(max_examples=1000, deadline=None)
@given(numel_and_world())
@example((2, 4))  # the 2-element bias of the measurement at 4 ranks
@example((2 * 768, 72))  # BERT's token_type_embeddings at 72 and 80 ranks
@example((2 * 768, 80))
@example((1, 128))
def test_real_elements_per_rank_match_an_element_count(case: tuple[int, int]) -> None:
    numel, world = case
    shard = deepspeed_shard_numel(numel, world)
    assert shard == math.ceil(numel / world)  # the layout the addendum states, read from DeepSpeed's own code
    # Independent count: element k of the flattened parameter lives on rank k // shard.
    owners = Counter(k // shard for k in range(numel))
    counts = [shard_real_numel(numel, shard, r) for r in range(world)]
    assert counts == [owners.get(r, 0) for r in range(world)]
    assert sum(counts) == numel


def test_padding_spans_several_ranks_for_small_tensors() -> None:
    # 2 elements at 4 ranks: shards of 1, so ranks 2 and 3 hold only padding; DeepSpeed reports 2 on rank 3 alone.
    assert [shard_real_numel(2, 1, r) for r in range(4)] == [1, 1, 0, 0]
    # BERT's token_type_embeddings (1536) at 80 ranks: shards of 20; rank 76 holds 16 real elements, 77-79 none.
    assert [shard_real_numel(1536, 20, r) for r in (75, 76, 77, 79)] == [20, 16, 0, 0]


class Ranks:
    """`world` ranks of one process group played by threads: `get_rank`, `get_world_size` and a summing `all_reduce`
    (through a barrier), enough for bigbatch.optim.zero and the optimizers' norm reduction to run in one process."""

    def __init__(self, world: int, group: str = "group") -> None:
        self.world, self.local, self.group = world, threading.local(), group
        self.barrier = threading.Barrier(world, timeout=30)
        self.slots: list = [None] * world

    def get_rank(self, group=None) -> int:
        assert group == self.group, "asked the default group, not the sub-group's"
        return self.local.rank

    def get_world_size(self, group=None) -> int:
        assert group == self.group, "asked the default group, not the sub-group's"
        return self.world

    def all_reduce(self, t, group=None) -> None:
        assert group == self.group, "reduced over the default group, not the sub-group"
        self.slots[self.local.rank] = t.clone()
        self.barrier.wait()
        total = sum(self.slots[1:], self.slots[0].clone())
        self.barrier.wait()
        t.copy_(total)

    def run(self, fn):
        results, errors = [None] * self.world, []

        def body(rank):
            self.local.rank = rank
            try:
                results[rank] = fn(rank)
            except BaseException as err:  # noqa: BLE001 - re-raised below, after every thread ended
                errors.append(err)
                self.barrier.abort()

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:  # the error a rank raised, not the broken barrier the others then met
            raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
        return results


@st.composite
def sub_groups(draw: st.DrawFn) -> tuple[list[int], int]:
    world = draw(st.integers(1, 12))
    return draw(st.lists(st.integers(1, world * world + 3), min_size=1, max_size=4)), world


@settings(max_examples=40, deadline=None)
@given(case=sub_groups())
@example(case=([1], 1))  # one rank: no padding
@example(case=([1], 12))  # one element on 12 ranks: ranks 1-11 hold padding only
@example(case=([2, 3, 5], 4))  # padding > shard: earlier ranks pad too
@example(case=([12 * 12 + 1, 7], 12))  # world^2 + 1: the last rank holds one element
@example(case=([8, 16], 4))  # whole shards: no padding anywhere
def test_zero3_padding_filled_with_nan_stays_out_of_the_norms_and_the_step(case):
    """ZeRO-3's flat fp32 master of a sub-group, built by hand for every rank as DeepSpeed lays it out (each
    parameter's shard of ceil(numel / world) elements in turn, the padding filled with NaN on purpose): the
    segments `_stage3_segments` returns give LAMB, stepping every rank's slice with the norms all-reduced, exactly
    Algorithm 2 on the whole parameters, and every real element finite."""
    numels, world = case
    ranks = Ranks(world)
    g = torch.Generator().manual_seed(sum(numels) + world)
    weights = [torch.randn(n, generator=g, dtype=torch.float64) * (10.0 ** (i - 1)) for i, n in enumerate(numels)]
    grads = [torch.randn(n, generator=g, dtype=torch.float64) for n in numels]
    shard = [deepspeed_shard_numel(n, world) for n in numels]
    params = [SimpleNamespace(ds_numel=n, partition_numel=lambda s=s: s) for n, s in zip(numels, shard)]

    def slice_of(full, rank):
        parts = []
        for t, s in zip(full, shard):
            part = torch.full((s,), math.nan, dtype=torch.float64)
            real = t[rank * s:(rank + 1) * s]
            part[:real.numel()] = real
            parts.append(part)
        return torch.cat(parts)

    def on_rank(rank):
        padding = [s * world - n if rank == world - 1 else 0 for n, s in zip(numels, shard)]
        flat = slice_of(weights, rank)
        segments = zero._stage3_segments(flat, params, "group", padding, 0)
        opt = LAMB([flat], lr=0.05, fused=False)
        opt.set_layout(flat, FlatLayout(tuple(map(str, range(len(numels)))), segments, "group"))
        flat.grad = slice_of(grads, rank)
        opt.step()
        return flat, segments

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(zero, "dist", ranks)
        patch.setattr(layerwise, "dist", ranks)
        results = ranks.run(on_rank)
    expected, _ = lamb_reference([w.tolist() for w in weights], [[x.tolist() for x in grads]], lr=0.05)
    for j, (n, s) in enumerate(zip(numels, shard)):
        offset = sum(shard[:j])
        got = torch.cat([flat[offset:offset + s][:max(0, min(s, n - r * s))] for r, (flat, _) in enumerate(results)])
        assert torch.isfinite(got).all()
        assert torch.allclose(got, torch.tensor(expected[j], dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_stage3_segments_refuse_a_layout_that_disagrees_with_deepspeeds_bookkeeping():
    """_stage3_segments checks DeepSpeed's own records so a change of layout fails loudly: the last rank's padding
    against groups_padding, the shards against the flat master's size, the real elements against the sizes."""
    params = [SimpleNamespace(ds_numel=3, partition_numel=lambda: 2),
              SimpleNamespace(ds_numel=4, partition_numel=lambda: 2)]

    def segments(flat_numel, padding, params=params):
        ranks = Ranks(2)  # a fresh barrier: a rank that raised breaks it
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(zero, "dist", ranks)
            return ranks.run(lambda rank: zero._stage3_segments(torch.zeros(flat_numel), params, "group", padding, 5))

    assert segments(4, [1, 0]) == [((0, 2, 0), (2, 2, 1)), ((0, 1, 0), (2, 2, 1))]
    with pytest.raises(zero.UnsupportedLayout, match=r"^ZeRO-3 sub-group 5: padding of parameter 0 disagrees with "
                                                     r"groups_padding$"):
        segments(4, [0, 0])
    with pytest.raises(zero.UnsupportedLayout, match=r"^ZeRO-3 sub-group 5: shards add up to 4 elements but the "
                                                     r"flat master holds 6$"):
        segments(6, [1, 0])
    short = [SimpleNamespace(ds_numel=5, partition_numel=lambda: 2)]  # 2 ranks x 2 cannot hold 5 elements
    with pytest.raises(zero.UnsupportedLayout, match=r"^ZeRO-3 sub-group 5: shards' real elements do not add up "
                                                     r"to the parameters' sizes$"):
        segments(2, [0], short)


def test_zero12_layout_read_from_each_parameters_hp_mapping():
    """_hp_mapped_layout on stand-ins for DeepSpeed's `_hp_mapping` (no engine): segments sorted by their start in the
    flat slice, a parameter with no piece on this rank skipped, names from the model or by position; a mapping that
    points outside the slice or has the wrong size, or none at all, is refused."""
    flat = torch.zeros(10, dtype=torch.float64)

    def mapped(start, numel, fragment=None):
        p = torch.nn.Parameter(torch.zeros(numel))
        address = SimpleNamespace(start=start, numel=numel)
        piece = flat.narrow(0, start, numel) if fragment is None else fragment
        p._hp_mapping = SimpleNamespace(get_hp_fragment_address=lambda: address, get_hp_fragment=lambda: piece)
        return p

    a, c = mapped(6, 4), mapped(0, 6)
    b = torch.nn.Parameter(torch.zeros(3))
    b._hp_mapping = None
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert zero._names(model) == {id(model[0].weight): "0.weight", id(model[0].bias): "0.bias"}
    layout = zero._hp_mapped_layout(flat, [a, b, c], {id(a): "a", id(c): "c"}, "grp", 0)
    assert layout == FlatLayout(("a", "group0.1", "c"), ((0, 6, 2), (6, 4, 0)), "grp")
    with pytest.raises(zero.UnsupportedLayout, match="^DeepSpeed parameters carry no _hp_mapping; this DeepSpeed "
                                                     "version is not supported$"):
        zero._hp_mapped_layout(flat, [a, torch.nn.Parameter(torch.zeros(2))], {}, None, 1)
    for bad in (mapped(2, 4, flat.narrow(0, 3, 4)), mapped(2, 4, flat.narrow(0, 2, 3))):
        with pytest.raises(zero.UnsupportedLayout, match=r"_hp_mapping of group1\.1 does not point into"):
            zero._hp_mapped_layout(flat, [a, bad], {id(a): "a"}, None, 1)
