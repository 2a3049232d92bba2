"""Tests of ``lazyattention.reference.layout``: the metadata a kernel reads, and the
errors for layouts that cannot be valid."""

import pytest
import torch
from hypothesis import given, note

from lazyattention.reference import MAX_POSITION, BlockPool, Layout, Placement, RequestLayout, ceil_div
from tests.strategies import build, cases


@given(case=cases())
def test_metadata_describes_every_block(case):
    """Row ``r`` lists request ``r``'s segment blocks then own blocks, each with its
    physical id, the logical position of its first token, its shift and valid length
    (eq. 6); padding rows have length 0; everything is int32."""
    note(case.describe())
    layout = build(case).layout
    meta = layout.metadata()
    S = layout.block_size
    assert all(t.dtype == torch.int32 for t in meta)
    assert meta.cu_queries.tolist()[-1] == layout.num_queries
    for r, req in enumerate(layout.requests):
        rows = []
        for p in (*req.segments, req.own):
            for k, b in enumerate(p.blocks):
                rows.append([b, p.start + k * S, p.start - p.stored_start, min(S, p.length - k * S)])
        n = len(rows)
        assert meta.num_blocks[r] == n
        assert meta.num_segment_blocks[r] == sum(len(s.blocks) for s in req.segments)
        got = torch.stack([meta.block_table[r], meta.block_pos[r], meta.block_shift[r], meta.block_len[r]], -1)
        assert got[:n].tolist() == rows
        assert (meta.block_len[r, n:] == 0).all()
        assert meta.query_start[r] == req.own.start + req.own.length - req.num_queries
        assert int(meta.block_len[r].sum()) == sum(p.length for p in (*req.segments, req.own))
    assert layout.query_positions().tolist() == [
        req.query_start + i for req in layout.requests for i in range(req.num_queries)
    ]


