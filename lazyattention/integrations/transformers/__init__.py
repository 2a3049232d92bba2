"""``lazyattention.integrations.transformers``: deferred RoPE inside Hugging Face transformers.

A stock ``LlamaForCausalLM``, ``MistralForCausalLM`` or ``Qwen2ForCausalLM`` serves RAG
requests with each document's KV cached once and reused at any offset, zero copy:

* :func:`register` puts the attention implementation ``"lazyattention"`` (and its mask
  function) into transformers' ``AttentionInterface``;
* :class:`PagedCache`, a transformers ``Cache``, writes K/V into the project's paged
  segment store;
* :class:`LazyRAG` is the user API: documents and a question in, text out;
* :mod:`~lazyattention.integrations.transformers.pretrained` gives the embedded
  pretrained model (``python -m lazyattention.integrations.transformers.pretrained``
  prepares it once).

Install with ``pip install 'lazyattention[transformers]'``. Why the model runs at
``position_ids = 0`` (the exact, cheapest way to hand the kernels pre-RoPE queries) is
explained in :mod:`lazyattention.integrations.transformers.attention`.
"""

from .attention import (
    ATTENTION_NAME,
    STEP_KWARG,
    Step,
    attention_implementation,
    paged_attention,
    paged_attention_mask,
    register,
)
from .baselines import block_diagonal, block_diagonal_mask, full_attention
from .cache import PagedCache
from .rag import STRATEGIES, Answer, LazyRAG, Request, RequestStats, Sampling, chat_parts, eos_token_ids
from .support import SUPPORTED_MODEL_TYPES, ModelSupport, UnsupportedModel, check_model

__all__ = [
    "ATTENTION_NAME",
    "STEP_KWARG",
    "Step",
    "paged_attention",
    "paged_attention_mask",
    "register",
    "PagedCache",
    "LazyRAG",
    "Request",
    "Sampling",
    "Answer",
    "RequestStats",
    "STRATEGIES",
    "chat_parts",
    "eos_token_ids",
    "block_diagonal",
    "block_diagonal_mask",
    "full_attention",
    "attention_implementation",
    "SUPPORTED_MODEL_TYPES",
    "ModelSupport",
    "UnsupportedModel",
    "check_model",
]
