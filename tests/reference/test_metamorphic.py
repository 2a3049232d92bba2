"""Metamorphic properties of deferred positional encoding (DESIGN §1, STYLE 5).

* A common shift of every logical position changes nothing (eq. 4).
* A segment encoded alone at stored position 0 and placed at ``s`` equals the same
  segment encoded at ``s`` — through a tiny two-layer attention stack, where the
  second layer's keys depend on the first layer's outputs, so it checks that whole
  hidden states (not just one layer's scores) are shift-invariant.
* Splitting the keys in two and merging by log-sum-exp equals attending to all (eq. 12).
"""

from dataclasses import replace

import pytest
import torch
from hypothesis import example, given, note, target
from hypothesis import strategies as st

from lazyattention.reference import (
    Layout,
    Placement,
    RequestLayout,
    RopeConfig,
    YarnScaling,
    assert_close,
    eager_attention,
    lazy_decode,
    lazy_prefill,
    merge_attention,
    write_kv,
)
from tests.strategies import build, cases, edge_cases, rope_configs

EDGES = edge_cases()
F64 = torch.float64


# --------------------------------------------------------------------------- common shift


def shifted(layout: Layout, c: int) -> Layout:
    """The same cache read with every logical position moved by ``c``.

    Stored positions stay (the cache is untouched), so every shift ``δ`` grows by ``c``.
    """
    requests = [
        RequestLayout(
            tuple(replace(seg, start=seg.start + c) for seg in req.segments),
            replace(req.own, start=req.own.start + c),
            req.num_queries,
        )
        for req in layout.requests
    ]
    return Layout(requests, layout.block_size)


@example(case=EDGES["equal_starts"], c=65_536)
@example(case=EDGES["offset_zero"], c=1)
@given(case=cases(big_starts=False), c=st.one_of(st.integers(1, 64), st.integers(65_000, 2**20)))
def test_common_shift_of_all_positions_changes_nothing(case, c):
    note(case.describe())
    note(f"common shift c={c}")
    inputs = build(case, F64)
    args = (inputs.q, inputs.k_cache, inputs.v_cache)
    base = lazy_prefill(*args, inputs.layout, case.rope)
    moved = shifted(inputs.layout, c)
    # Lazy rotates the query by p − δ, which the shift leaves unchanged: exact.
    assert torch.equal(lazy_prefill(*args, moved, case.rope), base)
    # Eager rotates by absolute positions: equal within the fp64 floor.
    err = assert_close(eager_attention(*args, moved, case.rope), base, None, F64, "eager after shift")
    target(err, label="eager error after a common shift")


# --------------------------------------------------------------------------- two-layer stack


class TinyStack:
    """Two attention layers with residuals, random weights, attention by the reference.

    ``hidden [T, E]`` → per layer: ``q, k, v`` projections (``[T, H, D]``,
    ``[T, Hkv, D]``), keys and values written to that layer's paged cache with
    ``write_kv`` (rotated at their stored positions), ``lazy_prefill``, output
    projection, residual add.
    """

    def __init__(self, rope: RopeConfig, gen: torch.Generator, heads=(2, 1), width=16, layers=2):
        h, hkv = heads
        d = rope.head_dim
        self.rope, self.h, self.hkv = rope, h, hkv

        def w(i, o):
            return torch.randn(i, o, generator=gen, dtype=F64) / i**0.5

        self.layers = [(w(width, h * d), w(width, hkv * d), w(width, hkv * d), w(h * d, width)) for _ in range(layers)]

    def new_cache(self, num_blocks, block_size):
        shape = (num_blocks, block_size, self.hkv, self.rope.head_dim)
        return [(torch.zeros(shape, dtype=F64), torch.zeros(shape, dtype=F64)) for _ in self.layers]

    def forward(self, hidden, caches, layout: Layout, slots, stored_positions):
        """Run the request of ``layout`` (one request; its own tokens are ``hidden``).

        Args:
            hidden: ``[T, E]`` the own tokens' inputs (all of them are queries).
            caches: per layer ``(k_cache, v_cache)``, each ``[N, S, Hkv, D]``.
            slots: ``[T]`` where the own tokens' K/V go.
            stored_positions: ``[T]`` positions their keys are rotated at.
        """
        t, d = hidden.shape[0], self.rope.head_dim
        for (wq, wk, wv, wo), (k_cache, v_cache) in zip(self.layers, caches, strict=True):
            q = (hidden @ wq).view(t, self.h, d)
            k = (hidden @ wk).view(t, self.hkv, d)
            v = (hidden @ wv).view(t, self.hkv, d)
            write_kv(k, v, k_cache, v_cache, slots, stored_positions, self.rope)
            out = lazy_prefill(q, k_cache, v_cache, layout, self.rope)
            hidden = hidden + out.reshape(t, -1) @ wo
        return hidden


