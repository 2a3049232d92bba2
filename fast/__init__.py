"""``lazyattention.fast``: the Triton kernels behind the reference's attention API.

The same functions, names and signatures as :mod:`lazyattention.reference`'s attention
API (``ATTENTION_API``), so the module is the switch::

    import lazyattention.fast as la        # or lazyattention.reference

CUDA tensors run compiled kernels; CPU tensors run the same kernels under the Triton
interpreter (``TRITON_INTERPRET=1`` set before Triton is imported), which is how the
tests run without a GPU. Unsupported cases (float64, other devices) raise and name
the case; nothing falls back to the reference.
"""

try:
    import triton  # noqa: F401  (the kernels below need it; say how to get it)
except ImportError as exc:
    raise ImportError("lazyattention.fast needs Triton: pip install lazyattention[fast]") from exc

from .attention import (
    eager_attention,
    lazy_decode,
    lazy_prefill,
    merge_attention,
    raw_decode,
    raw_prefill,
    write_kv,
)

__all__ = [
    "write_kv",
    "lazy_prefill",
    "lazy_decode",
    "raw_prefill",
    "raw_decode",
    "eager_attention",
    "merge_attention",
]
