"""``lazyattention.integrations.transformers``: deferred RoPE inside Hugging Face transformers.

A stock ``LlamaForCausalLM``, ``MistralForCausalLM`` or ``Qwen2ForCausalLM`` serves RAG
requests with each document's KV cached once and reused at any offset, zero copy.
This package's names are the user API:

* :class:`LazyRAG`: documents and a question in, text out (:meth:`LazyRAG.answer`), many
  requests together (:meth:`LazyRAG.answer_batch`), token ids in
  (:meth:`LazyRAG.generate` with a :class:`RAGRequest`);
* :class:`Sampling`: the decoding options; :class:`Answer` and :class:`RequestStats`:
  what comes back;
* :func:`full_attention` and :func:`block_diagonal`: the same request run by
  transformers itself, for comparison;
* :func:`check_model` and :class:`UnsupportedModel`: whether a model can be served, and why not;
* :func:`load_pretrained`: a local checkpoint folder, or the embedded SmolLM2.

The machinery lives in the submodules: :mod:`~lazyattention.integrations.transformers.attention`
(the registered attention implementation, and why the model runs at ``position_ids = 0``),
:mod:`~lazyattention.integrations.transformers.cache` (``PagedCache``, a transformers
``Cache`` over the project's paged segment store) and
:mod:`~lazyattention.integrations.transformers.support`.

Install with ``pip install 'lazyattention[transformers]'``.
"""

import importlib.util

if importlib.util.find_spec("transformers") is None:
    raise ModuleNotFoundError(
        "lazyattention.integrations.transformers needs Hugging Face transformers, which is not installed: "
        "pip install 'lazyattention[transformers]'",
        name="transformers",
    )

from .baselines import block_diagonal, full_attention
from .pretrained import load_pretrained
from .rag import Answer, LazyRAG, RAGRequest, RequestStats, Sampling
from .support import UnsupportedModel, check_model

__all__ = [
    "LazyRAG",
    "RAGRequest",
    "Sampling",
    "Answer",
    "RequestStats",
    "full_attention",
    "block_diagonal",
    "check_model",
    "UnsupportedModel",
    "load_pretrained",
]
