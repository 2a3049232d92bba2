# %% [markdown]
# # 4. The paged, shared cache: one physical copy, many requests, many offsets
#
# **What you will learn**
#
# * how the reference's `BlockPool` (reference counts) and `SegmentStore` (segments by
#   content hash, LRU of unreferenced ones) keep **one** physical copy of a document's
#   K/V, however many requests use it;
# * that three requests of **one batch** can read that copy at three different offsets
#   (at the front, after another document, after a gap) with one `lazy_prefill` call,
#   and each gets exactly the attention of a private, freshly encoded copy;
# * that the shared blocks are never written again, and the rules of eviction: an
#   unreferenced segment stays cached until space is needed, a segment in use is never
#   evicted.

# %%
import matplotlib.pyplot as plt
import torch

import lazyattention.reference as la

generator = torch.Generator().manual_seed(0)
f64 = torch.float64
N, S, H, HKV, D = 24, 8, 4, 2, 32  # physical blocks, block size, heads, KV heads, head dim
rope = la.RopeConfig(head_dim=D)

pool = la.BlockPool(N)
store = la.SegmentStore(pool, block_size=S)
cache = la.PagedKVCache(num_layers=1, num_blocks=N, block_size=S, num_kv_heads=HKV, head_dim=D, dtype=f64)
k_cache, v_cache = cache.k[0], cache.v[0]  # [N, S, Hkv, D], the one layer of this toy


