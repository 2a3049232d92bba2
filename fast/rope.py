"""RoPE inside the kernels: exact angle reduction with fixed-point turns.

The reference computes every angle ``n · θ_i`` in float64 and reduces it to
``[-π, π)`` (eq. 3). A kernel cannot afford float64, and float32 ``n · θ`` is off by
~0.06 rad at ``n ≈ 10^6``. Deferred encoding rotates by ``n = p − δ`` (eq. 8), which
can be anything in ``(−2^31, 2^31)``, so the reduction must be exact.

**Fixed-point turns.** Write the frequency in *turns per position*, ``f_i = θ_i / 2π``,
as a 64-bit two's-complement fraction ``F_i = round(f_i · 2^64) mod 2^64``. Then

    n · F_i  mod 2^64   =   (n · f_i mod 1) · 2^64          exactly, for any int64 n,

because integer multiplication modulo ``2^64`` *is* the reduction modulo one turn.
Read as a signed int64, the product is the angle in ``[-½, ½)`` turns; one int64 →
float32 conversion and one multiplication by ``2π / 2^64`` give the angle in
``[-π, π)`` with error ``≤ 2^-24·π`` from those two roundings plus ``|n|·2^-65`` turns
from rounding ``F_i`` (``≤ 2^-34`` turns even at ``|n| = 2^31``): about 4e-7 rad at
every position. The host computes ``F_i`` once per configuration from the reference's
float64 ``θ_i`` (:func:`lazyattention.reference.inverse_frequencies`) with exact
rational arithmetic. The kernels go one step further (:func:`rope_cos_sin`): they take
the nearest quarter turn off in integers too, convert only the remainder in
``[−π/4, π/4)``, and evaluate cos and sin there with short polynomials — no libdevice
call, no branch.

**Per-channel tables.** The kernels rotate a whole ``[rows, D]`` tile with two loads
(the tile and its *partner* channels) and one fused multiply-add per element:

    out[d] = x[d] · cos(n F[d]) · m[d]  +  x[partner(d)] · sin(n F[d]) · m[d]

``F[d]`` carries the sign of the 2-D rotation (``−F_i`` on the first channel of a pair,
``+F_i`` on the second, since ``sin(−a) = −sin a``), and is 0 on pass-through channels
``d ≥ R`` (angle 0: cos 1, sin 0). ``m[d]`` is YaRN's attention factor on rotary
channels and 1 elsewhere (eq. 5). ``partner(d)`` is ``d ± R/2`` for NeoX, ``d ^ 1`` for
interleaved, ``d`` beyond ``R`` — the pairing of eq. (3).

Shape alphabet: ``D`` head dim, ``DP`` its power-of-two padding, ``R`` rotary dim.
"""

from __future__ import annotations

import functools
from fractions import Fraction
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from lazyattention.reference.rope import RopeConfig, inverse_frequencies

__all__ = ["RopeTables", "rope_tables", "kernel_angles", "kernel_cos_sin"]

# 2π to 60 significant digits: enough that rounding f_i · 2^64 is exact to the last bit.
_TWO_PI = 2 * Fraction("3.14159265358979323846264338327950288419716939937510582097494")
_TWO_64 = 1 << 64


class RopeTables(NamedTuple):
    """Per-channel rotation tables for one ``RopeConfig`` and padding, on one device.

    Attributes:
        freq: ``[DP]`` int64 signed fixed-point turns per position (``0`` where no rotation).
        partner: ``[DP]`` int32, the channel each channel pairs with (itself if none).
        mscale: ``[DP]`` float32, the attention factor ``m`` on rotary channels, 1 elsewhere.
    """

    freq: torch.Tensor
    partner: torch.Tensor
    mscale: torch.Tensor


def _fixed_turns(theta: float) -> int:
    """``round(θ / 2π · 2^64)`` reduced to a signed int64, from the exact float64 ``θ``."""
    value = round(Fraction(theta) / _TWO_PI * _TWO_64) % _TWO_64
    return value - _TWO_64 if value >= _TWO_64 // 2 else value


@functools.lru_cache(maxsize=64)
def _host_tables(rope: RopeConfig, padded_dim: int) -> RopeTables:
    """The tables on the CPU; computed once per (frozen, hashable) config, read-only."""
    r = rope.rotary_dim
    half = r // 2
    turns = [_fixed_turns(t) for t in inverse_frequencies(rope).tolist()]
    freq = [0] * padded_dim
    partner = list(range(padded_dim))
    mscale = [1.0] * padded_dim
    for d in range(r):
        if rope.style == "neox":
            i, first = d % half, d < half
            partner[d] = d + half if first else d - half
        else:
            i, first = d // 2, d % 2 == 0
            partner[d] = d ^ 1
        # First channel of a pair: a·cos(φ) − b·sin(φ) = a·cos(−φ) + b·sin(−φ), so it gets −F.
        freq[d] = -turns[i] if first else turns[i]
        mscale[d] = rope.attention_scaling
    return RopeTables(
        freq=torch.tensor(freq, dtype=torch.int64),
        partner=torch.tensor(partner, dtype=torch.int32),
        mscale=torch.tensor(mscale, dtype=torch.float32),
    )


@functools.lru_cache(maxsize=64)
def rope_tables(rope: RopeConfig, padded_dim: int, device: torch.device) -> RopeTables:
    """:class:`RopeTables` for ``rope`` padded to ``padded_dim`` channels, on ``device``.

    Memoised per (config, padding, device): the tables are a pure function of the
    frozen config, never written after creation, so the cache holds no state that can
    change a result; it only keeps a host-to-device copy out of every call.
    """
    if padded_dim < rope.head_dim:
        raise ValueError(f"padded_dim {padded_dim} < head_dim {rope.head_dim}")
    host = _host_tables(rope, padded_dim)
    return RopeTables(*(t.to(device) for t in host))


