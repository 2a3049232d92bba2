"""The model runner: one engine step's inputs onto the device in one copy, then the forward.

The engine builds a step on the host (:class:`~lazyattention.serving.model.StepInputs`
with CPU tensors and host :class:`~lazyattention.reference.Layout`\\ s). The runner then,
once per step and never per layer:

1. **checks the step on the host** — slots distinct and inside the cache, positions in
   range, the same checks ``write_kv`` makes (``check_write_values``), on CPU tensors,
   so no layer reads a device tensor back (``validate=False`` reaches the layers;
   ``debug=True`` keeps the per-layer checks as well);
2. **packs every integer tensor of the step** — token ids, slots, positions, logit rows,
   Block-Attention's copy slots and shifts, the :class:`BlockMetadata` of the prefill
   and decode layouts (built on the host by :class:`HostMetadata`) and a sharing plan's
   kernel metadata — into one pinned int32 host buffer, **copies it to the device
   once** (``non_blocking``), and hands the layers views of that copy
   (``Layout.use_metadata``);
3. takes the tokens the previous step sampled, still on the device, where the engine
   says so (:class:`CarriedTokens`: the host never waits for them to build this step);
4. runs the forward: eagerly for a step with prefills (or copies), or, for a
   decode-only step on a backend that captures on this device, by **replaying a CUDA
   graph**.

``compile_backend``: every part of a layer but its attention — the two RMSNorms and
the MLP, and the final norm — runs through ``torch.compile`` (``dynamic=True``: one
compiled graph serves every token count; ``nn.Module.compile``, in place, so the state
dict is unchanged and every user of the model runs them compiled). The attention (the
backend's kernels, whose host code reads layouts) stays eager. It is a switch, so that
its gain can be measured against eager on a GPU; a decode step compiles before its
graph is captured, in the warm-up run.

Shared-segment decode (``shared_decode_min_requests=N``, a backend that has it, rotated
cache): a decode step whose layout has a segment read by ``N`` or more of its requests
runs the backend's shared-segment decode in every layer. The sharing plan
(``plan_sharing``) is **kept across decode steps**: it is built again only when the
batch's requests or their segments change, since its kernel metadata (work items,
members, the shared segments' block tables) depends on nothing else; each step builds
only the layout of the rest (the other segments and the growing own tokens). That
metadata is laid out in **fixed shapes** (:class:`SharedBucket`: work items, members,
table entries and merge slots each padded to a power of two; padded work items have no
members and write nothing, and every merge slot a request does not use gets an empty
work item that writes ``lse = −inf``), so a step with shared segments replays a CUDA
graph like any decode step, from :attr:`ModelRunner.shared_graphs`, keyed by that
bucket too.

CUDA graphs (as vLLM and nano-vllm capture decode). A decode-only step of ``B``
requests whose longest block table has ``M`` blocks runs in the graph of bucket
``(B', M')`` (:func:`graph_bucket`): ``B'`` the next power of two up to 8, then the next
multiple of 8; ``M'`` at least 16 and otherwise ``M`` rounded up to one of eight sizes
per octave, so a bucket pads the keys by at most an eighth. (The decode kernel
splits ``M'`` blocks among its programs: at two splits, a 130-block batch padded to
256 blocks gives the first split 128 blocks and the second 2; padded to 144, 72 and
58.) The graph reads static device
buffers padded to that bucket: padding requests have one token in the cache's scratch
block (the block after the pool, see ``Model.new_cache``), which no request owns, so
their writes change nothing a real request reads; padding blocks have length 0. Every
launch parameter the kernels derive from shapes (decode's split count, grid sizes) is
thereby fixed per bucket. A bucket is captured the first time a step needs it (an
eager warm-up run of that step, the capture, then its replay) and replayed
afterwards; a capture that fails raises, naming the bucket. Prefill stays eager; a
backend without CUDA graphs is never captured.

Shape alphabet: ``T`` new tokens of a step, ``B`` decode requests, ``M`` blocks per
request (padded), ``V`` vocabulary.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lazyattention.reference.cache import PagedKVCache
from lazyattention.reference.checks import check_write_values
from lazyattention.reference.layout import BlockMetadata, Layout, Placement, RequestLayout
from lazyattention.steps import BLOCK_FIELDS, HostMetadata, Packer, graph_bucket, metadata_views, power_of_two

from .model import Model, StepInputs

if TYPE_CHECKING:
    from lazyattention.backends import SharingPlan

__all__ = ["ModelRunner", "CarriedTokens", "SharedBucket", "fixed_sharing_metadata"]

_ITEM, _MEMBER = 6, 3  # int32 fields per work item and per member of a sharing plan's metadata


# --------------------------------------------------------------------------- carried tokens


@dataclass(frozen=True)
class CarriedTokens:
    """Tokens of a step that the previous step sampled and that are still on the device.

    Token ``i`` of the step is ``source[rows[i]]`` where ``rows[i] >= 0``, and the host's
    ``token_ids[i]`` elsewhere. So the engine builds step ``n + 1`` while step ``n`` runs,
    without waiting for its tokens.

    Args:
        rows: ``[T]`` int host tensor, ``-1`` for a token the host knows.
        source: ``[R]`` integer tensor on the model's device (the previous step's
            sampled tokens).
    """

    rows: torch.Tensor
    source: torch.Tensor

    def fill(self, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``ids`` with the carried tokens put in, on the device (``rows``: the copy of
        :attr:`rows` there, as long as ``ids``)."""
        taken = self.source[rows.clamp(min=0).long()].to(ids.dtype)
        return torch.where(rows >= 0, taken, ids)