def slots_of(blocks, first: int, length: int) -> torch.Tensor:
    """Flat slots ``block * S + offset`` of tokens ``first .. first + length - 1``."""
    j = torch.arange(first, first + length)
    return torch.tensor(blocks)[j // S] * S + j % S


# A toy "model": each document's pre-RoPE keys and values, fixed by its tokens.
documents = {"manual": list(range(100, 120)), "faq": list(range(500, 509))}  # 20 and 9 tokens
kv_of = {
    name: (
        torch.randn(len(tokens), HKV, D, dtype=f64, generator=generator),
        torch.randn(len(tokens), HKV, D, dtype=f64, generator=generator),
    )
    for name, tokens in documents.items()
}


def get_segment(name: str) -> la.Segment:
    """Acquire a document's segment; on a miss, prefill it alone at 0 and seal it."""
    segment, hit = store.acquire(tokens=documents[name])
    if not hit:
        k, v = kv_of[name]
        la.write_kv(k, v, k_cache, v_cache, slots_of(segment.blocks, 0, len(k)), torch.arange(len(k)), rope)
        store.seal(segment)  # read-only from now on
    return segment


# %% [markdown]
# ## Three requests, one document, three offsets
#
# * request 0: `[manual] [own]`: the manual at 0;
# * request 1: `[faq] [manual] [own]`: the manual at 9, after another document;
# * request 2: `[manual] [own]` with the manual at 1000: a gap, as if a long chat history
#   that this toy leaves out sat before it.
#
# Each request takes a reference on the segments it reads, and owns blocks for its own
# tokens (4 each, all of them queries here).

# %%
placements = {0: [("manual", 0)], 1: [("faq", 0), ("manual", 9)], 2: [("manual", 1000)]}
requests, taken, own_blocks, own_kv = [], [], [], []
for docs in placements.values():
    segments = [get_segment(name) for name, _ in docs]  # one reference each, for this request
    taken.append(segments)
    segs = [la.Placement(seg.blocks, seg.length, start) for seg, (_, start) in zip(segments, docs, strict=True)]
    blocks = tuple(store.allocate(1))  # the request's own block
    own_start = docs[-1][1] + len(documents[docs[-1][0]])
    own = la.Placement(blocks, length=4, start=own_start, stored_start=own_start)
    requests.append(la.RequestLayout(tuple(segs), own, num_queries=4))
    k, v = (torch.randn(4, HKV, D, dtype=f64, generator=generator) for _ in range(2))
    la.write_kv(k, v, k_cache, v_cache, slots_of(blocks, 0, 4), torch.arange(own_start, own_start + 4), rope)
    own_blocks.append(blocks)
    own_kv.append((k, v))
layout = la.Layout(requests, block_size=S)
store.check_invariants()

manual = store.get(la.content_key(documents["manual"]))
print(f"manual: blocks {manual.blocks}, users {manual.refs}, hits {manual.hits}")
print("pool reference counts of its blocks:", [pool.refcount(b) for b in manual.blocks])
assert manual.refs == 3 and manual.hits == 2  # one miss (the first request), then hits
assert all(pool.refcount(b) == 1 + 3 for b in manual.blocks)  # the store's + one per request

# %% [markdown]
# ## One batched call
#
# The layout gives every block of every request its shift: the manual's blocks appear
# with $\delta = 0$, $9$ and $1000$ in the three rows of the block table, pointing at the
# same physical blocks.

# %%
meta = layout.metadata()
print("block_table:\n", meta.block_table)
print("block_shift:\n", meta.block_shift)
for r, expected_shift in enumerate((0, 9, 1000)):
    row = meta.block_table[r, : int(meta.num_blocks[r])].tolist()
    shifts = {int(meta.block_shift[r, i]) for i, b in enumerate(row) if b in manual.blocks}
    assert shifts == {expected_shift}, (r, shifts)


def draw_block_table(meta, names):
    """Each request's logical blocks (rows), coloured by what they hold, each labelled with
    the physical block it reads and its shift; the physical blocks below, with how many
    requests read each."""
    colours = {"manual": "#4e79a7", "faq": "#e15759", "own": "#9c9c9c"}
    rows = [meta.block_table[r, : int(meta.num_blocks[r])].tolist() for r in range(meta.block_table.shape[0])]
    _, ax = plt.subplots(figsize=(8, 3.6), layout="constrained")
    for r, row in enumerate(rows):
        y = len(rows) - r
        for i, phys in enumerate(row):
            ax.add_patch(plt.Rectangle((i, y), 0.92, 0.8, color=colours[names[phys]]))
            label = f"#{phys}\nδ={int(meta.block_shift[r, i])}"
            ax.text(i + 0.46, y + 0.4, label, ha="center", va="center", color="white", fontsize=9)
        ax.text(-0.15, y + 0.4, f"request {r}", ha="right", va="center")
    used = sorted({phys for row in rows for phys in row})
    for j, phys in enumerate(used):
        readers = sum(phys in row for row in rows)
        ax.add_patch(plt.Rectangle((j * 0.75, -0.6), 0.68, 0.7, color=colours[names[phys]]))
        ax.text(j * 0.75 + 0.34, -0.25, f"#{phys}\n×{readers}", ha="center", va="center", color="white", fontsize=8)
    ax.text(-0.15, -0.25, "physical", ha="right", va="center")
    ax.set_xlim(-1.6, max(max(map(len, rows)), len(used) * 0.75) + 0.2)
    ax.set_ylim(-0.8, len(rows) + 1)
    ax.axis("off")
    ax.set_title("block table: physical block # and shift δ per logical block; ×n: requests reading it")
    plt.show()


names = {b: "manual" for b in manual.blocks}
names.update({b: "faq" for b in store.get(la.content_key(documents["faq"])).blocks})
names.update({b: "own" for blocks in own_blocks for b in blocks})
draw_block_table(meta, names)

snapshot = k_cache[list(manual.blocks)].clone(), v_cache[list(manual.blocks)].clone()
q = torch.randn(layout.num_queries, H, D, dtype=f64, generator=generator)  # pre-RoPE
out = la.lazy_prefill(q, k_cache, v_cache, layout, rope)

# The shared blocks are bit-for-bit what the document's own prefill wrote.
assert torch.equal(k_cache[list(manual.blocks)], snapshot[0])
assert torch.equal(v_cache[list(manual.blocks)], snapshot[1])

# %% [markdown]
# ## Each request gets what a private copy would give
#
# The check builds, for each request alone, the cache an engine without sharing would
# build: its documents encoded **at the request's offsets** (keys rotated at their logical
# positions, a private copy), then plain attention with no shift at all.

# %%
for r, req in enumerate(requests):
    kc = torch.zeros(8, S, HKV, D, dtype=f64)
    vc = torch.zeros_like(kc)
    private, next_block = [], 0
    for (name, start), placement in zip(placements[r], req.segments, strict=True):
        k, v = kv_of[name]
        blocks = tuple(range(next_block, next_block + len(placement.blocks)))
        next_block += len(blocks)
        la.write_kv(k, v, kc, vc, slots_of(blocks, 0, len(k)), start + torch.arange(len(k)), rope)
        private.append(la.Placement(blocks, len(k), start, stored_start=start))
    own = la.Placement((next_block,), 4, req.own.start, stored_start=req.own.start)
    k, v = own_kv[r]
    la.write_kv(k, v, kc, vc, slots_of(own.blocks, 0, 4), req.own.start + torch.arange(4), rope)
    alone = la.Layout([la.RequestLayout(tuple(private), own, num_queries=4)], block_size=S)
    expected = la.eager_attention(q[4 * r : 4 * r + 4], kc, vc, alone, rope)
    err = (out[4 * r : 4 * r + 4] - expected).abs().max().item()
    print(f"request {r}: max |shared, batched − private copy| = {err:.1e}")
    assert err < 1e-12

# %% [markdown]
# ## Memory: one copy instead of one per request
#
# Block-Attention would give each request its own re-rotated copy of the segment blocks
# it reads. Counted from the block table: segment blocks read by the batch, and the
# distinct physical blocks behind them.

# %%
segment_blocks = [meta.block_table[r, : int(meta.num_segment_blocks[r])].tolist() for r in range(layout.batch_size)]
read = sum(len(row) for row in segment_blocks)
distinct = len({b for row in segment_blocks for b in row})
print(
    f"segment blocks read: {read} ({read * cache.bytes_per_block} B if copied per request); "
    f"physical: {distinct} ({distinct * cache.bytes_per_block} B, shared)"
)
assert (read, distinct) == (3 + (2 + 3) + 3, 3 + 2)

# %% [markdown]
# ## Releasing, and the eviction rules
#
# When the requests finish they drop their references. The segments stay cached
# (unreferenced, in LRU order) for the next request that retrieves them; their blocks go
# back to the pool only when space is needed.

# %%
for r in range(3):
    for segment in taken[r]:
        store.release(segment)
    pool.release(own_blocks[r])
store.check_invariants()
assert manual.refs == 0 and all(pool.refcount(b) == 1 for b in manual.blocks)
assert la.content_key(documents["manual"]) in store
print(f"after release: {pool.num_free} free blocks, {store.num_evictable_blocks} evictable")

# A new request uses the manual again: a hit, no prefill.
manual_again, hit = store.acquire(tokens=documents["manual"])
assert hit and manual_again is manual

# Asking for more blocks than free + evictable fails, and changes nothing:
before = (pool.num_free, len(store))
try:
    store.allocate(pool.num_free + store.num_evictable_blocks + 1)
    raise AssertionError("expected OutOfBlocks")
except la.OutOfBlocks as error:
    print("OutOfBlocks:", error)
assert (pool.num_free, len(store)) == before
store.check_invariants()

# Asking for everything that can be freed evicts the unreferenced FAQ, never the manual:
blocks = store.allocate(pool.num_free + store.num_evictable_blocks)
assert la.content_key(documents["faq"]) not in store
assert la.content_key(documents["manual"]) in store
assert torch.equal(k_cache[list(manual.blocks)], snapshot[0])
pool.release(blocks)
store.release(manual_again)
store.check_invariants()

# %% [markdown]
# ## Summary
#
# * One physical copy of a document's K/V served three requests of one batch at offsets
#   0, 9 and 1000, each exact to float64 rounding against a private copy encoded at its
#   offset. No block was written after the document's own prefill.
# * Reference counts say who uses what (`1 + users` per block); unreferenced segments are
#   evicted least recently used first, and only when space is needed; a segment in use
#   never is.
# * The engine (tutorial 6) is this bookkeeping plus a scheduler; the Triton kernel
#   (tutorial 5) is `lazy_prefill` made fast.
