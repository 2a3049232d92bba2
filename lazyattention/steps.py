"""A step's integer data on the host, for the loops that capture steps in CUDA graphs.

The serving runner (:mod:`lazyattention.serving.runner`) and ``LazyRAG``'s captured
steps (:mod:`lazyattention.integrations.transformers.graphs`) build a step the same
way, with what is here:

* :class:`HostMetadata` builds a layout's :class:`~lazyattention.reference.BlockMetadata`
  on the host, equal to ``Layout.metadata()`` and faster: the rows of a request's
  segments are kept from one step to the next, and only its own tokens' rows are new;
* :func:`graph_bucket` is the rule that rounds a step's batch and block count up to
  the shapes of a captured graph;
* :class:`Packer` lays a step's named int32 tensors back to back in one buffer, so
  they reach the device in one copy, and gives views of that copy by name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lazyattention.reference.layout import BlockMetadata, Layout, Placement, RequestLayout

__all__ = ["BLOCK_FIELDS", "INT32_MAX", "HostMetadata", "Packer", "graph_bucket", "metadata_views", "power_of_two"]

INT32_MAX = 2**31 - 1

#: The ``[B, M]`` fields of :class:`~lazyattention.reference.BlockMetadata`.
BLOCK_FIELDS = ("block_table", "block_pos", "block_shift", "block_len")


def power_of_two(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 << max(0, n - 1).bit_length()


def graph_bucket(batch: int, blocks: int) -> tuple[int, int]:
    """The CUDA-graph bucket ``(B', M')`` of a decode step of ``batch`` requests whose
    longest block table has ``blocks`` blocks.

    ``B'``: the next power of two up to 8, then the next multiple of 8. ``M'``: 16 up
    to 16 blocks; above, ``blocks`` rounded up to a multiple of an eighth of the power
    of two below it (eight bucket sizes per octave: at most 1/8 of padding).

    Examples:
        >>> graph_bucket(3, 16), graph_bucket(17, 130), graph_bucket(16, 516)
        ((4, 16), (24, 144), (16, 576))
    """
    if batch < 1 or blocks < 1:
        raise ValueError(f"a decode step needs batch >= 1 and blocks >= 1, got {batch}, {blocks}")
    b = power_of_two(batch) if batch <= 8 else -(-batch // 8) * 8
    if blocks <= 16:
        return b, 16
    step = 1 << ((blocks - 1).bit_length() - 4)
    return b, -(-blocks // step) * step


class Packer:
    """Named int32 tensors packed into one flat buffer, and views of a copy of it."""

    def __init__(self):
        self.names: list[str] = []
        self.shapes: list[tuple[int, ...]] = []
        self.parts: list[torch.Tensor] = []

    def add(self, name: str, t: torch.Tensor | None) -> None:
        if t is None:
            return
        if t.dtype != torch.int32 and t.numel() and (int(t.min()) < -INT32_MAX or int(t.max()) > INT32_MAX):
            raise ValueError(f"{name} does not fit int32: range [{int(t.min())}, {int(t.max())}]")
        self.names.append(name)
        self.shapes.append(tuple(t.shape))
        self.parts.append(t.reshape(-1).to(torch.int32))

    @property
    def size(self) -> int:
        return sum(p.numel() for p in self.parts)

    def pack(self, out: torch.Tensor) -> None:
        """Write the parts, back to back, into ``out [size]`` (host memory)."""
        if self.parts:
            torch.cat(self.parts, out=out)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``name -> view`` of ``flat``, a copy of what :meth:`pack` wrote."""
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            n = math.prod(shape)
            out[name] = flat[offset : offset + n].view(shape)
            offset += n
        return out


def _placement_rows(placements: Sequence[Placement], block_size: int) -> torch.Tensor:
    """``[blocks, 4]`` int32 rows ``(block, logical start, shift, valid length)`` of the
    placements' blocks, one after another, as ``Layout.metadata`` writes them."""
    s = block_size
    rows = [(b, p.start + k * s, p.shift, min(s, p.length - k * s)) for p in placements for k, b in enumerate(p.blocks)]
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, 4)


class HostMetadata:
    """``Layout.metadata("cpu")`` for a serving loop, built faster.

    A decode step's requests read the same segment placements from one step to the
    next; only their own tokens grow. So the rows of each request's segments are built
    once and kept (keyed by the placements, at most ``capacity`` entries), and a step
    builds only the rows of its own tokens. The result equals ``Layout.metadata()``
    (a test checks it on every step of real engines); the layout is handed it with
    ``Layout.use_metadata``.
    """

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self._segments: dict[tuple[Placement, ...], torch.Tensor] = {}

    def _segment_rows(self, segments: tuple[Placement, ...], block_size: int) -> torch.Tensor:
        rows = self._segments.get(segments)
        if rows is None:
            if len(self._segments) >= self.capacity:
                self._segments.clear()
            rows = _placement_rows(segments, block_size)
            self._segments[segments] = rows
        return rows

    def __call__(self, layout: Layout) -> BlockMetadata:
        """The layout's host metadata (and the layout keeps it, as if it had built it)."""
        meta = self.of_requests(layout.requests, layout.block_size)
        layout.use_metadata(meta)
        return meta

    def of_requests(self, requests: Sequence[RequestLayout], block_size: int) -> BlockMetadata:
        """The host metadata of ``Layout(requests, block_size)``, for requests already
        checked (a layout's, and padding built to be valid), without building the layout."""
        s = block_size
        own = _placement_rows([r.own for r in requests], s).split([len(r.own.blocks) for r in requests])
        rows = [torch.cat((self._segment_rows(r.segments, s), o)) for r, o in zip(requests, own, strict=True)]
        table = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # [B, M, 4], zeros after each request
        per_request = torch.tensor(
            [(r.num_blocks, r.num_blocks - len(r.own.blocks), r.query_start) for r in requests], dtype=torch.int32
        ).reshape(-1, 3)
        queries = torch.tensor([0] + [req.num_queries for req in requests], dtype=torch.int32)
        return BlockMetadata(
            *(table[..., i].contiguous() for i in range(4)),
            num_blocks=per_request[:, 0].contiguous(),
            num_segment_blocks=per_request[:, 1].contiguous(),
            query_start=per_request[:, 2].contiguous(),
            cu_queries=torch.cumsum(queries, 0, dtype=torch.int32),
        )


def metadata_views(views: dict[str, torch.Tensor], prefix: str) -> BlockMetadata:
    """The :class:`~lazyattention.reference.BlockMetadata` among a :class:`Packer`'s
    views, its fields named ``f"{prefix}.{field}"``."""
    return BlockMetadata(*(views[f"{prefix}.{f}"] for f in BlockMetadata._fields))
