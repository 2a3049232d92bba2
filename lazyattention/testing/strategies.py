"""Hypothesis strategies for layouts and RoPE configurations, and the builder that
turns a drawn :class:`Case` into tensors.

One module for the project's tests (reference and fast alike) and for
``lazyattention check`` on a user's machine, so that all of them draw the same kinds of
layouts and build their inputs the same way.

The split follows STYLE.md: a strategy draws only *structure* (documents, requests,
starts, block size, heads, RoPE) and a *seed*; :func:`build` then makes every tensor
from a ``torch.Generator`` seeded with it. A failing example therefore prints as a
small, readable :class:`Case`, and ``build(case, dtype)`` reproduces its tensors.

Usage::

    from lazyattention.testing.strategies import build, cases

    @given(case=cases())
    def test_something(case):
        note(case.describe())
        inputs = build(case, torch.float64)
        out = lazy_prefill(inputs.q, inputs.k_cache, inputs.v_cache, inputs.layout, case.rope)

Shape alphabet: ``B`` requests, ``H`` query heads, ``Hkv`` KV heads, ``Tq`` query
tokens of the batch, ``D`` head dim, ``N`` physical blocks, ``S`` block size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from hypothesis import strategies as st

from lazyattention.reference import (
    Layout,
    LinearScaling,
    Llama3Scaling,
    NoScaling,
    Placement,
    RequestLayout,
    RopeConfig,
    YarnScaling,
    ceil_div,
    write_kv,
)

__all__ = [
    "BLOCK_SIZES",
    "GQA_RATIOS",
    "HEAD_DIMS",
    "Built",
    "Case",
    "DocSpec",
    "RequestSpec",
    "SegmentSpec",
    "build",
    "cases",
    "edge_cases",
    "realistic_cases",
    "kernel_cases",
    "kernel_edge_cases",
    "shifted",
    "rope_configs",
    "scalings",
    "starts",
]

#: Head dims the issue asks for (non-powers of two included).
HEAD_DIMS = (64, 80, 96, 128, 256)
#: Block sizes: 1 (every token its own block), small primes, powers of two.
BLOCK_SIZES = (1, 2, 3, 4, 5, 8, 16)
#: Query heads per KV head.
GQA_RATIOS = (1, 2, 4, 8)

#: Logical positions past 2^16 (16-bit offsets overflow) and near 2^20 (fp32 angles
#: visibly wrong). Positions near 2^31 are tested on the angles alone
#: (test_rope.py): there even the fp64 oracle's angles are only good to ~1e-7 rad,
#: so attention outputs could not be held to the fp64 floor.
BIG_STARTS = (65_536, 2**20)


# --------------------------------------------------------------------------- structure


@dataclass(frozen=True)
class DocSpec:
    """A cached document: ``length`` tokens whose keys are stored rotated at
    ``stored_start + j`` (0 for a document prefilled alone)."""

    length: int
    stored_start: int = 0


@dataclass(frozen=True)
class SegmentSpec:
    """Document ``doc`` (an index into :attr:`Case.docs`) placed at logical ``start``."""

    doc: int
    start: int


@dataclass(frozen=True)
class RequestSpec:
    """A request: its segments, then ``own_length`` own tokens at logical positions
    ``own_start + j`` whose keys are stored at ``own_stored_start + j``; the last
    ``num_queries`` own tokens are the queries."""

    segments: tuple[SegmentSpec, ...]
    own_length: int
    own_start: int
    own_stored_start: int
    num_queries: int


@dataclass(frozen=True)
class Case:
    """Everything a test needs except the tensors, which :func:`build` makes from ``seed``.

    Several requests may place the same document (same physical blocks) at different
    starts: the zero-copy sharing the project exists for.
    """

    docs: tuple[DocSpec, ...]
    requests: tuple[RequestSpec, ...]
    block_size: int
    num_heads: int
    num_kv_heads: int
    rope: RopeConfig
    seed: int
    spare_blocks: int = 1

    @property
    def decode(self) -> bool:
        """True when every request has exactly one query (valid for ``*_decode``)."""
        return all(r.num_queries == 1 for r in self.requests)

    def describe(self) -> str:
        """A one-paragraph summary for Hypothesis ``note()``."""
        reqs = "; ".join(
            "segs=["
            + ", ".join(f"doc{s.doc}(L={self.docs[s.doc].length})@{s.start}" for s in r.segments)
            + f"] own={r.own_length}@{r.own_start}(stored {r.own_stored_start}) q={r.num_queries}"
            for r in self.requests
        )
        docs = ", ".join(f"doc{i}: L={d.length} stored@{d.stored_start}" for i, d in enumerate(self.docs))
        return (
            f"S={self.block_size} H={self.num_heads} Hkv={self.num_kv_heads} rope={self.rope} "
            f"seed={self.seed}\n  docs: {docs}\n  requests: {reqs}"
        )


# --------------------------------------------------------------------------- strategies


def scalings() -> st.SearchStrategy:
    """Every supported RoPE scaling with plausible parameters (eq. 2a–2c)."""
    factor = st.sampled_from((1.0, 2.0, 4.0, 8.0, 16.0, 32.0))
    return st.one_of(
        st.just(NoScaling()),
        st.builds(LinearScaling, factor=factor),
        st.builds(
            Llama3Scaling,
            factor=factor,
            low_freq_factor=st.sampled_from((1.0, 2.0)),
            high_freq_factor=st.sampled_from((4.0, 8.0)),
            original_max_position=st.sampled_from((256, 8192)),
        ),
        st.builds(
            YarnScaling,
            factor=factor,
            original_max_position=st.sampled_from((512, 4096)),
            beta_fast=st.sampled_from((32.0, 16.0)),
            beta_slow=st.sampled_from((1.0, 2.0)),
            attention_factor=st.sampled_from((None, 0.8, 1.3)),
            truncate=st.booleans(),
        ),
    )


@st.composite
def rope_configs(draw, head_dims=HEAD_DIMS) -> RopeConfig:
    """A :class:`RopeConfig`: head dim, full or partial rotary, base, style, scaling."""
    d = draw(st.sampled_from(head_dims))
    partial = draw(st.booleans())
    rotary = 2 * draw(st.integers(1, d // 2 - 1)) if partial else d
    return RopeConfig(
        head_dim=d,
        rotary_dim=rotary,
        base=draw(st.sampled_from((10_000.0, 500_000.0, 1_000_000.0))),
        style=draw(st.sampled_from(("neox", "interleaved"))),
        scaling=draw(scalings()),
    )


def starts(big: bool = True) -> st.SearchStrategy[int]:
    """Logical start positions: small ones, and with ``big`` ones around 2^16 and 2^20."""
    small = st.integers(0, 48)
    if not big:
        return small
    return st.one_of(small, *(st.integers(b - 40, b + 40) for b in BIG_STARTS))


@st.composite
def cases(
    draw,
    decode: bool = False,
    max_requests: int = 3,
    max_docs: int = 3,
    max_segments: int = 3,
    max_doc_length: int = 9,
    max_own_length: int = 6,
    head_dims=HEAD_DIMS,
    block_sizes=BLOCK_SIZES,
    big_starts: bool = True,
) -> Case:
    """A whole batch: documents, requests placing them, block size, heads, RoPE, seed.

    Layouts cover reordering (segments in any order of starts), gaps, overlaps (a
    start copied from an earlier segment of the request), the same document used by
    several requests at different starts, empty and one-token documents, lengths not
    a multiple of the block size, and own tokens stored at positions other than their
    logical ones.

    Args:
        decode: every request has exactly one query.
    """
    start = starts(big_starts)
    docs = tuple(
        DocSpec(length=draw(st.integers(0, max_doc_length)), stored_start=draw(st.one_of(st.just(0), start)))
        for _ in range(draw(st.integers(1, max_docs)))
    )
    requests = []
    for _ in range(draw(st.integers(1, max_requests))):
        segments: list[SegmentSpec] = []
        for _ in range(draw(st.integers(0, max_segments))):
            doc = draw(st.integers(0, len(docs) - 1))
            if segments and draw(st.booleans()):
                s = draw(st.sampled_from([seg.start for seg in segments]))  # overlap: equal starts
            else:
                s = draw(start)
            segments.append(SegmentSpec(doc=doc, start=s))
        own_length = draw(st.integers(1, max_own_length))
        own_start = draw(start)
        own_stored = draw(st.one_of(st.just(own_start), st.just(0), start))
        num_queries = 1 if decode else draw(st.integers(1, own_length))
        requests.append(RequestSpec(tuple(segments), own_length, own_start, own_stored, num_queries))
    num_kv_heads = draw(st.integers(1, 2))
    return Case(
        docs=docs,
        requests=tuple(requests),
        block_size=draw(st.sampled_from(block_sizes)),
        num_heads=num_kv_heads * draw(st.sampled_from(GQA_RATIOS)),
        num_kv_heads=num_kv_heads,
        rope=draw(rope_configs(head_dims)),
        seed=draw(st.integers(0, 2**32 - 1)),
        spare_blocks=draw(st.integers(0, 2)),
    )


def edge_cases() -> dict[str, Case]:
    """Named cases to pin with ``@example``: the edges STYLE.md lists.

    Every one has one query per request, so each is valid for decode and prefill alike.
    """
    rope = RopeConfig(head_dim=64)

    def one(docs, segs, own_length, own_start, block_size=4, heads=(2, 1), r=rope):
        req = RequestSpec(tuple(SegmentSpec(d, s) for d, s in segs), own_length, own_start, own_start, 1)
        return Case(tuple(DocSpec(length) for length in docs), (req,), block_size, heads[0], heads[1], r, seed=0)

    return {
        "one_token": one([1], [(0, 0)], 1, 1, block_size=1),
        "not_multiple_of_block": one([7, 5], [(0, 0), (1, 7)], 3, 12, block_size=4),
        "offset_zero": one([6], [(0, 0)], 2, 6),
        "past_65536": one([5, 3], [(1, 70_000), (0, 65_537)], 2, 80_000, block_size=2),
        "near_2_20": one([4], [(0, 2**20 - 3)], 1, 2**20 + 9, r=RopeConfig(head_dim=128, style="interleaved")),
        "equal_starts": one([3, 4, 2], [(0, 10), (1, 10), (2, 10)], 2, 14, block_size=2),
        "gqa_4": one([5], [(0, 3)], 2, 8, heads=(8, 2), r=RopeConfig(head_dim=80, rotary_dim=48)),
        "empty_segment": one([0, 3], [(0, 5), (1, 0)], 1, 5),
    }


@st.composite
def realistic_cases(draw, decode: bool = False) -> Case:
    """A serving-sized batch: 16–20 requests over 4–8 shared documents of 100–1500
    tokens, placed packed, reordered, gapped or past 65,536; own tokens 16–300; head dim
    128 with 32 query heads over 8 KV heads (or a group of 7 over 4); block sizes that
    give both the one-shift and the straddling key tiles."""
    docs = tuple(DocSpec(draw(st.integers(100, 1500))) for _ in range(draw(st.integers(4, 8))))
    requests = []
    for _ in range(draw(st.integers(16, 20))):
        chosen = draw(st.lists(st.integers(0, len(docs) - 1), min_size=1, max_size=4))
        packed = draw(st.booleans())
        position = draw(st.sampled_from((0, 70_000, 2**20 - 5000)))
        segments = []
        for doc in chosen:
            segments.append(SegmentSpec(doc, position))
            gap = 0 if packed else draw(st.integers(0, 50))
            position += docs[doc].length + gap
        if not packed:
            segments.reverse()  # placed out of order
        own = draw(st.integers(16, 300))
        requests.append(
            RequestSpec(tuple(segments), own, position, position, 1 if decode else draw(st.integers(1, own)))
        )
    heads = draw(st.sampled_from(((32, 8), (28, 4))))
    rope = RopeConfig(
        head_dim=128,
        rotary_dim=draw(st.sampled_from((128, 64))),
        base=500_000.0,
        style=draw(st.sampled_from(("neox", "interleaved"))),
        scaling=draw(scalings()),
    )
    return Case(
        docs,
        tuple(requests),
        draw(st.sampled_from((16, 64, 128))),
        heads[0],
        heads[1],
        rope,
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def kernel_cases(decode: bool = False, realistic: bool = False) -> st.SearchStrategy[Case]:
    """The cases a kernel is checked on: :func:`realistic_cases` (a GPU's sizes), or
    small :func:`cases` whose blocks are below, equal to and above a 16-key tile (the
    Triton interpreter's sizes)."""
    if realistic:
        return realistic_cases(decode=decode)
    return cases(decode=decode, block_sizes=(1, 3, 4, 5, 16, 20, 32), max_doc_length=24)


def kernel_edge_cases() -> dict[str, Case]:
    """Named edges beyond :func:`edge_cases` that only a kernel can get wrong, each with
    one query per request (decode-valid)."""

    def one(docs, segs, own_length, own_start, block_size, heads, rope, own_stored=None):
        stored = own_start if own_stored is None else own_stored
        req = RequestSpec(tuple(SegmentSpec(d, s) for d, s in segs), own_length, own_start, stored, 1)
        return Case(tuple(docs), (req,), block_size, heads[0], heads[1], rope, seed=1)

    near_max = 2**31 - 100
    return {
        # G = 3: the group is padded to 4 rows per token and the padding masked.
        "gqa_3": one([DocSpec(9)], [(0, 4)], 5, 20, 4, (6, 2), RopeConfig(head_dim=96)),
        # Keys stored near 2^31 and placed at 0: p − δ overflows int32.
        "shift_past_int32": one(
            [DocSpec(6, stored_start=near_max)], [(0, 0)], 3, 10, 4, (2, 1), RopeConfig(head_dim=64)
        ),
        # A block larger than the key tile: several tiles of one block, one shift.
        "block_larger_than_tile": one(
            [DocSpec(37), DocSpec(5)],
            [(1, 100), (0, 3)],
            4,
            140,
            40,
            (4, 2),
            RopeConfig(head_dim=80, rotary_dim=32, style="interleaved"),
        ),
        "head_dim_256": one([DocSpec(7)], [(0, 65_540)], 2, 65_600, 3, (4, 1), RopeConfig(head_dim=256)),
    }


def shifted(case: Case, c: int) -> Case:
    """``case`` with every logical position moved by ``c`` (segment starts and own
    tokens; stored positions unchanged): by eq. (4) every attention output is the same."""
    requests = tuple(
        replace(
            r,
            segments=tuple(replace(s, start=s.start + c) for s in r.segments),
            own_start=r.own_start + c,
        )
        for r in case.requests
    )
    return replace(case, requests=requests)


# --------------------------------------------------------------------------- tensors


@dataclass
class Built:
    """The tensors of a :class:`Case`, in one dtype.

    Attributes:
        layout: the :class:`Layout` every implementation reads.
        q: ``[Tq, H, D]`` pre-RoPE queries, requests concatenated in layout order.
        k_cache: ``[N, S, Hkv, D]`` keys written by ``write_kv`` with ``rope``,
            rotated at their stored positions (for the lazy and eager functions).
        raw_k_cache: ``[N, S, Hkv, D]`` the same keys written with ``rope=None``
            (for the raw-cache functions).
        v_cache: ``[N, S, Hkv, D]`` values.
        doc_blocks: physical blocks of each document, in :attr:`Case.docs` order.
        keys: ``[T, Hkv, D]`` pre-RoPE keys of each document (``"doc<i>"``) and each
            request's own tokens (``"own<r>"``), in the dtype of the build.
        values: the matching values.

    Every slot no token was written to holds NaN, so an implementation that reads past
    a block's valid length shows an infinite error instead of a plausible number.
    """

    layout: Layout
    q: torch.Tensor
    k_cache: torch.Tensor
    raw_k_cache: torch.Tensor
    v_cache: torch.Tensor
    doc_blocks: list[tuple[int, ...]]
    keys: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]


def build(
    case: Case,
    dtype: torch.dtype = torch.float64,
    values_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> Built:
    """Make the tensors of ``case`` from ``torch.Generator().manual_seed(case.seed)``.

    Random numbers are drawn in float64, rounded to ``values_dtype`` (default
    ``dtype``) and stored in ``dtype``. So ``build(case, torch.float64,
    values_dtype=torch.bfloat16)`` is the float64 oracle's input for
    ``build(case, torch.bfloat16)``: the very same numbers, held exactly.

    Args:
        case: the structure and seed.
        dtype: dtype of every tensor (and of the cache writes' arithmetic).
        values_dtype: dtype the random numbers are rounded through.
        device: where the tensors live.

    Returns:
        A :class:`Built`.
    """
    values_dtype = values_dtype or dtype
    gen = torch.Generator().manual_seed(case.seed)
    S, hkv, h, d = case.block_size, case.num_kv_heads, case.num_heads, case.rope.head_dim

    def randn(*shape):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64).to(values_dtype)
        return x.to(dtype).to(device)

    def blocks_for(length):
        return ceil_div(length, S)

    total = (
        sum(blocks_for(doc.length) for doc in case.docs)
        + sum(blocks_for(r.own_length) for r in case.requests)
        + case.spare_blocks
    )
    # A random permutation: block tables are neither sorted nor contiguous.
    ids = torch.randperm(max(total, 1), generator=gen).tolist()

    def take(n):
        out = tuple(ids[:n])
        del ids[:n]
        return out

    shape = (max(total, 1), S, hkv, d)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    raw_k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    keys, values = {}, {}

    def write(name, blocks, length, stored_start):
        k, v = randn(length, hkv, d), randn(length, hkv, d)
        slots = Placement(blocks, length, stored_start, stored_start).slots(S).to(device)
        pos = (torch.arange(length, dtype=torch.int64) + stored_start).to(device)
        write_kv(k, v, k_cache, v_cache, slots, pos, case.rope)
        write_kv(k, v, raw_k_cache, v_cache, slots, pos, None)
        keys[name], values[name] = k, v

    doc_blocks = []
    for i, doc in enumerate(case.docs):
        blocks = take(blocks_for(doc.length))
        write(f"doc{i}", blocks, doc.length, doc.stored_start)
        doc_blocks.append(blocks)

    requests = []
    for r, spec in enumerate(case.requests):
        own_blocks = take(blocks_for(spec.own_length))
        write(f"own{r}", own_blocks, spec.own_length, spec.own_stored_start)
        segments = tuple(
            Placement(doc_blocks[s.doc], case.docs[s.doc].length, s.start, case.docs[s.doc].stored_start)
            for s in spec.segments
        )
        own = Placement(own_blocks, spec.own_length, spec.own_start, spec.own_stored_start)
        requests.append(RequestLayout(segments, own, spec.num_queries))
    layout = Layout(requests, S)
    q = randn(layout.num_queries, h, d)
    return Built(layout, q, k_cache, raw_k_cache, v_cache, doc_blocks, keys, values)
