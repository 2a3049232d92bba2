# %% [markdown]
# # 5. The Triton kernel, tile by tile
#
# **What you will learn**
#
# * how deferred RoPE becomes a Triton kernel: a lazy decode kernel of about a hundred
#   lines, written here in full, that reads the paged cache, rotates the query once per
#   shift (eq. 8), keeps an online softmax (eq. 11) and splits its keys among programs
#   whose parts a second kernel merges (eq. 12);
# * that this kernel agrees with the reference under the project's one tolerance rule,
#   on the CPU through the Triton interpreter, on a layout with reordered documents past
#   position 65,536;
# * how the production kernel in `fast/` walks the same cache faster: GQA groups packed
#   into a matrix product, key tiles over paged blocks in *runs* of one shift, unmasked
#   tiles before masked ones, and the query rotated in two steps;
# * why the kernels' angles are exact at any position: fixed-point turns.
#
# Without a GPU everything below runs under `TRITON_INTERPRET=1` (set before Triton is
# imported), at tiny sizes; with a GPU the last section times the production kernel.

# %%
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`

import matplotlib.pyplot as plt
import triton
import triton.language as tl

import lazyattention.fast as fast
import lazyattention.reference as ref
from lazyattention.fast import attend
from lazyattention.fast.rope import kernel_angles, rope_tables, rotate_tile
from lazyattention.plot_style import PAGE_WIDTH, color, page_style
from lazyattention.reference import assert_close

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
generator = torch.Generator().manual_seed(0)

# %% [markdown]
# ## 1. A small batch over a paged cache
#
# Two documents cached once (stored at position 0), used by two requests at different
# offsets, reordered, one of them past 65,536: the zero-copy reuse the project is about.
# Blocks hold `S = 16` tokens; 8 query heads share 2 KV heads (groups of `G = 4`).
# Unwritten slots hold NaN, so a kernel that read one unmasked would return NaN.

# %%
S, H, HKV, D = 16, 8, 2, 64
dtype = torch.float16
rope = ref.RopeConfig(head_dim=D, base=500_000.0)
k_cache = torch.full((12, S, HKV, D), float("nan"), dtype=torch.float64)
v_cache = torch.full_like(k_cache, float("nan"))


def write(length, blocks, stored_start):
    """Write ``length`` random tokens into ``blocks``, keys rotated at their stored positions."""
    k = torch.randn(length, HKV, D, dtype=torch.float64, generator=generator).to(dtype).double()
    v = torch.randn(length, HKV, D, dtype=torch.float64, generator=generator).to(dtype).double()
    j = torch.arange(length)
    slots = torch.tensor(blocks)[j // S] * S + j % S
    ref.write_kv(k, v, k_cache, v_cache, slots, j + stored_start, rope)


write(40, (0, 1, 2), 0)  # document A: 40 tokens, blocks 0-2, the last one partly filled
write(20, (3, 4), 0)  # document B: 20 tokens
write(24, (5, 6), 70_060)  # request 0's own tokens, stored where they are used
write(10, (7,), 60)  # request 1's own tokens

P = ref.Placement
requests = [  # (segments, own tokens)
    ((P((3, 4), 20, 70_000), P((0, 1, 2), 40, 70_020)), P((5, 6), 24, 70_060, 70_060)),
    ((P((0, 1, 2), 40, 0), P((3, 4), 20, 40)), P((7,), 10, 60, 60)),
]
queries = (24, 6)  # prefill: request 0's 24 own tokens are all queries, request 1's last 6
prefill_layout = ref.Layout(
    [ref.RequestLayout(segs, own, n) for (segs, own), n in zip(requests, queries, strict=True)], block_size=S
)
decode_layout = ref.Layout([ref.RequestLayout(segs, own, 1) for segs, own in requests], block_size=S)
meta = decode_layout.metadata()
print("block_table\n", meta.block_table, "\nblock_shift\n", meta.block_shift, "\nblock_len\n", meta.block_len)
print("query position per request:", meta.query_start.tolist())

# %% [markdown]
# One row of metadata per request, segment blocks first, own blocks last. Request 0 reads
# B (shift 70,000) then A (shift 70,020); request 1 reads A then B at shifts 0 and 40. The
# own tokens were stored where they are used: shift 0. In decode each request has one
# query, its last own token, at the position printed last.
#
# ## 2. A lazy decode kernel you can read
#
# One program per (request, query head, split). It loads the **pre-RoPE** query once and
# walks its share of the request's blocks. Each block is one `[S, D]` tile of keys and
# values, found through the block table. When a block's shift differs from the last
# one, the program rotates the query by $p - \delta$ (eq. 8); the keys are never
# touched. An online softmax (eq. 11) keeps a running maximum, sum and weighted sum of
# values. Each split writes its normalised part and log-sum-exp, and a second kernel
# merges the parts (eq. 12).
#
# The rotation is `rotate_tile` from `fast/rope.py`: `m·(x·cos + x_partner·sin)`, where
# `x_partner` is the query read at each channel's rotation partner (eq. 3) and the
# angles are exact at any position (section 5).


# %%
@triton.jit
def lazy_decode_kernel(
    q_ptr,  # [B, H, D] pre-RoPE queries, one per request
    k_ptr,  # [N, S, Hkv, D] keys, stored rotated at their stored positions
    v_ptr,  # [N, S, Hkv, D] values
    part_ptr,  # [B, H, P, D] float32: each split's normalised output
    part_lse_ptr,  # [B, H, P] float32: each split's log-sum-exp
    table_ptr,  # [B, M] int32 physical block of each logical block
    shift_ptr,  # [B, M] int32 shift δ = logical − stored position
    len_ptr,  # [B, M] int32 valid tokens in the block
    num_blocks_ptr,  # [B] int32 blocks of each request
    q_pos_ptr,  # [B] int32 logical position p of each request's query
    freq_ptr,  # [D] int64 fixed-point turns per position (fast/rope.py)
    partner_ptr,  # [D] int32 the channel each channel rotates with
    mscale_ptr,  # [D] float32 attention factor m (1 without YaRN)
    scale,  # softmax scale τ
    M,  # blocks per row of the block table
    blocks_per_split,
    H: tl.constexpr,
    HKV: tl.constexpr,
    P: tl.constexpr,
    S: tl.constexpr,
    D: tl.constexpr,
):
    r, h, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kv_head = h // (H // HKV)  # GQA: the KV head this query head reads
    d = tl.arange(0, D)
    slot = tl.arange(0, S)

    # The pre-RoPE query and its partner channels, as [1, D] rows for rotate_tile.
    q_row = q_ptr + (r * H + h) * D
    x = tl.load(q_row + d)[None, :].to(tl.float32)
    x_partner = tl.load(q_row + tl.load(partner_ptr + d))[None, :].to(tl.float32)
    freq = tl.load(freq_ptr + d)[None, :]
    mscale = tl.load(mscale_ptr + d)[None, :]
    p = tl.load(q_pos_ptr + r).to(tl.int64)

    # This split's share of the request's blocks.
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.load(num_blocks_ptr + r))

    # Eq. (8): the query rotated by p − δ for the first block's shift.
    shift = tl.load(shift_ptr + r * M + first, mask=first < last, other=0)
    q = rotate_tile(x, x_partner, tl.zeros([1, 1], tl.int64) + (p - shift), freq, mscale)

    # Eq. (11): online softmax state — running max, running sum, weighted sum of values.
    m_i = tl.max(tl.full([S], float("-inf"), tl.float32), 0)
    l_i = tl.sum(tl.zeros([S], tl.float32), 0)
    acc = tl.zeros([D], tl.float32)

    for i in range(first, last):
        phys = tl.load(table_ptr + r * M + i).to(tl.int64)
        block_shift = tl.load(shift_ptr + r * M + i)
        valid = slot < tl.load(len_ptr + r * M + i)  # eq. (7): past the block's end, nothing

        # Eq. (8): a new shift re-rotates the query, once for all the blocks that share it.
        if block_shift != shift:
            shift = block_shift
            q = rotate_tile(x, x_partner, tl.zeros([1, 1], tl.int64) + (p - shift), freq, mscale)

        # The block's keys and values: one [S, D] tile; unwritten slots are never read.
        rows = ((phys * S + slot) * HKV + kv_head) * D
        k = tl.load(k_ptr + rows[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + rows[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)

        # Eq. (8): scores against the keys as stored.
        s = tl.sum(k * q, 1) * scale
        s = tl.where(valid, s, float("-inf"))

        # Eq. (11): rescale what was summed so far to the new maximum, then add this block.
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp(m_i - m_new)
        weights = tl.exp(s - m_new)
        l_i = l_i * alpha + tl.sum(weights, 0)
        acc = acc * alpha + tl.sum(weights[:, None] * v, 0)
        m_i = m_new

    # This split's part: normalised output and log-sum-exp (−inf if it saw no key).
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
    part = (r * H + h) * P + split
    tl.store(part_ptr + part * D + d, out)
    tl.store(part_lse_ptr + part, lse)


@triton.jit
def merge_kernel(part_ptr, part_lse_ptr, out_ptr, P: tl.constexpr, PP: tl.constexpr, D: tl.constexpr):
    """Eq. (12): one program per (request, head) merges its P parts by log-sum-exp."""
    row = tl.program_id(0)
    j = tl.arange(0, PP)  # PP: P padded to a power of two
    d = tl.arange(0, D)
    lse_j = tl.load(part_lse_ptr + row * P + j, mask=j < P, other=float("-inf"))
    top = tl.max(lse_j, 0)
    lse = top + tl.log(tl.sum(tl.exp(lse_j - top), 0))  # lse = log Σ_j e^{lse_j}
    w = tl.exp(lse_j - lse)  # e^{lse_j − lse}; 0 for a part with no keys
    parts = tl.load(part_ptr + (row * P + j[:, None]) * D + d[None, :], mask=(w > 0)[:, None], other=0.0)
    tl.store(out_ptr + row * D + d, tl.sum(w[:, None] * parts, 0).to(out_ptr.dtype.element_ty))


def tiny_lazy_decode(q, k_cache, v_cache, layout, rope, splits=2):
    """Launch both kernels: ``q [B, H, D]`` pre-RoPE, caches ``[N, S, Hkv, D]`` contiguous."""
    batch, heads, head_dim = q.shape
    meta = layout.metadata(q.device)
    tables = rope_tables(rope, head_dim, q.device)
    m = meta.block_table.shape[1]
    part = torch.empty(batch, heads, splits, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
    lazy_decode_kernel[(batch, heads, splits)](
        q, k_cache, v_cache, part, part_lse,
        meta.block_table, meta.block_shift, meta.block_len, meta.num_blocks, meta.query_start,
        tables.freq, tables.partner, tables.mscale, 1 / math.sqrt(head_dim), m, triton.cdiv(m, splits),
        H=heads, HKV=k_cache.shape[2], P=splits, S=layout.block_size, D=head_dim,
    )  # fmt: skip
    out = torch.empty_like(q)
    merge_kernel[(batch * heads,)](part, part_lse, out, P=splits, PP=triton.next_power_of_2(splits), D=head_dim)
    return out


# %% [markdown]
# ## 3. It computes the definition
#
# The kernel is held to the project's one tolerance rule: its error against the float64
# oracle (the eager definition, eq. 9, in float64 on the same rounded inputs) may be at
# most twice the reference's own error in float16, plus a small floor. One split, two
# and three (a split whose share holds no block writes `lse = −inf` and weighs nothing
# in the merge) must all pass.

# %%
q64 = torch.randn(2, H, D, dtype=torch.float64, generator=generator).to(dtype).double()
args16 = (q64.to(dtype), k_cache.to(dtype), v_cache.to(dtype))
oracle = ref.eager_attention(q64, k_cache, v_cache, decode_layout, rope)
reference = ref.lazy_decode(*args16, decode_layout, rope)
for splits in (1, 2, 3):
    ours = tiny_lazy_decode(*(x.to(device) for x in args16), decode_layout, rope, splits=splits)
    err = assert_close(ours, oracle, reference, dtype, f"tiny_lazy_decode, {splits} splits")
    print(f"{splits} split(s): error {err:.2e}; reference in float16: {(reference.double() - oracle).abs().max():.2e}")

# %% [markdown]
# Two requests, two documents each, in opposite orders and at offsets 70,000 apart: one
# copy of each document, read in place by both. Each program rotated its query once per
# shift in its share of the blocks, and never touched a key.
#
# ## 4. The production kernel: the same walk, in tiles
#
# `lazyattention.fast` runs one kernel for prefill and decode, lazy, raw and
# materialised keys ([`_attention_kernel`](source:_attention_kernel)). It keeps the walk
# above and changes how much work one step does:
#
# * **GQA packed into rows.** A program owns `BLOCK_Q` queries of one request and *all*
#   `G` query heads of one KV head: row `r` of its `[BLOCK_M, D]` query tile is token
#   `r // GP`, head `r % GP` (`GP` = `G` padded to a power of two). Scores are one
#   `tl.dot` of that tile with a `[BLOCK_N, D]` key tile, loaded once for the group.
# * **Runs of one shift.** [`_run_end`](source:_run_end) scans the block table for a
#   *run*: consecutive blocks of one shift that ends after the first partly filled
#   block. Every block of a run but its last is full, so the run's valid slots are one
#   contiguous range, and the query is rotated once per run
#   ([`_query_at_shift`](source:_query_at_shift)).
# * **Unmasked tiles, then masked ones.** Inside a run, a first loop walks the key tiles
#   that need no mask (every slot valid and visible to every query of the tile), a second
#   the run's last tiles, which do (eq. 7): [the two loops](source:_attention_kernel#for j0 in range).
#   Each holds only loads, two matrix products and the softmax update
#   ([`_softmax_update`](source:_softmax_update)), which the compiler software-pipelines.
# * **The query in two rotations** (prefill). A tile holds queries at many positions, so
#   a small kernel ([`_query_kernel`](source:_query_kernel)) first writes
#   `y = m R(p) q` once per query; since $R(p - \delta) = R(-\delta)\,R(p)$, each run
#   then needs the cos and sin of one vector of angles $-\delta\,\theta_i$. A decode tile
#   is one token, so there the kernel rotates the pre-RoPE query directly, as above.
# * **Split-KV and the merge.** Decode splits each request's blocks among programs, as
#   `tiny_lazy_decode` does, and [`_merge_kernel`](source:_merge_kernel) applies eq. (12)
#   to a block of heads at a time. Prefill splits the same way when its grid is smaller
#   than the GPU ([`prefill_splits`](source:prefill_splits)).
#
# The diagram replays the walk of the program that holds request 0's last query tile
# in prefill (4 tokens × the 4 heads of a group), with 16-slot and 64-slot key tiles, and
# below it the decode of request 0 split between two programs, whose parts the merge
# combines.


