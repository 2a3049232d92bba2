"""Tests of ``lazyattention.reference.cache``: the block pool and the segment store.

The centre is a Hypothesis state machine driving a :class:`BlockPool` and a
:class:`SegmentStore` together with a real (tiny) K tensor, against a plain model of
who holds what. After every step: the store's own invariants, no leak, no double
free, exact reference counts, in-use segments never evicted, sealed contents never
changed; every rejected call leaves everything as it was.
"""

import hashlib

import pytest
import torch
from hypothesis import event, given, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lazyattention.reference import BlockPool, CacheError, OutOfBlocks, PagedKVCache, SegmentStore, content_key

NUM_BLOCKS, BLOCK_SIZE = 10, 2
#: A small universe of documents, so that hits, misses and evictions all happen.
DOCUMENTS = [list(range(100 * i, 100 * i + length)) for i, length in enumerate([0, 1, 2, 3, 5, 6, 9])]


class PoolAndStore(RuleBasedStateMachine):
    """Random acquire (hit or miss) / write + seal / release / own-block allocate and
    free / evict sequences, plus deliberate misuse, over a 10-block pool."""

    def __init__(self):
        super().__init__()
        self.pool = BlockPool(NUM_BLOCKS)
        self.store = SegmentStore(self.pool, BLOCK_SIZE)
        self.k = torch.zeros(NUM_BLOCKS, BLOCK_SIZE, 1, 4, dtype=torch.float64)
        self.gen = torch.Generator().manual_seed(0)
        self.held = []  # (segment, key): one entry per reference the "requests" hold
        self.own = []  # lists of blocks allocated for requests' own tokens
        self.freed_own = []  # own block lists already freed (for double-free attempts)
        self.checksums = {}  # key -> bytes of its blocks' contents, recorded at seal

    # ------------------------------------------------------------------ helpers

    def snapshot(self):
        """Everything observable through the public API."""
        segs = {}
        for doc in DOCUMENTS:
            seg = self.store.get(content_key(doc))
            if seg is not None:
                segs[seg.key] = (seg.refs, seg.sealed, seg.blocks)
        refs = tuple(self.pool.refcount(b) for b in range(NUM_BLOCKS))
        return refs, self.pool.num_free, self.store.num_evictable_blocks, segs, self.k.clone()

    def assert_unchanged(self, before):
        after = self.snapshot()
        assert before[:4] == after[:4], "a rejected call changed the pool or the store"
        assert torch.equal(before[4], after[4]), "a rejected call changed the K/V tensor"

    def contents(self, seg):
        return self.k[list(seg.blocks)].clone() if seg.blocks else torch.empty(0)

    def write(self, blocks):
        for b in blocks:
            assert self.store.writable(b), f"block {b} is not writable"
            self.k[b] = torch.randn(self.k[b].shape, generator=self.gen, dtype=torch.float64)

    # ------------------------------------------------------------------ rules

    @rule(doc=st.sampled_from(DOCUMENTS), seal_now=st.booleans())
    def acquire(self, doc, seal_now):
        key = content_key(doc)
        cached = self.store.get(key)
        need = self.store.blocks_needed(len(doc))
        available = self.pool.num_free + self.store.num_evictable_blocks
        before = self.snapshot()
        if cached is None and need > available:
            event("acquire: out of blocks")
            with pytest.raises(OutOfBlocks, match=f"need {need} blocks"):
                self.store.acquire(doc)
            self.assert_unchanged(before)
            return
        seg, hit = self.store.acquire(doc)
        event(f"acquire: {'hit' if hit else 'miss'}{' with eviction' if need > before[1] and not hit else ''}")
        assert hit == (cached is not None)
        assert seg.key == key and seg.length == len(doc) and len(seg.blocks) == need
        if hit:
            assert seg is cached
            if seg.sealed:
                assert torch.equal(self.contents(seg), self.checksums[key]), "a hit changed contents"
        elif seal_now:
            self.seal(seg)
        self.held.append((seg, key))

    @precondition(lambda self: any(not seg.sealed for seg, _ in self.held))
    @rule(i=st.integers(0, 99))
    def write_and_seal(self, i):
        unsealed = [seg for seg, _ in self.held if not seg.sealed]
        self.seal(unsealed[i % len(unsealed)])

    def seal(self, seg):
        self.write(seg.blocks)
        self.store.seal(seg)
        self.checksums[seg.key] = self.contents(seg)
        assert not any(self.store.writable(b) for b in seg.blocks)

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 99))
    def release(self, i):
        seg, key = self.held.pop(i % len(self.held))
        self.store.release(seg)
        if not seg.sealed and not any(s is seg for s, _ in self.held):
            assert key not in self.store, "an unsealed segment with no users must be dropped"

    @rule(doc=st.sampled_from(DOCUMENTS))
    def release_unheld_segment(self, doc):
        """Releasing a segment nobody holds is a double release (or unknown): an
        error, and nothing changes."""
        seg = self.store.get(content_key(doc))
        if seg is None or seg.refs > 0:
            return
        before = self.snapshot()
        event("double release of a segment")
        with pytest.raises(CacheError, match="double release of segment"):
            self.store.release(seg)
        self.assert_unchanged(before)

    @rule(n=st.integers(0, 6))
    def allocate_own(self, n):
        available = self.pool.num_free + self.store.num_evictable_blocks
        before = self.snapshot()
        if n > available:
            with pytest.raises(OutOfBlocks, match=f"need {n} blocks"):
                self.store.allocate(n)
            self.assert_unchanged(before)
            return
        evictable_before = {k for k, (refs, sealed, _) in before[3].items() if refs == 0}
        blocks = self.store.allocate(n)
        assert len(blocks) == len(set(blocks)) == n
        assert all(self.pool.refcount(b) == 1 for b in blocks)
        # only unreferenced segments may have been evicted to make room
        gone = set(before[3]) - {content_key(d) for d in DOCUMENTS if content_key(d) in self.store}
        assert gone <= evictable_before
        self.write(blocks)
        self.own.append(blocks)

    @precondition(lambda self: self.own)
    @rule(i=st.integers(0, 99))
    def free_own(self, i):
        blocks = self.own.pop(i % len(self.own))
        self.pool.release(blocks)
        self.freed_own.append(blocks)

    @precondition(lambda self: self.freed_own)
    @rule(i=st.integers(0, 99))
    def double_free_own(self, i):
        """Freeing own blocks again: an error while they are still free; once a block
        was handed out again the pool cannot tell, so that case is skipped."""
        blocks = self.freed_own[i % len(self.freed_own)]
        if not blocks or any(self.pool.is_allocated(b) for b in blocks):
            return
        before = self.snapshot()
        event("double free of own blocks")
        with pytest.raises(CacheError, match="double release of block"):
            self.pool.release(blocks)
        self.assert_unchanged(before)

    @rule(n=st.integers(0, NUM_BLOCKS))
    def evict(self, n):
        lru_before = {k for k, (refs, _, _) in self.snapshot()[3].items() if refs == 0}
        free_before = self.pool.num_free
        evicted = self.store.evict(n)
        event(f"evict: {'some' if evicted else 'none'}")
        assert set(evicted) <= lru_before, "evicted a segment in use"
        assert self.pool.num_free >= free_before  # eviction only ever frees
        for key in evicted:
            assert key not in self.store
            self.checksums.pop(key, None)

    @rule(block=st.one_of(st.integers(-3, -1), st.integers(NUM_BLOCKS, NUM_BLOCKS + 3)))
    def unknown_block(self, block):
        before = self.snapshot()
        for call in (self.pool.release, self.pool.retain):
            with pytest.raises(CacheError, match=f"unknown block {block}"):
                call([block])
        self.assert_unchanged(before)

    # ------------------------------------------------------------------ invariants

    @invariant()
    def store_invariants(self):
        self.store.check_invariants()

    @invariant()
    def no_leak_no_double_free_exact_refcounts(self):
        expected = [0] * NUM_BLOCKS
        for doc in DOCUMENTS:
            seg = self.store.get(content_key(doc))
            if seg is not None:
                for b in seg.blocks:
                    expected[b] += 1  # the store's own reference
        for seg, _ in self.held:
            for b in seg.blocks:
                expected[b] += 1
        for blocks in self.own:
            for b in blocks:
                expected[b] += 1
        actual = [self.pool.refcount(b) for b in range(NUM_BLOCKS)]
        assert actual == expected, f"refcounts {actual} != expected {expected}"
        # a double free would list a block twice among the free ones
        assert self.pool.num_free == expected.count(0)
        assert self.pool.num_free + self.pool.num_used == NUM_BLOCKS

    @invariant()
    def held_segments_are_never_evicted(self):
        for seg, key in self.held:
            assert self.store.get(key) is seg, f"segment {key[:12]} in use was evicted"

    @invariant()
    def sealed_contents_never_change(self):
        for key, checksum in list(self.checksums.items()):
            seg = self.store.get(key)
            if seg is None:  # evicted to make room (held ones are checked above)
                del self.checksums[key]
                continue
            assert seg.sealed
            assert torch.equal(self.contents(seg), checksum), f"sealed segment {key[:12]} was rewritten"

    def teardown(self):
        """Everything released: only cached segments hold blocks; evicting them all
        frees the whole pool."""
        note(f"held={len(self.held)} own={len(self.own)} cached={len(self.store)}")
        for seg, _ in self.held:
            self.store.release(seg)
        for blocks in self.own:
            self.pool.release(blocks)
        cached = [self.store.get(content_key(d)) for d in DOCUMENTS]
        assert self.pool.num_used == sum(len(s.blocks) for s in cached if s is not None)
        self.store.evict(NUM_BLOCKS + 1)  # more than can be freed: evicts every segment
        assert self.pool.num_free == NUM_BLOCKS and len(self.store) == 0
        self.store.check_invariants()


