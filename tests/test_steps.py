"""A step's host data: the fast host metadata equals the layout's own, packed tensors
come back by name, and the CUDA-graph buckets cover what they round up."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lazyattention.reference.layout import BlockMetadata, Layout, Placement, RequestLayout
from lazyattention.steps import HostMetadata, Packer, graph_bucket, metadata_views
from lazyattention.testing.strategies import build, cases


@given(case=cases(), steps=st.integers(1, 3))
def test_host_metadata_equals_the_layouts_own(case, steps):
    """On layouts drawn like the attention tests' (gaps, overlaps, shared documents),
    rebuilt over a few steps as a serving loop would (the segment rows then come from
    what it kept), :class:`HostMetadata` gives exactly ``Layout.metadata()``."""
    layout = build(case).layout
    host = HostMetadata()
    for _ in range(steps):
        again = Layout(layout.requests, layout.block_size)
        built = host(again)
        fresh = Layout(layout.requests, layout.block_size).metadata()
        for name, a, b in zip(BlockMetadata._fields, built, fresh, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b), name
        assert again.metadata() is built  # the layout keeps what was built for it


SHAPES = st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=3), min_size=1, max_size=4)


@given(shapes=SHAPES, seed=st.integers(0, 99))
def test_packer_gives_back_each_tensor_by_name(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = {f"t{i}": torch.randint(-(2**31), 2**31 - 1, tuple(shape), generator=g) for i, shape in enumerate(shapes)}
    packer = Packer()
    for name, t in tensors.items():
        packer.add(name, t)
    flat = torch.empty(packer.size, dtype=torch.int32)
    packer.pack(flat)
    views = packer.views(flat.clone())
    assert views.keys() == tensors.keys()
    for name, t in tensors.items():
        assert torch.equal(views[name], t.to(torch.int32))


def test_packer_refuses_what_int32_cannot_hold():
    with pytest.raises(ValueError, match="does not fit int32"):
        Packer().add("slots", torch.tensor([2**31]))


def test_metadata_views_name_the_fields_by_prefix():
    packer = Packer()
    doc = Placement(blocks=(0, 1), length=5, start=10)
    own = Placement(blocks=(2,), length=3, start=15, stored_start=0)
    meta = Layout([RequestLayout((doc,), own, num_queries=3)], block_size=4).metadata()
    for name, t in zip(BlockMetadata._fields, meta, strict=True):
        packer.add(f"decode.{name}", t)
    flat = torch.empty(packer.size, dtype=torch.int32)
    packer.pack(flat)
    for a, b in zip(metadata_views(packer.views(flat), "decode"), meta, strict=True):
        assert torch.equal(a, b)


def test_graph_buckets():
    assert graph_bucket(1, 1) == (1, 16)
    assert graph_bucket(3, 16) == (4, 16)
    assert graph_bucket(16, 17) == (16, 18)
    assert graph_bucket(17, 130) == (24, 144)
    assert graph_bucket(16, 516) == (16, 576)
    with pytest.raises(ValueError, match="batch >= 1"):
        graph_bucket(0, 4)


@pytest.mark.parametrize("batch", [1, 5, 8, 9, 31, 64, 100])
def test_graph_buckets_pad_the_keys_by_at_most_an_eighth(batch):
    """Every block count up to 4,096: ``M'`` covers it by at most 1/8 (or is the
    16-block floor), buckets grow with the count, eight per octave; ``B'`` covers the
    batch, a power of two up to 8 and a multiple of 8 above."""
    buckets = set()
    last = 0
    for m in range(1, 4097):
        bb, mb = graph_bucket(batch, m)
        assert m <= mb and (mb == 16 or 8 * (mb - m) < mb), (m, mb)
        assert mb >= last
        last = mb
        buckets.add(mb)
        assert batch <= bb and (bb & (bb - 1) == 0 if bb <= 8 else bb % 8 == 0) and bb - batch < max(8, batch)
    assert len(buckets) == 1 + 8 * 8  # 16, then eight per octave from 16 to 4,096
