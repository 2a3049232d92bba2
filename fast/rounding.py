"""Rounding of kernel results to their storage dtype.

Compiled Triton rounds float32 → bfloat16 to nearest-even. The Triton interpreter
truncates instead (upstream behaviour of its bfloat16 cast), which doubles the rounding
error of every bfloat16 result the CPU tests see. :func:`round_to` rounds the float32
bits to nearest-even first when asked, so that the truncating cast is then exact; the
kernels ask for it only under the interpreter, and compiled code is unchanged.
The interpreter's bfloat16 *products* are wrong too: :func:`dot_dtype` gives the
matrix products float32 operands there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["round_to", "emulate_rtne", "dot_dtype"]


@triton.jit
def round_to(x, DTYPE: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    """``x`` (float32) cast to ``DTYPE``, rounding to nearest-even."""
    if EMULATE_RTNE:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


def emulate_rtne(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether results stored as ``dtype`` on ``device`` need :func:`round_to`'s help."""
    return dtype == torch.bfloat16 and device.type == "cpu"


def dot_dtype(dtype: torch.dtype, device: torch.device):
    """Triton dtype of the kernels' matrix products for inputs of ``dtype``: the input
    dtype, except float32 for bfloat16 under the interpreter (CPU), whose bfloat16
    products are wrong upstream."""
    if dtype == torch.bfloat16 and device.type == "cpu":
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]
