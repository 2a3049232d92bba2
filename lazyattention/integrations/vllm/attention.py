"""One step of the backend's attention, free of vLLM: metadata, cache write, attention.

:class:`~.backend.LazyAttentionImpl` is vLLM's glue around :func:`paged_attention`;
this module imports no vLLM, so the main test suite runs it with both kernel modules
(``lazyattention.reference``, and ``lazyattention.fast`` under the Triton interpreter),
on the layouts :meth:`~.plan.RequestPlan.step_layouts` makes.

Position convention: vLLM's model rotated q and k at their *sequence* positions
(``positions``). Own tokens are stored as rotated (their stored position is their
sequence position); a document's keys are turned by ``key_rotation = −vllm_start`` to
their local positions. The query is un-rotated to its pre-RoPE value; ``lazy_prefill``
rotates it by ``p − δ`` per block (eq. 8).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from lazyattention.reference import Layout, RopeConfig, rotate

from .plan import StepPiece

__all__ = ["LazyMetadata", "build_metadata", "unrope", "split_kv_cache", "paged_attention"]


@dataclass
class LazyMetadata:
    """One step's attention metadata, shared by every layer.

    ``layout``'s queries are the step's first ``num_tokens`` tokens, in order.
    """

    layout: Layout
    num_tokens: int
    positions: torch.Tensor  # [T] int64: sequence positions (where vLLM rotated q and k)
    key_rotation: torch.Tensor  # [T] int64: added to each written key's rotation
    rotate_keys: bool  # any key_rotation != 0
    slot_mapping: torch.Tensor  # [T] flat slots block * S + offset


def build_metadata(pieces: list[StepPiece], block_size: int, slot_mapping: torch.Tensor, device) -> LazyMetadata:
    """Assemble a step's :class:`LazyMetadata` from its pieces (in query order).

    The per-block tensors (:class:`~lazyattention.reference.BlockMetadata`) are built on
    the host and moved to ``device`` once here, not per layer.
    """
    layout = Layout([p.layout for p in pieces], block_size=block_size)
    positions, rotation = [], []
    for p in pieces:
        n = p.layout.num_queries
        positions.append(torch.arange(p.first_position, p.first_position + n, dtype=torch.int64))
        rotation.append(torch.full((n,), p.key_rotation, dtype=torch.int64))
    layout.metadata(device)
    num_tokens = layout.num_queries
    return LazyMetadata(
        layout=layout,
        num_tokens=num_tokens,
        positions=torch.cat(positions).to(device),
        key_rotation=torch.cat(rotation).to(device),
        rotate_keys=any(p.key_rotation != 0 for p in pieces),
        slot_mapping=slot_mapping[:num_tokens],
    )


def unrope(x: torch.Tensor, positions: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Invert :func:`~lazyattention.reference.apply_rope`: ``x`` was rotated at
    ``positions`` (and its rotary channels scaled by the YaRN factor, if any).

    ``x [T, H, D]``; returns the pre-RoPE tensor in ``x.dtype``.
    """
    out = rotate(x, positions, rope, conjugate=True)
    m = rope.attention_scaling
    if m == 1.0:
        return out
    r = rope.rotary_dim
    return torch.cat([out[..., :r] / m, out[..., r:]], dim=-1)


def split_kv_cache(kv_cache: torch.Tensor, head_size: int):
    """A layer's cache, vLLM's logical ``[N, Hkv, S, 2D]`` (K and V packed in the last
    dimension) in any physical layout, as key and value views ``[N, S, Hkv, D]``
    (strided, no copy)."""
    if kv_cache.dim() != 4 or kv_cache.shape[-1] != 2 * head_size:
        raise ValueError(
            f"the KV cache must be vLLM's packed [num_blocks, num_kv_heads, block_size, 2 * {head_size}], "
            f"got shape {tuple(kv_cache.shape)}"
        )
    if kv_cache.stride(-1) != 1:
        raise ValueError(f"the KV cache's last dimension must be contiguous, got strides {kv_cache.stride()}")
    by_slot = kv_cache.permute(0, 2, 1, 3)  # [N, S, Hkv, 2D]
    return by_slot[..., :head_size], by_slot[..., head_size:]


def paged_attention(
    kernels: ModuleType,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: LazyMetadata,
    rope: RopeConfig,
    scale: float,
) -> torch.Tensor:
    """Write the step's keys and values, then attend (eq. 8).

    Args:
        kernels: a backend's attention module (``lazyattention.sdpa``,
            ``lazyattention.reference`` or ``lazyattention.fast``).
        query: ``[T', H, D]`` rotated at ``meta.positions`` (``T' >= T`` rows; padding ignored).
        key: ``[T', Hkv, D]`` rotated at ``meta.positions``.
        value: ``[T', Hkv, D]``.
        kv_cache: one layer's cache, logical ``[N, Hkv, S, 2D]``, in any of vLLM's
            physical layouts (:func:`split_kv_cache`).
        meta: the step's metadata.
        rope: the model's RoPE.
        scale: softmax scale.

    Returns:
        ``[T, H, D]`` attention output of the step's ``T = meta.num_tokens`` queries.
    """
    T = meta.num_tokens
    head_size = query.shape[-1]
    k_cache, v_cache = split_kv_cache(kv_cache, head_size)
    k = key[:T]
    if meta.rotate_keys:  # a document's keys, from their sequence positions to their local ones
        k = rotate(k, meta.key_rotation, rope)
    block_size = k_cache.shape[1]
    slots = meta.slot_mapping.long()
    blocks, offsets = slots // block_size, slots % block_size  # indexed, not viewed: any strides
    k_cache[blocks, offsets] = k.to(k_cache.dtype)
    v_cache[blocks, offsets] = value[:T].to(v_cache.dtype)
    q = unrope(query[:T], meta.positions, rope)
    return kernels.lazy_prefill(q, k_cache, v_cache, meta.layout, rope, scale)
