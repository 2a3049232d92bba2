# %% [markdown]
# # 2. Why KV caches are position-bound
#
# **What you will learn**
#
# * why a key cached the ordinary way (rotated at its absolute position) gives the wrong
#   attention when the same document shows up at another offset, measured with the
#   reference attention functions;
# * how the *shift* of deferred encoding (eq. 6) makes that same cached key right again,
#   without touching it;
# * what this means for reuse, counted: a vLLM-style prefix cache against a segment cache
#   keyed by document content, on requests that retrieve documents in varying order.
#
# See [Why caches are position-bound](../concepts/position-bound.md) for the prose.

# %%
import hashlib
import os
import random

import torch

import lazyattention.reference as la

SMALL = os.environ.get("LAZYATTENTION_TUTORIAL_SMALL") == "1"  # set by the test suite
generator = torch.Generator().manual_seed(0)

# %% [markdown]
# ## A document cached at one offset, used at another
#
# One attention head is enough to see it. A document of `L` tokens is encoded in request A
# at start 100: an ordinary engine writes its keys rotated at positions 100…100+L−1.
# Request B retrieves the same document at start 300.

# %%
rope = la.RopeConfig(head_dim=16)
L, S, H, D = 10, 4, 1, 16  # tokens, block size, heads, head dim
k = torch.randn(L, H, D, dtype=torch.float64, generator=generator)  # pre-RoPE keys
v = torch.randn(L, H, D, dtype=torch.float64, generator=generator)
q = torch.randn(2, H, D, dtype=torch.float64, generator=generator)  # request B's 2 own tokens


def cache_with_document(stored_start: int):
    """A paged cache holding the document, its keys rotated at ``stored_start + j``."""
    k_cache = torch.zeros(8, S, H, D, dtype=torch.float64)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.arange(L)  # blocks 0, 1, 2 (the last one partly filled)
    la.write_kv(k, v, k_cache, v_cache, slots, stored_start + torch.arange(L), rope)
    # Request B's own two tokens go to block 3, rotated at their own positions 310, 311.
    la.write_kv(q, q, k_cache, v_cache, torch.tensor([12, 13]), torch.tensor([310, 311]), rope)
    return k_cache, v_cache


def request_b(stored_start: int) -> la.Layout:
    """Request B: the document at logical start 300, then 2 own tokens at 310, 311."""
    doc = la.Placement(blocks=(0, 1, 2), length=L, start=300, stored_start=stored_start)
    own = la.Placement(blocks=(3,), length=2, start=310, stored_start=310)
    return la.Layout([la.RequestLayout((doc,), own, num_queries=2)], block_size=S)


# The truth: the document encoded where request B uses it.
truth = la.eager_attention(q, *cache_with_document(300), request_b(300), rope)

# Reuse request A's cache (keys rotated at 100..) as if it were written for B (shift 0):
stale = la.eager_attention(q, *cache_with_document(100), request_b(300), rope)
# the same bytes, with the layout saying the truth: stored at 100, used at 300 (δ = 200):
shifted = la.lazy_prefill(q, *cache_with_document(100), request_b(100), rope)

stale_error = (stale - truth).abs().max().item()
shifted_error = (shifted - truth).abs().max().item()
print(f"reused as is:          max error {stale_error:.3f}")
print(f"reused with δ = 200:   max error {shifted_error:.1e}")
assert stale_error > 0.05  # a wrong answer, not rounding
assert shifted_error < 1e-12  # the deferred shift makes the stale cache exact

# %% [markdown]
# Wait: `request_b(100)` *also* moved nothing in memory. Its layout says the document's
# keys were stored at 100 and are used at 300, and `lazy_prefill` rotates the query by
# $p - \delta$ (eq. 8) instead of the keys. The ordinary alternative, Block-Attention's,
# copies the keys and re-rotates the copy by $\delta$ (eq. 9): same function, one copy per
# request. Prefix caching takes the third road: it reuses a cached key only when the whole
# prefix before it is identical, so the position is guaranteed to be the same.

# %% [markdown]
# ## Counting reuse: prefix cache vs segment cache
#
# A retrieval workload: a pool of documents, each request retrieves `K` of them in the
# order its retriever ranked them, then adds its own question. We replay the same
# requests against two caches with unlimited memory:
#
# * **prefix cache** (vLLM, SGLang): the prompt is cut into blocks; block `i` is found by
#   a hash of *all* tokens up to its end, so a block hits only if everything before it
#   is identical;
# * **segment cache** (this project's `SegmentStore`): each document is found by the hash
#   of its own tokens, wherever it sits in the prompt.

# %%
NUM_DOCS, K, DOC_LEN, QUERY_LEN, BLOCK = 20, 3, 48, 8, 16
NUM_REQUESTS = 40 if SMALL else 400
rng = random.Random(0)
documents = [[rng.randrange(32_000) for _ in range(DOC_LEN)] for _ in range(NUM_DOCS)]


