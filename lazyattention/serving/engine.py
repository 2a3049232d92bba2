"""A small serving engine: document-aware generation with continuous batching.

A request is ``[document_0] … [document_{n-1}] [query]`` followed by generated tokens
(DESIGN §2). The engine caches documents by content in a
:class:`~lazyattention.reference.SegmentStore` over a fixed KV budget of ``num_blocks``
paged blocks of ``block_size`` tokens. One concern per file:

* :mod:`~lazyattention.serving.request`: a request and its state;
* :mod:`~lazyattention.serving.strategies`: what is cached, under which key, where it is
  stored, what is copied (the table below);
* :mod:`~lazyattention.serving.scheduler`: admission, blocks on demand, preemption: which
  requests run in the next step;
* this module: the step. It asks the scheduler for a batch, builds the step's
  :class:`~lazyattention.serving.model.StepInputs` on the host, has the
  :class:`~lazyattention.serving.runner.ModelRunner` run it, and applies the tokens.

**The host runs one step ahead of the device** (``overlap=True``, the default). A step
is launched, and while it runs the host takes in the previous step's tokens (the one
wait of a step: its sampled tokens, copied back without blocking the stream) and
schedules and builds the next step. That is possible because nothing the scheduler
decides depends on a token's value: how many tokens a request has (hence its blocks,
whether it is done) is known at launch, and a decode step's input token that the host
has not yet seen is taken on the device from the previous step's sampled tokens
(:class:`~lazyattention.serving.runner.CarriedTokens`). All bookkeeping — sealing
prefilled documents, finishing requests, giving blocks back — happens at launch; the
device's stream order keeps a block given back from being rewritten before the
launched step has read it. A request's tokens land in ``output`` (and its
``first_token_time`` and ``finish_time`` are taken) when they reach the host; until
then they are ``pending``. A preempted request is re-admitted no earlier than the next
step, by which time its tokens have landed, so it recomputes known tokens.

A step is a **prefill step** — segment prefills (a missing document encoded alone) and
request prefills (a request's own tokens over its documents, a resumed request's
included), plus Block-Attention's copies — or a **decode step**: one token per running
request, and nothing else (the decode layout, slots, positions and logit rows only, so
it can be captured and replayed per batch size). In a prefill step every new K/V of a
layer is written before any attention of the layer reads it, so a document and the
request that needs it share a step.

=================== ========================================================================
``lazy``            documents cached once at stored positions ``0..L-1``, read in place at
                    any logical start: the query is rotated by ``p − δ`` (eq. 8). Zero copy.
``raw_cache``       as ``lazy`` but keys stored unrotated and rotated in the kernel at their
                    logical positions (eq. 10).
``block_attention`` documents cached at 0 as in ``lazy``; each request copies their K/V into
                    blocks it owns, re-rotating keys by ``δ`` (eq. 9). Bytes copied counted.
``prefix_cache``    ordinary causal attention over the whole sequence; reuses the K/V of an
                    exact token prefix (document boundaries are the reuse points).
``recompute``       ordinary causal attention over the whole sequence, nothing reused.
=================== ========================================================================

Budget and preemption (vLLM's policy; details in :mod:`~lazyattention.serving.scheduler`):
a request is admitted, first come first served, when its documents, its copies and the
blocks of its prompt fit, evicting unreferenced cached documents (least recently used
first) if needed; its own blocks then grow as it decodes. Prefill has priority over
decode. When a decoding request finds no block, the most recently admitted running
request is preempted (it gives back everything and waits at the front of the queue;
re-admitted, it recomputes its own tokens and continues). A request that could not fit
even in an empty cache is refused when it is added, with an error naming the budget.
:meth:`Engine.abort` drops a request and gives back what it holds.

Decoding is greedy (argmax), so a request's output depends only on its inputs and the
strategy, never on what else shares its batch or whether it was preempted — the
engine's tests check exactly that.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from lazyattention.reference.cache import BlockPool, SegmentStore
from lazyattention.reference.layout import Layout, Placement, RequestLayout

from .model import Model, StepInputs
from .request import Request, RequestStatus
from .runner import CarriedTokens, ModelRunner
from .scheduler import Batch, Scheduler
from .strategies import STRATEGIES, Strategy, blocks_needed, get_strategy

__all__ = ["STRATEGIES", "Request", "EngineStats", "Engine", "blocks_needed"]


@dataclass
class EngineStats:
    """Counters over an engine's lifetime."""

    steps: int = 0
    decode_steps: int = 0  # steps that only decoded (the rest prefilled)
    forward_tokens: int = 0  # tokens through the model (segment + request prefills + decodes)
    segment_prefill_tokens: int = 0
    bytes_copied: int = 0  # K/V bytes written by Block-Attention re-encoding, all layers
    peak_blocks: int = 0  # most blocks allocated at once (cached documents included)
    hits: int = 0
    lookups: int = 0
    preemptions: int = 0  # times a running request gave its blocks back to let others decode
    aborts: int = 0
    # Wall time in :meth:`Engine.step`, by phase (seconds). ``launch``: building a step's
    # inputs and issuing its work, which on CUDA runs later (on a CPU device it is the
    # computation itself); ``wait``: blocked until a step's tokens reach the host (on
    # CUDA, the device is the slower then); ``land``: taking the tokens in. Timings, not
    # counters: two runs' stats compare equal without them.
    schedule_seconds: float = field(default=0.0, compare=False)
    launch_seconds: float = field(default=0.0, compare=False)
    wait_seconds: float = field(default=0.0, compare=False)
    land_seconds: float = field(default=0.0, compare=False)

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def host_seconds(self) -> float:
        """Time the host spent working in :meth:`Engine.step` (every phase but ``wait``)."""
        return self.schedule_seconds + self.launch_seconds + self.land_seconds