# %%
def replay(meta, r, block_n, first_q, last_q):
    """The runs one program visits: (shift, first block, unmasked tiles, masked tiles)."""
    num_seg, num_blk = int(meta.num_segment_blocks[r]), int(meta.num_blocks[r])
    own_start = int(meta.block_pos[r, num_seg])
    end_block = num_seg + min(num_blk - num_seg, (last_q - own_start) // S + 1)
    visible_to_all = num_seg * S + first_q - own_start + 1  # own slots before: seen by every query
    visible_to_none = num_seg * S + last_q - own_start + 1  # own slots from here: seen by none
    runs, b = [], 0
    while b < end_block:
        shift, end = int(meta.block_shift[r, b]), b
        while end < end_block and int(meta.block_shift[r, end]) == shift:
            end += 1
            if int(meta.block_len[r, end - 1]) < S:  # a partly filled block ends the run
                break
        valid_end = (end - 1) * S + int(meta.block_len[r, end - 1])
        safe = min(valid_end, visible_to_all)
        safe = max(b * S, b * S + (safe - b * S) // block_n * block_n)
        unmasked = list(range(b * S, safe, block_n))
        masked = list(range(safe, min(valid_end, visible_to_none), block_n))
        runs.append((shift, b, unmasked, masked))
        b = end
    return runs


def _blocks_row(ax, meta, r):
    """Request ``r``'s blocks, the filled part shaded, each with its shift."""
    for b in range(int(meta.num_blocks[r])):
        ax.add_patch(plt.Rectangle((b * S, 1.2), int(meta.block_len[r, b]), 0.5, color=color("lazy"), alpha=0.35))
        ax.add_patch(plt.Rectangle((b * S, 1.2), S, 0.5, fill=False, lw=1.2))
        ax.text(b * S + S / 2, 1.95, f"δ={int(meta.block_shift[r, b]):,}", ha="center", fontsize=7.5)


def _rotation(ax, x):
    ax.plot([x, x], [0.3, 1.0], color="#c0392b", lw=2.5)
    ax.text(x + 0.8, 0.05, "rotate q", color="#c0392b", fontsize=8)


def _tile(ax, x, width, masked, face):
    hatched = {"hatch": "///", "fill": False, "ec": face} if masked else {"alpha": 0.85, "ec": "white"}
    ax.add_patch(plt.Rectangle((x, 0.4), width, 0.5, fc=face, lw=1.5, **hatched))


def draw_walk(meta, r, first_q, last_q, decode_meta, splits=2, tile_sizes=(16, 64)):
    """The key slots of request ``r`` as blocks, and each walk over them: prefill with
    ``tile_sizes`` slots a key tile, then decode split among ``splits`` programs."""
    num_blk = int(meta.num_blocks[r])
    with plt.rc_context(page_style()):
        fig, axes = plt.subplots(len(tile_sizes) + 1, 1, figsize=(PAGE_WIDTH, 7.0), layout="constrained")
        for ax, block_n in zip(axes[:-1], tile_sizes, strict=True):
            _blocks_row(ax, meta, r)
            runs = replay(meta, r, block_n, first_q, last_q)
            ends = [b * S for _, b, _, _ in runs[1:]] + [num_blk * S]
            for (_, b, unmasked, masked), run_end in zip(runs, ends, strict=True):
                _rotation(ax, b * S)
                for j0 in unmasked + masked:  # a tile drawn up to the run's end
                    _tile(ax, j0, min(block_n, run_end - j0), j0 in masked, color("norot"))
            ax.set_yticks([0.65, 1.45], [f"prefill, {block_n}-slot tiles", "blocks"])
        # Decode: one query, one block a tile; each split walks its share, rotating the
        # query at its first block and where the shift changes, and writes (out, lse).
        ax = axes[-1]
        _blocks_row(ax, decode_meta, r)
        per_split = -(-int(decode_meta.num_blocks[r]) // splits)
        for split in range(splits):
            first, last = split * per_split, min((split + 1) * per_split, int(decode_meta.num_blocks[r]))
            face = ("#f28e2b", "#76b7b2")[split % 2]
            for b in range(first, last):
                if b == first or int(decode_meta.block_shift[r, b]) != int(decode_meta.block_shift[r, b - 1]):
                    _rotation(ax, b * S)
                _tile(ax, b * S, S, int(decode_meta.block_len[r, b]) < S, face)
            ax.text((first + last) * S / 2, -0.45, f"split {split} → out, lse", ha="center", fontsize=8, color=face)
        ax.text(num_blk * S / 2, -0.95, "merge of the splits by log-sum-exp (eq. 12)", ha="center", fontsize=8.5)
        ax.set_yticks([0.65, 1.45], [f"decode, {splits} splits", "blocks"])
        for ax in axes:
            ax.set_xlim(-2, num_blk * S + 2)
            ax.set_ylim(-1.1 if ax is axes[-1] else 0, 2.25)
            ax.spines[["left", "top", "right"]].set_visible(False)
        axes[-1].set_xlabel("key slot of the request (segment blocks, then own blocks)")
        fig.suptitle("Each tile: scores, then the online softmax update (eq. 11). "
                     "Solid: no mask; hatched: masked (a partly filled block, or causal)", fontsize=8.5)  # fmt: skip
        plt.show()


prefill_meta = prefill_layout.metadata()
first_q, last_q = int(prefill_meta.query_start[0]) + 20, int(prefill_meta.query_start[0]) + 23
draw_walk(prefill_meta, 0, first_q, last_q, meta)
for block_n in (16, 64):
    runs = replay(prefill_meta, 0, block_n, first_q, last_q)
    print(f"BLOCK_N={block_n}: {len(runs)} runs (= query rotations)")
    for shift, _, unmasked, masked in runs:
        print(f"   shift {shift:>6}: unmasked tiles at slots {unmasked}, masked tiles at slots {masked}")
    assert len(runs) == 3  # B, A, own tokens: three rotations, whatever the tiling

# %% [markdown]
# With 16-slot tiles the segments' full blocks need no mask; each segment's partly
# filled last block and the own tokens on the diagonal do. With 64-slot tiles every tile
# is a run's last. Own blocks wholly after the tile's last query are never visited. A key
# tile that lies inside one block (`S % BLOCK_N == 0`) arrives on Hopper by one bulk
# tensor copy (TMA); otherwise each row gathers its own block's physical id
# ([`key_tile`](source:key_tile)).
#
# The production kernel passes the same check as the tiny one, in prefill and decode,
# and so does the materialise path (Block-Attention's copy and re-rotation, then the same
# kernel with every shift 0):

# %%
prefill_q = torch.randn(prefill_layout.num_queries, H, D, dtype=torch.float64, generator=generator)
prefill_q = prefill_q.to(dtype).double()
p_args16 = (prefill_q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), prefill_layout, rope)
p_args_dev = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in p_args16)
p_oracle, p_oracle_lse = ref.eager_attention(prefill_q, k_cache, v_cache, prefill_layout, rope, return_lse=True)
p_reference, p_reference_lse = ref.lazy_prefill(*p_args16, return_lse=True)
out, lse = fast.lazy_prefill(*p_args_dev, return_lse=True)
assert_close(out, p_oracle, p_reference, dtype, "fast.lazy_prefill")
assert_close(lse, p_oracle_lse, p_reference_lse, dtype, "fast.lazy_prefill lse")
assert_close(fast.eager_attention(*p_args_dev), p_oracle, ref.eager_attention(*p_args16), dtype, "fast.eager")
decoded = fast.lazy_decode(*(x.to(device) for x in args16), decode_layout, rope)
assert_close(decoded, oracle, reference, dtype, "fast.lazy_decode")
print("fast.lazy_prefill, fast.eager_attention and fast.lazy_decode agree with the definition")

# %% [markdown]
# ## 5. Angles: fixed-point turns
#
# Both kernels take cos and sin from `rope_cos_sin` in `fast/rope.py`
# ([source](source:rope_cos_sin)). The query of a token at position $p$ meets a block of
# shift $\delta$ rotated by $R(p - \delta)$, and $p - \delta$ can be anything in
# $(-2^{31}, 2^{31})$. The reference computes $(p-\delta)\,\theta_i$ in float64 and
# reduces it to $[-\pi, \pi)$. The kernel stores each frequency as a 64-bit fraction of a
# turn, $F_i = \mathrm{round}(\theta_i / 2\pi \cdot 2^{64})$; then $n \cdot F_i$ in int64
# arithmetic, which wraps modulo $2^{64}$, *is* $n\,\theta_i$ modulo one turn, exactly.
# One conversion to float32 gives the angle to about $4\cdot10^{-7}$ rad at every
# $|n| < 2^{31}$. Plain float32 $n\,\theta_i$ is off by radians there.

# %%
positions = torch.tensor([0, 70_001, 2**20 + 3, 2**31 - 2, -(2**31 - 1)])
exact = ref.rope_angles(positions, rope)  # float64, reduced


def wrapped(a, b):
    return float((torch.remainder(a.double() - b.double() + math.pi, 2 * math.pi) - math.pi).abs().max())


ours = kernel_angles(positions.to(device), rope).cpu()
naive = positions.float()[:, None] * ref.inverse_frequencies(rope).float()
print(f"kernel angles: max error {wrapped(ours, exact):.1e} rad; naive float32: {wrapped(naive, exact):.1e} rad")
assert wrapped(ours, exact) < 1e-6
assert wrapped(naive, exact) > 1e-2

# %% [markdown]
# ## 6. Speed (GPU only)
#
# With a GPU, `triton.testing.perf_report` times the lazy kernel against the same kernel
# with the rotation switched off and against materialise, one line per provider. The full
# side-by-side benchmark with SDPA and FlashInfer is `benchmarks/kernels.py` (results on
# the [kernels page](../benchmarks/kernels.md)).

# %%
if torch.cuda.is_available():

    @triton.testing.perf_report(
        triton.testing.Benchmark(
            x_names=["segment"],
            x_vals=[256, 1024, 4096],
            line_arg="provider",
            line_vals=["lazy", "norot", "materialise"],
            line_names=["lazy", "no rotation", "materialise"],
            ylabel="TFLOP/s",
            plot_name="lazy-prefill-d128",
            args={},
        )
    )
    def bench_prefill(segment, provider):
        big_s, tq, hd = 64, 1024, 128
        n_seg = 8192 // segment
        reqs, nb = [], 0
        for _ in range(2):
            segs = []
            for d in range(n_seg):
                segs.append(ref.Placement(tuple(range(nb, nb + segment // big_s)), segment, d * segment))
                nb += segment // big_s
            own = ref.Placement(tuple(range(nb, nb + tq // big_s)), tq, n_seg * segment, n_seg * segment)
            nb += tq // big_s
            reqs.append(ref.RequestLayout(tuple(segs), own, tq))
        lay = ref.Layout(reqs, big_s)
        rp = ref.RopeConfig(head_dim=hd, base=500_000.0)
        kc = torch.randn(nb, big_s, 8, hd, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        q = torch.randn(lay.num_queries, 32, hd, device="cuda", dtype=torch.bfloat16)
        tables = rope_tables(rp, hd, q.device)
        m = lay.metadata("cuda")
        fns = {
            "lazy": lambda: fast.lazy_prefill(q, kc, vc, lay, rp),
            "norot": lambda: attend.attend(q, kc, vc, m, tables, tq, 0.1, attend.NONE, False, False),
            "materialise": lambda: fast.eager_attention(q, kc, vc, lay, rp),
        }
        ms = triton.testing.do_bench(fns[provider], return_mode="median")
        flops = 4 * 32 * hd * 2 * (tq * n_seg * segment + tq * (tq + 1) / 2)
        return flops / ms / 1e9

    bench_prefill.run(print_data=True)
