"""Where the fast path allocates its outputs and scratch buffers.

Every kernel launcher takes its outputs from :func:`empty`, looked up at call time, so a
test can swap it for an allocator that fills buffers with NaN and so prove that every
element a caller reads was written by a kernel (the "poisoned outputs" check).
"""

from __future__ import annotations

import torch

__all__ = ["empty"]


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor: ``torch.empty(shape, dtype=dtype, device=device)``."""
    return torch.empty(shape, dtype=dtype, device=device)
