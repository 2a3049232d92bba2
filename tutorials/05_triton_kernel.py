# %% [markdown]
# # 5. The Triton kernel, tile by tile
#
# **What you will learn**
#
# * how `lazyattention.fast.lazy_prefill` turns eq. (8) into one Triton kernel: which
#   program owns which queries, how a GQA group shares one key tile, how paged blocks
#   become key tiles, and where the query is rotated — once per *run of equal shifts*;
# * why the angles are exact at any position: fixed-point turns, where int64 wrap-around
#   *is* the reduction modulo one turn;
# * that the kernel agrees with the reference under the project's one tolerance rule,
#   here on the CPU through the Triton interpreter, on a layout with reordered documents
#   past position 65,536.
#
# The kernel lives in `fast/attend.py`; the rotation helpers in `fast/rope.py`. Without a
# GPU everything below runs under `TRITON_INTERPRET=1` (set before Triton is imported),
# at tiny sizes; with a GPU the last section times the kernel against its baselines.

# %%
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`

import triton

import lazyattention.fast as fast
import lazyattention.reference as ref
from lazyattention.fast import attend
from lazyattention.fast.rope import kernel_angles, rope_tables
from lazyattention.reference import assert_close

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
generator = torch.Generator().manual_seed(0)

# %% [markdown]
# ## 1. Angles: fixed-point turns
#
# The query of a token at position $p$ meets a cached block of shift $\delta$ rotated by
# $R(p - \delta)$. The reference computes $(p-\delta)\,\theta_i$ in float64 and reduces it
# to $[-\pi, \pi)$. The kernel stores each frequency as a 64-bit fraction of a turn,
# $F_i = \mathrm{round}(\theta_i / 2\pi \cdot 2^{64})$; then $n \cdot F_i$ in int64
# arithmetic — which wraps modulo $2^{64}$ — *is* $n\,\theta_i$ modulo one turn, exactly.
# One conversion to float32 gives the angle to about $4\cdot10^{-7}$ rad at every
# $|n| < 2^{31}$. Plain float32 $n\,\theta_i$ is off by radians there.

# %%
rope = ref.RopeConfig(head_dim=64, base=500_000.0)
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
# ## 2. A small batch
#
# Two documents cached once (stored at 0), used by two requests at different offsets,
# reordered, one of them past 65,536 — the zero-copy reuse the project is about. Blocks
# hold `S = 16` tokens; 8 query heads share 2 KV heads (groups of `G = 4`).

# %%
S, H, HKV, D = 16, 8, 2, 64
dtype = torch.float16
k_cache = torch.full((12, S, HKV, D), float("nan"), dtype=torch.float64)  # unwritten slots: NaN
v_cache = torch.full_like(k_cache, float("nan"))


def write(length, blocks, stored_start):
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
layout = ref.Layout(
    [
        ref.RequestLayout((P((3, 4), 20, 70_000), P((0, 1, 2), 40, 70_020)), P((5, 6), 24, 70_060, 70_060), 24),
        ref.RequestLayout((P((0, 1, 2), 40, 0), P((3, 4), 20, 40)), P((7,), 10, 60, 60), 6),
    ],
    block_size=S,
)
meta = layout.metadata()
print("block_table\n", meta.block_table, "\nblock_shift\n", meta.block_shift, "\nblock_len\n", meta.block_len)

# %% [markdown]
# One row of metadata per request, segment blocks first, own blocks last. Request 0 reads
# B (shift 70,000) then A (shift 70,020); request 1 reads A then B at shifts 0 and 40.
# The own tokens were stored where they are used: shift 0.
#
# ## 3. The grid and the query tile
#
# `attend.plan` picks the tiles. The grid is `(query tiles, B, Hkv · splits)`: a program
# owns `BLOCK_Q` consecutive queries of one request and **all `G` query heads of one KV
# head**. Row `r` of its `[BLOCK_M, D]` query tile is token `r // GP`, head `r % GP`
# (`GP` = `G` padded to a power of two). A key tile loaded once then serves the whole
# group — GQA costs no extra key traffic.

