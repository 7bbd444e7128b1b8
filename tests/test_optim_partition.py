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

    def __init__(self, world: int, group: str | tuple[str, ...] = "group") -> None:
        # several group names: sub-groups over the same ranks (ZeRO-3's sub_group_process_groups)
        self.world, self.local = world, threading.local()
        self.groups = group if isinstance(group, tuple) else (group,)
        self.barrier = threading.Barrier(world, timeout=30)
        self.slots: list = [None] * world

    def get_rank(self, group=None) -> int:
        assert group in self.groups, "asked the default group, not the sub-group's"
        return self.local.rank

    def get_world_size(self, group=None) -> int:
        assert group in self.groups, "asked the default group, not the sub-group's"
        return self.world

    def all_reduce(self, t, group=None) -> None:
        assert group in self.groups, "reduced over the default group, not the sub-group"
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


def deepspeed_wrapper(kind: str, **fields) -> SimpleNamespace:
    """A stand-in for one of DeepSpeed's optimizer wrappers: attach_layouts tells them apart by their class name."""
    return type(kind, (SimpleNamespace,), {})(**fields)


def test_attach_layouts_registers_the_tensor_each_wrapper_hands_the_client():
    """attach_layouts without an engine, on stand-ins for each wrapper DeepSpeed 0.19 builds: the client's own
    parameters at stage 0 (one not in the model left without a layout), ZeRO-1/2's and bf16's flat slices read from
    `_hp_mapping` over each group's own process group, ZeRO-3's flat masters from the shards over each sub-group's
    process group (2 ranks played by threads), names from the model or by position; a sub-group whose padding
    disagrees refused naming that sub-group; offload and unknown wrappers refused by name."""
    model = torch.nn.Linear(2, 3)  # weight: 6 elements, bias: 3
    w, b = model.weight, model.bias
    stray = torch.nn.Parameter(torch.zeros(2))  # in the optimizer, not in the model

    client = LAMB([w, b, stray], lr=0.1, fused=False)
    assert zero.attach_layouts(client, client, model) == "LAMB"
    assert client._layouts == {id(w): FlatLayout(("weight",), ((0, 6, 0),)),
                               id(b): FlatLayout(("bias",), ((0, 3, 0),))}

    def mapped(p, flat, start):  # p's piece at `start` of this rank's flat slice, as _hp_mapping places it
        address = SimpleNamespace(start=start, numel=p.numel())
        p._hp_mapping = SimpleNamespace(get_hp_fragment_address=lambda: address,
                                        get_hp_fragment=lambda: flat.narrow(0, start, p.numel()))
        return p

    for kind, flats, params in (("DeepSpeedZeroOptimizer", "single_partition_of_fp32_groups", "bit16_groups"),
                                ("BF16_Optimizer", "fp32_groups_flat_partition", "bf16_groups")):
        first, second = torch.zeros(12), torch.zeros(2)
        ds = deepspeed_wrapper(kind, real_dp_process_group=["g0", "g1"], **{
            flats: [first, second],
            params: [[mapped(b, first, 0), mapped(w, first, 5)], [mapped(stray, second, 0)]]})
        client = LAMB([first, second], lr=0.1, fused=False)
        assert zero.attach_layouts(ds, client, model) == kind
        assert client._layouts == {id(first): FlatLayout(("bias", "weight"), ((0, 3, 0), (5, 6, 1)), "g0"),
                                   id(second): FlatLayout(("group1.0",), ((0, 2, 0),), "g1")}

    # ZeRO-3 on 2 ranks: weight in shards of 3 (both real), bias in shards of 2 (rank 1: one real, one padding)
    w.ds_numel, w.partition_numel = 6, lambda: 3
    b.ds_numel, b.partition_numel = 3, lambda: 2
    stray.ds_numel, stray.partition_numel = 2, lambda: 1
    ranks = Ranks(2, group=("sg0", "sg1"))

    def on_rank(rank, stray_padding=0):
        flats = [torch.zeros(5), torch.zeros(1)]
        ds = deepspeed_wrapper("DeepSpeedZeroOptimizer_Stage3", fp16_groups=[[w, b], [stray]],
                               fp32_partitioned_groups_flat=flats, sub_group_process_groups=["sg0", "sg1"],
                               groups_padding=[[0, 1], [stray_padding]] if rank == 1 else [[0, 0], [0]])
        client = LAMB(flats, lr=0.1, fused=False)
        assert zero.attach_layouts(ds, client, model) == "DeepSpeedZeroOptimizer_Stage3"
        return [client._layouts[id(f)] for f in flats]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(zero, "dist", ranks)
        results = ranks.run(on_rank)
    assert results == [[FlatLayout(("weight", "bias"), ((0, 3, 0), (3, 2, 1)), "sg0"),
                        FlatLayout(("subgroup1.0",), ((0, 1, 0),), "sg1")],
                       [FlatLayout(("weight", "bias"), ((0, 3, 0), (3, 1, 1)), "sg0"),
                        FlatLayout(("subgroup1.0",), ((0, 1, 0),), "sg1")]]
    ranks = Ranks(2, group=("sg0", "sg1"))  # a fresh barrier: the rank that raises breaks it
    with pytest.MonkeyPatch.context() as patch, pytest.raises(
            zero.UnsupportedLayout, match="^ZeRO-3 sub-group 1: padding of parameter 0 disagrees with groups_padding$"):
        patch.setattr(zero, "dist", ranks)
        ranks.run(lambda rank: on_rank(rank, stray_padding=1))

    client = LAMB([torch.zeros(1)], lr=0.1)
    refused = [deepspeed_wrapper("DeepSpeedZeroOptimizer", cpu_offload=True),
               deepspeed_wrapper("DeepSpeedZeroOptimizer_Stage3", offload_optimizer=True),
               deepspeed_wrapper("DeepSpeedZeroOptimizer_Stage3", offload_param=True)]
    for ds in refused:
        with pytest.raises(zero.UnsupportedLayout, match="^offload_optimizer$"):
            zero.attach_layouts(ds, client, model)
    with pytest.raises(zero.UnsupportedLayout, match="^FP16_UnfusedOptimizer$"):
        zero.attach_layouts(deepspeed_wrapper("FP16_UnfusedOptimizer"), client, model)


