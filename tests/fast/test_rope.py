"""The kernels' angle reduction (fixed-point turns, ``fast/rope.py``) against the
reference's float64 angles, at every position the layout allows."""

import math

import torch
from hypothesis import example, given, note, settings, target
from hypothesis import strategies as st

from lazyattention.fast.rope import kernel_angles, kernel_cos_sin
from lazyattention.reference import RopeConfig, YarnScaling, rope_angles
from tests.strategies import rope_configs

from .strategies import DEVICE, examples

#: The accuracy the kernels promise for an angle, in radians, at any |n| < 2^31.
ANGLE_TOLERANCE = 1e-6

EDGES = [0, 1, 65_535, 65_536, 65_537, 2**20 - 1, 2**20, 2**20 + 1, 2**31 - 2, -(2**31 - 1), -(2**20), -65_537]


def wrapped_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual − expected|`` modulo 2π (both are reduced to one period)."""
    diff = actual.double().cpu() - expected.double().cpu()
    return float((torch.remainder(diff + math.pi, 2 * math.pi) - math.pi).abs().max())


@settings(max_examples=examples(25, 40))
@example(rope=RopeConfig(head_dim=128, base=500_000.0), seed=0)
@example(rope=RopeConfig(head_dim=80, rotary_dim=32, style="interleaved", scaling=YarnScaling(8.0, 4096)), seed=1)
@given(rope=rope_configs(), seed=st.integers(0, 2**32 - 1))
def test_kernel_angles_match_float64_reference(rope, seed):
    note(f"rope={rope} seed={seed}")
    gen = torch.Generator().manual_seed(seed)
    random = torch.randint(-(2**31) + 1, 2**31 - 1, (48,), generator=gen, dtype=torch.int64)
    positions = torch.cat([torch.tensor(EDGES, dtype=torch.int64), random])
    ours = kernel_angles(positions.to(DEVICE), rope)
    err = wrapped_error(ours, rope_angles(positions, rope))
    target(err, label="angle error (rad)")
    assert err <= ANGLE_TOLERANCE, f"angle error {err:.3e} rad > {ANGLE_TOLERANCE:.0e}"


@settings(max_examples=examples(25, 30))
@example(rope=RopeConfig(head_dim=128, base=500_000.0), seed=0)
@given(rope=rope_configs(), seed=st.integers(0, 2**32 - 1))
def test_kernel_cos_sin_match_float64(rope, seed):
    """The cos and sin the kernels rotate by: integer quadrant reduction + polynomials."""
    note(f"rope={rope} seed={seed}")
    gen = torch.Generator().manual_seed(seed)
    random = torch.randint(-(2**31) + 1, 2**31 - 1, (48,), generator=gen, dtype=torch.int64)
    positions = torch.cat([torch.tensor(EDGES, dtype=torch.int64), random])
    cos, sin = kernel_cos_sin(positions.to(DEVICE), rope)
    angles = rope_angles(positions, rope)
    err = max(
        float((cos.double().cpu() - angles.cos()).abs().max()), float((sin.double().cpu() - angles.sin()).abs().max())
    )
    target(err, label="cos/sin error")
    assert err <= ANGLE_TOLERANCE, f"cos/sin error {err:.3e} > {ANGLE_TOLERANCE:.0e}"


def test_naive_float32_angles_would_fail():
    """The bar above is meaningful: float32 ``n · θ`` misses it by orders of magnitude."""
    rope = RopeConfig(head_dim=128)
    positions = torch.tensor([2**20 + 7, 2**24 + 3], dtype=torch.int64)
    theta = rope_angles(torch.tensor(1), rope)  # θ_i reduced, fine for these θ ≤ 1
    naive = positions.float()[:, None] * theta.float()
    assert wrapped_error(naive, rope_angles(positions, rope)) > 1000 * ANGLE_TOLERANCE
