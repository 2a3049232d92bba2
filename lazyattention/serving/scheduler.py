"""The scheduler: which requests run in the next step, and what blocks they hold.

A step is either a **prefill step** or a **decode step**, never both:

* *prefill step*: requests admitted from the front of the waiting queue (FIFO) while
  they fit: at most ``max_num_seqs`` running, at most ``max_batch_tokens`` prefill
  tokens (the first one always goes, however long), and their blocks. Each is prefilled
  in the step that admits it, with the segment prefills of its missing documents.
  Admission takes only what the prefill writes: the documents' segments,
  Block-Attention's copies and the blocks of the own tokens so far.
* *decode step*: one token for every running request, when nothing can be admitted.
  A request whose next token starts a new block gets it now (blocks on demand). When
  none is left, even after evicting unreferenced cached documents, the most recently
  admitted running request is **preempted**: it gives back everything it holds and
  returns to the front of the waiting queue. Re-admitted, it prefills its own tokens
  (query and output so far) again over its documents, which are found cached or
  prefilled anew.

Prefill has priority: a step that can admit someone prefills. Running requests lose a
step each time, as in vLLM and nano-vllm, and admission is bounded by ``max_num_seqs``
and the blocks, so decodes always come round again. Preempting the newest request
first means the oldest always progresses, and since every request fits the budget
alone (the engine refuses one that does not), everything finishes.

Segment prefills are created and completed in the same step, so between steps no
segment is half written: aborting or preempting a request never strands one.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from lazyattention.reference.cache import OutOfBlocks, Segment, SegmentStore
from lazyattention.reference.layout import Placement, ceil_div

from .request import Request, RequestStatus
from .strategies import Strategy

__all__ = ["SegmentPrefill", "Batch", "Scheduler"]


@dataclass
class SegmentPrefill:
    """A cached segment whose K/V this step computes."""

    segment: Segment
    tokens: list[int]
    placement: Placement  # its blocks, at its stored positions
    context: tuple[Placement, ...]  # what its tokens read besides themselves (prefix caching)


@dataclass
class Batch:
    """One step's work: either prefills (with their segment prefills) or decodes."""

    segment_prefills: list[SegmentPrefill] = field(default_factory=list)
    prefills: list[Request] = field(default_factory=list)
    decodes: list[Request] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)  # given back while scheduling

    def __bool__(self) -> bool:
        return bool(self.prefills or self.decodes)


