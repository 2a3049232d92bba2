"""The properties a backend's attention functions must hold, as plain functions.

Each takes a backend module (``lazyattention.fast`` or ``lazyattention.reference``), a
function name, a :class:`~lazyattention.testing.strategies.Case`, a dtype and a device,
runs the function and raises ``AssertionError`` (from
:func:`lazyattention.reference.assert_close`) when the property fails. They return the
worst ratio of error to bound, so a search can climb toward the worst case. The
project's tests (``tests/fast``) and ``lazyattention check`` call the same ones.

* :func:`differential`: the function against the float64 oracle — the reference eager
  definition (eq. 9) run in float64 on the very same rounded inputs — with the
  reference's function of the same name, in the dtype under test, as the yardstick
  (the tolerance rule), for the output and the log-sum-exp.
* :func:`shift_invariance`: every logical position moved by a common shift gives the
  same attention (eq. 4): the function on the shifted case against the oracle of the
  unshifted one.
"""

from __future__ import annotations

import torch

import lazyattention.reference as reference
from lazyattention.reference import assert_close
from lazyattention.reference.tolerance import error, tolerance

from .strategies import Case, build, shifted

__all__ = ["FUNCTIONS", "CACHE", "oracle", "differential", "shift_invariance"]

#: Which cache each attention function reads: raw functions read keys written with rope=None.
CACHE = {
    "lazy_prefill": "k_cache",
    "raw_prefill": "raw_k_cache",
    "eager_attention": "k_cache",
    "lazy_decode": "k_cache",
    "raw_decode": "raw_k_cache",
}
FUNCTIONS = tuple(CACHE)
F64 = torch.float64


def oracle(case: Case, dtype: torch.dtype, device, scale: float | None = None):
    """``(out, lse)`` of the float64 eager definition on the inputs of ``build(case, dtype)``."""
    x = build(case, F64, values_dtype=dtype, device=device)
    return reference.eager_attention(x.q, x.k_cache, x.v_cache, x.layout, case.rope, scale, return_lse=True)


def _run(backend, name: str, case: Case, dtype: torch.dtype, device, scale):
    x = build(case, dtype, device=device)
    args = (x.q, getattr(x, CACHE[name]), x.v_cache, x.layout, case.rope, scale)
    out, lse = getattr(backend, name)(*args, return_lse=True)
    ref_out, ref_lse = getattr(reference, name)(*args, return_lse=True)
    return out, lse, ref_out, ref_lse


def _assert(out, lse, ref_out, ref_lse, want_out, want_lse, dtype, what: str) -> float:
    assert out.dtype == dtype and out.shape == want_out.shape and lse.shape == want_lse.shape, what
    ratio = 0.0
    for part, actual, want, ref in (("out", out, want_out, ref_out), ("lse", lse, want_lse, ref_lse)):
        assert_close(actual, want, ref, dtype, f"{what} {part} ({dtype})")
        ratio = max(ratio, error(actual, want) / tolerance(ref, want, dtype))
    return ratio


def _release(device) -> None:
    if torch.device(device).type == "cuda":
        # The float64 oracle's scores take gigabytes at realistic shapes; hand them back
        # so that parallel test workers do not run each other out of memory.
        torch.cuda.empty_cache()


def differential(backend, name: str, case: Case, dtype: torch.dtype, device, scale: float | None = None) -> float:
    """``backend.name`` within the tolerance rule of the float64 oracle, output and lse.

    Returns:
        The larger of ``error / bound`` for the output and the lse (≤ 1 when it holds).
    """
    got = _run(backend, name, case, dtype, device, scale)
    want = oracle(case, dtype, device, scale)
    ratio = _assert(*got, *want, dtype, f"{backend.__name__}.{name}")
    del got, want
    _release(device)
    return ratio


def shift_invariance(backend, name: str, case: Case, dtype: torch.dtype, device, shift: int) -> float:
    """``backend.name`` on ``shifted(case, shift)`` within the tolerance rule of the
    oracle of ``case`` itself (eq. 4: a common shift of positions changes nothing).

    Returns:
        The larger of ``error / bound`` for the output and the lse.
    """
    got = _run(backend, name, shifted(case, shift), dtype, device, None)
    want = oracle(case, dtype, device)
    ratio = _assert(*got, *want, dtype, f"{backend.__name__}.{name} shifted by {shift}")
    del got, want
    _release(device)
    return ratio
