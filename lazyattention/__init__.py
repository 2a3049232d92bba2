"""lazyattention: deferred positional encoding for KV-cache reuse.

The names a user starts from, each imported on first use (``import lazyattention``
itself imports neither torch nor transformers nor Triton)::

    import lazyattention as la

    rag = la.LazyRAG(model, tokenizer)             # a stock Hugging Face model
    out = rag.answer("Who runs the lab?", ["The lab is in Oslo.", "Ada runs it."])

* with Hugging Face transformers (``pip install 'lazyattention[transformers]'``):
  :class:`LazyRAG`, :class:`Sampling`, :class:`Answer`, :class:`RAGRequest`,
  :func:`full_attention`, :func:`load_pretrained`;
* the project's own model and engine: :func:`load_model`, :func:`load_tokenizer`,
  :class:`Engine`;
* the attention functions: ``lazyattention.reference`` (pure PyTorch, the definition)
  and ``lazyattention.fast`` (Triton kernels), one API; the module is the switch.
"""

import importlib

__version__ = "0.1.0"

#: Each public name and the module that defines it.
_HOMES = {
    "LazyRAG": "lazyattention.integrations.transformers",
    "Sampling": "lazyattention.integrations.transformers",
    "Answer": "lazyattention.integrations.transformers",
    "RAGRequest": "lazyattention.integrations.transformers",
    "full_attention": "lazyattention.integrations.transformers",
    "load_pretrained": "lazyattention.integrations.transformers",
    "Engine": "lazyattention.serving.engine",
    "load_model": "lazyattention.serving.loading",
    "load_tokenizer": "lazyattention.serving.loading",
}

#: Submodules reachable as attributes (``lazyattention.fast`` imports Triton when first used).
_MODULES = ("reference", "fast")

__all__ = [*_HOMES, *_MODULES, "__version__"]


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
    elif name in _MODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