class Scheduler:
    """Waiting and running requests over a :class:`SegmentStore`.

    Args:
        strategy: what a request's documents cost and how they are read.
        store: the segment store (its pool is the KV budget).
        max_num_seqs: requests running at once.
        max_batch_tokens: prefill tokens per step (segment prefills included).
    """

    def __init__(self, strategy: Strategy, store: SegmentStore, max_num_seqs: int, max_batch_tokens: int):
        self.strategy = strategy
        self.store = store
        self.pool = store.pool
        self.block_size = store.block_size
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order

    def add(self, req: Request) -> None:
        """Queue ``req``; its documents' cache keys are hashed here unless it has them."""
        if req.segment_keys is None:
            req.segment_keys = self.strategy.segment_keys(req.documents)
        req.own_prefix = self.strategy.own_prefix(req.documents)
        req.own_start = req.document_tokens - len(req.own_prefix)
        self.waiting.append(req)

    def schedule(self) -> Batch:
        """The next step's batch: prefills if anyone can be admitted, else decodes."""
        batch = self._admit()
        if not batch.prefills:
            batch.decodes = self._grow_running(batch.preempted)
        return batch

    # ------------------------------------------------------------------ prefill

    def _admit(self) -> Batch:
        batch, jobs, tokens = Batch(), {}, 0
        while self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            cost, blocks = self._cost(req)
            if batch.prefills and tokens + cost > self.max_batch_tokens:
                break
            if blocks > self.pool.num_free + self.store.num_evictable_blocks:
                break  # FIFO: wait until running requests give blocks back
            self._acquire(req, jobs)
            tokens += cost
            self.waiting.popleft()
            self.running.append(req)
            req.status = RequestStatus.RUNNING
            batch.prefills.append(req)
        batch.segment_prefills = list(jobs.values())
        return batch

    def _cost(self, req: Request) -> tuple[int, int]:
        """``(tokens, blocks)`` admitting ``req`` adds to this step: its own tokens and
        the documents neither cached nor prefilled this step; blocks for those, for its
        copies, and the unreferenced cached documents it pins (evictable until then).
        Exact, so an admission that passes the check cannot run short."""
        missing, pinned = {}, {}
        for d, key in enumerate(req.segment_keys):  # key d is document d's
            seg = self.store.get(key)
            if seg is None:
                missing[key] = len(req.documents[d])
            elif seg.refs == 0:
                pinned[key] = len(seg.blocks)
        s = self.block_size
        blocks = (
            sum(ceil_div(n, s) for n in missing.values())
            + sum(pinned.values())
            + self.strategy.copy_blocks(req.documents, s)
            + ceil_div(req.num_own, s)
        )
        return req.num_own + sum(missing.values()), blocks

    def _acquire(self, req: Request, jobs: dict[str, SegmentPrefill]) -> None:
        """Take every segment and block ``req``'s prefill needs, or nothing at all
        (:class:`OutOfBlocks`). Cached documents are taken first, so that allocating
        a missing one never evicts another this request is about to reuse."""
        keys = req.segment_keys
        first = req.preemptions == 0  # hits count once per request
        found = {}
        try:
            for d in sorted(range(len(keys)), key=lambda d: keys[d] not in self.store):
                found[d] = self.store.acquire(key=keys[d], length=len(req.documents[d]))
                req.entries.append(found[d][0])
            req.copy_blocks = self.store.allocate(self.strategy.copy_blocks(req.documents, self.block_size))
            req.own_blocks = self.store.allocate(ceil_div(req.num_own, self.block_size))
        except OutOfBlocks:
            self._release(req)
            raise
        sources, start = [], 0
        for d, key in enumerate(keys):
            doc, (seg, hit) = req.documents[d], found[d]
            stored = self.strategy.stored_start(start)
            if not hit and doc:
                context = tuple(sources) if self.strategy.reads_prefix() else ()
                jobs[key] = SegmentPrefill(seg, doc, Placement(seg.blocks, len(doc), stored, stored), context)
            elif not hit:
                self.store.seal(seg)  # empty: nothing to compute
            if first and doc:
                req.lookups += 1
                req.hits += hit
            sources.append(Placement(seg.blocks, len(doc), start=start, stored_start=stored))
            start += len(doc)
        pairs = self.strategy.placements(sources, req.copy_blocks)
        req.sources = [source for source, _ in pairs]
        req.placements = [read for _, read in pairs]

    def prefilled(self, req: Request) -> None:
        """After ``req``'s prefill: a request that reads copies of its documents lets
        the cached originals go (they may be evicted from now on)."""
        if req.sources != req.placements:
            for seg in req.entries:
                self.store.release(seg)
            req.entries = []

    # ------------------------------------------------------------------ decode

    def _grow_running(self, preempted: list[Request]) -> list[Request]:
        """Running requests (oldest first) whose next token has a slot; preempt the
        newest while one is short of a block."""
        scheduled, queue = [], deque(self.running)
        while queue:
            req = queue.popleft()
            while not self._grow(req):
                victim = queue.pop() if queue else req
                self.preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            else:
                scheduled.append(req)
        return scheduled

    def _grow(self, req: Request) -> bool:
        """Give ``req`` the block its next token is written into, if it needs one."""
        short = ceil_div(req.num_own, self.block_size) - len(req.own_blocks)
        if short > 0:
            try:
                req.own_blocks += self.store.allocate(short)
            except OutOfBlocks:
                return False
        return True

    # ------------------------------------------------------------------ giving back

    def preempt(self, req: Request) -> None:
        """Give back everything ``req`` holds; it waits at the front of the queue and
        recomputes its own tokens when re-admitted."""
        self._release(req)
        self.running.remove(req)
        self.waiting.appendleft(req)
        req.status = RequestStatus.WAITING
        req.preemptions += 1

    def finish(self, req: Request) -> None:
        self._release(req)
        self.running.remove(req)
        req.status = RequestStatus.FINISHED

    def abort(self, req: Request) -> None:
        """Drop a waiting or running request, giving back what it holds. Segments it
        shared stay cached and referenced by their other users."""
        if req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        elif req.status is RequestStatus.RUNNING:
            self._release(req)
            self.running.remove(req)
        else:
            raise ValueError(
                f"request {req.id} is {req.status.value}: only a waiting or running request can be aborted"
            )
        req.status = RequestStatus.ABORTED

    def _release(self, req: Request) -> None:
        """Give back every segment reference and block ``req`` holds."""
        for seg in req.entries:
            self.store.release(seg)
        self.pool.release(req.own_blocks + req.copy_blocks)
        req.entries, req.sources, req.placements, req.own_blocks, req.copy_blocks = [], [], [], [], []