@given(case=cases())
def test_own_slots_address_the_own_blocks(case):
    layout = build(case).layout
    S = layout.block_size
    for r, req in enumerate(layout.requests):
        slots = layout.own_slots(r).tolist()
        assert slots == [req.own.blocks[j // S] * S + j % S for j in range(req.own.length)]  # the definition
        assert slots == [req.own.slot(S, j) for j in range(req.own.length)]
        for seg in req.segments:
            assert seg.slots(S).tolist() == [seg.blocks[j // S] * S + j % S for j in range(seg.length)]
            assert seg.slots(S).tolist() == [seg.slot(S, j) for j in range(seg.length)]
        assert layout.own_slots(r, first=req.own.length - 1).tolist() == slots[-1:]


def test_metadata_holds_positions_near_the_int32_bound():
    """Positions and shifts up to 2^31 − 2 survive the int32 metadata exactly."""
    big = MAX_POSITION - 3
    doc = Placement(blocks=(0,), length=2, start=big)
    own = Placement(blocks=(1,), length=1, start=big + 2, stored_start=0)
    meta = Layout([RequestLayout((doc,), own, 1)], block_size=2).metadata()
    assert meta.block_pos.tolist() == [[big, big + 2]]
    assert meta.block_shift.tolist() == [[big, big + 2]]


def test_metadata_is_cached_per_device():
    layout = Layout([RequestLayout((), Placement((0,), 1, 0), 1)], block_size=1)
    assert layout.metadata() is layout.metadata("cpu")
    meta = layout.metadata("meta")
    assert meta.block_table.device.type == "meta"


def own(length=2, start=0, blocks=None, stored_start=None, block_size=2):
    blocks = tuple(range(ceil_div(length, block_size))) if blocks is None else blocks
    return Placement(blocks, length, start, start if stored_start is None else stored_start)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Layout([], 2), "at least one request"),
        (lambda: Layout([RequestLayout((), own(), 1)], 0), "block_size must be a positive int"),
        (lambda: Layout([RequestLayout((), own(), 1)], 2.0), "block_size must be a positive int"),
        (lambda: Layout([RequestLayout((), own(blocks=(0, 1)), 1)], 2), "2 tokens need 1 blocks of 2, got 2"),
        (lambda: Layout([RequestLayout((own(3, blocks=(4,)),), own(), 1)], 2), "segment 0: 3 tokens need 2 blocks"),
        (lambda: Layout([RequestLayout((own(0, blocks=(0,)),), own(), 1)], 2), "0 tokens need 0 blocks"),
        (lambda: Layout([RequestLayout((), own(), 0)], 2), r"num_queries must be in \[1, own length 2\], got 0"),
        (lambda: Layout([RequestLayout((), own(), 3)], 2), "num_queries must be in"),
        (lambda: Layout([RequestLayout((), own(start=-1), 1)], 2), "negative position -1"),
        (lambda: Layout([RequestLayout((own(2, start=-5),), own(), 1)], 2), "segment 0: negative position"),
        (lambda: Layout([RequestLayout((), own(stored_start=-2), 1)], 2), r"own tokens \(stored\): negative"),
        (lambda: Layout([RequestLayout((), own(start=MAX_POSITION - 1), 1)], 2), "overflow the int32 position"),
        (lambda: Layout([RequestLayout((own(2, start=MAX_POSITION),), own(), 1)], 2), "overflow"),
        (lambda: Layout([RequestLayout((), own(blocks=(-1,)), 1)], 2), "block id -1 is not a non-negative int"),
        (lambda: Layout([RequestLayout((), own(blocks=(1.0,)), 1)], 2), "block id 1.0 is not"),
    ],
)
def test_invalid_layouts_are_rejected(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_placement_checked_once_is_checked_again_at_another_block_size():
    """A layout remembers the placements it checked (a serving loop passes the same
    segment objects every step); the memory is per block size, and a placement whose
    blocks are a list, which can change, is checked every time."""
    doc = Placement((9,), 5, start=0)
    Layout([RequestLayout((doc,), own(), 1)], block_size=8)
    Layout([RequestLayout((doc,), own(), 1)], block_size=8)
    with pytest.raises(ValueError, match="segment 0: 5 tokens need 2 blocks of 4, got 1"):
        Layout([RequestLayout((doc,), own(block_size=4), 1)], block_size=4)
    blocks = [9]
    listed = Placement(blocks, 5, start=0)
    Layout([RequestLayout((listed,), own(), 1)], block_size=8)
    blocks.append(-1)
    with pytest.raises(ValueError, match="segment 0: 5 tokens need 1 blocks of 8, got 2"):
        Layout([RequestLayout((listed,), own(), 1)], block_size=8)


def test_own_tokens_may_not_be_written_into_a_block_a_segment_reads():
    """The own tokens are written while the segments are read: a shared block would be
    overwritten under its readers. Segments may share blocks among themselves."""
    doc = Placement((3, 4), 4, start=0)
    again = Placement((4,), 2, start=9, stored_start=2)  # a block of doc, read-only: fine
    Layout([RequestLayout((doc, again), Placement((5,), 2, 4), 1)], block_size=2)
    mine = RequestLayout((), Placement((7,), 1, 0), 1)
    clash = RequestLayout((again, doc), Placement((5, 3), 3, 4), 1)
    with pytest.raises(ValueError, match=r"request 1: own tokens are written into block 3, which segment 1 reads"):
        Layout([mine, clash], block_size=2)


@pytest.mark.parametrize("n", [0, 1, 5, 16, 17])
@pytest.mark.parametrize("b", [1, 4, 16])
def test_ceil_div(n, b):
    assert ceil_div(n, b) == len(range(0, n, b)) and ceil_div(n, b) * b >= n > (ceil_div(n, b) - 1) * b


def test_check_cache_rejects_blocks_outside_the_cache_and_freed_blocks():
    pool = BlockPool(4)
    doc_blocks, own_blocks = pool.allocate(2), pool.allocate(1)
    layout = Layout(
        [RequestLayout((Placement(tuple(doc_blocks), 3, 10),), Placement(tuple(own_blocks), 1, 13), 1)], block_size=2
    )
    layout.check_cache(4, allocated=pool.is_allocated)
    with pytest.raises(ValueError, match=r"request 0 segment 0: block 1 is outside the cache \(1 blocks\)"):
        layout.check_cache(1)
    pool.release(doc_blocks[1:])
    with pytest.raises(ValueError, match="request 0 segment 0: block 1 is not allocated"):
        layout.check_cache(4, allocated=pool.is_allocated)
    pool.release(own_blocks)
    with pytest.raises(ValueError, match="block 1 is not allocated"):
        layout.check_cache(4, allocated=pool.is_allocated)
    assert pool.refcount(doc_blocks[0]) == 1 and pool.num_free == 3  # checking changed nothing
