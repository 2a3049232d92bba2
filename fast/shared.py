"""Shared-segment decode: a segment read by many requests of a batch, read once.

In a decode batch, many requests may read the same cached segment (the same physical
blocks: a popular retrieved document, a system prompt), each at its own logical start,
hence its own shift ``δ_r``. The per-request decode (:func:`lazyattention.fast.lazy_decode`)
reads that segment's keys and values once per request. Here they are read once for the
whole batch: the query absorbs the shift (eq. 8), so queries of *different* requests can
attend to the same key tile, each row rotated by its own ``p_r − δ_r``.

* :func:`plan_sharing` (host, once per step): groups the batch's segment placements by
  their physical blocks, length and stored start; a group read by at least
  ``min_requests`` requests is *shared*. The rest of each request (its other segments and
  its own tokens) is an ordinary :class:`~lazyattention.reference.Layout`.
* :func:`shared_decode`: the rest through the per-request decode kernel
  (``fast/attend.py``, with its log-sum-exp and float32 output), each shared segment
  through :func:`_shared_kernel`, and the partials merged per (request, head) by
  log-sum-exp (eq. 12, :func:`~lazyattention.fast.merge.merge_partials`).

**The shared kernel.** A program holds one KV head and a tile of ``BLOCK_R`` *members*
of one shared segment (a member is one request's placement of it); row ``i`` of the
``[BLOCK_R · GP, DP]`` query tile is member ``i // GP`` and query head ``i % GP`` of the
KV head's group. The rows are rotated once per program, directly from the pre-RoPE
query: ``m R(p_r − δ_r) q``, with the angles ``(p_r − δ_r) · θ`` of each member
(``[BLOCK_R, DP]``, shared by its group's rows) — never per key tile, and with no query
kernel before (as the decode's direct rotation, ``fast/kernels.py``). The program then
walks its share of the segment's key tiles (bulk tensor copies when ``S % BLOCK_N == 0``
and the head dim is unpadded, row gathers otherwise: the attention kernel's
:func:`~lazyattention.fast.kernels.key_tile`) with an online softmax (eq. 11); segment
keys are visible to every query (eq. 7), so only the last tile, past the segment's valid
length, is masked. It writes a partial ``(out, lse)`` per (request, head) into that
request's merge slot.

**Key split.** A few popular documents give few programs (segments × member tiles ×
``Hkv``); each segment's blocks are then split among several programs, chosen from the
SM count as the decode's split is (about four programs per SM, at least two key tiles
per split, at most :data:`MAX_SPLITS`), and the splits merge with the rest.

**Metadata.** One int32 tensor per (device, tiles), uploaded once and cached on the
plan: the work items ``[I, 6]`` (table offset, first and end key slot, first member,
member count, split), the members ``[R, 3]`` (request, shift, first merge slot) and the
shared segments' block tables, back to back. A request's merge slots past its own
(requests read different numbers of shared segments) get work items without keys,
which write ``lse = −inf``: every slot the merge reads is written by a kernel.

Not a switch inside :func:`lazyattention.fast.lazy_decode`: whether and how a batch shares
is data, and ``lazy_decode``'s CUDA-graph capture relies on a data-independent path. The
caller decides (the serving engine's ``shared_decode=`` option).

Shape alphabet: ``B`` requests, ``H`` heads, ``Hkv`` KV heads, ``G = H / Hkv`` (``GP``
padded to a power of two), ``D`` head dim (``DP`` padded), ``S`` block size, ``P`` merge
slots per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from lazyattention.reference.checks import check_attention_inputs
from lazyattention.reference.layout import Layout, RequestLayout, ceil_div
from lazyattention.reference.rope import RopeConfig

from . import buffers
from . import plan as _plan
from .attend import attend, default_scale
from .attention import _check_backend, _tables
from .kernels import LAZY, LOG2E, cache_descriptors, finish, key_tile
from .merge import merge_partials
from .plan import Plan
from .rope import RopeTables, rope_cos_sin
from .rounding import dot_dtype

__all__ = [
    "MAX_SPLITS",
    "MAX_SLOTS",
    "REST_SPLIT_TILES",
    "ITEM_FIELDS",
    "MEMBER_FIELDS",
    "SharedMetadata",
    "SharedSegment",
    "SharingPlan",
    "plan_sharing",
    "shared_tiles",
    "shared_decode",
    "attend_shared",
    "shared_launches",
]

#: Most programs one shared segment's keys are split among.
MAX_SPLITS = 8
#: Most partials merged per request (the rest, plus each shared read times its splits).
MAX_SLOTS = 64

#: The most key tiles one program of the rest's decode walks (``plan(max_split_tiles=)``):
#: the rest is what too few requests share, so its requests differ widely in length, and
#: a split sized by the longest request alone leaves a few programs holding the launch.
#: ``None``: the decode plan's own split. 8 is from ``benchmarks/tune_engine_decode.py
#: --shared`` (``benchmarks/sweeps/tune_rest_cap_h100.json``): the engine's heavy step
#: at 64 requests, the rest 40 µs a layer against 75 uncapped (47 at 4 tiles, 40 at 16).
REST_SPLIT_TILES: int | None = 8

#: Int32 fields per work item (table offset, first and end key slot, first member, member
#: count, split) and per member (request, shift, first merge slot) of :class:`SharedMetadata`.
ITEM_FIELDS, MEMBER_FIELDS = 6, 3


# --------------------------------------------------------------------------- device code


@triton.jit(do_not_specialize=["G", "D", "item_off", "member_off", "table_off"])
def _shared_kernel(
    q_ptr, k_ptr, v_ptr, k_desc, v_desc, part_ptr, part_lse_ptr, meta_ptr, query_start_ptr,
    freq_ptr, partner_ptr, mscale_ptr,
    qk_scale, item_off, member_off, table_off,
    stride_qt, stride_qh,
    stride_kn, stride_ks, stride_kh, stride_vn, stride_vs, stride_vh,
    stride_pt, stride_ph, stride_pp, stride_lt, stride_lh,
    G, D,
    BLOCK_R: tl.constexpr, GP: tl.constexpr, BLOCK_N: tl.constexpr, DP: tl.constexpr, S: tl.constexpr,
    TMA: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One work item (a tile of members of one shared segment, one share of its key
    slots) for one KV head; grid ``(items, Hkv)``. Writes each row's partial
    attention and log-sum-exp into ``part [B, H, P, D]`` and ``part_lse [B, H, P]``."""
    BLOCK_M: tl.constexpr = BLOCK_R * GP
    item = meta_ptr + item_off + tl.program_id(0) * 6
    kv_head = tl.program_id(1)
    table_row = meta_ptr + table_off + tl.load(item)
    j_lo = tl.load(item + 1)
    j_hi = tl.load(item + 2)
    first_member = tl.load(item + 3)
    num_members = tl.load(item + 4)
    split = tl.load(item + 5)

    # ---- the query tile: row = (member, head of the group), members from any request
    rows = tl.arange(0, BLOCK_M)
    mi = rows // GP
    g = rows % GP
    member_ok = mi < num_members
    row_ok = member_ok & (g < G)
    members = meta_ptr + member_off + first_member * 3
    r = tl.load(members + mi * 3, mask=member_ok, other=0).to(tl.int64)
    slot = tl.load(members + mi * 3 + 2, mask=member_ok, other=0) + split
    d = tl.arange(0, DP)
    d_ok = d < D
    freq = tl.load(freq_ptr + d)[None, :]
    partner = tl.load(partner_ptr + d)[None, :]
    mscale = tl.load(mscale_ptr + d)[None, :]
    # m R(p_r − δ_r) q (eq. 8) from the pre-RoPE query: the angles (p_r − δ_r)·θ once per
    # program and member ([BLOCK_R, DP]), shared by the GP rows of the member's group
    # (the query seen as [BLOCK_R, GP, DP]: broadcast to [BLOCK_M, DP] instead, cos and
    # sin spilled 368 bytes at 4 warps on sm_90).
    m = tl.arange(0, BLOCK_R)
    m_ok = m < num_members
    r_m = tl.load(members + m * 3, mask=m_ok, other=0)
    shift = tl.load(members + m * 3 + 1, mask=m_ok, other=0)
    turn = tl.load(query_start_ptr + r_m, mask=m_ok, other=0).to(tl.int64) - shift.to(tl.int64)
    cos_m, sin_m = rope_cos_sin(turn[:, None], freq)
    head = kv_head * G + g
    q_rows = q_ptr + r * stride_qt + head * stride_qh
    x_mask = row_ok[:, None] & d_ok[None, :]
    x = tl.reshape(tl.load(q_rows[:, None] + d[None, :], mask=x_mask, other=0.0), (BLOCK_R, GP, DP))
    xp = tl.reshape(tl.load(q_rows[:, None] + partner, mask=x_mask, other=0.0), (BLOCK_R, GP, DP))
    cos_m = cos_m * mscale
    sin_m = sin_m * mscale
    q3 = x.to(tl.float32) * cos_m[:, None, :] + xp.to(tl.float32) * sin_m[:, None, :]
    q = tl.reshape(q3, (BLOCK_M, DP)).to(DOT_DTYPE)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DP], tl.float32)
    q_pos = tl.zeros([BLOCK_M], tl.int32)  # unused: every segment key is visible (eq. 7)

    # ---- key tiles: full ones unmasked, the last (past the valid end) masked. With
    # own_slot0 = j_hi every valid slot counts as a segment slot, visible to all rows.
    safe_end = j_lo + (j_hi - j_lo) // BLOCK_N * BLOCK_N
    for j0 in range(j_lo, safe_end, BLOCK_N):
        m_i, l_i, acc = key_tile(
            q, m_i, l_i, acc, j0, j_hi, j_hi, 0, q_pos, qk_scale,
            k_ptr, v_ptr, k_desc, v_desc, table_row, table_row, kv_head, d, d_ok, freq, partner, mscale,
            stride_kn, stride_ks, stride_kh, stride_vn, stride_vs, stride_vh,
            S, BLOCK_N, DP, 0, False, TMA, DOT_DTYPE, PRECISION,
        )  # fmt: skip
    for j0 in range(safe_end, j_hi, BLOCK_N):
        m_i, l_i, acc = key_tile(
            q, m_i, l_i, acc, j0, j_hi, j_hi, 0, q_pos, qk_scale,
            k_ptr, v_ptr, k_desc, v_desc, table_row, table_row, kv_head, d, d_ok, freq, partner, mscale,
            stride_kn, stride_ks, stride_kh, stride_vn, stride_vs, stride_vh,
            S, BLOCK_N, DP, 0, True, TMA, DOT_DTYPE, PRECISION,
        )  # fmt: skip

    # ---- write this member's partial into its request's merge slot
    out, lse = finish(m_i, l_i, acc)
    dst = r * stride_pt + head * stride_ph + slot * stride_pp
    tl.store(part_ptr + dst[:, None] + d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(part_lse_ptr + r * stride_lt + head * stride_lh + slot, lse, mask=row_ok)


# --------------------------------------------------------------------------- host: the plan


@dataclass(frozen=True)
class SharedSegment:
    """One shared segment: its physical blocks, valid length and stored start, and its
    members ``(request, shift δ)`` in layout order (a request that places it twice is
    two members)."""

    blocks: tuple[int, ...]
    length: int
    stored_start: int
    members: tuple[tuple[int, int], ...]

    @property
    def requests(self) -> int:
        """How many distinct requests read it."""
        return len({r for r, _ in self.members})


class SharedMetadata(NamedTuple):
    """A sharing plan's kernel metadata on one device, for one tile plan: what the shared
    kernel reads, by name (:meth:`SharingPlan.build_metadata`)."""

    tensor: torch.Tensor  # int32: items, members, block tables, back to back
    num_items: int
    item_off: int
    member_off: int
    table_off: int
    slots: int  # P: merge slots per request (slot 0 is the rest)
    splits: tuple[int, ...]  # per shared segment


class SharingPlan:
    """Which segments of a decode layout are shared, and the layout of the rest.

    Built by :func:`plan_sharing`; read by :func:`shared_decode`, which must get the
    same ``layout`` object. Its device metadata is built once per device and tile plan
    and kept (every layer of a step reuses it).

    Attributes:
        layout: the decode layout it was planned for.
        min_requests: the sharing threshold it was planned with.
        segments: the shared segments.
        rest: ``layout`` with every shared placement removed from its requests.
    """

    def __init__(self, layout: Layout, min_requests: int, segments: tuple[SharedSegment, ...], rest: Layout):
        self.layout = layout
        self.min_requests = min_requests
        self.segments = segments
        self.rest = rest
        self._metadata: dict[tuple, SharedMetadata] = {}

    @property
    def read_tokens(self) -> int:
        """Shared-segment tokens the per-request decode would read (every member's)."""
        return sum(seg.length * len(seg.members) for seg in self.segments)

    @property
    def unique_tokens(self) -> int:
        """Shared-segment tokens the shared kernel reads (once per segment)."""
        return sum(seg.length for seg in self.segments)

    def splits(self, tiles: Plan, num_kv_heads: int, device: torch.device) -> tuple[int, ...]:
        """Key splits per shared segment: about four programs per SM over all shared
        work, at least two key tiles per split, at most :data:`MAX_SPLITS`, and at most
        :data:`MAX_SLOTS` partials per request (halving the split until it fits).
        Under the interpreter: two splits wherever a segment has more than two key
        tiles, so that the tests cross split boundaries."""
        key_tiles = [ceil_div(seg.length, tiles.block_n) for seg in self.segments]
        blocks = [len(seg.blocks) for seg in self.segments]
        if device.type == "cpu":
            return tuple(min(b, 2 if t > 2 else 1) for t, b in zip(key_tiles, blocks, strict=True))
        programs = num_kv_heads * sum(ceil_div(len(seg.members), tiles.block_q) for seg in self.segments)
        want = max(1, min(MAX_SPLITS, ceil_div(4 * _plan.multiprocessors(device), programs)))
        while True:
            splits = tuple(min(want, b, max(1, t // 2)) for t, b in zip(key_tiles, blocks, strict=True))
            if want == 1 or self._slots(splits) <= MAX_SLOTS:
                return splits
            want //= 2

    def _slots(self, splits: tuple[int, ...]) -> int:
        used = [1] * self.layout.batch_size
        for seg, p in zip(self.segments, splits, strict=True):
            for r, _ in seg.members:
                used[r] += p
        return max(used)

    def host_metadata(self, tiles: Plan, splits: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, ...]]:
        """``(tensor, (items, item_off, member_off, table_off, slots))``: the int32
        metadata of :func:`_shared_kernel` on the host (see the module docstring)."""
        s = self.layout.block_size
        items, members, table = [], [], []
        used = [1] * self.layout.batch_size  # merge slot 0 of every request: the rest
        for seg, p in zip(self.segments, splits, strict=True):
            t0 = len(table)
            table.extend(seg.blocks)
            per_split = ceil_div(len(seg.blocks), p)
            parts = ceil_div(len(seg.blocks), per_split)  # every split has at least one block
            m0 = len(members)
            for r, shift in seg.members:
                members.append((r, shift, used[r]))
                used[r] += parts
            for k in range(parts):  # splits outermost: programs that run together share key tiles
                lo, hi = k * per_split * s, min((k + 1) * per_split * s, seg.length)
                for t in range(0, len(seg.members), tiles.block_q):
                    items.append((t0, lo, hi, m0 + t, min(tiles.block_q, len(seg.members) - t), k))
        slots = max(used)
        if slots > MAX_SLOTS:
            worst = max(range(len(used)), key=used.__getitem__)
            raise NotImplementedError(
                f"lazyattention.fast.shared_decode: request {worst} needs {slots} partials (its rest, and each "
                f"shared segment it reads times its splits); at most {MAX_SLOTS} are merged (raise min_requests)"
            )
        # The slots a request does not use get empty work items (no keys: lse = −inf,
        # weight 0 in the merge), so that the shared kernel writes every slot.
        m0 = len(members)
        members += [(r, 0, k) for r in range(len(used)) for k in range(used[r], slots)]
        for t in range(m0, len(members), tiles.block_q):
            items.append((0, 0, 0, t, min(tiles.block_q, len(members) - t), 0))
        flat = [x for row in items for x in row] + [x for row in members for x in row] + table
        tensor = torch.tensor(flat, dtype=torch.int32)
        member_off = len(items) * ITEM_FIELDS
        return tensor, (len(items), 0, member_off, member_off + len(members) * MEMBER_FIELDS, slots)

    def build_metadata(self, device: torch.device, tiles: Plan, num_kv_heads: int) -> SharedMetadata:
        """The metadata for ``tiles`` on ``device``'s SM count, its tensor on the host
        (for a caller that uploads it with other tensors, then :meth:`use_metadata`)."""
        splits = self.splits(tiles, num_kv_heads, device)
        host, (n, item_off, member_off, table_off, slots) = self.host_metadata(tiles, splits)
        return SharedMetadata(host, n, item_off, member_off, table_off, slots, splits)

    def use_metadata(self, meta: SharedMetadata, tiles: Plan, num_kv_heads: int) -> None:
        """Use ``meta`` (from :meth:`build_metadata`, its tensor copied to its device) as
        :meth:`metadata` there."""
        self._metadata[(meta.tensor.device, tiles, num_kv_heads)] = meta

    def metadata(self, device: torch.device, tiles: Plan, num_kv_heads: int) -> SharedMetadata:
        """The metadata on ``device`` for ``tiles`` (built and uploaded once, then kept)."""
        key = (device, tiles, num_kv_heads)
        meta = self._metadata.get(key)
        if meta is None:
            meta = self.build_metadata(device, tiles, num_kv_heads)
            meta = self._metadata[key] = meta._replace(tensor=meta.tensor.to(device))
        return meta

    def __repr__(self) -> str:
        return (
            f"SharingPlan(segments={len(self.segments)}, members={sum(len(s.members) for s in self.segments)}, "
            f"min_requests={self.min_requests}, read_tokens={self.read_tokens}, unique_tokens={self.unique_tokens})"
        )


def plan_sharing(layout: Layout, min_requests: int = 2) -> SharingPlan | None:
    """Find the segments of a decode ``layout`` that ``min_requests`` or more requests read.

    Placements are grouped by ``(blocks, length, stored_start)``: the same cached tokens,
    wherever each request places them (any start, hence any shift). Empty placements are
    left to the rest.

    Args:
        layout: a decode layout (one query per request).
        min_requests: the fewest distinct requests that make a segment shared (≥ 1).

    Returns:
        A :class:`SharingPlan`, or ``None`` when no segment is shared that widely.

    Examples:
        >>> from lazyattention.reference import Placement
        >>> doc = Placement((0, 1), 7, start=0)
        >>> reqs = [RequestLayout((doc,), Placement((2 + r,), 2, start=7), 1) for r in range(2)]
        >>> plan_sharing(Layout(reqs, block_size=4)).unique_tokens
        7
        >>> plan_sharing(Layout(reqs, block_size=4), min_requests=3) is None
        True
    """
    if not isinstance(layout, Layout):
        raise TypeError(f"layout must be a Layout, got {type(layout).__name__}")
    if isinstance(min_requests, bool) or not isinstance(min_requests, int) or min_requests < 1:
        raise ValueError(f"min_requests must be an int >= 1, got {min_requests!r}")
    many = [r for r, req in enumerate(layout.requests) if req.num_queries != 1]
    if many:
        raise ValueError(f"plan_sharing needs a decode layout (one query per request); requests {many} have more")
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for r, req in enumerate(layout.requests):
        for d, seg in enumerate(req.segments):
            if seg.length:
                groups.setdefault((seg.blocks, seg.length, seg.stored_start), []).append((r, d))
    shared = [(key, m) for key, m in groups.items() if len({r for r, _ in m}) >= min_requests]
    if not shared:
        return None
    taken = {member for _, m in shared for member in m}
    rest = Layout(
        [
            RequestLayout(
                tuple(seg for d, seg in enumerate(req.segments) if (r, d) not in taken), req.own, req.num_queries
            )
            for r, req in enumerate(layout.requests)
        ],
        layout.block_size,
    )
    segments = tuple(
        SharedSegment(blocks, length, stored, tuple((r, layout.requests[r].segments[d].shift) for r, d in m))
        for (blocks, length, stored), m in shared
    )
    return SharingPlan(layout, min_requests, segments, rest)


def shared_tiles(
    num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> Plan:
    """Tiles of :func:`_shared_kernel`, as an attention :class:`~lazyattention.fast.plan.Plan`
    whose ``block_q`` is the members per program (``BLOCK_R``) and ``gp`` the padded group.

    About 64 rows (16 members of a group of 4) by 64 keys in 16-bit, over 4 warps
    (``ptxas`` for sm_90: 239 registers, no spill, so two programs share an SM; the
    attention kernel's prefill, whose key loop this is, ran 1.3–2× slower over 8 warps at
    64 rows on an H200, ``benchmarks/sweeps/tune_prefill_h200.json``);
    32 × 32 over 8 warps past head dim 128 (169 registers); 16 × 32 in float32 (head dim
    128: 740 bytes of spill, as the attention kernel's decode; 256: about 17 KiB, slow
    but correct); 16 × 16 under the interpreter. Bulk tensor copies
    (``tma``) when a key tile lies in one block and the head dim needs no padding.
    ``benchmarks/compile_sm90.py --functions shared_decode`` compiles them without a GPU."""
    gp = triton.next_power_of_2(num_heads // num_kv_heads)
    dp = max(16, triton.next_power_of_2(head_dim))
    if device.type == "cpu":
        block_m, block_n, warps, stages = 16, 16, 4, 1
    elif dtype == torch.float32:
        block_m, block_n, warps, stages = 16, 32, 4, 2
    elif dp > 128:
        block_m, block_n, warps, stages = 32, 32, 8, 2
    else:
        block_m, block_n, warps, stages = 64, 64, 4, 3
    block_m = max(block_m, gp)
    tma = block_size % block_n == 0 and dp == head_dim
    return Plan(block_m // gp, gp, block_n, dp, 1, warps, stages, tma, direct=False, flat=False)


# --------------------------------------------------------------------------- public


def shared_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: Layout,
    rope: RopeConfig,
    scale: float | None = None,
    return_lse: bool = False,
    *,
    sharing: SharingPlan | None = None,
):
    """:func:`lazyattention.reference.lazy_decode`, each shared segment read once for all
    the requests that read it (see the module docstring). Same arguments, result and
    errors as ``lazy_decode``.

    Args:
        sharing: ``plan_sharing(layout, ...)`` for this very ``layout``; default
            ``plan_sharing(layout)`` (segments read by two or more requests).

    Raises:
        ValueError: nothing is shared (``sharing=None`` and no segment is read by two
            requests), or ``sharing`` was planned for another layout.
        NotImplementedError: a request reads more shared segments than one merge takes.
    """
    check_attention_inputs(q, k_cache, v_cache, layout, rope, scale, True)
    _check_backend("shared_decode", q, k_cache, v_cache)
    if sharing is None:
        sharing = plan_sharing(layout)
        if sharing is None:
            raise ValueError(
                "lazyattention.fast.shared_decode: no segment of this layout is read by 2 or more requests; "
                "use lazyattention.fast.lazy_decode, or pass sharing=plan_sharing(layout, min_requests=1)"
            )
    elif not isinstance(sharing, SharingPlan):
        raise TypeError(f"sharing must be a SharingPlan (from plan_sharing), got {type(sharing).__name__}")
    elif sharing.layout is not layout:
        raise ValueError("sharing was planned for another layout: pass plan_sharing(layout) of this layout")
    scale = default_scale(q.shape[-1], scale)
    out, lse = attend_shared(q, k_cache, v_cache, sharing, _tables(rope, q.device), scale)
    return (out, lse) if return_lse else out


def attend_shared(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, sharing: SharingPlan,
                  tables: RopeTables, scale: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The launches of :func:`shared_decode` on validated inputs: the rest, the shared
    segments, the merge. Returns ``out [B, H, D]`` in ``q.dtype`` and ``lse [B, H]``."""
    launches, out, lse = shared_launches(q, k_cache, v_cache, sharing, tables, scale)
    for launch in launches.values():
        launch()
    return out, lse


def shared_launches(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, sharing: SharingPlan,
                    tables: RopeTables, scale: float, tiles: Plan | None = None,
                    rest_plan: Plan | None = None):  # fmt: skip
    """:func:`attend_shared`'s launches, not yet run: ``(launches, out, lse)``, where
    ``launches`` maps ``"rest"``, ``"shared"`` and ``"merge"`` to calls that, run in that
    order, fill ``out [B, H, D]`` and ``lse [B, H]`` (the merge reads what the others
    wrote, into buffers allocated here: a benchmark may time each alone). ``tiles``: the
    shared kernel's, instead of :func:`shared_tiles`'; ``rest_plan``: the rest's decode,
    instead of the decode plan split by :data:`REST_SPLIT_TILES` (benchmarks)."""
    b, h, d = q.shape
    _, s, hkv, _ = k_cache.shape
    tiles = tiles or shared_tiles(h, hkv, d, s, q.dtype, q.device)
    meta = sharing.metadata(q.device, tiles, hkv)
    rest_meta = sharing.rest.metadata(q.device)
    m = rest_meta.block_table.shape[1]
    rest_plan = rest_plan or _plan.plan(h, hkv, d, s, q.dtype, q.device, True, b * hkv, m * s,
                                        max_split_tiles=REST_SPLIT_TILES)  # fmt: skip
    part = buffers.empty((b, h, meta.slots, d), torch.float32, q.device)
    part_lse = buffers.empty((b, h, meta.slots), torch.float32, q.device)
    out = buffers.empty((b, h, d), q.dtype, q.device)
    lse = buffers.empty((b, h), torch.float32, q.device)
    k_desc, v_desc = cache_descriptors(k_cache, v_cache, tiles)

    def rest():  # the per-request kernel, written in float32 into merge slot 0
        attend(q, k_cache, v_cache, rest_meta, tables, 1, scale, LAZY, True, True, rest_plan,
               out=part[:, :, 0], lse=part_lse[:, :, 0])  # fmt: skip

    def shared():
        _shared_kernel[(meta.num_items, hkv)](
            q_ptr=q, k_ptr=k_cache, v_ptr=v_cache, k_desc=k_desc, v_desc=v_desc,
            part_ptr=part, part_lse_ptr=part_lse, meta_ptr=meta.tensor, query_start_ptr=rest_meta.query_start,
            freq_ptr=tables.freq, partner_ptr=tables.partner, mscale_ptr=tables.mscale,
            qk_scale=scale * LOG2E, item_off=meta.item_off, member_off=meta.member_off, table_off=meta.table_off,
            stride_qt=q.stride(0), stride_qh=q.stride(1),
            stride_kn=k_cache.stride(0), stride_ks=k_cache.stride(1), stride_kh=k_cache.stride(2),
            stride_vn=v_cache.stride(0), stride_vs=v_cache.stride(1), stride_vh=v_cache.stride(2),
            stride_pt=part.stride(0), stride_ph=part.stride(1), stride_pp=part.stride(2),
            stride_lt=part_lse.stride(0), stride_lh=part_lse.stride(1),
            G=h // hkv, D=d,
            BLOCK_R=tiles.block_q, GP=tiles.gp, BLOCK_N=tiles.block_n, DP=tiles.dp, S=s,
            TMA=k_desc is not None, DOT_DTYPE=dot_dtype(q.dtype, q.device),
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )  # fmt: skip

    def merge():
        merge_partials(part, part_lse, out, lse)

    return {"rest": rest, "shared": shared, "merge": merge}, out, lse