# --------------------------------------------------------------------------- sharing in fixed shapes


@dataclass(frozen=True)
class SharedBucket:
    """The fixed shapes of a sharing plan's kernel metadata: work items, members,
    shared block-table entries and merge slots per request (each a power of two)."""

    items: int
    members: int
    table: int
    slots: int

    @property
    def size(self) -> int:
        """Int32 elements of the metadata tensor."""
        return self.items * _ITEM + self.members * _MEMBER + self.table


def fixed_sharing_metadata(meta: Any, batch: int, rows: int, members_per_item: int) -> tuple[Any, SharedBucket]:
    """A sharing plan's kernel metadata (``SharingPlan.build_metadata``, on the host)
    laid out in fixed shapes, for a launch over ``rows >= batch`` requests.

    Work items, members and block-table entries are padded to powers of two with zeros
    (a padded work item has no members: it reads and writes nothing); merge slots to a
    power of two. Every merge slot of the ``rows`` requests that no member writes — past
    ``meta.slots`` for the ``batch`` real requests, past slot 0 (the rest's) for padding
    requests — gets members in work items without keys, which write ``lse = −inf``, so
    the merge reads only what a kernel wrote in this launch.

    Returns:
        ``(meta, bucket)``: ``meta`` with its tensor and counts replaced (its
        ``splits`` kept), and its :class:`SharedBucket`.
    """
    t = meta.tensor
    items = t[meta.item_off : meta.item_off + meta.num_items * _ITEM].view(-1, _ITEM)
    members = t[meta.member_off : meta.table_off].view(-1, _MEMBER)
    table = t[meta.table_off :]
    slots = power_of_two(meta.slots)
    empty = [(r, 0, k) for r in range(batch) for k in range(meta.slots, slots)]
    empty += [(r, 0, k) for r in range(batch, rows) for k in range(1, slots)]
    first = len(members)
    new_items = [
        (0, 0, 0, first + i, min(members_per_item, len(empty) - i), 0) for i in range(0, len(empty), members_per_item)
    ]
    bucket = SharedBucket(
        items=power_of_two(len(items) + len(new_items)),
        members=power_of_two(len(members) + len(empty)),
        table=power_of_two(len(table)),
        slots=slots,
    )
    out = torch.zeros(bucket.size, dtype=torch.int32)
    item_view = out[: bucket.items * _ITEM].view(-1, _ITEM)
    item_view[: len(items)] = items
    if new_items:
        item_view[len(items) : len(items) + len(new_items)] = torch.tensor(new_items, dtype=torch.int32)
    member_off = bucket.items * _ITEM
    member_view = out[member_off : member_off + bucket.members * _MEMBER].view(-1, _MEMBER)
    member_view[: len(members)] = members
    if empty:
        member_view[len(members) : len(members) + len(empty)] = torch.tensor(empty, dtype=torch.int32)
    table_off = member_off + bucket.members * _MEMBER
    out[table_off : table_off + len(table)] = table
    fixed = meta._replace(
        tensor=out, num_items=bucket.items, item_off=0, member_off=member_off, table_off=table_off, slots=slots
    )
    return fixed, bucket


@dataclass
class _KeptPlan:
    """The sharing plan of the last decode batch, kept while its requests and their
    segments stay the same (``key``)."""

    key: tuple[tuple[Placement, ...], ...]
    plan: SharingPlan | None
    host: Any = None  # its kernel metadata on the host (built once)
    fixed: dict[int, tuple[Any, SharedBucket]] = field(default_factory=dict)  # rows -> fixed shapes