class PrefixCache:
    """Block-level prefix caching: a block is keyed by the hash of the whole prefix."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.blocks: set[str] = set()

    def lookup_and_insert(self, prompt: list[int]) -> int:
        """Return how many leading tokens were cached, then cache every full block."""
        parent, hit_tokens, missed = "", 0, False
        for start in range(0, len(prompt) - self.block_size + 1, self.block_size):
            block = prompt[start : start + self.block_size]
            parent = hashlib.sha256((parent + repr(block)).encode()).hexdigest()
            if parent in self.blocks and not missed:
                hit_tokens += self.block_size
            else:
                missed = True
                self.blocks.add(parent)
        return hit_tokens


def replay(requests):
    """Document tokens served from cache by each strategy."""
    prefix = PrefixCache(BLOCK)
    store = la.SegmentStore(la.BlockPool(10_000), block_size=BLOCK)
    prefix_hits = segment_hits = doc_tokens = 0
    for doc_ids, question in requests:
        prompt = [t for d in doc_ids for t in documents[d]] + question
        # Prefix hits can run past the documents into the question; count documents only.
        prefix_hits += min(prefix.lookup_and_insert(prompt), K * DOC_LEN)
        taken = []
        for d in doc_ids:
            segment, hit = store.acquire(tokens=documents[d])
            if hit:
                segment_hits += DOC_LEN
            else:
                store.seal(segment)  # an engine would prefill it alone, at 0, here
            taken.append(segment)
        for segment in taken:  # the request finished: its segments stay cached, unreferenced
            store.release(segment)
        doc_tokens += K * DOC_LEN
    store.check_invariants()
    return prefix_hits / doc_tokens, segment_hits / doc_tokens


def make_requests(ordered: bool):
    out = []
    for _ in range(NUM_REQUESTS):
        doc_ids = rng.sample(range(NUM_DOCS), K)
        if ordered:
            doc_ids.sort()  # a canonical order: the best case for prefix caching
        out.append((doc_ids, [rng.randrange(32_000) for _ in range(QUERY_LEN)]))
    return out


prefix_sorted, segment_sorted = replay(make_requests(ordered=True))
prefix_any, segment_any = replay(make_requests(ordered=False))
print(f"{NUM_REQUESTS} requests, {K} of {NUM_DOCS} documents each, document-token hit ratio:")
print(f"  documents in canonical order: prefix cache {prefix_sorted:.1%}, segment cache {segment_sorted:.1%}")
print(f"  documents in retrieval order: prefix cache {prefix_any:.1%}, segment cache {segment_any:.1%}")

# %% [markdown]
# What the numbers say, asserted: the segment cache misses each document exactly once
# (then hits), whatever the order; the prefix cache does worse, and worse still when the
# order varies, because only a request whose *first* documents match a previous one hits.

# %%
cold_misses = NUM_DOCS * DOC_LEN / (NUM_REQUESTS * K * DOC_LEN)
assert abs(segment_any - (1 - cold_misses)) < 1e-12 and abs(segment_sorted - (1 - cold_misses)) < 1e-12
assert prefix_any < prefix_sorted < segment_sorted
assert prefix_any < 0.75 * segment_any

# %% [markdown]
# The smallest case shows it exactly: two requests with the same three documents, in
# another order.

# %%
prefix = PrefixCache(BLOCK)
first = [t for d in (0, 1, 2) for t in documents[d]]
swapped = [t for d in (1, 0, 2) for t in documents[d]]
prefix.lookup_and_insert(first)
assert prefix.lookup_and_insert(swapped) == 0  # not one block reused
assert prefix.lookup_and_insert(first) == 3 * DOC_LEN  # an exact repeat reuses everything
store = la.SegmentStore(la.BlockPool(64), block_size=BLOCK)
for d in (0, 1, 2):
    segment, hit = store.acquire(tokens=documents[d])
    store.seal(segment)
    store.release(segment)
hits = []
for d in (1, 0, 2):
    segment, hit = store.acquire(tokens=documents[d])
    hits.append(hit)
assert hits == [True, True, True]

# %% [markdown]
# ## Summary
#
# * A key rotated at an absolute position is right only at that position (an error of
#   order 0.1 on a unit-scale output here); the deferred shift makes it exact again, with
#   no write.
# * Reuse by exact prefix misses a large share of the document tokens (about half of them
#   at the default size here) once the retrieval order varies; reuse by content misses
#   only each document's first appearance, provided the attention can place a cached document
#   anywhere, which is what deferred encoding provides.
# * Next: [tutorial 3](03_deferred_rope_in_pytorch.md) builds the deferred attention by
#   hand and checks it against the reference.
