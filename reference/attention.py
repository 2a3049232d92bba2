"""Attention over a paged, shared KV cache with deferred positional encoding.

The definitions of the project. Each function here has a twin of the same name and
signature in ``lazyattention.fast``; a test enforces it.

Position convention (eq. 6): the cache stores keys rotated at their *stored*
positions (``apply_rope(k, stored_pos)``, eq. 5); every block of a request carries a
shift ``δ = logical − stored``. A query at logical position ``p`` is passed
*pre-RoPE*; the lazy functions rotate it by ``p − δ`` once per distinct shift
(eq. 8) and never touch the keys. By the relative identity (eq. 4) the scores equal
those of :func:`eager_attention`, which rotates the query at ``p`` and re-rotates
every cached key by ``δ`` (eq. 9). The raw-cache variant stores keys unrotated and
rotates them at their logical positions when attended (eq. 10).

Shape alphabet: ``B`` requests, ``H`` query heads, ``Hkv`` KV heads (``H % Hkv == 0``,
query head ``h`` reads KV head ``h // (H / Hkv)``), ``Tq`` query tokens of the batch,
``Tk`` key tokens of one request, ``D`` head dim, ``N`` physical blocks, ``S`` block size.

Arithmetic is float32 (float64 for float64 inputs); outputs are cast back to the
input dtype at the end, so the float64 run is the oracle. One rounding more in float16
and bfloat16: a query or key rotated here enters the score product rounded to the input
dtype, as a 16-bit model's RoPE returns it (docs/concepts/numerics.md says why).
"""

from __future__ import annotations

import math

import torch

from . import ATTENTION_API
from .checks import check_attention_inputs, check_write_inputs
from .layout import Layout, RequestLayout
from .rope import RopeConfig, apply_rope, rotate

__all__ = list(ATTENTION_API)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- cache write


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    rope: RopeConfig | None,
    *,
    validate: bool = True,
) -> None:
    """Write new tokens' keys and values into the paged cache, in place.

    Keys are rotated at ``positions`` first (eq. 5): the *stored* positions, which for
    a segment prefilled alone are ``0..L-1``. ``rope=None`` stores them unrotated
    (the raw-cache variant).

    Args:
        k: ``[T, Hkv, D]`` pre-RoPE keys.
        v: ``[T, Hkv, D]`` values.
        k_cache: ``[N, S, Hkv, D]`` (any strides), written at ``slots``.
        v_cache: ``[N, S, Hkv, D]`` (any strides), written at ``slots``.
        slots: ``[T]`` flat slot indices ``block * S + offset``, distinct.
        positions: ``[T]`` stored positions of the tokens.
        rope: the model's RoPE, or ``None`` for unrotated keys.
        validate: check the values of ``slots`` and ``positions`` (range, distinct
            slots). Shapes, dtypes and devices are checked either way. A caller that
            has checked them already (once per step, on the host) passes ``False``, so
            that no layer reads its device tensors back.
    """
    check_write_inputs(k, v, k_cache, v_cache, slots, positions, rope, validate)
    stored = apply_rope(k, positions, rope) if rope is not None else k
    block, offset = _block_offset(slots.long(), k_cache.shape[1])
    k_cache[block, offset] = stored
    v_cache[block, offset] = v


