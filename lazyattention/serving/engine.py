"""A small serving engine: document-aware generation with continuous batching.

A request is ``[document_0] … [document_{n-1}] [query]`` followed by generated
tokens (DESIGN §2). The engine caches documents by content hash in a
:class:`~lazyattention.reference.SegmentStore` over a fixed KV budget of
``num_blocks`` paged blocks, and every step runs **one** model forward over a batch of

* *segment prefills* — a missing document encoded alone (its own causal attention),
* *request prefills* — a request's query tokens over its documents,
* *decodes* — one new token per running request,

in that order inside each layer (every new K/V is written before any attention of the
layer reads it), so a document and the request that needs it can share a step.

Strategies, one engine, so comparisons are apples to apples:

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

``lazy``, ``raw_cache`` and ``block_attention`` compute one function (documents encoded
block-diagonally); ``prefix_cache`` and ``recompute`` compute ordinary full attention.

Budget: a request is admitted only when every block it will ever need (its documents,
copies, own tokens up to ``max_new_tokens``) can be held at once, evicting unreferenced
cached documents (least recently used first) if needed. Admission is FIFO. So no running
request ever runs short (no preemption needed), and a request that could not fit even
in an empty cache is refused when it is added, with an error naming the budget.

Decoding is greedy (argmax), so a request's output depends only on its inputs and the
strategy, never on what else shares its batch — the engine's tests check exactly that.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from lazyattention.reference.cache import BlockPool, OutOfBlocks, Segment, SegmentStore, content_key
from lazyattention.reference.layout import Layout, Placement, RequestLayout

from .model import Model, StepInputs
from .runner import ModelRunner

__all__ = ["STRATEGIES", "Request", "EngineStats", "Engine", "blocks_needed"]

#: The reuse strategies, all served by the same :class:`Engine`.
STRATEGIES = ("lazy", "block_attention", "prefix_cache", "recompute", "raw_cache")


@dataclass
class Request:
    """One request and everything the engine records about it.

    ``query`` and each document are lists of token ids; ``output`` fills with the
    generated ids. Times are ``time.perf_counter()`` seconds (device synchronised).
    """

    id: int
    query: list[int]
    documents: list[list[int]]
    max_new_tokens: int
    arrival: float
    output: list[int] = field(default_factory=list)
    first_token_time: float | None = None
    finish_time: float | None = None
    hits: int = 0  # documents whose K/V was found cached (counted once per request)
    lookups: int = 0  # non-empty documents looked up
    first_logits: torch.Tensor | None = None  # [V] float32, when the engine keeps them
    # bookkeeping of the strategy
    starts: list[int] = field(default_factory=list)  # logical start of each document
    own_start: int = 0  # logical position of the first own token
    own_prefix: int = 0  # own tokens before the query (the documents under ``recompute``)
    entries: list[Segment] = field(default_factory=list)  # cache entries this request holds
    placements: list[Placement] = field(default_factory=list)  # what its queries read
    own_blocks: list[int] = field(default_factory=list)
    copy_blocks: list[int] = field(default_factory=list)
    prefilled: bool = False

    @property
    def document_tokens(self) -> int:
        return sum(len(d) for d in self.documents)

    @property
    def done(self) -> bool:
        return len(self.output) >= self.max_new_tokens


@dataclass
class EngineStats:
    """Counters over an engine's lifetime."""

    steps: int = 0
    forward_tokens: int = 0  # tokens through the model (segment + request prefills + decodes)
    segment_prefill_tokens: int = 0
    bytes_copied: int = 0  # K/V bytes written by Block-Attention re-encoding, all layers
    peak_blocks: int = 0  # most blocks allocated at once (cached documents included)
    hits: int = 0
    lookups: int = 0

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


@dataclass
class _SegmentJob:
    """A cache entry whose K/V still has to be computed (a segment prefill)."""

    segment: Segment
    tokens: list[int]
    start: int  # stored = logical position of its first token
    context: tuple[Placement, ...]  # what its tokens read besides themselves (prefix_cache)


