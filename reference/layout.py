"""The layout: which cached tokens each request attends to, at which logical positions.

One :class:`Layout` describes a batch of requests. Every attention implementation —
lazy, raw-cache, eager, reference and fast — reads the same object, so no test can
build the inputs of two implementations differently.

A request is ``[segment_0] … [segment_{n-1}] [own tokens]`` (DESIGN §2):

* each segment is a :class:`Placement`: physical blocks holding keys stored
  (rotated) at positions ``stored_start + j``, placed at logical positions
  ``start + j``. Its *shift* is ``δ = start - stored_start`` (eq. 6). Starts are
  free: reordered, gapped and overlapping segments are all valid.
* the request's own tokens are one more :class:`Placement`, attended causally; its
  last ``num_queries`` tokens are the queries of this call. They are written, so
  their blocks must be none of the blocks the request's segments read (segments may
  share blocks with each other: they are only read).

Masks (eq. 7): a query sees every token of every segment, and the own tokens at or
before its own position. Segment tokens among themselves are not this layout's
business: they were encoded alone, when the segment was prefilled.

Shape alphabet: ``B`` requests, ``M`` blocks per request (padded), ``S`` block size,
``Tq`` query tokens of the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from itertools import repeat
from typing import NamedTuple

import torch

from .rope import check_positions

__all__ = ["ceil_div", "Placement", "RequestLayout", "Layout", "BlockMetadata"]


def ceil_div(a: int, b: int) -> int:
    """``⌈a / b⌉`` for non-negative ints, exactly (no float): e.g. the blocks of ``b``
    tokens that ``a`` tokens need."""
    return -(-a // b)


@dataclass(frozen=True)
class Placement:
    """A run of cached tokens placed at logical positions.

    Args:
        blocks: physical block ids holding the tokens in order; exactly
            ``ceil(length / S)`` of them (the last one may be partly filled).
        length: number of tokens (``0`` is allowed: an empty segment contributes nothing).
        start: logical position of the first token in the request.
        stored_start: position its keys were rotated at when written (0 for a
            segment prefilled alone, the canonical case).
    """

    blocks: tuple[int, ...]
    length: int
    start: int
    stored_start: int = 0

    @property
    def shift(self) -> int:
        """``δ = start - stored_start`` (eq. 6)."""
        return self.start - self.stored_start

    def slot(self, block_size: int, j: int) -> int:
        """The cache slot ``block * S + offset`` of token ``j``: it lives at offset
        ``j % S`` of ``blocks[j // S]``."""
        return self.blocks[j // block_size] * block_size + j % block_size

    def slots(self, block_size: int, first: int = 0) -> torch.Tensor:
        """``[length - first]`` int64 cache slots of tokens ``first..length-1``, as
        :meth:`slot` gives them, computed for all at once."""
        j = torch.arange(first, self.length, dtype=torch.int64)
        blocks = torch.tensor(self.blocks, dtype=torch.int64).reshape(-1)
        return blocks[j // block_size] * block_size + j % block_size


@dataclass(frozen=True)
class RequestLayout:
    """One request: its segments, its own tokens, and how many of those are queries.

    Args:
        segments: the cached segments, fully visible to every query.
        own: the request's own tokens (already written to its blocks), causal.
        num_queries: the last ``num_queries`` own tokens are this call's queries.
    """

    segments: tuple[Placement, ...]
    own: Placement
    num_queries: int

    @property
    def query_start(self) -> int:
        """Logical position of the first query token."""
        return self.own.start + self.own.length - self.num_queries

    @cached_property
    def num_blocks(self) -> int:
        """Blocks of the request's block table: its segments' and its own."""
        return len(self.own.blocks) + sum(len(s.blocks) for s in self.segments)


class BlockMetadata(NamedTuple):
    """Per-block metadata for a paged cache, one row per request, padded to ``M``.

    Segment blocks come first, own blocks last; padding rows have length 0.
    All int32 (``block_pos`` and ``block_shift`` may need the full int32 range).
    """

    block_table: torch.Tensor  # [B, M] physical block id (0 in padding)
    block_pos: torch.Tensor  # [B, M] logical position of the block's first token
    block_shift: torch.Tensor  # [B, M] δ = logical − stored position
    block_len: torch.Tensor  # [B, M] valid tokens in the block (0 in padding)
    num_blocks: torch.Tensor  # [B]
    num_segment_blocks: torch.Tensor  # [B] blocks before this index are segments
    query_start: torch.Tensor  # [B] logical position of each request's first query
    cu_queries: torch.Tensor  # [B + 1] offsets of each request's queries in [Tq]


#: Placements already checked, by ``(id, block size)``: a serving loop lays out the
#: same cached segments (the same objects) step after step, and a frozen placement
#: whose blocks are a tuple, checked once, stays valid. Each entry holds its placement, so its id is not reused
#: while it is here; the table starts afresh when full.
_CHECKED: dict[tuple[int, int], Placement] = {}
_CHECKED_CAPACITY = 1 << 14


class Layout:
    """A batch of :class:`RequestLayout`\\ s over a paged cache with block size ``S``.

    Validates everything it can without the cache: block counts, positions in
    ``[0, 2^31 - 1)``, at least one query per request. :meth:`metadata` turns it into
    the tensors the kernels read; :meth:`check_cache` checks it against a cache.

    Examples:
        >>> doc = Placement(blocks=(0, 1), length=5, start=10)   # cached at 0, used at 10
        >>> own = Placement(blocks=(2,), length=3, start=15, stored_start=0)
        >>> layout = Layout([RequestLayout((doc,), own, num_queries=3)], block_size=4)
        >>> layout.metadata().block_shift.tolist()
        [[10, 10, 15]]
    """

    def __init__(self, requests: list[RequestLayout] | tuple[RequestLayout, ...], block_size: int):
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if len(requests) == 0:
            raise ValueError("a layout needs at least one request")
        self.requests = tuple(requests)
        self.block_size = block_size
        for r, req in enumerate(self.requests):
            self._check_request(r, req)
        #: The largest block id the layout reads or writes (``-1``: none).
        self.max_block = max(
            (max(p.blocks) for req in self.requests for p in (*req.segments, req.own) if p.blocks), default=-1
        )
        self._metadata: dict[torch.device, BlockMetadata] = {}

    # ------------------------------------------------------------------ validation

    def _check_placement(self, r: int, d: int | None, p: Placement) -> None:
        """Check placement ``p`` of request ``r`` (segment ``d``, or its own tokens when
        ``d`` is ``None``) against this layout's block size."""
        if _CHECKED.get((id(p), self.block_size)) is p:
            return
        what = f"request {r} own tokens" if d is None else f"request {r} segment {d}"
        check_positions(p.start, p.length, what)
        check_positions(p.stored_start, p.length, f"{what} (stored)")
        need = ceil_div(p.length, self.block_size)
        if len(p.blocks) != need:
            raise ValueError(f"{what}: {p.length} tokens need {need} blocks of {self.block_size}, got {len(p.blocks)}")
        if not all(map(isinstance, p.blocks, repeat(int))) or min(p.blocks, default=0) < 0:
            bad = next(b for b in p.blocks if not isinstance(b, int) or b < 0)
            raise ValueError(f"{what}: block id {bad!r} is not a non-negative int")
        if type(p.blocks) is tuple:  # immutable: checked once, valid for good
            if len(_CHECKED) >= _CHECKED_CAPACITY:
                _CHECKED.clear()
            _CHECKED[id(p), self.block_size] = p

    def _check_request(self, r: int, req: RequestLayout) -> None:
        for d, seg in enumerate(req.segments):
            self._check_placement(r, d, seg)
        self._check_placement(r, None, req.own)
        if not (1 <= req.num_queries <= req.own.length):
            raise ValueError(
                f"request {r}: num_queries must be in [1, own length {req.own.length}], got {req.num_queries}"
            )
        # Own tokens are written while the segments are read: one physical block must
        # not be both. (Segments may share blocks among themselves: they are read-only.)
        own = set(req.own.blocks)
        for d, seg in enumerate(req.segments):
            if not own.isdisjoint(seg.blocks):
                b = next(b for b in seg.blocks if b in own)
                raise ValueError(
                    f"request {r}: own tokens are written into block {b}, which segment {d} reads; "
                    "a request's own blocks must be disjoint from its segments' blocks"
                )

    def check_cache(self, num_physical_blocks: int, allocated=None) -> None:
        """Raise ``ValueError`` if a block id is outside ``[0, num_physical_blocks)``
        or, when ``allocated`` (a predicate on block ids) is given, not allocated.

        Every attention call runs this, once per layer: without a predicate it is one
        comparison against :attr:`max_block`, and the walk over the blocks happens
        only to name the culprit.
        """
        if allocated is None and self.max_block < num_physical_blocks:
            return
        for r, req in enumerate(self.requests):
            for name, p in [*((f"segment {d}", s) for d, s in enumerate(req.segments)), ("own tokens", req.own)]:
                for b in p.blocks:
                    if b >= num_physical_blocks:
                        raise ValueError(
                            f"request {r} {name}: block {b} is outside the cache ({num_physical_blocks} blocks)"
                        )
                    if allocated is not None and not allocated(b):
                        raise ValueError(f"request {r} {name}: block {b} is not allocated (freed or never taken)")

    # ------------------------------------------------------------------ derived

    @property
    def batch_size(self) -> int:
        return len(self.requests)

    @property
    def num_queries(self) -> int:
        """``Tq``: query tokens over the whole batch."""
        return sum(req.num_queries for req in self.requests)

    @property
    def max_blocks(self) -> int:
        """``M``: blocks of the longest block table (the metadata's row width)."""
        return max(req.num_blocks for req in self.requests)

    def query_positions(self) -> torch.Tensor:
        """``[Tq]`` int64 logical positions of all queries, request by request."""
        return torch.cat([torch.arange(req.num_queries, dtype=torch.int64) + req.query_start for req in self.requests])

    def own_slots(self, r: int, first: int = 0) -> torch.Tensor:
        """Slots ``block * S + offset`` of request ``r``'s own tokens ``first..length-1``
        (:meth:`Placement.slots`)."""
        return self.requests[r].own.slots(self.block_size, first)

    def metadata(self, device: torch.device | str = "cpu") -> BlockMetadata:
        """The per-block tensors of :class:`BlockMetadata` on ``device`` (cached)."""
        device = torch.device(device)
        if device not in self._metadata:
            self._metadata[device] = BlockMetadata(*(t.to(device) for t in self._build_metadata()))
        return self._metadata[device]

    def use_metadata(self, meta: BlockMetadata) -> None:
        """Use ``meta``, already on its device, as :meth:`metadata` there.

        For a serving loop that builds :meth:`metadata` on the host and moves a whole
        step's tensors to the device in one copy (``meta`` is then views of that copy;
        its rows may be padded past ``M`` with length-0 blocks; every kernel then reads
        the same values as from :meth:`metadata`). Only shapes, dtypes and contiguity
        are checked here: the values are the caller's, copied from the host's.
        """
        b, m = meta.block_table.shape
        if b != self.batch_size or m < self.max_blocks:
            raise ValueError(
                f"metadata [{b}, {m}] does not fit the layout's [{self.batch_size}, {self.max_blocks}] "
                "(need B equal, M at least)"
            )
        for name, t in zip(BlockMetadata._fields, meta, strict=True):
            want = (b + 1,) if name == "cu_queries" else (b, m) if name.startswith("block_") else (b,)
            if t.dtype != torch.int32 or tuple(t.shape) != want or t.device != meta.block_table.device:
                raise ValueError(
                    f"metadata {name}: need int32 {want} on {meta.block_table.device}, got {t.dtype} "
                    f"{tuple(t.shape)} on {t.device}"
                )
            if not t.is_contiguous():
                raise ValueError(f"metadata {name} must be contiguous (the kernels read one row stride)")
        self._metadata[meta.block_table.device] = meta

    def _build_metadata(self) -> BlockMetadata:
        S = self.block_size
        rows = []
        for req in self.requests:
            row = []
            for p in (*req.segments, req.own):
                for k, b in enumerate(p.blocks):
                    row.append((b, p.start + k * S, p.shift, min(S, p.length - k * S)))
            rows.append(row)
        B, M = len(rows), max(len(row) for row in rows)
        table = torch.zeros(B, M, 4, dtype=torch.int64)
        for r, row in enumerate(rows):
            if row:
                table[r, : len(row)] = torch.tensor(row, dtype=torch.int64)
        num_segment_blocks = [sum(len(s.blocks) for s in req.segments) for req in self.requests]
        cu = [0]
        for req in self.requests:
            cu.append(cu[-1] + req.num_queries)

        def i32(x):
            return torch.as_tensor(x, dtype=torch.int32)

        return BlockMetadata(
            block_table=i32(table[..., 0]),
            block_pos=i32(table[..., 1]),
            block_shift=i32(table[..., 2]),
            block_len=i32(table[..., 3]),
            num_blocks=i32([len(row) for row in rows]),
            num_segment_blocks=i32(num_segment_blocks),
            query_start=i32([req.query_start for req in self.requests]),
            cu_queries=i32(cu),
        )

    def __repr__(self) -> str:
        return f"Layout(batch_size={self.batch_size}, block_size={self.block_size}, num_queries={self.num_queries})"