def test_reduce_squares_sums_each_parameters_segments_on_the_partials_device():
    """_reduce_squares without a group: the squared partials of each kind summed per parameter (several segments of
    one parameter, a parameter with none here, a layout with no segment at all), then the root; on the meta device
    (which, like CUDA, refuses an index on another device) it builds every tensor on the partials' device."""
    partials = [torch.tensor([[1.0, 4.0, 16.0], [9.0, 0.0, 25.0]], dtype=torch.float64), torch.zeros(2, 0)]
    layouts = [FlatLayout(("a", "b", "c"), ((0, 2, 2), (2, 1, 0), (3, 3, 2))), FlatLayout(("d",), ())]
    first, empty = LAMB._reduce_squares(partials, layouts)
    assert first.tolist() == [[math.sqrt(4.0), 0.0, math.sqrt(17.0)], [0.0, 0.0, math.sqrt(34.0)]]
    assert empty.tolist() == [[0.0], [0.0]]
    on_meta = LAMB._reduce_squares([p.to("meta") for p in partials], layouts)
    assert [(t.device.type, tuple(t.shape)) for t in on_meta] == [("meta", (2, 3)), ("meta", (2, 1))]


def test_scale_segments_multiplies_each_segment_by_its_own_parameters_factor():
    """_scale_segments: each segment times its parameter's factor, elements outside every segment untouched, a
    tensor whose layout has no segment here skipped without stopping the tensors after it; on bf16 tensors the fp32
    factor is applied unrounded (one rounding of the product, as the fused kernels do)."""
    skipped, flat = torch.arange(3.0), torch.arange(1.0, 9.0)
    layouts = [FlatLayout(("x",), ()), FlatLayout(("a", "b"), ((0, 2, 1), (3, 2, 0), (6, 2, 1)))]
    LAMB._scale_segments([skipped, flat], layouts, [torch.tensor([5.0]), torch.tensor([10.0, -2.0])])
    assert skipped.tolist() == [0.0, 1.0, 2.0]
    assert flat.tolist() == [-2.0, -4.0, 3.0, 40.0, 50.0, 6.0, -14.0, -16.0]

    half = torch.linspace(1.0, 2.0, 64).bfloat16()
    factor = torch.tensor([1.0 + 2**-9 + 2**-12])  # not a bf16 number
    expected = (half.float() * factor).bfloat16()
    LAMB._scale_segments([half], [FlatLayout(("w",), ((0, 64, 0),))], [factor])
    assert torch.equal(half, expected)
