"""The reuse strategies: how a request's documents are cached, stored and read.

Each strategy is a small frozen dataclass that owns its decisions; the engine asks,
never compares names:

==================== =====================================================================
:class:`Lazy`        documents cached once by content at stored positions ``0..L-1`` and
                     read in place at any logical start: shift ``δ = start`` (eq. 6), the
                     query rotated by ``p − δ`` (eq. 8). Zero copy.
:class:`RawCache`    as :class:`Lazy`, keys stored unrotated and rotated in the kernel at
                     their logical positions (eq. 10).
:class:`BlockAttention` cached as in :class:`Lazy`; each request copies its documents'
                     K/V into blocks it owns, re-rotating keys by ``δ`` (eq. 9), and reads
                     the copies (shift 0).
:class:`PrefixCache` ordinary causal attention; a document's K/V is cached under the key
                     of the whole token prefix it ends, stored where it sits (shift 0).
:class:`Recompute`   ordinary causal attention; nothing cached: the documents are the
                     request's own tokens.
==================== =====================================================================

The first three compute one function (documents encoded apart); the last two compute
ordinary full attention.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

from lazyattention.reference.cache import content_key
from lazyattention.reference.layout import Placement, ceil_div

__all__ = [
    "Strategy",
    "Lazy",
    "RawCache",
    "BlockAttention",
    "PrefixCache",
    "Recompute",
    "STRATEGIES",
    "get_strategy",
    "blocks_needed",
]


@dataclass(frozen=True)
class Strategy:
    """The defaults are :class:`Lazy`'s: every document a segment cached by content,
    encoded alone at stored positions ``0..L-1``, read in place at its logical start."""

    name: ClassVar[str] = "lazy"
    #: Keys are cached unrotated and rotated in the kernel (eq. 10).
    raw: ClassVar[bool] = False

    def segment_keys(self, documents: list[list[int]]) -> list[str]:
        """The cache key of each document's segment, in order (``[]``: nothing is cached)."""
        return [content_key(d) for d in documents]

    def stored_start(self, start: int) -> int:
        """Where the keys of a segment placed at logical ``start`` are stored: at 0,
        so one copy is valid at every offset."""
        return 0

    def reads_prefix(self) -> bool:
        """Whether a segment's prefill attends to the segments before it (else it is
        encoded alone)."""
        return False

    def own_prefix(self, documents: list[list[int]]) -> list[int]:
        """Own tokens of the request before its query: none, its documents are segments."""
        return []

    def copy_blocks(self, documents: list[list[int]], block_size: int) -> int:
        """Blocks the request copies its documents into: none, it reads them in place."""
        return 0

    def placements(self, segments: list[Placement], copy_blocks: list[int]) -> list[tuple[Placement, Placement]]:
        """``(source, read)`` per document: the source is the cached segment, ``read``
        what the request's queries read. A source other than ``read`` is copied into
        ``read`` at the request's prefill, keys re-rotated by ``read.stored_start −
        source.stored_start`` (eq. 9). Here: read in place."""
        return [(seg, seg) for seg in segments]

    def blocks_needed(
        self, block_size: int, query, documents, max_new_tokens: int, keys: list[str] | None = None
    ) -> int:
        """KV blocks one request needs at once with nothing else cached: its distinct
        segments, its copies, its own tokens up to ``max_new_tokens`` (the last
        generated token is never written). ``keys``: the documents'
        :meth:`segment_keys`, when the caller has them (hashing is not free)."""
        documents = [list(d) for d in documents]
        own = len(self.own_prefix(documents)) + len(query) + max_new_tokens - 1
        keys = self.segment_keys(documents) if keys is None else keys
        segments = {key: len(documents[d]) for d, key in enumerate(keys)}  # distinct once
        return (
            ceil_div(own, block_size)
            + sum(ceil_div(n, block_size) for n in segments.values())
            + self.copy_blocks(documents, block_size)
        )

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Lazy(Strategy):
    """Deferred positional encoding: one cached copy per document, read in place."""

    name: ClassVar[str] = "lazy"


@dataclass(frozen=True)
class RawCache(Strategy):
    """Unrotated keys, rotated in the kernel at their logical positions (eq. 10)."""

    name: ClassVar[str] = "raw_cache"
    raw: ClassVar[bool] = True


@dataclass(frozen=True)
class BlockAttention(Strategy):
    """Block-Attention re-encoding: a per-request copy of each document, re-rotated to
    its logical start (eq. 9)."""

    name: ClassVar[str] = "block_attention"

    def copy_blocks(self, documents, block_size):
        return sum(ceil_div(len(d), block_size) for d in documents)

    def placements(self, segments, copy_blocks):
        out, i = [], 0
        for seg in segments:
            k = len(seg.blocks)
            copy = Placement(tuple(copy_blocks[i : i + k]), seg.length, start=seg.start, stored_start=seg.start)
            out.append((seg, copy))
            i += k
        return out


@dataclass(frozen=True)
class PrefixCache(Strategy):
    """Prefix caching: reuse only an exact token prefix (document boundaries are the
    reuse points), so a reordered document list misses."""

    name: ClassVar[str] = "prefix_cache"

    def segment_keys(self, documents):
        keys, chain = [], "prefix"  # a document's key names the whole token prefix it ends
        for doc in documents:
            if doc:
                chain = hashlib.sha256(f"{chain}/{content_key(doc)}".encode()).hexdigest()
            keys.append(chain if doc else content_key([]))
        return keys

    def stored_start(self, start):
        return start

    def reads_prefix(self):
        return True


@dataclass(frozen=True)
class Recompute(Strategy):
    """Full recompute: the documents are the request's own tokens, nothing is reused."""

    name: ClassVar[str] = "recompute"

    def segment_keys(self, documents):
        return []

    def own_prefix(self, documents):
        return [t for d in documents for t in d]


_BY_NAME = {s.name: s for s in (Lazy, BlockAttention, PrefixCache, Recompute, RawCache)}

#: The names of the reuse strategies, all served by the same engine.
STRATEGIES = tuple(_BY_NAME)


def get_strategy(strategy: str | Strategy) -> Strategy:
    """A strategy object from its name (one of :data:`STRATEGIES`), or the object itself."""
    if isinstance(strategy, Strategy):
        return strategy
    if strategy not in _BY_NAME:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    return _BY_NAME[strategy]()


def blocks_needed(strategy: str | Strategy, block_size: int, query, documents, max_new_tokens: int) -> int:
    """:meth:`Strategy.blocks_needed` of a strategy given by name or object. An engine
    refuses a request that needs more than its whole budget."""
    return get_strategy(strategy).blocks_needed(block_size, query, documents, max_new_tokens)