def _block_offset(slots: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot ``block * S + offset`` → ``(block, offset)``: indexing ``cache[block, offset]``
    works for a cache of any strides (a flattening ``view`` needs a contiguous one)."""
    return slots // block_size, slots % block_size


# --------------------------------------------------------------------------- one request


def _gather(req: RequestLayout, cache: torch.Tensor, block_size: int):
    """Concatenate a request's cached tokens (segments, then own tokens).

    Returns:
        ``tokens [Tk, Hkv, D]`` as stored, ``shift [Tk]`` (δ per token),
        ``pos [Tk]`` logical positions, ``is_own [Tk]`` bool.
    """
    parts, shifts, positions, own_flags = [], [], [], []
    for p, is_own in [*((seg, False) for seg in req.segments), (req.own, True)]:
        block, offset = _block_offset(p.slots(block_size).to(cache.device), block_size)
        parts.append(cache[block, offset])
        shifts.append(torch.full((p.length,), p.shift, dtype=torch.int64))
        positions.append(torch.arange(p.length, dtype=torch.int64) + p.start)
        own_flags.append(torch.full((p.length,), is_own))
    dev = cache.device
    return (
        torch.cat(parts),
        torch.cat(shifts).to(dev),
        torch.cat(positions).to(dev),
        torch.cat(own_flags).to(dev),
    )


def _visible(q_pos: torch.Tensor, k_pos: torch.Tensor, is_own: torch.Tensor) -> torch.Tensor:
    """Eq. (7): ``[Tq, Tk]`` — every segment token, and own tokens at or before the query."""
    return ~is_own[None, :] | (k_pos[None, :] <= q_pos[:, None])


def _expand_kv_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """GQA: ``[Tk, Hkv, D] -> [Tk, H, D]``, each KV head serving ``H / Hkv`` query heads."""
    return x.repeat_interleave(num_heads // x.shape[1], dim=1)


def _softmax_attention(scores: torch.Tensor, values: torch.Tensor, visible: torch.Tensor):
    """Masked softmax and weighted sum (eq. 11).

    Args:
        scores: ``[H, Tq, Tk]`` already scaled.
        values: ``[Tk, H, D]``.
        visible: ``[Tq, Tk]`` bool.

    Returns:
        ``out [Tq, H, D]`` and ``lse [Tq, H]`` (natural log).
    """
    scores = scores.masked_fill(~visible[None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [H, Tq]
    probs = torch.exp(scores - lse[..., None])
    out = torch.einsum("hqk,khd->qhd", probs, values)
    return out, lse.transpose(0, 1)


def _operand(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A rotated query or key as it enters the score product: rounded to the input
    ``dtype`` (a no-op for float32 and float64), as a 16-bit model's RoPE returns it
    and as a tensor-core product takes it (docs/concepts/numerics.md)."""
    return x.to(dtype).to(x.dtype)


def _lazy_scores(q, q_pos, keys, shift, rope, dtype):
    """Eq. (8): scores ``[H, Tq, Tk]`` with the query rotated by ``p − δ``, once per δ.

    ``q [Tq, H, D]`` pre-RoPE; ``keys [Tk, H, D]`` as stored.
    """
    scores = q.new_empty(q.shape[1], q.shape[0], keys.shape[0])
    for delta in torch.unique(shift).tolist():
        cols = shift == delta
        q_rot = _operand(apply_rope(q, q_pos - delta, rope), dtype)  # R(p − δ) q, eq. (8)
        scores[:, :, cols] = torch.einsum("qhd,khd->hqk", q_rot, keys[cols])
    return scores


def _attend_request(q, k_cache, v_cache, req, layout, rope, scale, keys_mode):
    """Attention of one request's queries ``[Tq, H, D]``; returns ``out, lse``."""
    dtype, cdt = q.dtype, compute_dtype(q.dtype)
    h = q.shape[1]
    q = q.to(cdt)
    q_pos = torch.arange(req.num_queries, device=q.device) + req.query_start
    stored, shift, k_pos, is_own = _gather(req, k_cache, layout.block_size)
    values, _, _, _ = _gather(req, v_cache, layout.block_size)
    keys = _expand_kv_heads(stored.to(cdt), h)
    values = _expand_kv_heads(values.to(cdt), h)
    if keys_mode == "lazy":
        scores = _lazy_scores(q, q_pos, keys, shift, rope, dtype)
    else:
        if keys_mode == "eager":
            keys = rotate(keys, shift, rope)  # R(δ) k_stored: keys at logical positions, eq. (9)
        else:
            keys = apply_rope(keys, k_pos, rope)  # raw cache: rotate at logical positions, eq. (10)
        q_rot = _operand(apply_rope(q, q_pos, rope), dtype)
        scores = torch.einsum("qhd,khd->hqk", q_rot, _operand(keys, dtype))
    return _softmax_attention(scores * scale, values, _visible(q_pos, k_pos, is_own))


def _attention(q, k_cache, v_cache, layout, rope, scale, return_lse, decode, keys_mode):
    check_attention_inputs(q, k_cache, v_cache, layout, rope, scale, decode)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    cu = [0]
    for req in layout.requests:
        cu.append(cu[-1] + req.num_queries)
    outs, lses = [], []
    for r, req in enumerate(layout.requests):
        out, lse = _attend_request(q[cu[r] : cu[r + 1]], k_cache, v_cache, req, layout, rope, scale, keys_mode)
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs).to(q.dtype)
    return (out, torch.cat(lses)) if return_lse else out


# --------------------------------------------------------------------------- public


