"""The one tolerance rule of the project (DESIGN §5, FlashAttention's).

    max|actual − oracle64| ≤ 2 · max|reference_in_dtype − oracle64| + floor(dtype)

``oracle64`` is the float64 run of the definition; ``reference_in_dtype`` is the
reference run on the same inputs in the dtype under test, so the bound is *twice what
plain PyTorch loses in that dtype*, never a hand-tuned number. ``floor`` only keeps
the bound from being zero when the reference happens to be exact. The same function
and numbers are used in every test and every environment; CI never loosens them.
"""

from __future__ import annotations

import math

import torch

__all__ = ["FLOOR", "error", "tolerance", "assert_close"]

#: The absolute floor added to the bound, per dtype under test.
FLOOR: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}


def error(actual: torch.Tensor, oracle: torch.Tensor) -> float:
    """``max|actual − oracle|`` in float64; NaN anywhere gives ``inf``."""
    diff = (actual.detach().to(torch.float64).cpu() - oracle.detach().to(torch.float64).cpu()).abs()
    if diff.numel() == 0:
        return 0.0
    if torch.isnan(diff).any():
        return float("inf")
    return float(diff.max())


def tolerance(reference: torch.Tensor | None, oracle: torch.Tensor, dtype: torch.dtype) -> float:
    """The bound ``2 · error(reference, oracle) + FLOOR[dtype]``.

    ``reference=None`` (the dtype under test is float64 itself) leaves the floor alone.
    """
    if dtype not in FLOOR:
        raise ValueError(f"no tolerance floor for dtype {dtype}")
    base = 0.0 if reference is None else error(reference, oracle)
    return 2.0 * base + FLOOR[dtype]


def assert_close(
    actual: torch.Tensor,
    oracle: torch.Tensor,
    reference: torch.Tensor | None,
    dtype: torch.dtype,
    name: str = "output",
) -> float:
    """Assert the tolerance rule; return the error (useful for Hypothesis ``target``).

    Args:
        actual: the result under test.
        oracle: the float64 result of the definition on the same inputs.
        reference: the reference implementation's result in ``dtype`` (or ``None``).
        dtype: the dtype under test, which picks the floor.
        name: what is compared, for the message.
    """
    if actual.shape != oracle.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != oracle shape {tuple(oracle.shape)}")
    err = error(actual, oracle)
    bound = tolerance(reference, oracle, dtype)
    if not math.isfinite(bound):
        # A NaN/inf in the reference or the oracle makes the bound infinite, which
        # would accept anything, NaN included.
        raise AssertionError(f"{name}: the reference or the oracle is not finite; no bound can be drawn")
    if not err <= bound:
        ref_err = "n/a" if reference is None else f"{error(reference, oracle):.3e}"
        raise AssertionError(
            f"{name}: max|actual − oracle| = {err:.3e} exceeds the bound {bound:.3e} "
            f"(2 × reference error {ref_err} + floor {FLOOR[dtype]:.0e} for {dtype})"
        )
    return err