PoolAndStore.TestCase.settings = settings(
    PoolAndStore.TestCase.settings, max_examples=2 * settings().max_examples, stateful_step_count=30
)
TestPoolAndStore = PoolAndStore.TestCase


# --------------------------------------------------------------------------- plain tests


def test_lru_evicts_least_recently_released_first():
    pool = BlockPool(2)
    store = SegmentStore(pool, 2)
    a, _ = store.acquire(key="a", length=2)
    b, _ = store.acquire(key="b", length=2)
    for seg in (a, b):
        store.seal(seg)
    store.release(b)
    store.release(a)  # a released last: b is the least recently used
    store.allocate(1)
    assert "b" not in store and "a" in store
    seg, hit = store.acquire(key="a", length=2)  # a hit takes it off the LRU
    assert hit and seg is a and store.num_evictable_blocks == 0
    with pytest.raises(OutOfBlocks, match="the rest are in use"):
        store.allocate(2)
    assert "a" in store
    store.check_invariants()


def test_a_hit_with_another_length_is_an_error():
    store = SegmentStore(BlockPool(4), 2)
    store.acquire(key="k", length=3)
    with pytest.raises(CacheError, match="has length 3, asked for 4"):
        store.acquire(key="k", length=4)
    store.check_invariants()


def test_content_key_is_by_content():
    assert content_key([1, 2, 3]) == content_key(torch.tensor([1, 2, 3], dtype=torch.int32))
    assert content_key([1, 2, 3]) != content_key([3, 2, 1])
    assert content_key([]) != content_key([0])
    assert content_key([]) == hashlib.sha256(b"").hexdigest()
    assert content_key([1]) == hashlib.sha256((1).to_bytes(8, "little")).hexdigest()


