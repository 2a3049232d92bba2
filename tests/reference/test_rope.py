"""Tests of ``lazyattention.reference.rope``: rotation algebra, angle accuracy at large
positions, scalings, configuration checks.

Independent comparison with Hugging Face ``transformers`` is in ``test_rope_hf.py``.
"""

import math

import mpmath
import pytest
import torch
from hypothesis import example, given, note, target
from hypothesis import strategies as st

from lazyattention.reference import (
    MAX_POSITION,
    LinearScaling,
    Llama3Scaling,
    NoScaling,
    RopeConfig,
    YarnScaling,
    apply_rope,
    assert_close,
    inverse_frequencies,
    rope_angles,
    rotate,
)
from lazyattention.reference.rope import check_positions, rope_cos_sin
from tests.strategies import rope_configs

F64 = torch.float64

#: Positions for the composition test. Each rotation by ``p`` carries an angle error
#: of up to ~``1.25·|p·θ_0|·2^-52`` (θ_0 = 1; see the accuracy tests below). With
#: unit vectors and ``|p| <= 2^17`` three rotations stay near 1e-10, under the
#: float64 floor of the tolerance rule (1e-9). The inverse and relative-identity
#: tests reach 2^20 (two rotations, ~6e-10 at worst); larger positions are checked
#: against an exact computation below instead.
algebra_positions = st.integers(-(2**17), 2**17)


