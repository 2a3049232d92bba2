"""The split merge: partial attentions combined by their log-sum-exp (eq. 12).

Split-KV decode and prefill (``fast/attend.py``), the shared-segment decode
(``fast/shared.py``) and ``merge_attention`` write partial attentions over disjoint
key sets, each with its log-sum-exp; :func:`merge_partials` combines them.

Shape alphabet: ``T`` tokens, ``H`` heads, ``P`` parts, ``D`` head dim.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rounding import emulate_rtne, round_to

__all__ = ["merge_partials"]


# --------------------------------------------------------------------------- device code


@triton.jit
def _merge_kernel(
    part_ptr,
    part_lse_ptr,
    out_ptr,
    lse_ptr,
    H,
    P,
    D,
    stride_pt,
    stride_ph,
    stride_pp,
    stride_lt,
    stride_lh,
    stride_ot,
    stride_oh,
    stride_rt,
    stride_rh,
    HB: tl.constexpr,
    PP: tl.constexpr,
    DP: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
):
    """Combine ``P`` partial attentions of one token's heads ``HB·j … HB·j + HB − 1`` by
    log-sum-exp (eq. 12); grid ``(T, ⌈H / HB⌉)``.

    ``lse = log Σ_p e^{lse_p}``, ``out = Σ_p e^{lse_p − lse} out_p``; a part that saw no
    key has ``lse_p = −inf`` and weight 0.
    """
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * HB + tl.arange(0, HB)
    p = tl.arange(0, PP)
    d = tl.arange(0, DP)
    h_ok = h < H
    hp_ok = h_ok[:, None] & (p < P)[None, :]
    lse_p = tl.load(part_lse_ptr + t * stride_lt + h[:, None] * stride_lh + p[None, :], mask=hp_ok,
                    other=float("-inf"))  # fmt: skip
    top = tl.max(lse_p, 1)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp(lse_p - top[:, None])
    total = tl.sum(w, 1)
    rows = t * stride_pt + h[:, None, None] * stride_ph + p[None, :, None] * stride_pp + d[None, None, :]
    mask = (hp_ok & (w > 0.0))[:, :, None] & (d < D)[None, None, :]
    parts = tl.load(part_ptr + rows, mask=mask, other=0.0)
    out = tl.sum(parts * w[:, :, None], 1) / tl.where(total > 0.0, total, 1.0)[:, None]
    lse = tl.where(total > 0.0, top + tl.log(total), float("-inf"))
    out_rows = out_ptr + t * stride_ot + h[:, None] * stride_oh + d[None, :]
    tl.store(out_rows, round_to(out, out_ptr.dtype.element_ty, EMULATE_RTNE), mask=h_ok[:, None] & (d < D)[None, :])
    tl.store(lse_ptr + t * stride_rt + h * stride_rh, lse, mask=h_ok)


# --------------------------------------------------------------------------- host code


def merge_partials(part: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """``out [T, H, D]``, ``lse [T, H]`` from ``part [T, H, P, D]``, ``part_lse [T, H, P]`` (eq. 12).

    A program merges ``HB`` heads of one token, about 8 K partial elements. One program
    per (token, head) gave a decode batch of 256 requests × 32 heads 8,192 programs of a
    few kilobytes each: that merge took 24.6–26.4 µs on an H200, this one 4.9–9.7 µs
    (``benchmarks/results/shared_decode_h200.json``, its 256-request rows)."""
    t, h, p, d = part.shape
    if t == 0:
        return
    if part.stride(-1) != 1 or out.stride(-1) != 1 or part_lse.stride(-1) != 1:
        raise ValueError("merge needs the last dimension of its tensors contiguous")
    pp, dp = max(2, triton.next_power_of_2(p)), max(16, triton.next_power_of_2(d))
    hb = min(triton.next_power_of_2(h), max(1, 8192 // (pp * dp)))
    _merge_kernel[(t, triton.cdiv(h, hb))](
        part_ptr=part, part_lse_ptr=part_lse, out_ptr=out, lse_ptr=lse, H=h, P=p, D=d,
        stride_pt=part.stride(0), stride_ph=part.stride(1), stride_pp=part.stride(2),
        stride_lt=part_lse.stride(0), stride_lh=part_lse.stride(1),
        stride_ot=out.stride(0), stride_oh=out.stride(1),
        stride_rt=lse.stride(0), stride_rh=lse.stride(1),
        HB=hb, PP=pp, DP=dp,
        EMULATE_RTNE=emulate_rtne(out.dtype, out.device),
    )  # fmt: skip