# --------------------------------------------------------------------------- device code


@triton.jit
def rope_cos_sin(n, freq):
    """cos and sin of the angle ``n · F`` (eq. 3), reduced exactly modulo one turn.

    The reduction stays in integers to the end (Cody–Waite, with an exact split): the
    int64 product is the angle in fixed-point turns (it wraps modulo ``2^64`` = one
    turn); rounding it to the nearest quarter turn gives the quadrant ``k`` and a
    remainder in ``[−π/4, π/4)``, the only part converted to float32. Short Taylor
    polynomials then give sin and cos of the remainder to ~1e-7, and the quadrant
    swaps and negates them. No libdevice call: its general ``cosf``/``sinf`` carry a
    large-argument path whose local memory and registers cost the kernels dearly.

    Args:
        n: int64 ``[rows, 1]`` rotation amounts (``p − δ`` for deferred encoding).
        freq: int64 ``[1, DP]`` signed fixed-point turns (:class:`RopeTables`.freq).

    Returns:
        float32 ``[rows, DP]`` cos and sin.
    """
    turns = n * freq  # wraps modulo 2^64: the reduction to one turn, exact
    k = (turns + (1 << 61)) >> 62  # nearest quarter turn, in [-2, 1]
    r = (turns - (k << 62)).to(tl.float32) * 3.4061215800865545e-19  # 2π / 2^64: r in [-π/4, π/4)
    r2 = r * r
    sin_r = r * (1.0 + r2 * (-1.0 / 6 + r2 * (1.0 / 120 + r2 * (-1.0 / 5040 + r2 * (1.0 / 362880)))))
    cos_r = 1.0 + r2 * (-0.5 + r2 * (1.0 / 24 + r2 * (-1.0 / 720 + r2 * (1.0 / 40320 + r2 * (-1.0 / 3628800)))))
    quadrant = k & 3  # angle = quadrant · π/2 + r
    cos = tl.where(quadrant == 0, cos_r, tl.where(quadrant == 1, -sin_r, tl.where(quadrant == 2, -cos_r, sin_r)))
    sin = tl.where(quadrant == 0, sin_r, tl.where(quadrant == 1, cos_r, tl.where(quadrant == 2, -sin_r, -cos_r)))
    return cos, sin


@triton.jit
def rotate_tile(x, x_partner, n, freq, mscale):
    """Rotate a float32 tile by ``m R(n)`` (eq. 5): ``x·cos·m + x_partner·sin·m``.

    Args:
        x: float32 ``[rows, DP]``.
        x_partner: float32 ``[rows, DP]``, ``x`` read at the partner channels.
        n: int64 ``[rows, 1]`` rotation amounts.
        freq: int64 ``[1, DP]``; mscale: float32 ``[1, DP]``.
    """
    cos, sin = rope_cos_sin(n, freq)
    return (x * cos + x_partner * sin) * mscale


@triton.jit
def _angles_kernel(pos_ptr, freq_ptr, out_ptr, T, BLOCK_T: tl.constexpr, DP: tl.constexpr, WHAT: tl.constexpr):
    """Write, for tests, ``n_t · F[d]`` in radians (``WHAT=0``), or its cos (1) or sin (2)
    as the kernels compute them."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, DP)
    n = tl.load(pos_ptr + t, mask=t < T, other=0).to(tl.int64)
    freq = tl.load(freq_ptr + d)
    if WHAT == 0:
        turns = n[:, None] * freq[None, :]
        value = turns.to(tl.float32) * 3.4061215800865545e-19  # 2π / 2^64
    else:
        cos, sin = rope_cos_sin(n[:, None], freq[None, :])
        value = cos if WHAT == 1 else sin
    tl.store(out_ptr + t[:, None] * DP + d[None, :], value, mask=(t < T)[:, None])


def _run_angles(positions: torch.Tensor, rope: RopeConfig, what: int) -> torch.Tensor:
    if positions.is_floating_point() or positions.dim() != 1:
        raise ValueError(f"positions must be a 1-D integer tensor, got {positions.dtype} {tuple(positions.shape)}")
    dp = triton.next_power_of_2(rope.head_dim)
    tables = rope_tables(rope, max(16, dp), positions.device)
    out = torch.empty(positions.shape[0], tables.freq.shape[0], dtype=torch.float32, device=positions.device)
    block_t = 16
    _angles_kernel[(triton.cdiv(positions.shape[0], block_t),)](
        pos_ptr=positions.to(torch.int64), freq_ptr=tables.freq, out_ptr=out, T=positions.shape[0],
        BLOCK_T=block_t, DP=tables.freq.shape[0], WHAT=what,
    )  # fmt: skip
    # One column per frequency, with the positive sign: the second channel of each pair.
    half = rope.rotary_dim // 2
    cols = [half + i if rope.style == "neox" else 2 * i + 1 for i in range(half)]
    return out[:, cols]


def kernel_angles(positions: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """The kernels' fixed-point angles ``n · θ_i`` in radians, ``[T, F]`` float32 — for tests.

    Compare with :func:`lazyattention.reference.rope_angles` at any position, e.g. near
    ``2^31``.

    Args:
        positions: ``[T]`` integers, any sign.
    """
    return _run_angles(positions, rope, 0)


def kernel_cos_sin(positions: torch.Tensor, rope: RopeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The cos and sin the kernels rotate by (:func:`rope_cos_sin`), each ``[T, F]``."""
    return _run_angles(positions, rope, 1), _run_angles(positions, rope, 2)