@dataclass
class _SharedStep:
    """A decode step's sharing: the plan for its layout, and the layout of the rest."""

    plan: SharingPlan
    rest: Layout
    kept: _KeptPlan


@dataclass
class _HostTwin:
    """A pinned host buffer a graph's inputs are written into, its views, and the event
    after its last copy to the device."""

    buffer: torch.Tensor
    views: dict[str, torch.Tensor]
    copied: torch.cuda.Event | None = None


@dataclass
class _DecodeGraph:
    """A captured decode step: static device inputs (one flat buffer) and their views,
    two pinned host twins used in turn (so that writing a step never waits for the
    previous step's copy to leave its buffer), the graph and its static logits
    ``[B', V]``. ``layout`` names the block metadata it reads: ``"decode"``, or
    ``"rest"`` for a step with shared segments (whose plan's metadata is ``"sharing"``)."""

    batch: int
    blocks: int
    layout: str
    device_buffer: torch.Tensor
    device: dict[str, torch.Tensor]
    twins: tuple[_HostTwin, _HostTwin]
    step: StepInputs
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None
    turn: int = 0


def _outside_attention(model: Model) -> list[torch.nn.Module]:
    """The modules of a step's forward that are not attention: each layer's two
    RMSNorms and MLP, and the final norm."""
    layers = [(layer.input_layernorm, layer.mlp, layer.post_attention_layernorm) for layer in model.layers]
    return [module for modules in layers for module in modules] + [model.norm]


