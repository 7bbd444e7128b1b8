"""ZeRO-3 partition arithmetic of `bigbatch/optim/zero.py` for every parameter size and world up to 128, no launch.

The real launches (tests/test_optim_zero.py) run a few worlds; this covers the rest of the (numel, world) plane.
"""

from __future__ import annotations

import math
from collections import Counter
from types import SimpleNamespace

from deepspeed.runtime.zero.partition_parameters import Init
from hypothesis import example, given, settings
from hypothesis import strategies as st

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
