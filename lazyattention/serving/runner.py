"""The model runner: one engine step's inputs onto the device in one copy, then the forward.

The engine builds a step on the host (:class:`~lazyattention.serving.model.StepInputs`
with CPU tensors and host :class:`~lazyattention.reference.Layout`\\ s). The runner then,
once per step and never per layer:

1. **checks the step on the host** — slots distinct and inside the cache, positions in
   range, the same checks ``write_kv`` makes (``check_write_values``), on CPU tensors,
   so no layer reads a device tensor back (``validate=False`` reaches the layers;
   ``debug=True`` keeps the per-layer checks as well);
2. **packs every integer tensor of the step** — token ids, slots, positions, logit rows,
   Block-Attention's copy slots and shifts, and the :class:`BlockMetadata` of the
   prefill and decode layouts (built on the host by ``Layout.metadata``) — into one
   pinned int32 host buffer, **copies it to the device once** (``non_blocking``), and
   hands the layers views of that copy (``Layout.use_metadata``);
3. runs the forward: eagerly for a step with prefills (or copies), or, for a
   decode-only step on the fast backend on CUDA, by **replaying a CUDA graph**.

Shared-segment decode (``shared_decode=N``, fast backend, rotated cache): a decode step
whose layout has a segment read by ``N`` or more of its requests
(:func:`lazyattention.fast.shared.plan_sharing`, once per step on the host) runs
:func:`~lazyattention.fast.shared.shared_decode` in every layer — eagerly, outside the
CUDA graphs, since the plan is data and a graph's launches are fixed per bucket. The
plan's kernel metadata and its rest layout's block metadata travel in the step's one
copy with everything else, and every layer reuses them. Other decode steps keep their
graphs.

CUDA graphs (as vLLM and nano-vllm capture decode). A decode-only step of ``B``
requests whose longest block table has ``M`` blocks runs in the graph of bucket
``(B', M')``: ``B'`` the next power of two ``>= B``, ``M'`` the next power of two
``>= M`` (at least 16). The graph reads static device buffers, padded to that bucket:
padding requests have one token in the cache's scratch block (the block after the
pool, see ``Model.new_cache``), which no request owns, so their writes change nothing
a real request reads; padding blocks have length 0. Every launch parameter the
kernels derive from shapes (decode's split count, grid sizes) is thereby fixed per
bucket. A bucket is captured the first time a step needs it (an eager warm-up run of
that step, the capture, then its replay) and replayed afterwards; a capture that fails
raises, naming the bucket. Prefill stays eager; the reference backend is never
captured.

Shape alphabet: ``T`` new tokens of a step, ``B`` decode requests, ``M`` blocks per
request (padded), ``V`` vocabulary.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, replace

import torch

from lazyattention.reference.cache import PagedKVCache
from lazyattention.reference.checks import check_write_values
from lazyattention.reference.layout import BlockMetadata, Layout, Placement, RequestLayout

from .model import Model, StepInputs

__all__ = ["ModelRunner", "HostMetadata", "graph_bucket"]

_INT32_MAX = 2**31 - 1
_BLOCK_FIELDS = ("block_table", "block_pos", "block_shift", "block_len")


def graph_bucket(batch: int, blocks: int) -> tuple[int, int]:
    """The CUDA-graph bucket ``(B', M')`` of a decode step of ``batch`` requests whose
    longest block table has ``blocks`` blocks: next powers of two (``M' >= 16``)."""
    if batch < 1 or blocks < 1:
        raise ValueError(f"a decode step needs batch >= 1 and blocks >= 1, got {batch}, {blocks}")
    return 1 << (batch - 1).bit_length(), max(16, 1 << (blocks - 1).bit_length())


class _Packer:
    """Named int32 tensors packed into one flat buffer, and views of a copy of it."""

    def __init__(self):
        self.names: list[str] = []
        self.shapes: list[tuple[int, ...]] = []
        self.parts: list[torch.Tensor] = []

    def add(self, name: str, t: torch.Tensor | None) -> None:
        if t is None:
            return
        if t.dtype != torch.int32 and t.numel() and (int(t.min()) < -_INT32_MAX or int(t.max()) > _INT32_MAX):
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


def _placement_rows(p: Placement, block_size: int) -> torch.Tensor:
    """``[len(p.blocks), 4]`` int32 rows ``(block, logical start, shift, valid length)``,
    as ``Layout.metadata`` writes them."""
    s = block_size
    rows = [(b, p.start + k * s, p.shift, min(s, p.length - k * s)) for k, b in enumerate(p.blocks)]
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
            rows = torch.cat(
                [torch.empty(0, 4, dtype=torch.int32)] + [_placement_rows(p, block_size) for p in segments]
            )
            self._segments[segments] = rows
        return rows

    def __call__(self, layout: Layout) -> BlockMetadata:
        """The layout's host metadata (and the layout keeps it, as if it had built it)."""
        s = layout.block_size
        parts = [(self._segment_rows(r.segments, s), _placement_rows(r.own, s)) for r in layout.requests]
        m = max(len(seg) + len(own) for seg, own in parts)
        table = torch.zeros(len(parts), m, 4, dtype=torch.int32)
        for r, (seg, own) in enumerate(parts):
            table[r, : len(seg)] = seg
            table[r, len(seg) : len(seg) + len(own)] = own
        per_request = torch.tensor(
            [
                (len(seg) + len(own), len(seg), req.query_start)
                for (seg, own), req in zip(parts, layout.requests, strict=True)
            ],
            dtype=torch.int32,
        ).reshape(-1, 3)
        queries = torch.tensor([0] + [req.num_queries for req in layout.requests], dtype=torch.int32)
        meta = BlockMetadata(
            *(table[..., i].contiguous() for i in range(4)),
            num_blocks=per_request[:, 0].contiguous(),
            num_segment_blocks=per_request[:, 1].contiguous(),
            query_start=per_request[:, 2].contiguous(),
            cu_queries=torch.cumsum(queries, 0, dtype=torch.int32),
        )
        layout.use_metadata(meta)
        return meta


def _metadata(views: dict[str, torch.Tensor], prefix: str) -> BlockMetadata:
    return BlockMetadata(*(views[f"{prefix}.{f}"] for f in BlockMetadata._fields))


@dataclass
class _DecodeGraph:
    """A captured decode step: static device inputs (one flat buffer), its pinned host
    twin, the views of both, the graph and its static logits ``[B', V]``."""

    batch: int
    blocks: int
    device_buffer: torch.Tensor
    host_buffer: torch.Tensor
    device: dict[str, torch.Tensor]
    host: dict[str, torch.Tensor]
    step: StepInputs
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None
    copied: torch.cuda.Event | None = None


class ModelRunner:
    """Runs engine steps of ``model`` over ``cache``.

    Args:
        model: the decoder.
        cache: the paged KV cache the steps read and write (from ``model.new_cache``,
            whose scratch block the CUDA graphs' padding rows write).
        cuda_graphs: replay decode-only steps from CUDA graphs. ``None`` (default):
            on for the fast backend on a CUDA device, off otherwise. ``True`` elsewhere
            raises: the reference backend and the CPU are never captured.
        debug: also check slot and position values inside every layer (a host
            synchronisation per layer on a GPU: the tests turn it on). Steps then run
            eagerly, since a check that reads the device cannot be captured.
        scratch_block: the block the padding rows write (default: the cache's last
            block, the scratch block of ``Model.new_cache``). Each step is checked
            never to read or write it.
        shared_decode: run a decode step whose layout has a segment read by at least
            this many requests through shared-segment decode, eagerly (see the module
            docstring); ``None`` (default): never. Fast backend only.

    Example:
        >>> from lazyattention.serving.model import Model, ModelConfig
        >>> model = Model(ModelConfig.tiny()).init_random(0)
        >>> runner = ModelRunner(model, model.new_cache(8, 4))
        >>> runner.cuda_graphs
        False
    """

    def __init__(
        self,
        model: Model,
        cache: PagedKVCache,
        *,
        cuda_graphs: bool | None = None,
        debug: bool = False,
        scratch_block: int | None = None,
        shared_decode: int | None = None,
    ):
        if shared_decode is not None:
            if isinstance(shared_decode, bool) or not isinstance(shared_decode, int) or shared_decode < 1:
                raise ValueError(f"shared_decode must be None or an int >= 1, got {shared_decode!r}")
            if not model.backend.capabilities.shared_decode:
                raise ValueError(
                    f"shared_decode needs the fast backend (shared-segment decode), got backend={model.backend.name!r}"
                )
        self.shared_decode = shared_decode
        self.model = model
        self.cache = cache
        self.debug = debug
        self.device = model.device
        capturable = model.backend.captures_on(self.device)
        if cuda_graphs and not capturable:
            raise ValueError(
                f"cuda_graphs=True needs the fast backend on a CUDA device (a backend CUDA graphs capture), "
                f"got backend={model.backend.name!r} on {self.device}"
            )
        self.cuda_graphs = capturable if cuda_graphs is None else bool(cuda_graphs)
        self.scratch_block = cache.num_blocks - 1 if scratch_block is None else scratch_block
        if not 0 <= self.scratch_block < cache.num_blocks:
            raise ValueError(f"scratch_block {self.scratch_block} is outside the cache ({cache.num_blocks} blocks)")
        self.graphs: dict[tuple[int, int, bool], _DecodeGraph] = {}
        self._padded: dict[tuple[int, int, bool], _DecodeGraph] = {}
        self.host_metadata = HostMetadata()
        self._built: weakref.WeakKeyDictionary[Layout, BlockMetadata] = weakref.WeakKeyDictionary()
        self._pool = None
        self.steps_eager = 0
        self.steps_replayed = 0
        self.steps_shared = 0  # decode steps run through shared-segment decode (eagerly)

    # ------------------------------------------------------------------ public

    def run(self, token_ids: torch.Tensor, step: StepInputs) -> torch.Tensor:
        """``token_ids [T]`` and ``step`` on the host → logits ``[R, V]`` float32 on the
        model's device, one row per ``step.logit_rows``."""
        if token_ids.shape != step.slots.shape:
            raise ValueError(f"token_ids {tuple(token_ids.shape)} and slots {tuple(step.slots.shape)} differ")
        self.check_step(step)
        sharing = self._sharing(step)
        if sharing is not None:
            self.steps_shared += 1
            return self._eager(token_ids, replace(step, sharing=sharing))
        if self._graphable(step):
            return self._replay(token_ids, step)
        return self._eager(token_ids, step)

    def _sharing(self, step: StepInputs):
        """The step's sharing plan, when shared-segment decode is on and the step is a
        decode-only step of a rotated cache with a segment that ``shared_decode`` or
        more of its requests read; otherwise ``None``."""
        if self.shared_decode is None or step.prefill is not None or step.decode is None or step.raw:
            return None
        return self.model.backend.shared().plan_sharing(step.decode, self.shared_decode)

    def check_step(self, step: StepInputs) -> None:
        """The value checks of every ``write_kv`` of the step, once, on the host; and,
        with CUDA graphs on, that no real token touches the scratch block."""
        capacity = self.cache.num_blocks * self.cache.block_size
        check_write_values(step.slots, step.positions, capacity)
        if step.copy_src is not None and step.copy_src.numel():
            check_write_values(step.copy_dst, step.copy_shift, capacity)
            if int(step.copy_src.min()) < 0 or int(step.copy_src.max()) >= capacity:
                raise ValueError(f"copy_src must lie in [0, {capacity})")
        rows = step.logit_rows
        if rows is not None and rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= step.slots.numel()):
            raise ValueError(f"logit_rows must lie in [0, {step.slots.numel()})")
        if self.cuda_graphs:
            self._check_scratch(step)

    def _check_scratch(self, step: StepInputs) -> None:
        """No real token of ``step`` writes or reads the scratch block."""
        s, scratch = self.cache.block_size, self.scratch_block
        written = [step.slots] + ([step.copy_dst] if step.copy_dst is not None else [])
        if any(bool((w // s == scratch).any()) for w in written):
            raise ValueError(f"a step writes into block {scratch}, the runner's scratch block")
        for layout in (step.prefill, step.decode):
            if layout is not None:
                meta = self._host(layout)
                if bool(((meta.block_table == scratch) & (meta.block_len > 0)).any()):
                    raise ValueError(f"a layout reads block {scratch}, the runner's scratch block")

    def _host(self, layout: Layout) -> BlockMetadata:
        """The layout's host metadata, built once (by :class:`HostMetadata`)."""
        meta = self._built.get(layout)
        if meta is None:
            meta = self._built[layout] = self.host_metadata(layout)
        return meta

    # ------------------------------------------------------------------ eager

    def _eager(self, token_ids: torch.Tensor, step: StepInputs) -> torch.Tensor:
        packer = _Packer()
        packer.add("ids", token_ids)
        for name in ("slots", "positions", "logit_rows", "copy_src", "copy_dst", "copy_shift"):
            packer.add(name, getattr(step, name))
        layouts = {"prefill": step.prefill, "decode": step.decode}
        if step.sharing is not None:
            layouts["rest"] = step.sharing.rest
            shared_meta, shared_tiles = self._shared_metadata(step.sharing)
            packer.add("sharing", shared_meta.tensor)
        for prefix, layout in layouts.items():
            if layout is not None:
                for f, t in zip(BlockMetadata._fields, self._host(layout), strict=True):
                    packer.add(f"{prefix}.{f}", t)
        views = packer.views(self._to_device(packer))
        for prefix, layout in layouts.items():
            if layout is not None:
                layout.use_metadata(_metadata(views, prefix))
        if step.sharing is not None:
            shared_meta = shared_meta._replace(tensor=views["sharing"])
            step.sharing.use_metadata(shared_meta, shared_tiles, self.model.cfg.num_kv_heads)
        device_step = StepInputs(
            slots=views["slots"],
            positions=views["positions"],
            prefill=step.prefill,
            decode=step.decode,
            raw=step.raw,
            copy_src=views.get("copy_src"),
            copy_dst=views.get("copy_dst"),
            copy_shift=views.get("copy_shift"),
            logit_rows=views.get("logit_rows"),
            sharing=step.sharing,
            validate=self.debug,
        )
        self.steps_eager += 1
        return self.model(views["ids"], self.cache, device_step)

    def _shared_metadata(self, sharing):
        """The sharing plan's kernel metadata on the host and the tiles it is for, to
        travel in the step's one upload (``lazyattention.fast.shared``)."""
        cfg = self.model.cfg
        shared_tiles = self.model.backend.shared().shared_tiles
        tiles = shared_tiles(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, self.cache.block_size, self.model.dtype,
                             self.device)  # fmt: skip
        return sharing.build_metadata(self.device, tiles, cfg.num_kv_heads), tiles

    def _to_device(self, packer: _Packer) -> torch.Tensor:
        """The packed step on the model's device: on CUDA one ``non_blocking`` copy from
        pinned memory (PyTorch's pinned-memory cache reuses a buffer only after the copy
        that reads it has completed)."""
        cuda = self.device.type == "cuda"
        host = torch.empty(packer.size, dtype=torch.int32, pin_memory=cuda)
        packer.pack(host)
        if not cuda:
            return host.to(self.device)
        flat = torch.empty(packer.size, dtype=torch.int32, device=self.device)
        flat.copy_(host, non_blocking=True)
        return flat

    # ------------------------------------------------------------------ CUDA graphs

    def _graphable(self, step: StepInputs) -> bool:
        """A decode-only step (no prefill, no copies, the logits of every request)."""
        if not self.cuda_graphs or self.debug or step.prefill is not None or step.decode is None:
            return False
        if step.copy_src is not None and step.copy_src.numel():
            return False
        b = step.decode.batch_size
        return step.logit_rows is None or step.logit_rows.tolist() == list(range(b))

    def _replay(self, token_ids: torch.Tensor, step: StepInputs) -> torch.Tensor:
        b = step.decode.batch_size
        meta = self._host(step.decode)
        bucket = graph_bucket(b, meta.block_table.shape[1])
        key = (*bucket, step.raw)
        g = self.graphs.get(key)
        if g is None:
            g = self._capture(bucket, token_ids, step)
            self.graphs[key] = g
        else:
            self._fill(g, token_ids, step)
            g.graph.replay()
        self.steps_replayed += 1
        return g.logits[:b].clone()

    def _new_graph(self, bucket: tuple[int, int], raw: bool) -> _DecodeGraph:
        """Static buffers of a bucket and the padded decode layout that reads them."""
        bb, mb = bucket
        packer = _Packer()
        for name in ("ids", "slots", "positions"):
            packer.add(name, torch.zeros(bb, dtype=torch.int32))
        for f in BlockMetadata._fields:
            shape = (bb, mb) if f in _BLOCK_FIELDS else (bb + 1,) if f == "cu_queries" else (bb,)
            packer.add(f"decode.{f}", torch.zeros(shape, dtype=torch.int32))
        host_buffer = torch.zeros(packer.size, dtype=torch.int32, pin_memory=self.device.type == "cuda")
        device_buffer = torch.zeros(packer.size, dtype=torch.int32, device=self.device)
        s = self.cache.block_size
        pad = RequestLayout((), Placement((self.scratch_block,), 1, start=0), num_queries=1)
        layout = Layout([pad] * bb, s)
        device = packer.views(device_buffer)
        layout.use_metadata(_metadata(device, "decode"))
        step = StepInputs(slots=device["slots"], positions=device["positions"], decode=layout, raw=raw, validate=False)
        return _DecodeGraph(bb, mb, device_buffer, host_buffer, device, packer.views(host_buffer), step)

    def _fill(self, g: _DecodeGraph, token_ids: torch.Tensor, step: StepInputs) -> None:
        """Write the step, padded to the bucket, into the host buffer; copy it to the
        device buffer the graph reads (one ``non_blocking`` copy)."""
        if g.copied is not None and not g.copied.query():
            g.copied.synchronize()  # the previous copy has not yet left the host buffer
        h, b = g.host, step.decode.batch_size
        meta = self._host(step.decode)
        m = meta.block_table.shape[1]
        h["ids"][:b] = token_ids
        h["slots"][:b] = step.slots
        h["positions"][:b] = step.positions
        h["ids"][b:] = 0
        h["slots"][b:] = self.scratch_block * self.cache.block_size  # padding: the scratch block's first slot
        h["positions"][b:] = 0
        for f in _BLOCK_FIELDS:
            t = h[f"decode.{f}"]
            t.zero_()
            t[:b, :m] = getattr(meta, f)
        h["decode.block_table"][b:, 0] = self.scratch_block
        h["decode.block_len"][b:, 0] = 1
        for f, pad in (("num_blocks", 1), ("num_segment_blocks", 0), ("query_start", 0)):
            h[f"decode.{f}"][:b] = getattr(meta, f)
            h[f"decode.{f}"][b:] = pad
        torch.arange(g.batch + 1, dtype=torch.int32, out=h["decode.cu_queries"])  # one query per request
        g.device_buffer.copy_(g.host_buffer, non_blocking=True)
        if self.device.type == "cuda":
            g.copied = torch.cuda.Event()
            g.copied.record()

    def padded_decode(self, token_ids: torch.Tensor, step: StepInputs) -> torch.Tensor:
        """A decode-only step computed as its CUDA graph computes it — padded to its
        bucket, from the bucket's static buffers — but run eagerly, on any device
        (for tests: what a capture records). Returns logits ``[B, V]``.

        Fast backend only: its kernels read the layout's metadata, which is where the
        real requests are; the reference reads the layout's requests, which for a
        bucket are the padding placeholders.
        """
        if not self.model.backend.capabilities.cuda_graphs:
            raise ValueError(
                f"padded_decode needs the fast backend (a backend CUDA graphs capture: its kernels read the block "
                f"metadata), got backend={self.model.backend.name!r}"
            )
        self.check_step(step)
        self._check_scratch(step)
        bucket = graph_bucket(step.decode.batch_size, self._host(step.decode).block_table.shape[1])
        key = (*bucket, step.raw)
        g = self._padded.get(key)  # buffers kept per bucket and refilled, as a graph's are
        if g is None:
            g = self._padded[key] = self._new_graph(bucket, step.raw)
        self._fill(g, token_ids, step)
        return self.model(g.device["ids"], self.cache, g.step)[: step.decode.batch_size]

    def _capture(self, bucket: tuple[int, int], token_ids: torch.Tensor, step: StepInputs) -> _DecodeGraph:
        """Warm up (compile) the bucket on this step's inputs, capture it, replay it."""
        g = self._new_graph(bucket, step.raw)
        self._fill(g, token_ids, step)
        try:
            self.model(g.device["ids"], self.cache, g.step)  # eager: compiles the kernels, writes this step's K/V
            torch.cuda.synchronize(self.device)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            g.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g.graph, pool=self._pool):
                g.logits = self.model(g.device["ids"], self.cache, g.step)
        except Exception as exc:
            raise RuntimeError(
                f"CUDA graph capture of the decode step failed for bucket batch={bucket[0]}, blocks={bucket[1]} "
                f"(raw={step.raw}): {exc}"
            ) from exc
        g.graph.replay()  # the same K/V again, and this step's logits
        return g