# %%
q64 = torch.randn(layout.num_queries, H, D, dtype=torch.float64, generator=generator).to(dtype).double()
plan = attend.plan(H, HKV, D, S, dtype, device, decode=False, work_items=0, max_key_slots=0)
print(plan)
rows = torch.arange(plan.block_q * plan.gp)
print(
    "row -> (token, head in group):",
    list(zip((rows // plan.gp).tolist(), (rows % plan.gp).tolist(), strict=True))[:6],
    "...",
)
assert plan.block_q * plan.gp >= 16  # the matrix units want at least 16 rows

# %% [markdown]
# ## 4. The query in two rotations, shift runs and key tiles
#
# Before the attention kernel, a small kernel rotates every query once at its own
# position, `y = m R(p) q · scale` (float32), and stores `y` read at the partner channels
# too. Since $R(p - \delta) = R(-\delta)\,R(p)$, the attention kernel then rotates a
# whole query tile for a shift $\delta$ with the cos and sin of **one** vector of angles
# $-\delta\,\theta_i$: `q = y·cos + y_partner·sin`.
#
# The program walks the request's blocks in **runs**: maximal ranges of consecutive
# blocks with one shift that end after the first partly filled block — in practice a
# whole segment, then the own tokens. Every block of a run but its last is then full, so
# the run's valid slots are one contiguous range. At the start of a run the query tile is
# rotated (above); then one loop walks the key tiles that need **no mask** (every slot
# valid and visible to every query of the tile), and a second loop the run's last tiles,
# which do: slots past the run's valid end, and own keys after some query of the tile
# (causal, eq. 7). Each loop holds only loads, two matrix products and the online-softmax
# update, which the compiler software-pipelines.
#
# A key tile of `BLOCK_N` slots that lies inside one block (`S % BLOCK_N == 0`) arrives
# by one bulk tensor copy (TMA on Hopper); otherwise each row of the tile gathers its own
# block's physical id. Here is the walk, replayed in Python for the program that holds
# request 0's *last* query tile (4 tokens × the 4 heads of a group), with `BLOCK_N = 16`
# (one block per tile, as under the interpreter) and `BLOCK_N = 64` (a tile spans four
# 16-token blocks).


# %%
def replay(meta, r, block_n, first_q, last_q):
    """The runs one program visits: (shift, unmasked tiles, masked tiles), tiles as first slots."""
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
        runs.append((shift, unmasked, masked))
        b = end
    return runs


first_q, last_q = int(meta.query_start[0]) + 20, int(meta.query_start[0]) + 23
for block_n in (16, 64):
    runs = replay(meta, 0, block_n, first_q, last_q)
    print(f"BLOCK_N={block_n}: {len(runs)} runs (= query rotations)")
    for shift, unmasked, masked in runs:
        print(f"   shift {shift:>6}: unmasked tiles at slots {unmasked}, masked tiles at slots {masked}")
    # Three runs (B, A, own tokens): three rotations, whatever the tiling.
    assert len(runs) == 3

# %% [markdown]
# With 16-slot tiles the segments' full blocks need no mask; each segment's partly
# filled last block (B's holds 4 of 16 tokens, A's 8 — those slots hold NaN here, and a
# kernel that read them unmasked would return NaN) and the own tokens on the diagonal
# do. With 64-slot tiles every tile here is a run's last. Own blocks wholly after the
# tile's last query are never visited.
#
# ## 5. The kernel against the reference
#
# The fast path is held to the project's one tolerance rule: its error against the float64
# oracle (the eager definition, eq. 9, in float64 on the same rounded inputs) may be at
# most twice the reference's own error in float16, plus a small floor.

# %%
args16 = (q64.to(dtype), k_cache.to(dtype), v_cache.to(dtype), layout, rope)
args_dev = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in args16)
oracle, oracle_lse = ref.eager_attention(q64, k_cache, v_cache, layout, rope, return_lse=True)
reference, reference_lse = ref.lazy_prefill(*args16, return_lse=True)
out, lse = fast.lazy_prefill(*args_dev, return_lse=True)
err = assert_close(out, oracle, reference, dtype, "fast.lazy_prefill")
assert_close(lse, oracle_lse, reference_lse, dtype, "fast.lazy_prefill lse")
print(f"fast: {err:.2e}   reference in float16: {(reference.double() - oracle).abs().max():.2e}")

# %% [markdown]
# The materialise path (`fast.eager_attention`, Block-Attention's copy + re-rotation) is
# the same function, and so is decode with split-KV: each request's keys are split among
# programs, each writes a partial output and log-sum-exp, and a second kernel merges them
# (eq. 12). Prefill splits the same way when its grid is smaller than the GPU — one short
# question over many retrieved documents would otherwise leave most SMs idle
# (`attend.prefill_splits` chooses how many). A decode tile holds one token, so all its
# rows share one position: there the attention kernel rotates the pre-RoPE query by
# $p - \delta$ itself, one vector of angles per run, and no query kernel runs first.

# %%
eager = fast.eager_attention(*args_dev)
assert_close(eager, oracle, ref.eager_attention(*args16), dtype, "fast.eager_attention")

decode_layout = ref.Layout([ref.RequestLayout(req.segments, req.own, 1) for req in layout.requests], S)
qd = torch.randn(2, H, D, dtype=torch.float64, generator=generator).to(dtype).double()
d_args = (qd, k_cache, v_cache, decode_layout, rope)
decoded = fast.lazy_decode(*(x.to(dtype).to(device) if isinstance(x, torch.Tensor) else x for x in d_args))
assert_close(
    decoded,
    ref.eager_attention(*d_args),
    ref.lazy_decode(qd.to(dtype), k_cache.to(dtype), v_cache.to(dtype), decode_layout, rope),
    dtype,
    "fast.lazy_decode",
)
print("eager and decode agree too")

# %% [markdown]
# ## 6. Speed (GPU only)
#
# With a GPU, `triton.testing.perf_report` times the lazy kernel against the same kernel
# with the rotation switched off and against materialise, one line per provider. The full
# side-by-side benchmark with SDPA is `benchmarks/kernels.py` (results on
# [Kernels (H100)](../benchmarks/kernels.md)).

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