class ModelRunner:
    """Runs engine steps of ``model`` over ``cache``.

    Args:
        model: the decoder.
        cache: the paged KV cache the steps read and write (from ``model.new_cache``,
            whose scratch block the CUDA graphs' padding rows write).
        cuda_graphs: replay decode-only steps from CUDA graphs. ``None`` (default):
            on where the model's backend captures (the fast backend on a CUDA device),
            off otherwise. ``True`` elsewhere raises.
        debug: also check slot and position values inside every layer (a host
            synchronisation per layer on a GPU: the tests turn it on). Steps then run
            eagerly, since a check that reads the device cannot be captured.
        scratch_block: the block the padding rows write (default: the cache's last
            block, the scratch block of ``Model.new_cache``). Each step is checked
            never to read or write it.
        shared_decode_min_requests: the threshold of shared-segment decode: a decode
            step whose layout has a segment read by at least this many requests runs
            it (see the module docstring), from CUDA graphs where decode is captured;
            ``None`` (default): never. Needs a backend that has shared-segment decode.
        compile_backend: run the norms and MLPs of the model compiled by
            ``torch.compile`` with this backend (``"inductor"`` on a GPU; see the
            module docstring); ``None`` (default): eagerly.

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
        shared_decode_min_requests: int | None = None,
        compile_backend: str | None = None,
    ):
        threshold = shared_decode_min_requests
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
                raise ValueError(f"shared_decode_min_requests must be None or an int >= 1, got {threshold!r}")
            if not model.backend.capabilities.shared_decode:
                raise ValueError(
                    "shared_decode_min_requests needs the fast backend (shared-segment decode), "
                    f"got backend={model.backend.name!r}"
                )
        self.shared_decode_min_requests = threshold
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
        self.compile_backend = compile_backend
        if compile_backend is not None:
            for module in _outside_attention(model):
                module.compile(backend=compile_backend, dynamic=True)
        self.graphs: dict[tuple[int, int, bool], _DecodeGraph] = {}  # (B', M', raw) -> graph
        self.shared_graphs: dict[tuple[int, int, SharedBucket], _DecodeGraph] = {}  # with shared segments
        self._padded: dict[tuple, _DecodeGraph] = {}
        self.host_metadata = HostMetadata()
        self._built: weakref.WeakKeyDictionary[Layout, BlockMetadata] = weakref.WeakKeyDictionary()
        self._kept: _KeptPlan | None = None
        self._tiles = None
        self._pool = None
        self.steps_eager = 0
        self.steps_replayed = 0
        self.steps_shared = 0  # decode steps run through shared-segment decode (eager or replayed)
        self.plans_built = 0  # times a sharing plan was built (it is kept while the batch stays)

    # ------------------------------------------------------------------ public

    def run(self, token_ids: torch.Tensor, step: StepInputs, carried: CarriedTokens | None = None) -> torch.Tensor:
        """``token_ids [T]`` and ``step`` on the host → logits ``[R, V]`` float32 on the
        model's device, one row per ``step.logit_rows``. ``carried``: tokens of the step
        still on the device (:class:`CarriedTokens`)."""
        if token_ids.shape != step.slots.shape:
            raise ValueError(f"token_ids {tuple(token_ids.shape)} and slots {tuple(step.slots.shape)} differ")
        if carried is not None and carried.rows.shape != token_ids.shape:
            raise ValueError(f"carried rows {tuple(carried.rows.shape)} and token_ids {tuple(token_ids.shape)} differ")
        if step.sharing is not None:
            raise ValueError("the runner plans shared-segment decode itself: pass a step without sharing")
        self.check_step(step)
        shared = self._shared_step(step)
        self.steps_shared += shared is not None
        if self._graphable(step):
            return self._replay(token_ids, step, shared, carried)
        return self._eager(token_ids, step, shared, carried)

    def forget_plans(self) -> None:
        """Drop the kept sharing plan and the host metadata kept per layout, keeping
        the captured graphs (for an engine that starts afresh)."""
        self._kept = None
        self._built = weakref.WeakKeyDictionary()

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
            if layout is not None and layout.max_block >= scratch:
                meta = self._host(layout)
                if bool(((meta.block_table == scratch) & (meta.block_len > 0)).any()):
                    raise ValueError(f"a layout reads block {scratch}, the runner's scratch block")

    def _host(self, layout: Layout) -> BlockMetadata:
        """The layout's host metadata, built once (by :class:`HostMetadata`)."""
        meta = self._built.get(layout)
        if meta is None:
            meta = self._built[layout] = self.host_metadata(layout)
        return meta

    # ------------------------------------------------------------------ sharing

    def _shared_step(self, step: StepInputs) -> _SharedStep | None:
        """The step's sharing, when shared-segment decode is on and the step is a
        decode-only step of a rotated cache with a segment that
        ``shared_decode_min_requests`` or more of its requests read; otherwise ``None``.

        The plan is built only when the requests or their segments differ from the
        previous decode step's; otherwise the kept plan's segments serve this layout,
        and only the rest's layout is new (its own tokens grew)."""
        threshold = self.shared_decode_min_requests
        if threshold is None or step.prefill is not None or step.decode is None or step.raw:
            return None
        layout = step.decode
        key = tuple(req.segments for req in layout.requests)
        kept = self._kept
        if kept is None or kept.key != key:
            plan = self.model.backend.shared().plan_sharing(layout, threshold)
            kept = self._kept = _KeptPlan(key, plan)
            self.plans_built += 1
            return None if plan is None else _SharedStep(plan, plan.rest, kept)
        if kept.plan is None:
            return None
        rest = Layout(
            [
                RequestLayout(kept_req.segments, req.own, req.num_queries)
                for kept_req, req in zip(kept.plan.rest.requests, layout.requests, strict=True)
            ],
            layout.block_size,
        )
        # The same plan for this step's layout object: the shared segments and their
        # members are the kept plan's, the rest is this step's.
        plan = type(kept.plan)(layout, threshold, kept.plan.segments, rest)
        return _SharedStep(plan, rest, kept)

    def _shared_tiles(self):
        """The tiles of the backend's shared-segment kernel for this model and cache."""
        if self._tiles is None:
            cfg = self.model.cfg
            self._tiles = self.model.backend.shared().shared_tiles(
                cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, self.cache.block_size, self.model.dtype, self.device
            )
        return self._tiles

    def _fixed_sharing(self, shared: _SharedStep, rows: int) -> tuple[Any, SharedBucket]:
        """The kept plan's kernel metadata (host) in fixed shapes for ``rows`` requests,
        built once per plan and row count."""
        kept = shared.kept
        if rows not in kept.fixed:
            tiles = self._shared_tiles()
            if kept.host is None:
                kept.host = kept.plan.build_metadata(self.device, tiles, self.model.cfg.num_kv_heads)
            batch = shared.plan.layout.batch_size
            kept.fixed[rows] = fixed_sharing_metadata(kept.host, batch, rows, tiles.block_q)
        return kept.fixed[rows]

    # ------------------------------------------------------------------ eager

    def _eager(
        self, token_ids: torch.Tensor, step: StepInputs, shared: _SharedStep | None, carried: CarriedTokens | None
    ) -> torch.Tensor:
        packer = Packer()
        packer.add("ids", token_ids)
        packer.add("carried", None if carried is None else carried.rows)
        for name in ("slots", "positions", "logit_rows", "copy_src", "copy_dst", "copy_shift"):
            packer.add(name, getattr(step, name))
        layouts = {"prefill": step.prefill, "decode": step.decode if shared is None else None}
        if shared is not None:
            layouts["rest"] = shared.rest
            fixed, _ = self._fixed_sharing(shared, step.decode.batch_size)
            packer.add("sharing", fixed.tensor)
        for prefix, layout in layouts.items():
            if layout is not None:
                for f, t in zip(BlockMetadata._fields, self._host(layout), strict=True):
                    packer.add(f"{prefix}.{f}", t)
        views = packer.views(self._to_device(packer))
        for prefix, layout in layouts.items():
            if layout is not None:
                layout.use_metadata(metadata_views(views, prefix))
        if shared is not None:
            shared.plan.use_metadata(fixed._replace(tensor=views["sharing"]), self._shared_tiles(),
                                     self.model.cfg.num_kv_heads)  # fmt: skip
        ids = views["ids"] if carried is None else carried.fill(views["ids"], views["carried"])
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
            sharing=None if shared is None else shared.plan,
            validate=self.debug,
        )
        self.steps_eager += 1
        return self.model(ids, self.cache, device_step)

    def _to_device(self, packer: Packer) -> torch.Tensor:
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

    def _graph_key(self, step: StepInputs, shared: _SharedStep | None) -> tuple:
        """``(B', M', raw)`` of a step's graph (:attr:`graphs`), or ``(B', M', sharing
        bucket)`` with ``M'`` of the rest's block tables for a step with shared segments
        (:attr:`shared_graphs`)."""
        layout = step.decode if shared is None else shared.rest
        bb, mb = graph_bucket(step.decode.batch_size, self._host(layout).block_table.shape[1])
        return (bb, mb, step.raw) if shared is None else (bb, mb, self._fixed_sharing(shared, bb)[1])

    def _replay(
        self, token_ids: torch.Tensor, step: StepInputs, shared: _SharedStep | None, carried: CarriedTokens | None
    ) -> torch.Tensor:
        b = step.decode.batch_size
        key = self._graph_key(step, shared)
        graphs = self.graphs if shared is None else self.shared_graphs
        g = graphs.get(key)
        if g is None:
            g = graphs[key] = self._capture(key, token_ids, step, shared, carried)
        else:
            self._fill(g, token_ids, step, shared, carried)
            g.graph.replay()
        self.steps_replayed += 1
        return g.logits[:b].clone()

    def _new_graph(self, key: tuple, shared: _SharedStep | None) -> _DecodeGraph:
        """Static buffers of a bucket and the padded decode layout (with, for a sharing
        bucket, its plan) that reads them."""
        bb, mb = key[:2]
        sharing = None if shared is None else key[2]
        prefix = "decode" if sharing is None else "rest"
        packer = Packer()
        for name in ("ids", "carried", "slots", "positions"):
            packer.add(name, torch.zeros(bb, dtype=torch.int32))
        for f in BlockMetadata._fields:
            shape = (bb, mb) if f in BLOCK_FIELDS else (bb + 1,) if f == "cu_queries" else (bb,)
            packer.add(f"{prefix}.{f}", torch.zeros(shape, dtype=torch.int32))
        if sharing is not None:
            packer.add("sharing", torch.zeros(sharing.size, dtype=torch.int32))
        twins = []
        for _ in range(2):
            host = torch.zeros(packer.size, dtype=torch.int32, pin_memory=self.device.type == "cuda")
            twins.append(_HostTwin(host, packer.views(host)))
        device_buffer = torch.zeros(packer.size, dtype=torch.int32, device=self.device)
        s = self.cache.block_size
        pad = RequestLayout((), Placement((self.scratch_block,), 1, start=0), num_queries=1)
        layout = Layout([pad] * bb, s)
        device = packer.views(device_buffer)
        plan = None
        if sharing is None:
            layout.use_metadata(metadata_views(device, "decode"))
        else:
            rest = Layout([pad] * bb, s)
            rest.use_metadata(metadata_views(device, "rest"))
            plan = type(shared.plan)(layout, self.shared_decode_min_requests, (), rest)
            fixed, _ = self._fixed_sharing(shared, bb)
            plan.use_metadata(fixed._replace(tensor=device["sharing"]), self._shared_tiles(),
                              self.model.cfg.num_kv_heads)  # fmt: skip
        step = StepInputs(
            slots=device["slots"],
            positions=device["positions"],
            decode=layout,
            raw=shared is None and key[2],
            sharing=plan,
            validate=False,
        )
        return _DecodeGraph(bb, mb, prefix, device_buffer, device, tuple(twins), step)

    def _fill(
        self,
        g: _DecodeGraph,
        token_ids: torch.Tensor,
        step: StepInputs,
        shared: _SharedStep | None,
        carried: CarriedTokens | None,
    ) -> None:
        """Write the step, padded to the bucket, into the host buffer; copy it to the
        device buffer the graph reads (one ``non_blocking`` copy); put the carried
        tokens in on the device."""
        twin = g.twins[g.turn]
        g.turn ^= 1
        if twin.copied is not None and not twin.copied.query():
            twin.copied.synchronize()  # the copy of two steps ago has not yet left this buffer
        h, b = twin.views, step.decode.batch_size
        meta = self._host(step.decode if shared is None else shared.rest)
        m = meta.block_table.shape[1]
        h["ids"][:b] = token_ids
        h["slots"][:b] = step.slots
        h["positions"][:b] = step.positions
        h["ids"][b:] = 0
        h["carried"][:b] = -1 if carried is None else carried.rows
        h["carried"][b:] = -1
        h["slots"][b:] = self.scratch_block * self.cache.block_size  # padding: the scratch block's first slot
        h["positions"][b:] = 0
        p = g.layout
        for f in BLOCK_FIELDS:
            t = h[f"{p}.{f}"]
            t.zero_()
            t[:b, :m] = getattr(meta, f)
        h[f"{p}.block_table"][b:, 0] = self.scratch_block
        h[f"{p}.block_len"][b:, 0] = 1
        for f, pad in (("num_blocks", 1), ("num_segment_blocks", 0), ("query_start", 0)):
            h[f"{p}.{f}"][:b] = getattr(meta, f)
            h[f"{p}.{f}"][b:] = pad
        torch.arange(g.batch + 1, dtype=torch.int32, out=h[f"{p}.cu_queries"])  # one query per request
        if shared is not None:
            h["sharing"].copy_(self._fixed_sharing(shared, g.batch)[0].tensor)
        g.device_buffer.copy_(twin.buffer, non_blocking=True)
        if self.device.type == "cuda":
            twin.copied = torch.cuda.Event()
            twin.copied.record()
        if carried is not None:
            g.device["ids"].copy_(carried.fill(g.device["ids"], g.device["carried"]))

    def padded_decode(self, token_ids: torch.Tensor, step: StepInputs, carried: CarriedTokens | None = None):
        """A decode-only step computed as its CUDA graph computes it — padded to its
        bucket, from the bucket's static buffers, with the bucket's sharing metadata
        where the step has shared segments — but run eagerly, on any device (for
        tests: what a capture records). Returns logits ``[B, V]``.

        Only for a backend that captures (its kernels read the layout's metadata, which
        is where the real requests are; the reference reads the layout's requests,
        which for a bucket are the padding placeholders).
        """
        if not self.model.backend.capabilities.cuda_graphs:
            raise ValueError(
                f"padded_decode needs the fast backend (a backend CUDA graphs capture: its kernels read the block "
                f"metadata), got backend={self.model.backend.name!r}"
            )
        self.check_step(step)
        self._check_scratch(step)
        shared = self._shared_step(step)
        self.steps_shared += shared is not None
        key = (shared is not None, *self._graph_key(step, shared))
        g = self._padded.get(key)  # buffers kept per bucket and refilled, as a graph's are
        if g is None:
            g = self._padded[key] = self._new_graph(key[1:], shared)
        self._fill(g, token_ids, step, shared, carried)
        return self.model(g.device["ids"], self.cache, g.step)[: step.decode.batch_size]

    def _capture(
        self, key: tuple, token_ids: torch.Tensor, step: StepInputs, shared: _SharedStep | None,
        carried: CarriedTokens | None,
    ) -> _DecodeGraph:  # fmt: skip
        """Warm up (compile) the bucket on this step's inputs, capture it, replay it."""
        g = self._new_graph(key, shared)
        self._fill(g, token_ids, step, shared, carried)
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
                f"CUDA graph capture of the decode step failed for bucket batch={key[0]}, blocks={key[1]} "
                f"({'sharing' if shared is not None else 'raw'}={key[2]}): {exc}"
            ) from exc
        g.graph.replay()  # the same K/V again, and this step's logits
        return g