@given(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=50))
def test_content_key_of_a_sequence_is_that_of_its_int64_tensor(tokens):
    assert content_key(tokens) == content_key(tuple(tokens)) == content_key(torch.tensor(tokens, dtype=torch.int64))


def test_content_key_refuses_what_is_not_an_int64_sequence():
    with pytest.raises(TypeError):
        content_key([1.5])
    with pytest.raises(OverflowError):
        content_key([2**63])


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda p, s: BlockPool(0), ValueError, "num_blocks must be a positive int"),
        (lambda p, s: SegmentStore(p, 0), ValueError, "block_size must be a positive int"),
        (lambda p, s: p.allocate(-1), ValueError, "non-negative int"),
        (lambda p, s: p.allocate(5), OutOfBlocks, "need 5 blocks, only 4"),
        (lambda p, s: p.retain([0]), CacheError, "cannot retain free block 0"),
        (lambda p, s: p.release([1]), CacheError, "double release of block 1"),
        (lambda p, s: p.release([4]), CacheError, "unknown block 4"),
        (lambda p, s: p.release(["0"]), CacheError, "unknown block '0'"),
        (lambda p, s: p.refcount(-1), CacheError, "unknown block -1"),
        (lambda p, s: s.acquire(), ValueError, "needs tokens, or key and length"),
        (lambda p, s: s.acquire(key="x"), ValueError, "non-negative length"),
        (lambda p, s: s.acquire(key="x", length=9), OutOfBlocks, "need 5 blocks"),
        (lambda p, s: s.release(SegmentStore(p, 2).acquire(key="y", length=0)[0]), CacheError, "unknown segment"),
        (lambda p, s: s.seal(SegmentStore(p, 2).acquire(key="y", length=0)[0]), CacheError, "unknown segment"),
    ],
)
def test_misuse_raises_a_clear_error_and_changes_nothing(call, error, match):
    pool = BlockPool(4)
    store = SegmentStore(pool, 2)
    before = ([pool.refcount(b) for b in range(4)], pool.num_free, len(store))
    with pytest.raises(error, match=match):
        call(pool, store)
    assert ([pool.refcount(b) for b in range(4)], pool.num_free, len(store)) == before
    store.check_invariants()


def test_release_of_a_duplicated_block_list_is_checked_as_a_whole():
    """Releasing ``[b, b]`` from a block with one reference must fail before it
    touches anything (not free the block once and then fail)."""
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    with pytest.raises(CacheError, match=f"double release of block {b}"):
        pool.release([b, b])
    assert pool.refcount(b) == 1 and pool.num_free == 1


def test_paged_kv_cache_shapes():
    cache = PagedKVCache(num_layers=2, num_blocks=3, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float16)
    assert len(cache.k) == len(cache.v) == 2
    assert cache.k[0].shape == (3, 4, 2, 8) and cache.k[0].dtype == torch.float16
    assert cache.bytes_per_block == 2 * 2 * 4 * 2 * 8 * 2