class Engine:
    """Continuous batching over a paged KV budget, with a selectable reuse strategy.

    Args:
        model: the decoder (its dtype and device are the cache's).
        strategy: one of :data:`STRATEGIES`.
        num_blocks: the KV budget ``N`` in blocks of ``block_size`` tokens.
        block_size: ``S``.
        max_batch_tokens: prefill tokens per step (a single request larger than this
            still runs, alone).
        max_num_seqs: requests admitted at once.
        keep_logits: keep each request's first-token logits (quality checks).

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
        strategy: str = "lazy",
        num_blocks: int = 256,
        block_size: int = 16,
        max_batch_tokens: int = 4096,
        max_num_seqs: int = 32,
        keep_logits: bool = False,
    ):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        for name, value in (("max_batch_tokens", max_batch_tokens), ("max_num_seqs", max_num_seqs)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.model = model
        self.strategy = strategy
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.store = SegmentStore(self.pool, block_size)
        self.cache = model.new_cache(num_blocks, block_size)
        self.runner = ModelRunner(model, self.cache)
        self.max_batch_tokens = max_batch_tokens
        self.max_num_seqs = max_num_seqs
        self.keep_logits = keep_logits
        self.stats = EngineStats()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.finished: list[Request] = []
        self._jobs: dict[str, _SegmentJob] = {}
        self._next_id = 0

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
        req = Request(
            id=self._next_id,
            query=query,
            documents=docs,
            max_new_tokens=max_new_tokens,
            arrival=time.perf_counter() if arrival is None else arrival,
        )
        total = req.document_tokens + len(query) + max_new_tokens
        window = self.model.cfg.sliding_window
        if window is not None and total > window:
            raise ValueError(
                f"request spans {total} tokens, more than the model's sliding window {window}; "
                "sliding-window attention is not implemented"
            )
        need = self.blocks_needed(req)
        if need > self.pool.num_blocks:
            raise ValueError(
                f"request needs {need} KV blocks under strategy {self.strategy!r} "
                f"({req.document_tokens} document tokens, {len(query)} query tokens, {max_new_tokens} new) "
                f"but the KV budget is {self.pool.num_blocks} blocks of {self.block_size}"
            )
        self._next_id += 1
        self.waiting.append(req)
        return req

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[Request]:
        """Admit what fits, run one batched forward, return the requests that finished."""
        self._admit()
        if not self.running:
            return []
        jobs, prefills = self._schedule_prefills()
        decodes = [r for r in self.running if r.prefilled]
        self._forward(jobs, prefills, decodes)
        self.stats.steps += 1
        done = [r for r in self.running if r.prefilled and r.done]
        for req in done:
            self._release(req)
            req.finish_time = time.perf_counter()
            self.running.remove(req)
            self.finished.append(req)
        return done

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
        while not req.done:
            if not self.has_work():
                raise RuntimeError(f"request {req.id} was lost")  # cannot happen: a bug if it does
            self.step()
        return list(req.output)

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` if pool, store and requests disagree (for tests)."""
        self.store.check_invariants()
        held: dict[int, int] = {}
        for req in self.running:
            for b in req.own_blocks + req.copy_blocks:
                held[b] = held.get(b, 0) + 1
        for b, n in held.items():
            assert self.pool.refcount(b) == n, f"request block {b}: refcount {self.pool.refcount(b)} != {n}"
            assert self.store.writable(b), f"request block {b} belongs to a sealed segment"
        # every referenced segment is held by a running request (waiting ones hold nothing)
        in_use = {seg.key: seg for req in self.running for seg in req.entries}
        segment_blocks = self.store.num_evictable_blocks + sum(len(seg.blocks) for seg in in_use.values())
        assert self.pool.num_used == segment_blocks + len(held), (
            f"pool leak: {self.pool.num_used} used, {segment_blocks} in cached segments, {len(held)} held by requests"
        )
        for req in self.running:
            for seg in req.entries:
                assert self.store.get(seg.key) is seg and seg.refs > 0, f"request {req.id} lost segment {seg.key[:12]}"
        for key, job in self._jobs.items():
            assert self.store.get(key) is job.segment and not job.segment.sealed

    # ------------------------------------------------------------------ budget and admission

    def _own_blocks_needed(self, req: Request) -> int:
        return _own_blocks(self.strategy, self.block_size, len(req.query), req.document_tokens, req.max_new_tokens)

    def blocks_needed(self, req: Request) -> int:
        """Blocks ``req`` needs at once under this strategy with nothing else cached
        (see :func:`blocks_needed`)."""
        return blocks_needed(self.strategy, self.block_size, req.query, req.documents, req.max_new_tokens)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            try:
                self._acquire(req)
            except OutOfBlocks:
                break  # FIFO: wait until running requests release blocks
            self.waiting.popleft()
            self.running.append(req)
            self.stats.hits += req.hits
            self.stats.lookups += req.lookups
            self.stats.peak_blocks = max(self.stats.peak_blocks, self.pool.num_used)

    def _acquire(self, req: Request) -> None:
        """Take every cache entry and block the request needs, or nothing at all."""
        req.starts, pos = [], 0
        for d in req.documents:
            req.starts.append(pos)
            pos += len(d)
        req.own_start = 0 if self.strategy == "recompute" else pos
        req.own_prefix = pos if self.strategy == "recompute" else 0
        req.hits = req.lookups = 0
        try:
            if self.strategy in ("lazy", "raw_cache", "block_attention"):
                for doc in req.documents:
                    self._acquire_entry(req, doc, key=content_key(doc), start=0, context=())
            elif self.strategy == "prefix_cache":
                chain = "prefix"  # the key of a document names the whole token prefix it ends
                for doc, start in zip(req.documents, req.starts):
                    if doc:
                        chain = hashlib.sha256(f"{chain}/{content_key(doc)}".encode()).hexdigest()
                    key = chain if doc else content_key([])
                    self._acquire_entry(req, doc, key=key, start=start, context=tuple(req.placements))
            if self.strategy == "block_attention":
                req.copy_blocks = self.store.allocate(sum(self.store.blocks_needed(len(d)) for d in req.documents))
            req.own_blocks = self.store.allocate(self._own_blocks_needed(req))
        except OutOfBlocks:
            self._release(req)
            raise
        req.placements = self._placements(req)

    def _acquire_entry(self, req: Request, tokens: list[int], key: str, start: int, context) -> None:
        seg, hit = self.store.acquire(key=key, length=len(tokens))
        req.entries.append(seg)
        req.placements.append(Placement(seg.blocks, len(tokens), start=start, stored_start=start))
        if tokens:
            req.lookups += 1
            req.hits += hit
        if not hit:
            if tokens:
                self._jobs[key] = _SegmentJob(seg, tokens, start, context)
            else:
                self.store.seal(seg)  # nothing to compute

    def _placements(self, req: Request) -> list[Placement]:
        """What the request's queries read besides their own tokens."""
        lengths = [len(d) for d in req.documents]
        if self.strategy in ("lazy", "raw_cache"):  # in place, shift δ = start (eq. 6)
            return [
                Placement(s.blocks, n, start=a, stored_start=0) for s, n, a in zip(req.entries, lengths, req.starts)
            ]
        if self.strategy == "block_attention":  # request-owned copies, stored at their logical starts
            out, i = [], 0
            for n, a in zip(lengths, req.starts):
                k = self.store.blocks_needed(n)
                out.append(Placement(tuple(req.copy_blocks[i : i + k]), n, start=a, stored_start=a))
                i += k
            return out
        if self.strategy == "prefix_cache":
            return list(req.placements)
        return []

    def _release(self, req: Request) -> None:
        """Give back everything the request holds (after finishing, or a failed admission)."""
        for seg in req.entries:
            self.store.release(seg)
            job = self._jobs.get(seg.key)
            if job is not None and self.store.get(seg.key) is not job.segment:
                del self._jobs[seg.key]  # its only holder left before it was computed
        self.pool.release(req.own_blocks + req.copy_blocks)
        req.entries, req.own_blocks, req.copy_blocks, req.placements = [], [], [], []

    # ------------------------------------------------------------------ scheduling

    def _pending_jobs(self, req: Request) -> list[_SegmentJob]:
        return [self._jobs[s.key] for s in req.entries if s.key in self._jobs]

    def _schedule_prefills(self):
        """FIFO: request prefills (with the segment prefills they need) within the token budget."""
        jobs: dict[str, _SegmentJob] = {}
        prefills: list[Request] = []
        used = 0
        for req in self.running:
            if req.prefilled:
                continue
            new_jobs = [j for j in self._pending_jobs(req) if j.segment.key not in jobs]
            docs = req.document_tokens if self.strategy == "recompute" else 0
            cost = sum(len(j.tokens) for j in new_jobs) + len(req.query) + docs
            if prefills and used + cost > self.max_batch_tokens:
                break
            used += cost
            prefills.append(req)
            for j in new_jobs:
                jobs[j.segment.key] = j
        return list(jobs.values()), prefills

    # ------------------------------------------------------------------ the step

    def _forward(self, jobs: list[_SegmentJob], prefills: list[Request], decodes: list[Request]) -> None:
        s = self.block_size
        ids: list[int] = []
        slots: list[torch.Tensor] = []
        positions: list[torch.Tensor] = []
        entries: list[RequestLayout] = []
        logit_rows: list[int] = []
        copy_src, copy_dst, copy_shift = [], [], []

        def write(tokens, placement: Placement, first: int = 0):
            """Queue tokens ``first..`` of ``placement`` for writing; return how many."""
            j = torch.arange(first, placement.length)
            blocks = torch.tensor(placement.blocks, dtype=torch.int64)
            slots.append(blocks[j // s] * s + j % s)
            positions.append(j + placement.stored_start)
            ids.extend(tokens)
            return placement.length - first

        for job in jobs:  # documents encoded alone (prefix_cache: after their prefix)
            seg = job.segment
            own = Placement(seg.blocks, len(job.tokens), start=job.start, stored_start=job.start)
            entries.append(RequestLayout(job.context, own, num_queries=write(job.tokens, own)))
            self.stats.segment_prefill_tokens += len(job.tokens)
        for req in prefills:
            tokens = (sum(req.documents, []) if self.strategy == "recompute" else []) + req.query
            own = self._own_placement(req, len(tokens))
            entries.append(RequestLayout(tuple(req.placements), own, num_queries=write(tokens, own)))
            logit_rows.append(len(ids) - 1)
            if self.strategy == "block_attention":
                for seg, copy in zip(req.entries, req.placements):
                    j = torch.arange(copy.length)
                    src = torch.tensor(seg.blocks, dtype=torch.int64)
                    dst = torch.tensor(copy.blocks, dtype=torch.int64)
                    copy_src.append(src[j // s] * s + j % s)
                    copy_dst.append(dst[j // s] * s + j % s)
                    copy_shift.append(torch.full((copy.length,), copy.start, dtype=torch.int64))
        decode_entries = []
        for req in decodes:
            n = req.own_prefix + len(req.query) + len(req.output)
            own = self._own_placement(req, n)
            decode_entries.append(RequestLayout(tuple(req.placements), own, num_queries=1))
            write([req.output[-1]], own, first=n - 1)
            logit_rows.append(len(ids) - 1)

        step = StepInputs(  # host tensors: the runner moves the step to the device
            slots=torch.cat(slots),
            positions=torch.cat(positions),
            prefill=Layout(entries, s) if entries else None,
            decode=Layout(decode_entries, s) if decode_entries else None,
            raw=self.strategy == "raw_cache",
            logit_rows=torch.tensor(logit_rows),
        )
        if copy_src:
            step.copy_src = torch.cat(copy_src)
            step.copy_dst = torch.cat(copy_dst)
            step.copy_shift = torch.cat(copy_shift)
            self.stats.bytes_copied += step.copy_src.numel() * self.cache.bytes_per_block // s
        logits = self.runner.run(torch.tensor(ids), step)
        next_tokens = logits.argmax(-1).tolist()  # .tolist() synchronises the device
        now = time.perf_counter()
        self.stats.forward_tokens += len(ids)

        for job in jobs:
            self.store.seal(job.segment)
            del self._jobs[job.segment.key]
        for i, req in enumerate(prefills):
            req.prefilled = True
            req.first_token_time = now
            req.output.append(next_tokens[i])
            if self.keep_logits:
                req.first_logits = logits[i].cpu()
            if self.strategy == "block_attention":
                # the request reads its own copies from now on: the originals may be evicted
                for seg in req.entries:
                    self.store.release(seg)
                req.entries = []
        for i, req in enumerate(decodes):
            req.output.append(next_tokens[len(prefills) + i])

    def _own_placement(self, req: Request, length: int) -> Placement:
        """The request's own tokens ``0..length-1``, stored where they sit (shift 0)."""
        k = self.store.blocks_needed(length)
        return Placement(tuple(req.own_blocks[:k]), length, start=req.own_start, stored_start=req.own_start)


def _own_blocks(strategy: str, block_size: int, query_len: int, document_tokens: int, max_new_tokens: int) -> int:
    written = query_len + max_new_tokens - 1  # the last generated token is never fed back
    if strategy == "recompute":
        written += document_tokens  # the documents are the request's own tokens
    return -(-written // block_size)


def blocks_needed(strategy: str, block_size: int, query, documents, max_new_tokens: int) -> int:
    """KV blocks one request needs at once under ``strategy`` with nothing else cached:
    its documents (each distinct one once; ``prefix_cache`` keys them by prefix),
    Block-Attention's per-request copies, and its own tokens up to ``max_new_tokens``.
    An engine refuses a request that needs more than its whole budget."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    documents = [list(d) for d in documents]

    def blocks(d) -> int:
        return -(-len(d) // block_size)

    need = _own_blocks(strategy, block_size, len(query), sum(map(len, documents)), max_new_tokens)
    if strategy in ("lazy", "raw_cache", "block_attention"):
        need += sum(blocks(d) for d in {content_key(d): d for d in documents}.values())
    if strategy in ("block_attention", "prefix_cache"):
        need += sum(blocks(d) for d in documents)
    return need


def _token_list(tokens, what: str, vocab_size: int) -> list[int]:
    """Token ids (a sequence of ints or an integer tensor) as a list, checked against
    the vocabulary."""
    t = tokens if isinstance(tokens, torch.Tensor) else torch.tensor(list(tokens), dtype=None)
    if t.numel() == 0:
        return []
    if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{what}: token ids must be integers, got {t.dtype}")
    t = t.reshape(-1)
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{what}: token id {bad} is outside the vocabulary [0, {vocab_size})")
    return t.tolist()
