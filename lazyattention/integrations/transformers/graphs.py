"""``LazyRAG``'s forward passes replayed from CUDA graphs.

Run eagerly, a forward pass of a stock transformers model does its host work layer by
layer: each module's Python, each launch, and each attention call's checks and plan.
For a small model that host work is the whole cost of a decode step. On a backend
that captures (``Backend.captures_on``), :class:`StepGraphs` runs two kinds of step
from CUDA graphs instead, as the serving runner does:

* a **decode step** of ``B`` requests whose longest block table has ``M`` blocks, in
  the graph of bucket ``(B', M') = graph_bucket(B, M)``
  (:func:`~lazyattention.steps.graph_bucket`); the ``B' − B`` padding requests hold one
  token each in the cache's last scratch block;
* a **prefill** whose logits are wanted at each request's last token — the questions
  after cached documents, or documents seen for the first time, each a request that
  sees only itself — of ``T`` tokens of ``B`` requests, in the graph of bucket
  ``(B', T', M')``: the
  ``B' − B`` padding requests hold one token each, and a filler request takes the
  rest of the ``T'`` rows (``T'`` the next power of two above ``T + B' − B``, at
  least 16, at most ``max_prefill_tokens``), in the scratch blocks. Only each
  request's last token's logits are kept.

A captured step reads one static int32 device buffer (token ids, slots, stored
positions, the kept rows and the padded :class:`~lazyattention.reference.BlockMetadata`)
and writes static logits. Each step fills a pinned host twin of that buffer (the
metadata built by :class:`~lazyattention.steps.HostMetadata` for the padded layout: the
real requests, then the padding ones), copies it in one ``non_blocking`` copy, and
replays. The step's slots and positions are checked on the host first
(``check_write_values``), so no layer reads a device tensor back. A bucket is captured
the first time a step needs it: one eager run of that step on the static buffers
(which compiles the kernels), the capture, then the replay. Everything else — a
prefill longer than the widest bucket, a step whose every row's logits are wanted —
runs eagerly.

The scratch blocks (``PagedCache(scratch_blocks=...)``) lie after the pool: no request
owns them, so what the padding tokens write there changes nothing a real request reads.
The filler writes from the first scratch block on, the padding requests in the last.

Shape alphabet: ``T'`` rows of a captured step, ``B'`` requests of its layout, ``M'``
blocks per request, ``V`` vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lazyattention.backends import Backend
from lazyattention.reference import Layout, Placement, RequestLayout, RopeConfig, ceil_div
from lazyattention.reference.checks import check_write_values
from lazyattention.reference.layout import BlockMetadata
from lazyattention.steps import BLOCK_FIELDS, HostMetadata, Packer, graph_bucket, metadata_views, power_of_two

from .attention import Step
from .cache import PagedCache

__all__ = ["StepGraphs", "MAX_PREFILL_TOKENS", "scratch_blocks"]

#: Rows of the widest prefill bucket (``T'``): a longer prefill runs eagerly.
MAX_PREFILL_TOKENS = 512


def scratch_blocks(block_size: int, max_prefill_tokens: int = MAX_PREFILL_TOKENS) -> int:
    """Scratch blocks a cache needs for :class:`StepGraphs`: room for the filler of the
    widest prefill bucket, and one block for the padding requests."""
    return ceil_div(max_prefill_tokens, block_size) + 1


#: ``(ids [1, T'], step, kept rows or None) -> logits``: the model's forward pass.
Forward = Callable[[torch.Tensor, Step, torch.Tensor | None], torch.Tensor]


@dataclass
class _Graph:
    """One bucket's static buffers, its captured graph and its static logits."""

    ids: torch.Tensor  # [1, T'] token ids, a view of ``device``
    host: torch.Tensor  # pinned int32 twin of ``device``
    views: dict[str, torch.Tensor]  # host views by name
    device: torch.Tensor  # the int32 buffer the graph reads
    step: Step  # reads views of ``device``
    keep: torch.Tensor | None  # [B'] the kept rows (prefill), a view of ``device``
    copied: torch.cuda.Event | None = None
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None