def lazy_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: Layout,
    rope: RopeConfig,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Deferred-RoPE attention of a batch of requests' query tokens (eq. 8).

    The queries of request ``r`` are its last ``num_queries`` own tokens, at logical
    positions ``query_start .. query_start + num_queries − 1``; their own keys and
    values must already be in the cache (:func:`write_kv`).

    Args:
        q: ``[Tq, H, D]`` **pre-RoPE** queries, requests concatenated in layout order.
        k_cache: ``[N, S, Hkv, D]`` keys stored rotated at their stored positions.
        v_cache: ``[N, S, Hkv, D]``.
        layout: which blocks each request reads, at which shift.
        rope: the model's RoPE.
        scale: softmax scale; ``None`` means ``1/sqrt(D)``.
        return_lse: also return the log-sum-exp of the scaled scores.

    Returns:
        ``out [Tq, H, D]`` in ``q.dtype``; with ``return_lse``, also ``lse [Tq, H]``
        in the compute dtype (float32, or float64 for float64 inputs).
    """
    return _attention(q, k_cache, v_cache, layout, rope, scale, return_lse, decode=False, keys_mode="lazy")


def lazy_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: Layout,
    rope: RopeConfig,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Deferred-RoPE attention of one new token per request (eq. 8).

    Same as :func:`lazy_prefill` with ``num_queries == 1`` for every request: the
    query is the request's last own token, whose K/V is already in the cache.

    Args:
        q: ``[B, H, D]`` pre-RoPE queries, one per request.
        k_cache: ``[N, S, Hkv, D]``.
        v_cache: ``[N, S, Hkv, D]``.
        layout: every request with ``num_queries == 1``.
        rope: the model's RoPE.
        scale: softmax scale; ``None`` means ``1/sqrt(D)``.
        return_lse: also return ``lse [B, H]``.

    Returns:
        ``out [B, H, D]`` (and ``lse [B, H]``).
    """
    return _attention(q, k_cache, v_cache, layout, rope, scale, return_lse, decode=True, keys_mode="lazy")


def raw_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: Layout,
    rope: RopeConfig,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Raw-cache variant (eq. 10): the cache holds **unrotated** keys; each key is
    rotated at its logical position, the query at its own.

    Arguments and returns as :func:`lazy_prefill`, except that ``k_cache`` was written
    with ``write_kv(..., rope=None)``.
    """
    return _attention(q, k_cache, v_cache, layout, rope, scale, return_lse, decode=False, keys_mode="raw")


def raw_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: Layout,
    rope: RopeConfig,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Raw-cache variant of :func:`lazy_decode` (eq. 10): ``q [B, H, D]``, unrotated cache."""
    return _attention(q, k_cache, v_cache, layout, rope, scale, return_lse, decode=True, keys_mode="raw")


def eager_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: Layout,
    rope: RopeConfig,
    scale: float | None = None,
    return_lse: bool = False,
):
    """The definitional baseline (eq. 9): materialise every cached key at its logical
    position (re-rotate by ``δ``), rotate the query at its position, then ordinary
    masked softmax attention. This is what Block-Attention computes with a copy.

    Works for prefill (``q [Tq, H, D]``) and decode (``q [B, H, D]`` with one query
    per request, which is the same thing). Arguments and returns as
    :func:`lazy_prefill`.
    """
    return _attention(q, k_cache, v_cache, layout, rope, scale, return_lse, decode=False, keys_mode="eager")


def merge_attention(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
):
    """Combine attention over two disjoint key sets by their log-sum-exps (eq. 12).

    ``out = out_a·e^(lse_a − lse) + out_b·e^(lse_b − lse)`` with
    ``lse = log(e^lse_a + e^lse_b)``. A part that saw no key has ``lse = −inf`` and
    weight 0.

    Args:
        out_a: ``[T, H, D]``.
        lse_a: ``[T, H]``.
        out_b: ``[T, H, D]``.
        lse_b: ``[T, H]``.

    Returns:
        ``out [T, H, D]`` in ``out_a.dtype`` and ``lse [T, H]``.
    """
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape or out_a.shape[:2] != lse_a.shape:
        raise ValueError(
            f"merge_attention needs out [T, H, D] and lse [T, H] pairs of equal shapes, got "
            f"{tuple(out_a.shape)}, {tuple(lse_a.shape)}, {tuple(out_b.shape)}, {tuple(lse_b.shape)}"
        )
    cdt = compute_dtype(out_a.dtype)
    lse_a, lse_b = lse_a.to(cdt), lse_b.to(cdt)
    lse = torch.logaddexp(lse_a, lse_b)
    wa = torch.exp(lse_a - lse).nan_to_num(0.0)[..., None]
    wb = torch.exp(lse_b - lse).nan_to_num(0.0)[..., None]
    out = out_a.to(cdt) * wa + out_b.to(cdt) * wb
    return out.to(out_a.dtype), lse
