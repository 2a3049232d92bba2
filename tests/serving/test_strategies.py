"""The strategies as objects: looked up by name once, and each deciding what is cached,
under which key, where it is stored (its shift) and what is copied."""

from __future__ import annotations

import pytest

from lazyattention.reference.cache import content_key
from lazyattention.reference.layout import Placement
from lazyattention.serving.engine import Engine
from lazyattention.serving.model import Model, ModelConfig
from lazyattention.serving.strategies import (
    STRATEGIES,
    BlockAttention,
    Lazy,
    PrefixCache,
    RawCache,
    Recompute,
    Strategy,
    blocks_needed,
    get_strategy,
)

A, B = [1, 2, 3, 4, 5], [6, 7, 8]


def test_names_and_lookup():
    assert STRATEGIES == ("lazy", "block_attention", "prefix_cache", "recompute", "raw_cache")
    for name in STRATEGIES:
        strategy = get_strategy(name)
        assert isinstance(strategy, Strategy) and strategy.name == name == str(strategy)
    mine = BlockAttention()
    assert get_strategy(mine) is mine
    assert Engine(Model(ModelConfig.tiny()), mine, num_blocks=4).strategy is mine
    with pytest.raises(ValueError, match=r"unknown strategy 'Lazy'; choose one of lazy, block_attention"):
        get_strategy("Lazy")


def test_documents_cached_by_content_and_read_in_place_at_a_shift():
    for strategy in (Lazy(), RawCache()):
        assert strategy.segment_keys([A, B]) == [content_key(A), content_key(B)]
        assert strategy.stored_start(7) == 0 and not strategy.reads_prefix()
        seg = Placement((3, 4), 5, start=7, stored_start=0)
        assert strategy.placements([seg], []) == [(seg, seg)]  # no copy: shift δ = 7
        assert strategy.own_prefix([A, B]) == [] and strategy.copy_blocks([A, B], 4) == 0
    assert RawCache().raw and not Lazy().raw


def test_block_attention_copies_each_document_to_its_logical_start():
    strategy = BlockAttention()
    assert strategy.copy_blocks([A, B, A], 4) == 2 + 1 + 2
    segs = [Placement((0, 1), 5, start=0), Placement((2,), 3, start=5)]
    pairs = strategy.placements(segs, [10, 11, 12])
    assert [src for src, _ in pairs] == segs
    assert [dst for _, dst in pairs] == [Placement((10, 11), 5, 0, 0), Placement((12,), 3, 5, 5)]  # shift 0
    assert [dst.stored_start - src.stored_start for src, dst in pairs] == [0, 5]  # the re-rotation δ


def test_prefix_cache_keys_name_the_whole_prefix():
    strategy = PrefixCache()
    ab, ba = strategy.segment_keys([A, B]), strategy.segment_keys([B, A])
    assert ab[0] == strategy.segment_keys([A])[0] and ab[1] != ba[0] and ab[1] != ba[1]
    assert strategy.segment_keys([A, [], B])[1] == content_key([])  # an empty document caches nothing
    assert strategy.stored_start(5) == 5 and strategy.reads_prefix()


def test_recompute_makes_the_documents_own_tokens():
    strategy = Recompute()
    assert strategy.segment_keys([A, B]) == [] and strategy.own_prefix([A, B]) == A + B


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # own tokens: 2 query + 4 new - 1 = 5 -> 2 blocks of 4; A: 2 blocks, B: 1, A again: free
        ("lazy", 2 + 2 + 1),
        ("raw_cache", 2 + 2 + 1),
        ("block_attention", 2 + 2 + 1 + (2 + 1 + 2)),  # plus a copy per placement
        ("prefix_cache", 2 + 2 + 1 + 2),  # A after B is another prefix
        ("recompute", 5),  # 13 document tokens + 5 own = 18 -> 5 blocks
    ],
)
def test_blocks_needed(name, expected):
    assert (
        blocks_needed(name, 4, [9, 9], [A, B, A], 4)
        == expected
        == get_strategy(name).blocks_needed(4, [9, 9], [A, B, A], 4)
    )
