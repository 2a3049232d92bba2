"""``lazyattention.fast``: the Triton kernels behind the reference's attention API.

The same functions, names and signatures as :mod:`lazyattention.reference`'s attention
API (:data:`~lazyattention.reference.ATTENTION_API`, the one list of their names), so
the module is the switch::

    import lazyattention.fast as la        # or lazyattention.reference

CUDA tensors run compiled kernels; CPU tensors run the same kernels under the Triton
interpreter (``TRITON_INTERPRET=1`` set before Triton is imported), which is how the
tests run without a GPU. Unsupported cases (float64, other devices) raise and name
the case; nothing falls back to the reference.

Beyond that API, :mod:`lazyattention.fast.shared` reads a segment that many requests of a
decode batch share once for all of them (``plan_sharing``, ``shared_decode``): a caller
opts in per step, since ``lazy_decode`` keeps one data-independent path for CUDA graphs.
"""

# ruff: noqa: F401  (re-exports: __all__ is the reference's name list)

try:
    import triton  # the kernels below need it; say how to get it
except ImportError as exc:
    raise ImportError("lazyattention.fast needs Triton: pip install lazyattention[fast]") from exc

from lazyattention.reference import ATTENTION_API

from .attention import (
    eager_attention,
    lazy_decode,
    lazy_prefill,
    merge_attention,
    raw_decode,
    raw_prefill,
    write_kv,
)

__all__ = list(ATTENTION_API)
