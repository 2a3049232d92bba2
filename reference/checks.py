"""Input validation shared by every attention implementation.

Both ``lazyattention.reference`` and ``lazyattention.fast`` call these before any
arithmetic, so a bad call fails the same way, with a message naming the problem,
whichever backend is chosen.
"""

from __future__ import annotations

import torch

from .layout import Layout
from .rope import MAX_POSITION, RopeConfig

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_attention_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: Layout,
    rope: RopeConfig,
    scale: float | None,
    decode: bool,
) -> None:
    """Raise ``TypeError``/``ValueError`` for any inconsistency between the inputs.

    Shapes: ``q [Tq, H, D]`` (``[B, H, D]`` for decode), ``k_cache`` and ``v_cache``
    ``[N, S, Hkv, D]``.
    """
    if not isinstance(layout, Layout):
        raise TypeError(f"layout must be a Layout, got {type(layout).__name__}")
    if not isinstance(rope, RopeConfig):
        raise TypeError(f"rope must be a RopeConfig, got {type(rope).__name__}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has unsupported dtype {t.dtype}; supported: fp16, bf16, fp32, fp64")
    if q.dim() != 3:
        raise ValueError(f"q must be [{'B' if decode else 'Tq'}, H, D], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be [N, S, Hkv, D], got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} != k_cache shape {tuple(k_cache.shape)}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise TypeError(f"dtype mismatch: q {q.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype}")
    if not (q.device == k_cache.device == v_cache.device):
        raise ValueError(f"device mismatch: q {q.device}, k_cache {k_cache.device}, v_cache {v_cache.device}")
    n_blocks, block_size, hkv, d = k_cache.shape
    h = q.shape[1]
    if q.shape[2] != d:
        raise ValueError(f"head dim mismatch: q has D={q.shape[2]}, cache has D={d}")
    if rope.head_dim != d:
        raise ValueError(f"rope.head_dim={rope.head_dim} but the tensors have D={d}")
    if hkv == 0 or h % hkv:
        raise ValueError(f"query heads H={h} must be a multiple of KV heads Hkv={hkv}")
    if block_size != layout.block_size:
        raise ValueError(f"cache block size {block_size} != layout block size {layout.block_size}")
    expected = layout.batch_size if decode else layout.num_queries
    if q.shape[0] != expected:
        what = "requests in the layout (decode: one query each)" if decode else "query tokens in the layout"
        raise ValueError(f"q has {q.shape[0]} rows but there are {expected} {what}")
    if decode:
        many = [r for r, req in enumerate(layout.requests) if req.num_queries != 1]
        if many:
            raise ValueError(f"decode takes one query per request; requests {many} have more")
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")
    layout.check_cache(n_blocks)


def check_write_inputs(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    rope: RopeConfig | None,
    validate: bool = True,
) -> None:
    """Validate a cache write: ``k, v [T, Hkv, D]``, ``slots, positions [T]`` integers.

    Shapes, dtypes and devices are always checked. With ``validate``, the values of
    ``slots`` and ``positions`` are checked too (:func:`check_write_values`), which
    reads them: on a GPU that is a host synchronisation.
    """
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"k and v must both be [T, Hkv, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"caches must be [N, S, Hkv, D] and equal, got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(
            f"k is [T, {k.shape[1]}, {k.shape[2]}] but the cache holds [.., {k_cache.shape[2]}, {k_cache.shape[3]}]"
        )
    if k.dtype != k_cache.dtype or v.dtype != v_cache.dtype:
        raise TypeError(f"dtype mismatch: k {k.dtype} / cache {k_cache.dtype}, v {v.dtype} / cache {v_cache.dtype}")
    if len({t.device for t in (k, v, k_cache, v_cache, slots, positions)}) != 1:
        raise ValueError("k, v, caches, slots and positions must be on one device")
    for name, t in (("slots", slots), ("positions", positions)):
        if t.dtype not in (torch.int32, torch.int64) or t.shape != (k.shape[0],):
            raise ValueError(
                f"{name} must be an int32/int64 tensor of shape [{k.shape[0]}], got {t.dtype} {tuple(t.shape)}"
            )
    if rope is not None and rope.head_dim != k.shape[2]:
        raise ValueError(f"rope.head_dim={rope.head_dim} but k has D={k.shape[2]}")
    if validate:
        check_write_values(slots, positions, capacity=k_cache.shape[0] * k_cache.shape[1])


def check_write_values(slots: torch.Tensor, positions: torch.Tensor, capacity: int) -> None:
    """Raise ``ValueError`` unless ``slots [T]`` are distinct and in ``[0, capacity)`` and
    ``positions [T]`` lie in ``[0, MAX_POSITION)``."""
    if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= capacity):
        raise ValueError(f"slots must lie in [0, {capacity}), got range [{int(slots.min())}, {int(slots.max())}]")
    if slots.numel() != torch.unique(slots).numel():
        raise ValueError("slots must be distinct: two tokens written to one slot")
    if positions.numel() and not (int(positions.min()) >= 0 and int(positions.max()) < MAX_POSITION):
        raise ValueError(
            f"positions must lie in [0, {MAX_POSITION}), got range [{int(positions.min())}, {int(positions.max())}]"
        )
