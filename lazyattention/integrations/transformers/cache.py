"""A transformers ``Cache`` whose memory is the project's paged, shared KV store.

:class:`PagedCache` owns a :class:`~lazyattention.reference.BlockPool`, a
:class:`~lazyattention.reference.SegmentStore` (documents by content hash,
reference-counted, LRU-evicted) and the K/V tensors of a
:class:`~lazyattention.reference.PagedKVCache`. Its :meth:`PagedCache.update` runs in
every layer right before attention: it writes the step's new keys and values with the
backend's ``write_kv`` at the step's slots (keys rotated at the step's stored
positions) and hands the layer's whole paged ``[N, S, Hkv, D]`` tensors to the
attention, which reads them through the step's layout. Nothing is ever copied, except
by :meth:`PagedCache.copy_rerotated`, which is the Block-Attention baseline.

Shape alphabet: ``T`` new tokens, ``Hkv`` KV heads, ``D`` head dim, ``N`` blocks,
``S`` block size, ``L`` segment length.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from lazyattention.reference import BlockPool, PagedKVCache, RopeConfig, Segment, SegmentStore, rotate

from .attention import step_of

__all__ = ["PagedCache"]


class _PagedLayer(CacheLayerMixin):
    """One layer's view of a :class:`PagedCache`; holds no tensors of its own.

    transformers asks layers for sequence lengths to size masks and positions; the
    integration passes ``position_ids`` and builds no mask, so the answers here are the
    neutral ones (nothing before the step's tokens).
    """

    is_sliding = False

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("PagedCache writes through PagedCache.update, never through a layer")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1


class PagedCache(Cache):
    """The paged KV store of a model, as a transformers ``Cache``.

    Args:
        num_layers: decoder layers of the model.
        num_kv_heads: ``Hkv``.
        head_dim: ``D``.
        num_blocks: ``N`` physical blocks.
        block_size: ``S`` tokens per block.
        dtype: the K/V dtype (the model's).
        device: where the K/V live (the model's device).
        scratch_blocks: blocks after the pool that no request owns (:attr:`scratch`),
            where a CUDA graph's padding tokens write (see
            :mod:`~lazyattention.integrations.transformers.graphs`).
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        scratch_blocks: int = 0,
    ):
        super().__init__(layers=[_PagedLayer() for _ in range(num_layers)])
        self.pool = BlockPool(num_blocks)
        self.store = SegmentStore(self.pool, block_size)
        blocks = num_blocks + scratch_blocks
        self.kv = PagedKVCache(num_layers, blocks, block_size, num_kv_heads, head_dim, dtype, device)
        self.block_size = block_size
        self.scratch = tuple(range(num_blocks, num_blocks + scratch_blocks))

    @classmethod
    def for_model(cls, model, num_blocks: int, block_size: int, scratch_blocks: int = 0) -> PagedCache:
        """A cache shaped for ``model`` (its config, dtype and device)."""
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            config.num_hidden_layers,
            config.num_key_value_heads,
            head_dim,
            num_blocks,
            block_size,
            model.dtype,
            model.device,
            scratch_blocks,
        )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write the step's new K/V into the paged cache; return the layer's paged tensors.

        Args:
            key_states: ``[1, Hkv, T, D]`` keys, pre-RoPE (the model ran at position 0).
            value_states: ``[1, Hkv, T, D]``.
            layer_idx: the layer.
            **kwargs: transformers passes the forward's keywords as ``kwargs=``; the
                :class:`~lazyattention.integrations.transformers.attention.Step` is among them.

        Returns:
            ``(k_cache, v_cache)``, each ``[N, S, Hkv, D]``: what the attention reads.
        """
        step = step_of(kwargs.get("kwargs", kwargs))
        k = key_states[0].transpose(0, 1).contiguous()  # [T, Hkv, D]
        v = value_states[0].transpose(0, 1).contiguous()
        k_cache, v_cache = self.kv.k[layer_idx], self.kv.v[layer_idx]
        # Every layer writes the step's same slots and positions: their values (a host
        # synchronisation on a GPU) are checked once, in the first layer.
        validate = step.validate and layer_idx == 0
        step.ops.write_kv(k, v, k_cache, v_cache, step.slots, step.positions, step.rope, validate=validate)
        return k_cache, v_cache

    # ---------------------------------------------------------------- slots and copies

    def slots(self, blocks, first: int, last: int) -> torch.Tensor:
        """``[last − first]`` flat slots of tokens ``first..last−1`` of a run in ``blocks`` (host)."""
        j = torch.arange(first, last, dtype=torch.int64)
        b = torch.tensor(list(blocks), dtype=torch.int64)
        return b[j // self.block_size] * self.block_size + j % self.block_size

    def copy_rerotated(self, seg: Segment, shift: int, rope: RopeConfig) -> tuple[list[int], int]:
        """Block-Attention's per-request copy: the segment's K/V into fresh blocks, keys
        re-rotated by ``R(δ)`` (eq. 9), so they sit at their logical positions.

        Returns:
            ``(blocks, bytes_copied)``; the caller releases the blocks with ``pool.release``.
        """
        blocks = self.store.allocate(len(seg.blocks))
        device = self.kv.k[0].device
        src = self.slots(seg.blocks, 0, seg.length).to(device)
        dst = self.slots(blocks, 0, seg.length).to(device)
        copied = 0
        for k_cache, v_cache in zip(self.kv.k, self.kv.v, strict=True):
            flat_k = k_cache.view(-1, *k_cache.shape[2:])
            flat_v = v_cache.view(-1, *v_cache.shape[2:])
            flat_k[dst] = rotate(flat_k[src], shift, rope)
            flat_v[dst] = flat_v[src]
            copied += 2 * seg.length * flat_k[0].numel() * flat_k.element_size()
        return blocks, copied

    @property
    def bytes_per_block(self) -> int:
        return self.kv.bytes_per_block