@example(rope=RopeConfig(head_dim=64), seg_len=5, query_len=2, s=65_541, block_size=4, seed=0)
@example(rope=RopeConfig(head_dim=64), seg_len=1, query_len=1, s=0, block_size=1, seed=1)
@example(
    rope=RopeConfig(head_dim=80, rotary_dim=32, style="interleaved", scaling=YarnScaling(4.0, 512)),
    seg_len=7,
    query_len=3,
    s=2**20 - 2,
    block_size=3,
    seed=2,
)
@given(
    rope=rope_configs(head_dims=(64, 80)),
    seg_len=st.integers(1, 7),
    query_len=st.integers(1, 3),
    s=st.one_of(st.integers(0, 40), st.integers(65_500, 65_600), st.integers(2**20 - 40, 2**20 + 40)),
    block_size=st.sampled_from((1, 3, 4)),
    seed=st.integers(0, 2**32 - 1),
)
def test_segment_encoded_at_zero_and_placed_at_s_equals_encoded_at_s(rope, seg_len, query_len, s, block_size, seed):
    note(f"rope={rope} L={seg_len} queries={query_len} s={s} S={block_size} seed={seed}")
    gen = torch.Generator().manual_seed(seed)
    stack = TinyStack(rope, gen)
    doc = torch.randn(seg_len, 16, generator=gen, dtype=F64)
    query = torch.randn(query_len, 16, generator=gen, dtype=F64)
    nb_doc, nb_query = -(-seg_len // block_size), -(-query_len // block_size)
    doc_blocks, query_blocks = tuple(range(nb_doc)), tuple(range(nb_doc, nb_doc + nb_query))

    def slots(blocks, n):
        j = torch.arange(n)
        return torch.tensor(blocks)[j // block_size] * block_size + j % block_size

    def run(stored_at):
        """Encode the document alone with keys stored at ``stored_at``, then run the
        query tokens of a request placing it at ``s``; return both hidden states."""
        caches = stack.new_cache(nb_doc + nb_query, block_size)
        alone = Layout([RequestLayout((), Placement(doc_blocks, seg_len, stored_at, stored_at), seg_len)], block_size)
        doc_out = stack.forward(doc, caches, alone, slots(doc_blocks, seg_len), torch.arange(seg_len) + stored_at)
        q_start = s + seg_len
        request = Layout(
            [
                RequestLayout(
                    (Placement(doc_blocks, seg_len, s, stored_at),),
                    Placement(query_blocks, query_len, q_start, q_start),
                    query_len,
                )
            ],
            block_size,
        )
        q_out = stack.forward(query, caches, request, slots(query_blocks, query_len), torch.arange(query_len) + q_start)
        return doc_out, q_out

    doc_at_zero, out_at_zero = run(stored_at=0)
    doc_at_s, out_at_s = run(stored_at=s)
    assert_close(doc_at_zero, doc_at_s, None, F64, "document hidden states (encoded at 0 vs at s)")
    err = assert_close(out_at_zero, out_at_s, None, F64, "query hidden states (placed at s vs encoded at s)")
    target(err, label="two-layer error, cached at 0 vs encoded at s")


# --------------------------------------------------------------------------- split + merge


def with_segments(req: RequestLayout, segments) -> RequestLayout:
    return RequestLayout(tuple(segments), req.own, req.num_queries)


@example(case=EDGES["equal_starts"])
@example(case=EDGES["past_65536"])
@given(case=cases(decode=True))
def test_decode_split_segments_and_lse_merge_equals_whole(case):
    """Decode: the query sees all own tokens, so a segment ``dup`` over the own blocks
    (same blocks, same positions) is exactly the own part; hence

        merge(attend(S1 + own), attend(S2 + own)) == attend(S1 + S2 + dup + own)

    with each side counting the own tokens twice. The whole is computed eagerly, the
    parts lazily, so a wrong shift in either shows here too.
    """
    note(case.describe())
    inputs = build(case, F64)
    layout, rope = inputs.layout, case.rope
    halves, wholes = ([], []), []
    for r, req in enumerate(layout.requests):
        cut = len(req.segments) // 2 if not r % 2 else len(req.segments)  # one side may be empty
        s1, s2 = req.segments[:cut], req.segments[cut:]
        halves[0].append(with_segments(req, s1))
        halves[1].append(with_segments(req, s2))
        dup = req.own  # a segment placement over the own tokens, at the same shift
        wholes.append(with_segments(req, (*s1, *s2, dup)))
    args = (inputs.q, inputs.k_cache, inputs.v_cache)
    a = lazy_decode(*args, Layout(halves[0], layout.block_size), rope, return_lse=True)
    b = lazy_decode(*args, Layout(halves[1], layout.block_size), rope, return_lse=True)
    whole, whole_lse = eager_attention(*args, Layout(wholes, layout.block_size), rope, return_lse=True)
    merged, merged_lse = merge_attention(*a, *b)
    err = assert_close(merged, whole, None, F64, "merged decode out")
    assert_close(merged_lse, whole_lse, None, F64, "merged decode lse")
    target(err, label="merge error")


@given(case=cases())
def test_prefill_split_segments_and_lse_merge(case):
    """Prefill (causal own tokens, several queries): both sides count the own tokens
    twice, ``merge(S1 + own, S2 + own) == merge(S1 + S2 + own, own)``; the right side
    eager, the left lazy."""
    note(case.describe())
    inputs = build(case, F64)
    layout, rope = inputs.layout, case.rope
    cuts = [len(req.segments) // 2 for req in layout.requests]
    parts = [
        Layout(
            [with_segments(req, segs(req, c)) for req, c in zip(layout.requests, cuts, strict=True)], layout.block_size
        )
        for segs in (lambda req, c: req.segments[:c], lambda req, c: req.segments[c:], lambda req, c: ())
    ]
    args = (inputs.q, inputs.k_cache, inputs.v_cache)
    left = merge_attention(
        *lazy_prefill(*args, parts[0], rope, return_lse=True), *lazy_prefill(*args, parts[1], rope, return_lse=True)
    )
    right = merge_attention(
        *eager_attention(*args, layout, rope, return_lse=True), *eager_attention(*args, parts[2], rope, return_lse=True)
    )
    err = assert_close(left[0], right[0], None, F64, "merged prefill out")
    assert_close(left[1], right[1], None, F64, "merged prefill lse")
    target(err, label="prefill merge error")


def test_merge_with_an_empty_part_is_the_other_part():
    """A part that saw no key has ``lse = −inf`` and weight 0, on either side."""
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(3, 2, 8, generator=gen)
    lse = torch.randn(3, 2, generator=gen)
    empty_lse = torch.full_like(lse, float("-inf"))
    merged, merged_lse = merge_attention(out, lse, torch.ones_like(out), empty_lse)
    assert torch.equal(merged, out) and torch.equal(merged_lse, lse)
    merged, merged_lse = merge_attention(torch.ones_like(out), empty_lse, out, lse)
    assert torch.equal(merged, out) and torch.equal(merged_lse, lse)


def test_merge_rejects_mismatched_shapes():
    out, lse = torch.zeros(3, 2, 8), torch.zeros(3, 2)
    with pytest.raises(ValueError, match="equal shapes"):
        merge_attention(out, lse, out[:2], lse[:2])
