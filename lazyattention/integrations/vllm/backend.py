"""The attention backends: deferred RoPE over vLLM's paged cache, one builder for both.

* :class:`LazyMetadataBuilder` runs once per step (per KV-cache group). For each row
  of the batch it reads the request's plan (written by the scheduler, found through
  the runner the plugin's worker binds) and turns it, with vLLM's block table, into
  the project's :class:`~lazyattention.reference.Layout`: one
  :class:`~lazyattention.reference.RequestLayout` per document being prefilled in the
  step and one for the request's own tokens, each block with its shift and valid
  length. Rows without a plan are ordinary causal attention.
* :class:`LazyAttentionImpl` runs per layer. vLLM's ``LlamaAttention`` hands it q and k
  rotated at their sequence positions. It writes k and v to the cache (a document's
  keys turned to their local positions first, so the document is stored as if
  prefilled alone at 0), un-rotates q to its pre-RoPE value, and calls the project's
  ``lazy_prefill`` on the layout: the query is rotated by ``p − δ`` once per shift,
  the keys never again (eq. 8).
* :class:`LazyCPUBackend` calls ``lazyattention.sdpa`` (vectorised PyTorch; registered over
  ``CPU_ATTN``); :class:`LazyTritonBackend` calls ``lazyattention.fast`` (Triton;
  registered as ``CUSTOM`` on CUDA). The two differ only by that module.

KV layout: every attention backend of vLLM 0.32 sees a layer's cache as the logical
``[num_blocks, num_kv_heads, block_size, 2 * head_size]``, K and V packed in the last
dimension, in one of the physical layouts vLLM negotiates (``KVCacheLayout``; CUDA's
FlashAttention and Triton backends accept any and vLLM's default is ``LBNHC``). The
key and value halves are read as ``[N, S, Hkv, D]`` strided views of it: the project's
layout, in place, whatever the physical order (no copy, no conversion of the cache).
So these backends, like vLLM's CUDA ones, declare no layout of their own.
"""

from __future__ import annotations

from types import ModuleType
from typing import ClassVar

import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_layout import KVCacheLayout

from lazyattention.backends import get_backend

from .attention import LazyMetadata, build_metadata, paged_attention
from .model import model_rope
from .plan import RequestPlan, plain_layout
from .request import PLAN_FIELD

__all__ = [
    "LazyMetadataBuilder",
    "LazyAttentionImpl",
    "LazyTritonImpl",
    "LazyCPUBackend",
    "LazyTritonBackend",
]


class LazyMetadataBuilder(AttentionMetadataBuilder[LazyMetadata]):
    """Per-step :class:`LazyMetadata` from vLLM's batch and the requests' plans."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size
        self.runner = None  # bound by the plugin's worker; without it every row is plain

    def bind(self, runner) -> None:
        """Give the builder the model runner, whose request states hold the plans."""
        self.runner = runner

    def _plans(self, num_reqs: int) -> list[RequestPlan | None]:
        if self.runner is None:
            return [None] * num_reqs
        plans = []
        for req_id in self.runner.input_batch.req_ids[:num_reqs]:
            params = self.runner.requests[req_id].sampling_params
            extra = params.extra_args if params is not None else None
            plans.append(RequestPlan.from_dict(extra[PLAN_FIELD]) if extra and PLAN_FIELD in extra else None)
        return plans

    def _block_table(self, common: CommonAttentionMetadata):
        if self.runner is not None:
            return self.runner.input_batch.block_table[0].get_numpy_array()
        return common.block_table_tensor.cpu().numpy()

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False):
        common = common_attn_metadata
        num_reqs = common.num_reqs
        starts = common.query_start_loc_cpu[: num_reqs + 1].tolist()
        seq_lens = common.seq_lens_cpu_upper_bound[:num_reqs].tolist()
        table = self._block_table(common)
        pieces = []
        for r, plan in enumerate(self._plans(num_reqs)):
            num_scheduled = starts[r + 1] - starts[r]
            if num_scheduled == 0:
                continue
            num_computed = seq_lens[r] - num_scheduled
            if plan is None:
                pieces.append(plain_layout(num_computed, num_scheduled, table[r], self.block_size))
            else:
                pieces.extend(plan.step_layouts(num_computed, num_scheduled, table[r]))
        meta = build_metadata(pieces, self.block_size, common.slot_mapping, self.device)
        if meta.num_tokens != starts[num_reqs]:
            raise RuntimeError(f"the plans cover {meta.num_tokens} of the step's {starts[num_reqs]} tokens")
        return meta


class LazyAttentionImpl(AttentionImpl[LazyMetadata]):
    """Deferred-RoPE attention; ``kernels`` is the module whose ``lazy_prefill`` runs: on
    the CPU the vectorised PyTorch backend (``"sdpa"``, property-tested against the
    reference like every backend)."""

    kernels: ClassVar[ModuleType] = get_backend("sdpa").ops

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
    ) -> None:
        unsupported = {
            "alibi_slopes": alibi_slopes,
            "sliding_window": sliding_window,
            "logits_soft_cap": logits_soft_cap or None,
            "kv_sharing_target_layer_name": kv_sharing_target_layer_name,
            "sinks": sinks,
        }
        for name, value in unsupported.items():
            if value is not None:
                raise NotImplementedError(f"lazyattention's vLLM backend does not support {name}={value!r}")
        if attn_type != AttentionType.DECODER:
            raise NotImplementedError(f"lazyattention's vLLM backend serves decoder attention, not {attn_type}")
        if kv_cache_dtype != "auto":
            raise NotImplementedError(f"the lazyattention backend needs kv_cache_dtype 'auto', got {kv_cache_dtype!r}")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.rope = model_rope(get_current_vllm_config().model_config.hf_config.to_dict())
        if self.rope.head_dim != head_size:
            raise NotImplementedError(f"RoPE head dim {self.rope.head_dim} != attention head size {head_size}")

    def forward(
        self,
        layer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: LazyMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("lazyattention's vLLM backend does not fuse output quantization")
        if attn_metadata is None:  # profiling and warm-up runs
            return output
        T = attn_metadata.num_tokens
        out = paged_attention(self.kernels, query, key, value, kv_cache, attn_metadata, self.rope, self.scale)
        output[:T] = out
        return output


class LazyTritonImpl(LazyAttentionImpl):
    """:class:`LazyAttentionImpl` with ``lazyattention.fast``'s Triton kernels."""

    @property
    def kernels(self) -> ModuleType:  # imported on first use: importing Triton is not free
        return get_backend("fast").ops


class _LazyBackendBase(AttentionBackend):
    forward_includes_kv_cache_update: bool = True  # the impl writes: a document's keys are turned first
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [32, 64, 80, 96, 112, 128, 160, 192, 224, 256]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...] | None:
        return None  # any: the cache is read through strided views (module docstring)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @staticmethod
    def get_builder_cls() -> type[LazyMetadataBuilder]:
        return LazyMetadataBuilder


class LazyCPUBackend(_LazyBackendBase):
    """Vectorised PyTorch (``lazyattention.sdpa``); vLLM picks it on CPU as ``CPU_ATTN``."""

    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"

    @staticmethod
    def get_impl_cls() -> type[LazyAttentionImpl]:
        return LazyAttentionImpl


class LazyTritonBackend(_LazyBackendBase):
    """Triton (``lazyattention.fast``); chosen on CUDA with ``--attention-backend CUSTOM``."""

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[LazyTritonImpl]:
        return LazyTritonImpl