class Engine:
    """Continuous batching over a paged KV budget, with a selectable reuse strategy.

    Args:
        model: the decoder (its dtype and device are the cache's).
        strategy: a :class:`~lazyattention.serving.strategies.Strategy`, or the name of
            one (:data:`STRATEGIES`).
        num_blocks: the KV budget ``N`` in blocks of ``block_size`` tokens.
        block_size: ``S``.
        max_batch_tokens: prefill tokens per step (a single request larger than this
            still runs, alone).
        max_num_seqs: requests running at once.
        keep_logits: keep each request's first-token logits (quality checks).
        cuda_graphs: replay decode steps from CUDA graphs (``None``: on CUDA with the
            fast backend; see :class:`~lazyattention.serving.runner.ModelRunner`).
        debug: check every layer's cache write (a host synchronisation per layer on a
            GPU) instead of once per step; the tests turn it on.
        shared_decode_min_requests: the threshold of shared-segment decode: the
            fewest requests of a decode step that must read one segment for the step
            to read that segment once for all of them (the backend's shared-segment
            decode, :class:`~lazyattention.backends.SharedDecode`); ``None`` (default):
            off. Such steps replay CUDA graphs like the others. Needs a backend that
            has it (fast) and a strategy whose cache is rotated (not ``raw_cache``).
        overlap: run the host one step ahead of the device (see the module
            docstring). ``False``: each :meth:`step` waits for its own tokens and
            returns the requests it finished.
        compile_backend: run the model's norms and MLPs through ``torch.compile``
            with this backend (``"inductor"`` on a GPU), in place; ``None`` (default):
            eagerly (see :class:`~lazyattention.serving.runner.ModelRunner`).

    Example:
        >>> from lazyattention.serving.model import Model, ModelConfig
        >>> engine = Engine(Model(ModelConfig.tiny()).init_random(0), "lazy", num_blocks=32)
        >>> doc = [5, 6, 7, 8, 9]
        >>> a = engine.generate([1, 2], documents=[doc], max_new_tokens=3)
        >>> b = engine.generate([3], documents=[[4], doc], max_new_tokens=3)   # doc reused at 1
        >>> engine.stats.hits, len(a)
        (1, 3)
    """

    def __init__(
        self,
        model: Model,
        strategy: str | Strategy = "lazy",
        num_blocks: int = 256,
        block_size: int = 16,
        max_batch_tokens: int = 4096,
        max_num_seqs: int = 32,
        keep_logits: bool = False,
        *,
        cuda_graphs: bool | None = None,
        debug: bool = False,
        shared_decode_min_requests: int | None = None,
        overlap: bool = True,
        compile_backend: str | None = None,
    ):
        self.strategy = get_strategy(strategy)
        if shared_decode_min_requests is not None and self.strategy.raw:
            raise ValueError(
                "shared_decode_min_requests is for a rotated cache; "
                f"strategy {self.strategy.name!r} stores keys unrotated"
            )
        for name, value in (("max_batch_tokens", max_batch_tokens), ("max_num_seqs", max_num_seqs)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.model = model
        self.block_size = block_size
        self.cache = model.new_cache(num_blocks, block_size)
        self.runner = ModelRunner(
            model,
            self.cache,
            cuda_graphs=cuda_graphs,
            debug=debug,
            shared_decode_min_requests=shared_decode_min_requests,
            compile_backend=compile_backend,
        )
        self.keep_logits = keep_logits
        self.overlap = overlap
        self._limits = (num_blocks, max_num_seqs, max_batch_tokens)
        self._start_empty()

    def _start_empty(self) -> None:
        """No request, no cached document, every block free, counters at zero."""
        num_blocks, max_num_seqs, max_batch_tokens = self._limits
        self.pool = BlockPool(num_blocks)
        self.store = SegmentStore(self.pool, self.block_size)
        self.scheduler = Scheduler(self.strategy, self.store, max_num_seqs, max_batch_tokens)
        self.stats = EngineStats()
        self.finished: list[Request] = []
        self._requests: dict[int, Request] = {}  # waiting and running, by id
        self._next_id = 0
        self._in_flight: _InFlight | None = None  # the launched step whose tokens are not on the host yet

    @property
    def waiting(self):
        """Requests waiting for admission, in order (preempted ones at the front)."""
        return self.scheduler.waiting

    @property
    def running(self) -> list[Request]:
        """Admitted requests, in admission order."""
        return self.scheduler.running

    # ------------------------------------------------------------------ public

    def add_request(self, query, documents=(), max_new_tokens: int = 16, arrival: float | None = None) -> Request:
        """Queue a request; it is admitted when the budget allows (FIFO).

        Args:
            query: token ids of the request's own prompt (at least one).
            documents: token-id sequences, placed back to back in this order before the
                query; an empty one is accepted and contributes nothing.
            max_new_tokens: tokens to generate (at least 1).
            arrival: arrival time (``perf_counter`` seconds); now when ``None``.

        Raises:
            ValueError: empty query, token ids outside the vocabulary, a bad
                ``max_new_tokens``, a request longer than Mistral's sliding window, or
                one that needs more blocks than the whole KV budget.
        """
        vocab = self.model.cfg.vocab_size
        query = _token_list(query, "query", vocab)
        if not query:
            raise ValueError("query must have at least one token")
        docs = [_token_list(d, f"document {i}", vocab) for i, d in enumerate(documents)]
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        total = sum(map(len, docs)) + len(query) + max_new_tokens
        window = self.model.cfg.sliding_window
        if window is not None and total > window:
            raise ValueError(
                f"request spans {total} tokens, more than the model's sliding window {window}; "
                "sliding-window attention is not implemented"
            )
        keys = self.strategy.segment_keys(docs)  # hashed once per request
        need = self.strategy.blocks_needed(self.block_size, query, docs, max_new_tokens, keys)
        if need > self.pool.num_blocks:
            raise ValueError(
                f"request needs {need} KV blocks under strategy {self.strategy.name!r} "
                f"({sum(map(len, docs))} document tokens, {len(query)} query tokens, {max_new_tokens} new) "
                f"but the KV budget is {self.pool.num_blocks} blocks of {self.block_size}"
            )
        req = Request(
            id=self._next_id,
            query=query,
            documents=docs,
            max_new_tokens=max_new_tokens,
            arrival=time.perf_counter() if arrival is None else arrival,
            segment_keys=keys,
        )
        self._next_id += 1
        self._requests[req.id] = req
        self.scheduler.add(req)
        return req

    def abort(self, request: Request | int) -> Request:
        """Drop a waiting or running request (the object or its id) and give back its
        blocks and segment references; segments other requests use stay as they are.

        Raises:
            ValueError: the request is unknown to this engine, finished or already aborted.
        """
        req = self._requests.get(request.id if isinstance(request, Request) else request)
        if req is None or (isinstance(request, Request) and req is not request):
            what = request.status.value if isinstance(request, Request) else "unknown"
            rid = request.id if isinstance(request, Request) else request
            raise ValueError(f"cannot abort request {rid!r}: it is not waiting or running here ({what})")
        self.scheduler.abort(req)
        del self._requests[req.id]
        self.stats.aborts += 1
        return req

    def has_work(self) -> bool:
        """Requests waiting or running, or a launched step whose tokens have not landed
        (unless all its requests were aborted)."""
        flight = self._in_flight
        landing = flight is not None and any(r.status is not RequestStatus.ABORTED for r in flight.requests)
        return bool(self.waiting or self.running or landing)

    def step(self) -> list[Request]:
        """Launch one prefill or decode step, then take in the tokens of the step
        before it (``overlap``) or of this one; return the requests whose last token
        thereby landed."""
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        self.stats.preemptions += len(batch.preempted)
        for req in batch.prefills:
            if req.preemptions == 0:  # hits count once per request, at its first admission
                self.stats.hits += req.hits
                self.stats.lookups += req.lookups
        if not batch and (self.waiting or self.running):  # cannot happen: every request fits the budget alone
            raise RuntimeError(f"no request can run: {len(self.waiting)} waiting, {len(self.running)} running")
        t1 = time.perf_counter()
        self.stats.schedule_seconds += t1 - t0
        launched = self._launch(batch) if batch else None
        self.stats.launch_seconds += time.perf_counter() - t1
        done = self._land(self._in_flight) if self._in_flight is not None else []
        self._in_flight = launched
        if not self.overlap and launched is not None:
            done += self._land(launched)
            self._in_flight = None
        return done

    def reset(self) -> None:
        """Start afresh, as a server just started: no request, no cached document,
        every block free, the counters at zero. What start-up paid for stays: the cache
        tensors and the runner's captured CUDA graphs (which read only the runner's own
        buffers and the cache).

        Raises:
            ValueError: requests are waiting or running, or their last tokens have not
                landed (:meth:`has_work`).
        """
        if self.has_work():
            raise ValueError("reset needs an idle engine: requests are waiting or running, or their tokens in flight")
        self._start_empty()
        self.runner.forget_plans()

    def run_until_done(self) -> list[Request]:
        """Step until every queued request finished; return them in finishing order."""
        done = []
        while self.has_work():
            done += self.step()
        return done

    def generate(self, query_ids, documents=(), max_new_tokens: int = 16) -> list[int]:
        """Generate greedily for one request (documents cached across calls).

        Each document is prefilled alone from position 0 the first time it is seen
        and reused (zero copy under ``lazy``) wherever a later request places it.
        Returns the generated token ids.
        """
        req = self.add_request(query_ids, documents, max_new_tokens)
        while not req.done or req.pending:
            self.step()
        return list(req.output)

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` if pool, store and requests disagree (for tests):
        every block accounted for exactly once per holder, nothing a running request
        reads evicted or freed, nothing held by a request that is not running."""
        self.store.check_invariants()
        held: dict[int, int] = {}
        for req in self.running:
            for b in req.own_blocks + req.copy_blocks:
                held[b] = held.get(b, 0) + 1
        for b, n in held.items():
            assert self.pool.refcount(b) == n, f"request block {b}: refcount {self.pool.refcount(b)} != {n}"
            assert self.store.writable(b), f"request block {b} belongs to a sealed segment"
        in_use = {seg.key: seg for req in self.running for seg in req.entries}
        segment_blocks = self.store.num_evictable_blocks + sum(len(seg.blocks) for seg in in_use.values())
        assert self.pool.num_used == segment_blocks + len(held), (
            f"pool leak: {self.pool.num_used} used, {segment_blocks} in cached segments, {len(held)} held by requests"
        )
        for req in self.running:
            assert req.status is RequestStatus.RUNNING
            for seg in req.entries:
                assert self.store.get(seg.key) is seg and seg.refs > 0, f"request {req.id} lost segment {seg.key[:12]}"
            readable = {b for seg in req.entries for b in seg.blocks} | set(req.copy_blocks)
            for p in req.placements:
                assert set(p.blocks) <= readable, f"request {req.id} reads blocks it does not hold: {p.blocks}"
            assert len(req.own_blocks) * self.block_size >= req.num_own - 1, f"request {req.id}: own blocks short"
        for req in self.waiting:
            assert req.status is RequestStatus.WAITING and not (req.entries or req.own_blocks or req.copy_blocks)
        assert set(self._requests) == {r.id for r in (*self.waiting, *self.running)}

    # ------------------------------------------------------------------ the step

    def _prefill_inputs(self, batch: Batch) -> tuple[torch.Tensor, StepInputs]:
        """Segment prefills, then request prefills (own tokens, copies)."""
        s = self.block_size
        ids, slots, positions, entries, logit_rows, copies = [], [], [], [], [], []

        def write(tokens: list[int], own: Placement, context: tuple[Placement, ...]) -> None:
            entries.append(RequestLayout(context, own, num_queries=own.length))
            slots.append(own.slots(s))
            positions.append(torch.arange(own.length) + own.stored_start)
            ids.extend(tokens)

        for job in batch.segment_prefills:  # documents encoded alone (prefix_cache: after their prefix)
            write(job.tokens, job.placement, job.context)
            self.stats.segment_prefill_tokens += len(job.tokens)
        for req in batch.prefills:
            write(req.own_tokens, req.own_placement(s), tuple(req.placements))
            logit_rows.append(len(ids) - 1)
            copies += [(src, dst) for src, dst in zip(req.sources, req.placements, strict=True) if src != dst]
        step = StepInputs(  # host tensors: the runner moves the step to the device
            slots=torch.cat(slots),
            positions=torch.cat(positions),
            prefill=Layout(entries, s),
            raw=self.strategy.raw,
            logit_rows=torch.tensor(logit_rows),
        )
        if copies:  # Block-Attention: copy into the request's blocks, re-rotated (eq. 9)
            step.copy_src = torch.cat([src.slots(s) for src, _ in copies])
            step.copy_dst = torch.cat([dst.slots(s) for _, dst in copies])
            step.copy_shift = torch.cat(
                [torch.full((dst.length,), dst.stored_start - src.stored_start) for src, dst in copies]
            )
            self.stats.bytes_copied += step.copy_src.numel() * self.cache.bytes_per_block // s
        return torch.tensor(ids), step

    def _decode_inputs(self, decodes: list[Request]) -> tuple[torch.Tensor, StepInputs, CarriedTokens | None]:
        """One token per request: its last token, written at its next own slot. A
        token still pending is carried from the step in flight, on the device."""
        s = self.block_size
        entries, slots, positions, ids, rows = [], [], [], [], []
        flight = self._in_flight
        for req in decodes:
            own = req.own_placement(s)
            entries.append(RequestLayout(tuple(req.placements), own, num_queries=1))
            last = own.length - 1  # the new token
            slots.append(own.slot(s, last))
            positions.append(own.stored_start + last)
            if req.pending:
                if req.pending != 1 or flight is None or req.id not in flight.rows:
                    raise RuntimeError(f"request {req.id}: {req.pending} pending token(s), not from the step in flight")
                ids.append(0)
                rows.append(flight.rows[req.id])
            else:
                ids.append(req.output[-1])
                rows.append(-1)
        step = StepInputs(
            slots=torch.tensor(slots),
            positions=torch.tensor(positions),
            decode=Layout(entries, s),
            raw=self.strategy.raw,
            logit_rows=torch.arange(len(decodes)),
        )
        carried = CarriedTokens(torch.tensor(rows), flight.tokens) if max(rows) >= 0 else None
        return torch.tensor(ids), step, carried

    def _launch(self, batch: Batch) -> _InFlight:
        """Run the batch's step on the device and do its bookkeeping now: sealed
        documents, finished requests' blocks given back (the stream runs this step
        before anything that could rewrite them). Its tokens land later."""
        self.stats.peak_blocks = max(self.stats.peak_blocks, self.pool.num_used)
        if batch.prefills:
            ids, step = self._prefill_inputs(batch)
            carried = None
        else:
            ids, step, carried = self._decode_inputs(batch.decodes)
        logits = self.runner.run(ids, step, carried)
        tokens = logits.argmax(-1)
        keep = logits[: len(batch.prefills)] if self.keep_logits and batch.prefills else None
        flight = _InFlight(
            requests=batch.prefills + batch.decodes,
            prefills=len(batch.prefills),
            tokens=tokens,
            host_tokens=_to_host(tokens),
            first_logits=None if keep is None else _to_host(keep),
            landed=torch.cuda.Event() if tokens.is_cuda else None,
        )
        if flight.landed is not None:
            flight.landed.record()
        self.stats.steps += 1
        self.stats.decode_steps += not batch.prefills
        self.stats.forward_tokens += len(ids)
        for job in batch.segment_prefills:
            self.store.seal(job.segment)
        for req in batch.prefills:
            self.scheduler.prefilled(req)
        for req in flight.requests:
            req.pending += 1
            if req.done:
                self.scheduler.finish(req)
                del self._requests[req.id]
        return flight

    def _land(self, flight: _InFlight) -> list[Request]:
        """Take in a launched step's tokens (waiting for that step only); return the
        requests whose last token this was."""
        t0 = time.perf_counter()
        if flight.landed is not None:
            flight.landed.synchronize()
        now = time.perf_counter()
        self.stats.wait_seconds += now - t0
        done = []
        for i, (req, token) in enumerate(zip(flight.requests, flight.host_tokens.tolist(), strict=True)):
            req.output.append(token)
            req.pending -= 1
            if i < flight.prefills and req.first_token_time is None:  # not a resumed request
                req.first_token_time = now
                if flight.first_logits is not None:
                    req.first_logits = flight.first_logits[i]
            if req.status is RequestStatus.FINISHED and not req.pending:
                req.finish_time = now
                self.finished.append(req)
                done.append(req)
        self.stats.land_seconds += time.perf_counter() - now
        return done


@dataclass
class _InFlight:
    """A launched step: its requests in row order (prefills first), its sampled tokens
    on the device and their copy on the way to the host, and the event that marks the
    copy done (``None`` off CUDA, where the copy is synchronous)."""

    requests: list[Request]
    prefills: int
    tokens: torch.Tensor
    host_tokens: torch.Tensor
    first_logits: torch.Tensor | None
    landed: torch.cuda.Event | None
    rows: dict[int, int] = field(init=False)  # request id -> row

    def __post_init__(self) -> None:
        self.rows = {req.id: i for i, req in enumerate(self.requests)}


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of ``t``: on CUDA into pinned memory without blocking (ready when
    an event recorded after it completes)."""
    if not t.is_cuda:
        return t.clone()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def _token_list(tokens, what: str, vocab_size: int) -> list[int]:
    """Token ids (a sequence of ints or an integer tensor) as a list, checked against
    the vocabulary."""
    if type(tokens) is list and tokens and set(map(type, tokens)) == {int}:  # the common case, without a tensor
        lo, hi, out = min(tokens), max(tokens), list(tokens)
    else:
        t = tokens if isinstance(tokens, torch.Tensor) else torch.tensor(list(tokens), dtype=None)
        if t.numel() == 0:
            return []
        if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"{what}: token ids must be integers, got {t.dtype}")
        t = t.reshape(-1)
        lo, hi, out = int(t.min()), int(t.max()), t.tolist()
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{what}: token id {bad} is outside the vocabulary [0, {vocab_size})")
    return out
