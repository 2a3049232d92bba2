"""``lazyattention.reference``: the readable PyTorch definition of deferred positional encoding.

Runs on any device PyTorch runs on, never imports Triton. The attention functions
(:data:`ATTENTION_API`) have twins of the same names and signatures in
``lazyattention.fast``: swap the module to swap the backend.
"""

# ruff: noqa: E402, F401  (re-exports, after ATTENTION_API, which attention.py reads while this file runs)

#: The attention API that ``lazyattention.fast`` mirrors name for name: the one list of
#: these names (``attention.py`` and ``lazyattention.fast`` build their ``__all__`` from
#: it), defined before the imports so that ``attention.py`` can read it.
ATTENTION_API = (
    "write_kv",
    "lazy_prefill",
    "lazy_decode",
    "raw_prefill",
    "raw_decode",
    "eager_attention",
    "merge_attention",
)

from .attention import (
    eager_attention,
    lazy_decode,
    lazy_prefill,
    merge_attention,
    raw_decode,
    raw_prefill,
    write_kv,
)
from .cache import BlockPool, CacheError, OutOfBlocks, PagedKVCache, Segment, SegmentStore, content_key
from .layout import BlockMetadata, Layout, Placement, RequestLayout, ceil_div
from .rope import (
    MAX_POSITION,
    LinearScaling,
    Llama3Scaling,
    NoScaling,
    RopeConfig,
    YarnScaling,
    apply_rope,
    inverse_frequencies,
    rope_angles,
    rotate,
)
from .tolerance import assert_close

__all__ = [
    *ATTENTION_API,
    "ATTENTION_API",
    "BlockMetadata",
    "BlockPool",
    "CacheError",
    "Layout",
    "LinearScaling",
    "Llama3Scaling",
    "MAX_POSITION",
    "NoScaling",
    "OutOfBlocks",
    "PagedKVCache",
    "Placement",
    "RequestLayout",
    "RopeConfig",
    "Segment",
    "SegmentStore",
    "YarnScaling",
    "apply_rope",
    "assert_close",
    "ceil_div",
    "content_key",
    "inverse_frequencies",
    "rope_angles",
    "rotate",
]
