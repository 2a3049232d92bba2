# %% [markdown]
# # 3. Deferred positional encoding in a page of PyTorch
#
# **What you will learn**
#
# * the canonical form of deferred encoding, written by hand in a dozen lines: cached keys
#   stay rotated at their *document-local* positions, and the **query** is rotated by
#   $p - \delta$, once per distinct shift $\delta$ (eq. 8);
# * that it equals eager RoPE, which re-rotates every cached key to its logical position
#   (eq. 9), and equals the references `lazy_prefill`, `eager_attention` and the raw-cache
#   `raw_prefill` (eq. 10), with reordered documents and grouped-query attention;
# * what each form costs in rotations, counted from the layout.
#
# The math is on [The math](../concepts/math.md); the forms and their costs on
# [Deferred encoding: two forms](../concepts/deferred-encoding.md).

# %%
import math

import torch

import lazyattention.reference as la

generator = torch.Generator().manual_seed(0)
f64 = torch.float64

# %% [markdown]
# ## The setting
#
# Two documents, A (13 tokens) and B (7 tokens), each prefilled **alone, from position 0**:
# the cache holds their keys rotated at 0…L−1, exactly what an ordinary engine writes for
# a prompt that starts with that document. Blocks of `S = 8` tokens; 4 query heads share 2
# KV heads (GQA).

# %%
S, H, HKV, D = 8, 4, 2, 32
rope = la.RopeConfig(head_dim=D, base=10000.0)
k_cache = torch.zeros(16, S, HKV, D, dtype=f64)  # [N, S, Hkv, D]
v_cache = torch.zeros_like(k_cache)