class StepGraphs:
    """Decode steps and short prefills, replayed from CUDA graphs (see the module doc).

    Args:
        forward: runs the model (see :data:`Forward`).
        cache: the paged cache; its scratch blocks take the padding tokens (at least
            ``ceil(max_prefill_tokens / block_size)`` of them: :func:`scratch_blocks`).
        rope: the step's rotation.
        backend: the attention backend; its kernels must read the block metadata from
            device buffers (``capabilities.cuda_graphs``).
        capture: capture and replay CUDA graphs (a CUDA device). ``False`` runs each
            bucket's static step eagerly instead — what a capture records, on any
            device the backend runs on (for tests).
        max_prefill_tokens: rows of a prefill bucket at most (``T'``).

    Raises:
        ValueError: the backend cannot be captured, or the cache has too few scratch blocks.
    """

    def __init__(self, forward: Forward, cache: PagedCache, rope: RopeConfig, backend: Backend, capture: bool = True,
                 max_prefill_tokens: int = MAX_PREFILL_TOKENS):  # fmt: skip
        if not backend.capabilities.cuda_graphs:
            raise ValueError(
                f"CUDA graphs need a backend whose kernels read the step's block metadata from device buffers; "
                f"backend {backend.name!r} does not"
            )
        need = scratch_blocks(cache.block_size, max_prefill_tokens)
        if len(cache.scratch) < need:
            raise ValueError(
                f"CUDA graphs pad steps into the cache's scratch blocks: need {need} for {max_prefill_tokens} "
                f"prefill tokens at block size {cache.block_size}, the cache has {len(cache.scratch)}"
            )
        self.forward = forward
        self.cache = cache
        self.rope = rope
        self.ops = backend.ops
        self.capture = capture
        self.max_prefill_tokens = max_prefill_tokens
        self.graphs: dict[tuple, _Graph] = {}
        self.host_metadata = HostMetadata()
        self.replays = 0
        self._pool = None
        self._stream = None  # the side stream of the warm-up runs and the captures
        self._capacity = (cache.kv.k[0].shape[0] - len(cache.scratch)) * cache.block_size  # slots of the pool
        self._pad = RequestLayout((), Placement(cache.scratch[-1:], 1, start=0), num_queries=1)  # one padding request

    # ------------------------------------------------------------------ buckets

    def bucket(self, layout: Layout, keep: torch.Tensor | None) -> tuple | None:
        """``("decode", B', M')`` or ``("prefill", B', T', M')`` of a step whose logits
        rows ``keep`` are wanted (``None``: every row), or ``None`` when it runs eagerly
        (a prefill whose every row is wanted, or too long for the widest bucket)."""
        rows = layout.max_blocks
        b, t = layout.batch_size, layout.num_queries
        if t == b:
            return ("decode", *graph_bucket(b, rows))
        if keep is None or not torch.equal(keep, _last_rows(layout)):
            return None
        bb, tt = self._prefill_rows(t, b)
        if tt > self.max_prefill_tokens:
            return None
        return ("prefill", bb, tt, graph_bucket(bb + 1, max(rows, ceil_div(tt, self.cache.block_size)))[1])

    def prefill_fits(self, num_tokens: int, batch_size: int) -> bool:
        """Whether a prefill of ``num_tokens`` rows over ``batch_size`` requests (each
        wanting its last row's logits) has a bucket: a longer one runs eagerly, so a
        caller splits it between requests."""
        return self._prefill_rows(num_tokens, batch_size)[1] <= self.max_prefill_tokens

    @staticmethod
    def _prefill_rows(t: int, b: int) -> tuple[int, int]:
        """``(B', T')`` of a prefill of ``t`` rows over ``b`` requests: ``B' − b`` padding
        requests of one row and at least one filler row."""
        bb = graph_bucket(b, 1)[0]
        return bb, max(16, power_of_two(t + bb - b + 1))

    def _padding(self, key: tuple, layout: Layout) -> list[RequestLayout]:
        """The padding requests of ``layout`` in bucket ``key``, in the scratch blocks:
        one token each in the last scratch block, then (prefill) the filler."""
        pads = [self._pad] * (key[1] - layout.batch_size)
        if key[0] == "decode":
            return pads
        n = key[2] - layout.num_queries - len(pads)
        filler = Placement(self.cache.scratch[: ceil_div(n, self.cache.block_size)], n, start=0)
        return [*pads, RequestLayout((), filler, num_queries=n)]

    # ------------------------------------------------------------------ one step

    def run(self, token_ids: torch.Tensor, layout: Layout, slots: torch.Tensor, positions: torch.Tensor,
            key: tuple) -> torch.Tensor:  # fmt: skip
        """The step's logits from its bucket's graph: ``[B, V]``, one row per request
        (its token in a decode, its last token in a prefill).

        Args:
            token_ids: ``[T]`` the step's token ids (host).
            layout: its layout (host).
            slots, positions: ``[T]`` where its K/V go and the positions they are
                rotated at (host tensors).
            key: its :meth:`bucket`.
        """
        check_write_values(slots, positions, self._capacity)
        g = self.graphs.get(key)
        fresh = g is None
        if fresh:
            g = self.graphs[key] = self._new(key)
        self._fill(g, key, token_ids, layout, slots, positions)
        if not self.capture:
            return self.forward(g.ids, g.step, g.keep)[: layout.batch_size]
        if fresh:
            self._capture(g, key)
        g.graph.replay()
        self.replays += 1
        return g.logits[: layout.batch_size].clone()

    def _new(self, key: tuple) -> _Graph:
        """A bucket's buffers and the static step that reads them."""
        kind, bb, m = key[0], key[1], key[-1]
        rows = bb if kind == "decode" else key[2]
        batch = bb if kind == "decode" else bb + 1  # the filler is one more request
        packer = Packer()
        for name in ("ids", "slots", "positions"):
            packer.add(name, torch.zeros(rows, dtype=torch.int32))
        if kind == "prefill":
            packer.add("keep", torch.zeros(bb, dtype=torch.int32))
        for f in BlockMetadata._fields:
            shape = (batch, m) if f in BLOCK_FIELDS else (batch + 1,) if f == "cu_queries" else (batch,)
            packer.add(f"meta.{f}", torch.zeros(shape, dtype=torch.int32))
        device_buffer = torch.zeros(packer.size, dtype=torch.int32, device=self.cache.kv.k[0].device)
        host = torch.zeros(packer.size, dtype=torch.int32, pin_memory=device_buffer.is_cuda)
        device = packer.views(device_buffer)
        s = self.cache.block_size
        if kind == "decode":
            placeholders = [self._pad] * bb
        else:  # the most queries a request of the bucket may have: the kernels' grids are fixed by it
            wide = Placement(self.cache.scratch[: ceil_div(rows - bb, s)], rows - bb, start=0)
            placeholders = [RequestLayout((), wide, num_queries=rows - bb), *[self._pad] * bb]
        layout = Layout(placeholders, s)
        layout.use_metadata(metadata_views(device, "meta"))
        step = Step(layout, device["slots"], device["positions"], self.rope, self.ops, validate=False)
        return _Graph(device["ids"].view(1, rows), host, packer.views(host), device_buffer, step, device.get("keep"))

    def _fill(self, g: _Graph, key: tuple, token_ids, layout: Layout, slots, positions) -> None:
        """The step padded to its bucket into the host twin, then one copy to the device."""
        if g.copied is not None:
            g.copied.synchronize()  # the previous step's copy has left the twin
        padding = self._padding(key, layout)
        meta = self.host_metadata.of_requests([*layout.requests, *padding], layout.block_size)
        h, t, m = g.views, token_ids.numel(), meta.block_table.shape[1]
        h["ids"][:t] = token_ids
        h["ids"][t:] = 0
        h["slots"][:t] = slots
        h["positions"][:t] = positions
        pads = padding if key[0] == "decode" else padding[:-1]
        h["slots"][t : t + len(pads)] = self.cache.scratch[-1] * self.cache.block_size
        h["positions"][t : t + len(pads)] = 0
        if key[0] == "prefill":
            filler = padding[-1].own
            h["slots"][t + len(pads) :] = filler.slots(layout.block_size)
            h["positions"][t + len(pads) :] = torch.arange(filler.length)
            h["keep"][: layout.batch_size] = _last_rows(layout)
            h["keep"][layout.batch_size :] = torch.arange(t, t + len(pads))
        for f, value in zip(BlockMetadata._fields, meta, strict=True):
            view = h[f"meta.{f}"]
            if f in BLOCK_FIELDS:
                view.zero_()
                view[:, :m] = value
            else:
                view.copy_(value)
        g.device.copy_(g.host, non_blocking=True)
        if g.device.is_cuda:
            g.copied = torch.cuda.Event()
            g.copied.record()

    def _capture(self, g: _Graph, key: tuple) -> None:
        """Run the bucket once eagerly (compiling its kernels), capture it. Both on one
        side stream, as PyTorch advises: what a library sets up lazily on a stream's first
        use (cuBLAS's workspace, say) is then set up before the capture, not inside it."""
        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
                self._stream = torch.cuda.Stream()
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):
                self.forward(g.ids, g.step, g.keep)
            torch.cuda.synchronize()
            g.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g.graph, pool=self._pool, stream=self._stream):
                g.logits = self.forward(g.ids, g.step, g.keep)
        except Exception as exc:
            raise RuntimeError(f"CUDA graph capture of LazyRAG's {key[0]} step failed for bucket {key}: {exc}") from exc


def _last_rows(layout: Layout) -> torch.Tensor:
    """``[B]`` the row of each request's last query among the step's ``T`` rows."""
    return torch.tensor([r.num_queries for r in layout.requests]).cumsum(0) - 1
