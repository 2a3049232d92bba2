"""Paged KV storage bookkeeping: a block pool with reference counts, and a segment
store keyed by content hash with LRU eviction of unreferenced segments.

This module moves no tensors: it decides which physical blocks hold what. The K/V
tensors themselves are plain ``[N, S, Hkv, D]`` tensors indexed by these block ids
(see :class:`PagedKVCache`).

Ownership rule (checked by :meth:`SegmentStore.check_invariants`): every block of a
cached segment has pool reference count ``1 + segment.refs`` — one for the store,
one per request using it. A segment with ``refs > 0`` is never evicted, and a sealed
segment's blocks are never written again.

Every method validates before it mutates: an error leaves pool and store as they were.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .layout import ceil_div

__all__ = ["CacheError", "OutOfBlocks", "BlockPool", "Segment", "SegmentStore", "PagedKVCache", "content_key"]


class CacheError(RuntimeError):
    """Misuse of the pool or the store: double release, unknown block or segment."""


class OutOfBlocks(CacheError):
    """Not enough free blocks, even after evicting every unreferenced segment."""


class BlockPool:
    """``num_blocks`` physical blocks with reference counts.

    Examples:
        >>> pool = BlockPool(4)
        >>> a = pool.allocate(2); pool.num_free
        2
        >>> pool.retain(a); pool.release(a); pool.release(a); pool.num_free
        4
    """

    def __init__(self, num_blocks: int):
        if not isinstance(num_blocks, int) or num_blocks <= 0:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self._refs = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def refcount(self, block: int) -> int:
        self._check_id(block)
        return self._refs[block]

    def is_allocated(self, block: int) -> bool:
        return 0 <= block < self.num_blocks and self._refs[block] > 0

    def _check_id(self, block) -> None:
        if not isinstance(block, int) or not (0 <= block < self.num_blocks):
            raise CacheError(f"unknown block {block!r} (pool has blocks 0..{self.num_blocks - 1})")

    def _check_allocated(self, blocks, action: str) -> None:
        for b in blocks:
            self._check_id(b)
        counts: dict[int, int] = {}
        for b in blocks:
            counts[b] = counts.get(b, 0) + 1
        for b, n in counts.items():
            if action == "release" and self._refs[b] < n:
                raise CacheError(f"double release of block {b} (reference count {self._refs[b]})")
            if action == "retain" and self._refs[b] == 0:
                raise CacheError(f"cannot retain free block {b} (reference count 0)")

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks, each with reference count 1."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"allocate takes a non-negative int, got {n!r}")
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} blocks, only {len(self._free)} of {self.num_blocks} are free")
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def retain(self, blocks) -> None:
        """Add one reference to each (allocated) block."""
        blocks = list(blocks)
        self._check_allocated(blocks, "retain")
        for b in blocks:
            self._refs[b] += 1

    def release(self, blocks) -> None:
        """Drop one reference from each block; a block reaching 0 is free again."""
        blocks = list(blocks)
        self._check_allocated(blocks, "release")
        for b in blocks:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)


def content_key(tokens) -> str:
    """The cache key of a token sequence: SHA-256 of its int64 little-endian bytes.

    ``tokens`` is a tensor or a sequence of ints (packed without a tensor: the same
    bytes, about ten times faster for a document of a thousand tokens).
    """
    if isinstance(tokens, torch.Tensor):
        data = tokens.to(torch.int64).reshape(-1).cpu().contiguous().numpy().astype("<i8").tobytes()
    else:
        packed = array("q", tokens)  # int64: TypeError for a non-integer, OverflowError past int64
        if sys.byteorder == "big":
            packed.byteswap()
        data = packed.tobytes()
    return hashlib.sha256(data).hexdigest()


@dataclass
class Segment:
    """A cached segment: its content key, length, blocks and users.

    ``sealed`` turns true once its K/V has been written; from then on its blocks are
    read-only. ``refs`` counts the requests currently using it.
    """

    key: str
    length: int
    blocks: tuple[int, ...]
    refs: int = 0
    sealed: bool = False
    hits: int = field(default=0, compare=False)


class SegmentStore:
    """Segments by content hash, over a :class:`BlockPool` with block size ``S``.

    * :meth:`acquire` returns the cached segment (a hit) or allocates a new one (a
      miss, to be written by the caller and then sealed with :meth:`seal`), and takes a
      reference for the caller.
    * :meth:`release` drops it; an unreferenced segment stays cached, in LRU order,
      until space is needed.
    * :meth:`allocate` hands out blocks for a request's own tokens, evicting
      unreferenced segments (least recently used first) only when the pool is short.
    """

    def __init__(self, pool: BlockPool, block_size: int):
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.pool = pool
        self.block_size = block_size
        self._segments: dict[str, Segment] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()  # unreferenced segments, oldest first
        self._owner: dict[int, str] = {}  # block -> key of the segment holding it

    def __len__(self) -> int:
        return len(self._segments)

    def __contains__(self, key: str) -> bool:
        return key in self._segments

    def blocks_needed(self, length: int) -> int:
        return ceil_div(length, self.block_size)

    @property
    def num_evictable_blocks(self) -> int:
        return sum(len(self._segments[k].blocks) for k in self._lru)

    def get(self, key: str) -> Segment | None:
        return self._segments.get(key)

    def acquire(self, tokens=None, length: int | None = None, key: str | None = None) -> tuple[Segment, bool]:
        """Take a reference to the segment with these tokens; create it on a miss.

        Give ``tokens`` (hashed by :func:`content_key`) or ``key`` and ``length``.

        Returns:
            ``(segment, hit)``. On a miss the segment is unsealed: write its K/V into
            ``segment.blocks``, then call :meth:`seal`.

        Raises:
            OutOfBlocks: the pool cannot hold it even after evicting every
                unreferenced segment (nothing is evicted then).
        """
        if key is None:
            if tokens is None:
                raise ValueError("acquire needs tokens, or key and length")
            key = content_key(tokens)
            length = tokens.numel() if isinstance(tokens, torch.Tensor) else len(tokens)
        if length is None or length < 0:
            raise ValueError(f"acquire needs a non-negative length, got {length!r}")
        seg = self._segments.get(key)
        if seg is not None:
            if seg.length != length:
                raise CacheError(f"segment {key[:12]} has length {seg.length}, asked for {length}")
            self.pool.retain(seg.blocks)
            if seg.refs == 0:
                del self._lru[key]
            seg.refs += 1
            seg.hits += 1
            return seg, True
        blocks = self.allocate(self.blocks_needed(length))
        seg = Segment(key=key, length=length, blocks=tuple(blocks), refs=1)
        # the store's own reference is the one allocate() gave; add the caller's
        self.pool.retain(blocks)
        self._segments[key] = seg
        for b in blocks:
            self._owner[b] = key
        return seg, False

    def seal(self, seg: Segment) -> None:
        """Mark a segment's K/V as written: its blocks are read-only from now on."""
        self._known(seg).sealed = True

    def release(self, seg: Segment) -> None:
        """Drop the caller's reference. An unsealed segment with no users is dropped
        entirely (its content was never written)."""
        seg = self._known(seg)
        if seg.refs == 0:
            raise CacheError(f"double release of segment {seg.key[:12]} (no references left)")
        self.pool.release(seg.blocks)
        seg.refs -= 1
        if seg.refs == 0:
            if seg.sealed:
                self._lru[seg.key] = None
            else:
                self._drop(seg)

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh blocks (reference count 1, the caller's), evicting LRU
        unreferenced segments only if the pool is short."""
        short = n - self.pool.num_free
        if short > 0:
            if short > self.num_evictable_blocks:
                raise OutOfBlocks(
                    f"need {n} blocks: {self.pool.num_free} free and {self.num_evictable_blocks} "
                    f"evictable of {self.pool.num_blocks}; the rest are in use"
                )
            self.evict(short)
        return self.pool.allocate(n)

    def evict(self, num_blocks: int) -> list[str]:
        """Evict least recently used unreferenced segments until ``num_blocks`` blocks
        were freed (or none is left); return the evicted keys."""
        freed, evicted = 0, []
        while freed < num_blocks and self._lru:
            key, _ = self._lru.popitem(last=False)
            seg = self._segments[key]
            freed += len(seg.blocks)
            self._drop(seg)
            evicted.append(key)
        return evicted

    def writable(self, block: int) -> bool:
        """False for blocks of sealed segments (never written again)."""
        key = self._owner.get(block)
        return key is None or not self._segments[key].sealed

    def _drop(self, seg: Segment) -> None:
        self.pool.release(seg.blocks)
        for b in seg.blocks:
            del self._owner[b]
        del self._segments[seg.key]

    def _known(self, seg: Segment) -> Segment:
        known = self._segments.get(seg.key)
        if known is not seg:
            raise CacheError(f"unknown segment {seg.key[:12]} (evicted, dropped, or from another store)")
        return known

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` if the bookkeeping is inconsistent (for tests)."""
        owned = set()
        for key, seg in self._segments.items():
            assert seg.key == key
            assert len(seg.blocks) == self.blocks_needed(seg.length), f"{key[:12]}: block count"
            for b in seg.blocks:
                assert b not in owned, f"block {b} held by two segments"
                owned.add(b)
                assert self.pool.refcount(b) == 1 + seg.refs, (
                    f"block {b} of {key[:12]}: refcount {self.pool.refcount(b)} != 1 + {seg.refs}"
                )
            assert (seg.refs == 0) == (key in self._lru), f"{key[:12]}: LRU membership vs refs {seg.refs}"
        assert set(self._owner) == owned
        assert all(k in self._segments and self._segments[k].sealed for k in self._lru)


class PagedKVCache:
    """The K/V tensors of a paged cache: per layer, ``k`` and ``v`` of ``[N, S, Hkv, D]``.

    Block ids come from a :class:`BlockPool` of the same ``N``; this class only holds
    the memory. Allocated once, never resized.
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size

    @property
    def bytes_per_block(self) -> int:
        t = self.k[0]
        return 2 * len(self.k) * t[0].numel() * t.element_size()