def prefill_alone(length: int, blocks: tuple[int, ...]):
    """Write a document's keys and values, rotated at its local positions 0..L-1."""
    k = torch.randn(length, HKV, D, dtype=f64, generator=generator)
    v = torch.randn(length, HKV, D, dtype=f64, generator=generator)
    j = torch.arange(length)
    slots = torch.tensor(blocks)[j // S] * S + j % S
    la.write_kv(k, v, k_cache, v_cache, slots, positions=j, rope=rope)
    return k, v  # pre-RoPE, kept only to build the eager check below


k_a, v_a = prefill_alone(13, blocks=(0, 1))
k_b, v_b = prefill_alone(7, blocks=(2,))

# %% [markdown]
# A request retrieves **B first, then A**, and adds 5 own tokens. Logical layout:
# B at 0…6, A at 7…19, own tokens at 20…24 (they are causal; all 5 are queries here).
# Each `Placement` states where the tokens were stored and where they are used: the
# shift is $\delta = \text{start} - \text{stored start}$ (eq. 6).

# %%
doc_b = la.Placement(blocks=(2,), length=7, start=0)  # δ = 0
doc_a = la.Placement(blocks=(0, 1), length=13, start=7)  # δ = 7
own = la.Placement(blocks=(3,), length=5, start=20, stored_start=20)  # δ = 0: stored where used
layout = la.Layout([la.RequestLayout((doc_b, doc_a), own, num_queries=5)], block_size=S)

q = torch.randn(5, H, D, dtype=f64, generator=generator)  # pre-RoPE queries
k_own = torch.randn(5, HKV, D, dtype=f64, generator=generator)
v_own = torch.randn(5, HKV, D, dtype=f64, generator=generator)
la.write_kv(k_own, v_own, k_cache, v_cache, layout.own_slots(0), torch.arange(20, 25), rope)

meta = layout.metadata()
print("block table:", meta.block_table.tolist(), " shifts:", meta.block_shift.tolist())
assert meta.block_shift.tolist() == [[0, 7, 7, 0]]

# %% [markdown]
# ## Step 1: gather the request's cached tokens, with their shifts
#
# Per key token: its stored key and value, its shift $\delta_j$, its logical position,
# and whether it is one of the request's own (causal) tokens.

# %%
stored_k, stored_v, shift, k_pos, is_own = [], [], [], [], []
for placement, own_flag in ((doc_b, False), (doc_a, False), (own, True)):
    j = torch.arange(placement.length)
    slots = torch.tensor(placement.blocks)[j // S] * S + j % S
    stored_k.append(k_cache.view(-1, HKV, D)[slots])
    stored_v.append(v_cache.view(-1, HKV, D)[slots])
    shift.append(torch.full((placement.length,), placement.shift))
    k_pos.append(placement.start + j)
    is_own.append(torch.full((placement.length,), own_flag))
stored_k, stored_v = torch.cat(stored_k), torch.cat(stored_v)  # [Tk, Hkv, D]
shift, k_pos, is_own = torch.cat(shift), torch.cat(k_pos), torch.cat(is_own)  # [Tk]
q_pos = torch.arange(20, 25)  # [Tq]

# GQA: query head h reads KV head h // (H / Hkv).
stored_k = stored_k.repeat_interleave(H // HKV, dim=1)  # [Tk, H, D]
stored_v = stored_v.repeat_interleave(H // HKV, dim=1)

# %% [markdown]
# ## Step 2: the lazy scores: rotate the query by p − δ, once per shift (eq. 8)
#
# The keys are never touched. Two distinct shifts here (0 and 7), so two rotations of
# the 5 query vectors per head.

# %%
scale = 1.0 / math.sqrt(D)
scores = torch.empty(H, 5, len(shift), dtype=f64)  # [H, Tq, Tk]
for delta in shift.unique().tolist():
    columns = shift == delta
    q_rotated = la.apply_rope(q, q_pos - delta, rope)  # R(p − δ) q, times YaRN's m if any
    scores[:, :, columns] = torch.einsum("qhd,khd->hqk", q_rotated, stored_k[columns]) * scale

# %% [markdown]
# ## Step 3: mask (eq. 7), softmax (eq. 11)
#
# Every segment token is visible; own tokens are causal.

# %%
visible = ~is_own[None, :] | (k_pos[None, :] <= q_pos[:, None])  # [Tq, Tk]
probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
lazy_by_hand = torch.einsum("hqk,khd->qhd", probs, stored_v)  # [Tq, H, D]

# %% [markdown]
# ## The check: against eager RoPE and the reference functions
#
# Eager RoPE, the definition: rotate every cached key by its shift, which puts it at its
# logical position, $k^{\text{logical}} = R(\delta)\,k^{\text{stored}}$ (eq. 9), and the
# query at its own position. We also build the truth from scratch: the pre-RoPE keys
# rotated directly at their logical positions, as a model that read this prompt in one
# piece (with block-diagonal document attention) would store them.

# %%
logical_k = la.rotate(stored_k, shift, rope)  # R(δ) k_stored: a copy, as Block-Attention makes
eager_scores = torch.einsum("qhd,khd->hqk", la.apply_rope(q, q_pos, rope), logical_k) * scale
eager_by_hand = torch.einsum("hqk,khd->qhd", eager_scores.masked_fill(~visible, float("-inf")).softmax(-1), stored_v)

from_scratch_k = la.apply_rope(torch.cat([k_b, k_a, k_own]), k_pos, rope).repeat_interleave(H // HKV, dim=1)
assert torch.allclose(logical_k, from_scratch_k, atol=1e-12)  # R(δ) R(j) = R(start + j)

results = {
    "lazy, by hand": lazy_by_hand,
    "eager, by hand": eager_by_hand,
    "la.lazy_prefill": la.lazy_prefill(q, k_cache, v_cache, layout, rope),
    "la.eager_attention": la.eager_attention(q, k_cache, v_cache, layout, rope),
}
for name, out in results.items():
    err = (out - eager_by_hand).abs().max().item()
    print(f"{name:20s} max |difference| vs eager by hand = {err:.1e}")
    assert err < 1e-12

# %% [markdown]
# ## The raw-cache form (eq. 10)
#
# The other deferred form stores keys **unrotated** (`rope=None`) and rotates every key at
# its logical position inside attention. Same function, different cost.

# %%
raw_k = torch.zeros_like(k_cache)
raw_v = torch.zeros_like(v_cache)
for k_doc, v_doc, blocks in ((k_a, v_a, (0, 1)), (k_b, v_b, (2,))):
    j = torch.arange(len(k_doc))
    slots = torch.tensor(blocks)[j // S] * S + j % S
    la.write_kv(k_doc, v_doc, raw_k, raw_v, slots, j, rope=None)
la.write_kv(k_own, v_own, raw_k, raw_v, layout.own_slots(0), torch.arange(20, 25), rope=None)
raw = la.raw_prefill(q, raw_k, raw_v, layout, rope)
assert (raw - eager_by_hand).abs().max().item() < 1e-12

# %% [markdown]
# ## Decoding one more token
#
# Decode is the same computation with one query per request: write the new token's K/V
# (here at logical and stored position 25), then `lazy_decode`.

# %%
own_next = la.Placement(blocks=(3,), length=6, start=20, stored_start=20)
layout_next = la.Layout([la.RequestLayout((doc_b, doc_a), own_next, num_queries=1)], block_size=S)
q_new = torch.randn(1, H, D, dtype=f64, generator=generator)
k_new = torch.randn(1, HKV, D, dtype=f64, generator=generator)
la.write_kv(k_new, k_new, k_cache, v_cache, layout_next.own_slots(0, first=5), torch.tensor([25]), rope)
decoded = la.lazy_decode(q_new, k_cache, v_cache, layout_next, rope)
assert (decoded - la.eager_attention(q_new, k_cache, v_cache, layout_next, rope)).abs().max() < 1e-12

# %% [markdown]
# ## In float32 and bfloat16: the tolerance rule
#
# In a low precision the forms round differently. The project's one rule
# (`lazyattention.reference.assert_close`): the error against the float64 oracle may be
# at most twice that of eager PyTorch in the same dtype, plus a small floor.

# %%
for dtype in (torch.float32, torch.bfloat16):
    low = [t.to(dtype) for t in (q, k_cache, v_cache)]
    # The oracle runs in float64 on the *same* (rounded) inputs.
    oracle = la.eager_attention(*(t.to(f64) for t in low), layout, rope)
    err = la.assert_close(
        la.lazy_prefill(*low, layout, rope),
        oracle,
        la.eager_attention(*low, layout, rope),
        dtype,
        name=f"lazy_prefill {dtype}",
    )
    print(f"{dtype!s:15s} lazy_prefill max error vs the float64 oracle: {err:.1e}")

# %% [markdown]
# ## Every RoPE variant
#
# The identity holds for both pairing styles, partial rotary and every scaling the
# reference supports (YaRN multiplies by its attention factor inside `apply_rope`, on
# the query and on the stored keys alike).

# %%
variants = {
    "interleaved": la.RopeConfig(head_dim=D, style="interleaved"),
    "partial rotary 16/32": la.RopeConfig(head_dim=D, rotary_dim=16),
    "linear x4": la.RopeConfig(head_dim=D, scaling=la.LinearScaling(factor=4.0)),
    "llama3": la.RopeConfig(head_dim=D, base=500000.0, scaling=la.Llama3Scaling()),
    "yarn x4": la.RopeConfig(head_dim=D, scaling=la.YarnScaling(factor=4.0, original_max_position=2048)),
}
for name, variant in variants.items():
    kc, vc = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    for k_doc, v_doc, blocks in ((k_a, v_a, (0, 1)), (k_b, v_b, (2,))):
        j = torch.arange(len(k_doc))
        la.write_kv(k_doc, v_doc, kc, vc, torch.tensor(blocks)[j // S] * S + j % S, j, variant)
    la.write_kv(k_own, v_own, kc, vc, layout.own_slots(0), torch.arange(20, 25), variant)
    lazy = la.lazy_prefill(q, kc, vc, layout, variant)
    eager = la.eager_attention(q, kc, vc, layout, variant)
    assert (lazy - eager).abs().max() < 1e-12, name
print("lazy == eager for", ", ".join(variants))

# %% [markdown]
# ## What each form costs
#
# Counted from the layout: rotations of head vectors for this request's attention.
# Lazy rotates each query once per distinct shift; eager rotates (and first copies)
# every cached key; the raw cache rotates every key each time it is read.

# %%
num_shifts = len(set(meta.block_shift[0, : int(meta.num_blocks[0])].tolist()))
Tq, Tk = q.shape[0], len(shift)
costs = {
    "lazy (query shift)": Tq * H * num_shifts,
    "eager / Block-Attention (copy + re-rotate keys)": Tk * HKV,
    "raw cache (rotate keys in the kernel)": Tk * HKV,
}
for form, rotations in costs.items():
    print(f"{form:50s} {rotations:4d} rotations")
assert num_shifts == 2

# %% [markdown]
# In this toy the counts are close. They diverge with size: a real prefill has query
# tiles of 64–128 tokens and segments of hundreds to thousands of tokens, so the lazy
# kernel rotates one query tile per distinct shift while the key-rotating forms turn
# every key of every tile; for decode, lazy rotates a single query vector per shift
# while the others rotate the whole context. And eager needs a copy of every reused key
# per request, which lazy never makes.
#
# ## Summary
#
# * Deferred encoding is a dozen lines: gather stored keys, rotate the query by $p-\delta$
#   once per shift, mask, softmax.
# * It equals eager RoPE to float64 rounding ($< 10^{-12}$), and the reference's lazy,
#   eager and raw-cache functions, for every RoPE variant.
# * Next: [tutorial 4](04_paged_shared_cache.md) shares one physical copy between many
#   requests at once.