def random_x(seed: int, rope: RopeConfig, tokens: int, heads: int = 2, dtype=F64) -> torch.Tensor:
    """``[tokens, heads, D]`` random vectors of unit norm, so that an angle error of
    ``e`` rad moves each entry (and each dot product) by at most ``e``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, heads, rope.head_dim, generator=gen, dtype=F64)
    return (x / x.norm(dim=-1, keepdim=True)).to(dtype)


def positions(seed: int, tokens: int, low: int, high: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randint(low, high + 1, (tokens,), generator=gen)


# --------------------------------------------------------------------------- algebra (eq. 4)


@example(rope=RopeConfig(head_dim=64), a=0, b=0, seed=0)
@example(rope=RopeConfig(head_dim=80, rotary_dim=16, style="interleaved"), a=65_537, b=-65_537, seed=1)
@given(rope=rope_configs(), a=algebra_positions, b=algebra_positions, seed=st.integers(0, 2**32 - 1))
def test_rotations_compose(rope, a, b, seed):
    """R(b) R(a) = R(a + b), per token (tensor positions) and as scalars."""
    note(f"rope={rope} a={a} b={b}")
    x = random_x(seed, rope, tokens=3)
    pa = positions(seed, 3, -abs(a), abs(a))
    composed = rotate(rotate(x, pa, rope), b, rope)
    err = assert_close(composed, rotate(x, pa + b, rope), None, F64, "R(b)R(a)x vs R(a+b)x")
    target(err, label="composition error")
    assert_close(rotate(rotate(x, a, rope), b, rope), rotate(x, a + b, rope), None, F64, "scalar positions")


@given(rope=rope_configs(), seed=st.integers(0, 2**32 - 1))
def test_conjugate_is_the_inverse_and_norms_are_kept(rope, seed):
    note(f"rope={rope}")
    x = random_x(seed, rope, tokens=4)
    p = positions(seed, 4, -(2**20), 2**20)
    y = rotate(x, p, rope)
    assert_close(rotate(y, p, rope, conjugate=True), x, None, F64, "R(p)^T R(p) x")
    assert_close(rotate(x, p, rope, conjugate=True), rotate(x, -p, rope), None, F64, "conjugate vs -p")
    assert_close(y.norm(dim=-1), x.norm(dim=-1), None, F64, "norm of R(p) x")
    # Channels past the rotary dim pass through untouched, bit for bit.
    assert torch.equal(y[..., rope.rotary_dim :], x[..., rope.rotary_dim :])


@example(rope=RopeConfig(head_dim=64), a=2**20 + 3, b=2**20 - 7, s=2**20, seed=0)
@given(
    rope=rope_configs(),
    a=st.integers(0, 2**20 + 64),
    b=st.integers(0, 2**20 + 64),
    s=st.integers(-(2**20), 2**20),
    seed=st.integers(0, 2**32 - 1),
)
def test_relative_identity(rope, a, b, s, seed):
    """Eq. (4): <R(a) q, R(b) k> = <R(a − s) q, R(b − s) k> = <R(a − b) q, k>."""
    note(f"rope={rope} a={a} b={b} s={s}")
    q, k = random_x(seed, rope, tokens=2).unbind(0)

    def score(pa, pb, kk=k):
        return (rotate(q, pa, rope) * rotate(kk, pb, rope)).sum(-1)

    exact = score(a - b, 0)
    err = assert_close(score(a, b), exact, None, F64, "<R(a)q, R(b)k>")
    assert_close(score(a - s, b - s), exact, None, F64, "<R(a-s)q, R(b-s)k>")
    target(err, label="relative identity error")


def test_rotation_is_not_the_identity():
    """Guards the algebra tests against a rotate() that does nothing."""
    rope = RopeConfig(head_dim=8)
    x = random_x(0, rope, tokens=1)
    assert (rotate(x, 1, rope) - x).abs().max() > 0.1


@pytest.mark.parametrize("style", ["neox", "interleaved"])
def test_pairs_and_angles_match_the_definition(style):
    """Eq. (3) by hand: pair ``i`` of channels rotates by ``p·θ_i``; NeoX pairs
    ``(i, i + R/2)``, interleaved ``(2i, 2i + 1)``; channels >= R pass through."""
    rope = RopeConfig(head_dim=12, rotary_dim=8, base=100.0, style=style)
    x = random_x(3, rope, tokens=1, heads=1)[0, 0]
    p = 5
    theta = [100.0 ** (-2 * i / 8) for i in range(4)]
    pairs = [(i, i + 4) for i in range(4)] if style == "neox" else [(2 * i, 2 * i + 1) for i in range(4)]
    expected = x.clone()
    for (u, w), t in zip(pairs, theta, strict=True):
        c, s = math.cos(p * t), math.sin(p * t)
        expected[u], expected[w] = c * x[u] - s * x[w], s * x[u] + c * x[w]
    assert_close(rotate(x[None], torch.tensor([p]), rope)[0], expected, None, F64, f"{style} rotation")


def test_apply_rope_is_rotation_times_attention_factor_on_rotary_channels():
    """Eq. (5): only YaRN has m != 1, and it scales the rotary channels only."""
    rope = RopeConfig(head_dim=16, rotary_dim=8, scaling=YarnScaling(factor=4.0, original_max_position=256))
    m = rope.attention_scaling
    assert m == pytest.approx(0.1 * math.log(4.0) + 1.0)
    x = random_x(4, rope, tokens=3)
    p = torch.tensor([0, 7, 70_000])
    out, rotated = apply_rope(x, p, rope), rotate(x, p, rope)
    assert_close(out[..., :8], m * rotated[..., :8], None, F64, "rotary channels")
    assert torch.equal(out[..., 8:], x[..., 8:])
    assert RopeConfig(head_dim=16, scaling=LinearScaling(2.0)).attention_scaling == 1.0


# --------------------------------------------------------------------------- scalings (eq. 2)


def test_linear_scaling_divides_every_frequency():
    plain = inverse_frequencies(RopeConfig(head_dim=64))
    assert_close(inverse_frequencies(RopeConfig(head_dim=64, scaling=LinearScaling(4.0))), plain / 4, None, F64, "2a")


def test_llama3_scaling_bands():
    """Eq. (2b): short wavelengths kept, long ones divided by the factor, the band in
    between strictly between the two and monotone."""
    s = Llama3Scaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)
    rope = RopeConfig(head_dim=128, base=500_000.0, scaling=s)
    plain, scaled = inverse_frequencies(RopeConfig(head_dim=128, base=500_000.0)), inverse_frequencies(rope)
    wavelength = 2 * math.pi / plain
    short, long = wavelength < 8192 / 4, wavelength > 8192 / 1
    assert short.any() and long.any()
    assert torch.equal(scaled[short], plain[short])
    assert_close(scaled[long], plain[long] / 8, None, F64, "long wavelengths")
    mid = ~short & ~long
    assert mid.any()
    ratio = scaled[mid] / plain[mid]
    assert ((ratio > 1 / 8) & (ratio < 1)).all() and (ratio.diff() <= 0).all()


def test_yarn_ramp_and_attention_factor():
    """Eq. (2c): highest frequencies kept, lowest divided by the factor; m derived
    from the factor unless given."""
    s = YarnScaling(factor=4.0, original_max_position=4096)
    plain, scaled = inverse_frequencies(RopeConfig(head_dim=64)), inverse_frequencies(RopeConfig(64, scaling=s))
    assert scaled[0] == plain[0]
    assert_close(scaled[-1:], plain[-1:] / 4, None, F64, "lowest frequency")
    assert RopeConfig(64, scaling=YarnScaling(4.0, 4096, attention_factor=1.5)).attention_scaling == 1.5
    assert RopeConfig(64, scaling=YarnScaling(1.0, 4096)).attention_scaling == 1.0


# --------------------------------------------------------------------------- accuracy (eq. 3)

LARGE_POSITIONS = [65_536, 65_537, 100_003, 2**20 - 1, 2**20, 2**20 + 12_345, 2**24 + 1, MAX_POSITION - 1]


def exact_angle_error(angles: torch.Tensor, pos: int, theta: torch.Tensor) -> torch.Tensor:
    """``|angle − (pos·θ mod 2π)|`` per frequency, the exact product by mpmath (60
    digits), with each float64 ``θ_i`` taken as the exact number it represents."""
    with mpmath.workdps(60):
        two_pi = 2 * mpmath.pi
        errs = []
        for a, t in zip(angles.tolist(), theta.tolist(), strict=True):
            diff = mpmath.mpf(a) - pos * mpmath.mpf(t)
            diff -= two_pi * mpmath.nint(diff / two_pi)  # the distance on the circle
            errs.append(float(abs(diff)))
    return torch.tensor(errs, dtype=F64)


@pytest.mark.parametrize("scaling", [NoScaling(), Llama3Scaling()], ids=["plain", "llama3"])
@pytest.mark.parametrize("pos", LARGE_POSITIONS)
def test_angles_are_accurate_at_large_positions(pos, scaling):
    """Our angles are within one float64 ulp of ``|pos·θ|`` of the exact angle (under
    1e-9 rad up to 2^20, ~5e-7 rad at 2^31); the naive float32 ``pos·θ`` is far
    worse — measured here, not assumed."""
    rope = RopeConfig(head_dim=128, base=500_000.0, scaling=scaling)
    theta = inverse_frequencies(rope)
    ours = rope_angles(torch.tensor([pos]), rope)[0]
    assert ((ours >= -math.pi) & (ours < math.pi)).all(), "angles are reduced to [-pi, pi)"
    err = exact_angle_error(ours, pos, theta)
    # Error budget for x = |pos·θ| (eq. 3: x is rounded, then x + π is rounded,
    # reduced by the float64 2π and shifted back by π): half an ulp for the product,
    # half an ulp for the sum, x/2π periods times float64 2π's error (2.45e-16) for
    # the reduction, half an ulp of π for the shift. Together under 1.25·x·2^-52 plus
    # a few ulps of π.
    bound = 1.25 * (pos * theta) * 2.0**-52 + 4 * 2.0**-52 * math.pi
    assert (err <= bound).all(), f"angle error {err.max():.3e} rad at position {pos}"
    naive = torch.tensor([pos], dtype=torch.float32)[..., None] * theta.float()
    naive_err = exact_angle_error(naive[0].double(), pos, theta)
    print(f"pos={pos}: ours {err.max():.2e} rad, naive fp32 {naive_err.max():.2e} rad")
    # Measured, at every one of these positions: fp32 is at least a thousand times worse.
    assert naive_err.max() > 1000 * err.max()
    if pos < 2**21:
        assert err.max() < 1e-9


@pytest.mark.parametrize("pos", [65_537, 2**20 + 1, MAX_POSITION - 1])
def test_rotate_is_accurate_at_large_positions(pos):
    """``rotate`` in float32 at a large position is as good as float32 cos/sin of an
    exact angle; the naive float32 rotation is visibly wrong."""
    rope = RopeConfig(head_dim=64, base=10_000.0)
    theta = inverse_frequencies(rope)
    x = random_x(5, rope, tokens=1, heads=1)[0, 0]
    with mpmath.workdps(60):
        exact_cos = torch.tensor([float(mpmath.cos(pos * mpmath.mpf(t))) for t in theta.tolist()], dtype=F64)
        exact_sin = torch.tensor([float(mpmath.sin(pos * mpmath.mpf(t))) for t in theta.tolist()], dtype=F64)
    a, b = x[:32], x[32:]
    exact = torch.cat([a * exact_cos - b * exact_sin, a * exact_sin + b * exact_cos])
    ours64 = rotate(x[None], torch.tensor([pos]), rope)[0]
    ours32 = rotate(x[None].float(), torch.tensor([pos]), rope)[0]
    err64, err32 = (ours64 - exact).abs().max(), (ours32.double() - exact).abs().max()
    naive_angle = torch.tensor(float(pos)) * theta.float()
    naive_cos, naive_sin = naive_angle.cos().double(), naive_angle.sin().double()
    naive = torch.cat([a * naive_cos - b * naive_sin, a * naive_sin + b * naive_cos])
    err_naive = (naive - exact).abs().max()
    print(f"pos={pos}: fp64 {err64:.1e}, fp32 {err32:.1e}, naive fp32 angles {err_naive:.1e}")
    assert err64 <= 4 * pos * 2.0**-53 * x.abs().max()  # only the product's rounding
    assert err32 < 1e-5  # float32 cos/sin of a reduced angle: a few ulps
    assert err_naive > 100 * err32


def test_cos_sin_dtype_and_integer_positions():
    rope = RopeConfig(head_dim=8)
    cos, sin = rope_cos_sin(torch.arange(3), rope, torch.float16)
    assert cos.dtype == sin.dtype == torch.float16 and cos.shape == (3, 4)
    with pytest.raises(TypeError, match="integers"):
        rope_angles(torch.tensor([1.5]), rope)


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(head_dim=63), "head_dim must be a positive even"),
        (dict(head_dim=0), "head_dim must be a positive even"),
        (dict(head_dim=64, rotary_dim=65), "rotary_dim must be even"),
        (dict(head_dim=64, rotary_dim=7), "rotary_dim must be even"),
        (dict(head_dim=64, style="gptj"), "style must be"),
        (dict(head_dim=64, base=1.0), "base must be > 1"),
        (dict(head_dim=64, scaling=LinearScaling(0.0)), "factor must be positive"),
    ],
)
def test_bad_rope_config_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RopeConfig(**kwargs)


def test_unknown_scaling_object_names_dynamic_ntk():
    with pytest.raises(TypeError, match="dynamic NTK is not supported"):
        RopeConfig(head_dim=64, scaling={"rope_type": "dynamic", "factor": 2.0})


@pytest.mark.parametrize(
    ("start", "length", "error", "match"),
    [
        (-1, 3, ValueError, "negative position -1"),
        (0, -1, ValueError, "negative length"),
        (MAX_POSITION - 2, 3, ValueError, "overflow the int32 position range"),
        (1.0, 3, TypeError, "must be ints"),
    ],
)
def test_check_positions(start, length, error, match):
    with pytest.raises(error, match=match):
        check_positions(start, length, "segment")
    check_positions(MAX_POSITION - 3, 3, "the last valid positions")
