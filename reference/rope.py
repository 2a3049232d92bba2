"""Rotary position embedding (RoPE): frequencies, angles and the one rotation primitive.

Everything positional in the project goes through this module. The math is on the
docs page *Concepts → The math*; equation numbers below refer to it.

Position convention: a position is an integer token index (``int64`` tensor or Python
int). ``rotate`` accepts any integer, negative included, because deferred encoding
rotates by *differences* ``p_q - δ`` (eq. 4). Model-level positions must lie in
``[0, MAX_POSITION)``; :func:`check_positions` enforces that.

Shape alphabet: ``T`` tokens, ``H`` heads, ``D`` head dim, ``R`` rotary dim
(``R <= D``, even), ``F = R / 2`` frequencies.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

__all__ = [
    "MAX_POSITION",
    "RopeConfig",
    "NoScaling",
    "LinearScaling",
    "Llama3Scaling",
    "YarnScaling",
    "inverse_frequencies",
    "rope_angles",
    "rope_cos_sin",
    "rotate",
    "rotate_by",
    "apply_rope",
    "with_attention_factor",
    "check_positions",
]

#: Positions (and position + length) must stay below this bound: int32 metadata.
MAX_POSITION = 2**31 - 1

TWO_PI = 2.0 * math.pi


@dataclass(frozen=True)
class NoScaling:
    """Plain RoPE: ``θ_i = base^(-2i/R)`` (eq. 1)."""


@dataclass(frozen=True)
class LinearScaling:
    """Position interpolation: every frequency divided by ``factor`` (eq. 2a)."""

    factor: float


@dataclass(frozen=True)
class Llama3Scaling:
    """Llama-3.1 frequency-dependent scaling (eq. 2b).

    Long wavelengths are divided by ``factor``, short ones kept, the band between
    ``original_max_position / high_freq_factor`` and ``original_max_position /
    low_freq_factor`` interpolated smoothly.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class YarnScaling:
    """YaRN (eq. 2c): a ramp between interpolated and original frequencies, plus an
    attention factor that multiplies cos and sin.

    ``attention_factor=None`` derives it from ``factor`` (and ``mscale``,
    ``mscale_all_dim`` when both are given) exactly as Hugging Face does.
    """

    factor: float
    original_max_position: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


Scaling = NoScaling | LinearScaling | Llama3Scaling | YarnScaling


@dataclass(frozen=True)
class RopeConfig:
    """How a model applies RoPE to one attention head.

    Args:
        head_dim: ``D``, the head dimension.
        rotary_dim: ``R``, how many leading channels rotate (``R <= D``, even);
            ``None`` means all of them. The remaining ``D - R`` pass through.
        base: ``rope_theta``.
        style: ``"neox"`` pairs channel ``i`` with ``i + R/2`` (rotate-half, Llama);
            ``"interleaved"`` pairs ``2i`` with ``2i + 1`` (GPT-J).
        scaling: one of :class:`NoScaling`, :class:`LinearScaling`,
            :class:`Llama3Scaling`, :class:`YarnScaling`.

    Examples:
        >>> rope = RopeConfig(head_dim=64, base=10000.0)
        >>> rope.rotary_dim, rope.style
        (64, 'neox')
    """

    head_dim: int
    rotary_dim: int | None = None
    base: float = 10000.0
    style: str = "neox"
    scaling: Scaling = field(default_factory=NoScaling)

    def __post_init__(self) -> None:
        if self.rotary_dim is None:
            object.__setattr__(self, "rotary_dim", self.head_dim)
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"head_dim must be a positive even number, got {self.head_dim}")
        if not (0 < self.rotary_dim <= self.head_dim) or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim must be even and in (0, head_dim={self.head_dim}], got {self.rotary_dim}")
        if self.style not in ("neox", "interleaved"):
            raise ValueError(f"style must be 'neox' or 'interleaved', got {self.style!r}")
        if self.base <= 1.0:
            raise ValueError(f"base must be > 1, got {self.base}")
        if not isinstance(self.scaling, (NoScaling, LinearScaling, Llama3Scaling, YarnScaling)):
            raise TypeError(
                "scaling must be NoScaling, LinearScaling, Llama3Scaling or YarnScaling; "
                "dynamic NTK is not supported: its frequencies depend on the total sequence "
                "length, so a segment's keys are not valid at another offset"
            )
        factor = getattr(self.scaling, "factor", 1.0)
        if factor <= 0:
            raise ValueError(f"scaling factor must be positive, got {factor}")

    @property
    def attention_scaling(self) -> float:
        """The factor that multiplies cos and sin (YaRN's ``mscale``; 1 otherwise)."""
        return _yarn_attention_factor(self.scaling) if isinstance(self.scaling, YarnScaling) else 1.0

    @classmethod
    def from_hf(cls, config: dict, head_dim: int | None = None) -> RopeConfig:
        """Build from a Hugging Face ``config.json`` dictionary.

        Reads ``rope_theta``, ``partial_rotary_factor`` and ``rope_scaling`` (or the
        newer ``rope_parameters``). Dynamic NTK and unknown types raise ``ValueError``.
        """
        if head_dim is None:
            head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        params = dict(config.get("rope_parameters") or {})
        scaling_dict = config.get("rope_scaling") or params
        base = params.get("rope_theta", config.get("rope_theta", 10000.0))
        partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
        rope_type = scaling_dict.get("rope_type", scaling_dict.get("type", "default")) if scaling_dict else "default"
        return cls(
            head_dim=head_dim,
            rotary_dim=int(head_dim * partial),
            base=float(base),
            style="neox",
            scaling=_scaling_from_hf(rope_type, scaling_dict, config),
        )


def _scaling_from_hf(rope_type: str, d: dict, config: dict) -> Scaling:
    if rope_type == "default":
        return NoScaling()
    if rope_type == "linear":
        return LinearScaling(factor=float(d["factor"]))
    if rope_type == "llama3":
        return Llama3Scaling(
            factor=float(d["factor"]),
            low_freq_factor=float(d["low_freq_factor"]),
            high_freq_factor=float(d["high_freq_factor"]),
            original_max_position=int(d["original_max_position_embeddings"]),
        )
    if rope_type == "yarn":
        original = d.get("original_max_position_embeddings") or config["max_position_embeddings"]
        factor = d.get("factor") or config["max_position_embeddings"] / original
        return YarnScaling(
            factor=float(factor),
            original_max_position=int(original),
            beta_fast=float(d.get("beta_fast") or 32.0),
            beta_slow=float(d.get("beta_slow") or 1.0),
            attention_factor=d.get("attention_factor"),
            mscale=d.get("mscale"),
            mscale_all_dim=d.get("mscale_all_dim"),
            truncate=bool(d.get("truncate", True)),
        )
    if rope_type == "dynamic":
        raise ValueError(
            "RoPE type 'dynamic' (dynamic NTK) is not supported: its frequencies change with "
            "the total sequence length, so a segment encoded alone is not valid at other offsets"
        )
    raise ValueError(f"unsupported RoPE type {rope_type!r}; supported: default, linear, llama3, yarn")


# --------------------------------------------------------------------------- frequencies


def inverse_frequencies(rope: RopeConfig) -> torch.Tensor:
    """The ``F = R/2`` angular frequencies ``θ_i`` in radians per position, float64.

    Eq. (1) for plain RoPE, then the scaling's eq. (2a)–(2c).

    Returns:
        ``[F]`` float64 tensor on the CPU.
    """
    r = rope.rotary_dim
    theta = rope.base ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)  # eq. (1)
    s = rope.scaling
    if isinstance(s, LinearScaling):
        return theta / s.factor  # eq. (2a)
    if isinstance(s, Llama3Scaling):
        return _llama3(theta, s)
    if isinstance(s, YarnScaling):
        return _yarn(theta, s, rope.base, r)
    return theta


@functools.lru_cache(maxsize=64)
def _cached_frequencies(rope: RopeConfig) -> torch.Tensor:
    """:func:`inverse_frequencies`, computed once per (frozen, hashable) config; read-only."""
    return inverse_frequencies(rope)


def _llama3(theta: torch.Tensor, s: Llama3Scaling) -> torch.Tensor:
    """Eq. (2b): keep short wavelengths, divide long ones, blend in between."""
    wavelength = TWO_PI / theta
    low_freq_wavelength = s.original_max_position / s.low_freq_factor
    high_freq_wavelength = s.original_max_position / s.high_freq_factor
    scaled = torch.where(wavelength > low_freq_wavelength, theta / s.factor, theta)
    smooth = (s.original_max_position / wavelength - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
    return torch.where(is_medium, blended, scaled)


def _yarn(theta: torch.Tensor, s: YarnScaling, base: float, r: int) -> torch.Tensor:
    """Eq. (2c): ramp from extrapolated (original) to interpolated (``θ/factor``)."""

    def correction_dim(rotations: float) -> float:
        return (r * math.log(s.original_max_position / (rotations * TWO_PI))) / (2 * math.log(base))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, r - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp, as the reference implementation does
    ramp = ((torch.arange(r // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    return (theta / s.factor) * ramp + theta * extrapolation_weight


def _yarn_attention_factor(s: YarnScaling) -> float:
    if s.attention_factor is not None:
        return float(s.attention_factor)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if s.mscale and s.mscale_all_dim:
        return mscale(s.factor, s.mscale) / mscale(s.factor, s.mscale_all_dim)
    return mscale(s.factor)


# --------------------------------------------------------------------------- angles


def rope_angles(positions: torch.Tensor | int, rope: RopeConfig) -> torch.Tensor:
    """Angles ``pos · θ_i`` reduced to ``[-π, π)``, computed in float64 (eq. 3).

    Why float64: in float32, ``pos · θ`` at ``pos ≈ 10^6`` is off by ~0.06 rad.
    In float64 the product and the reduction to one period together stay within
    about 1.2 ulp of ``|pos·θ|`` (measured against 60-digit mpmath: 1.5e-10 rad
    at 2^20, 1.7e-7 rad at 2^31 − 2; naive float32 is off by 0.02–0.04 rad at
    2^20), so the float32 cos/sin that follow are as accurate as float32 allows.

    Args:
        positions: integer positions, any shape ``[...]``, any sign.

    Returns:
        ``[..., F]`` float64 angles.
    """
    pos = torch.as_tensor(positions)
    if pos.is_floating_point():
        raise TypeError(f"positions must be integers, got dtype {pos.dtype}")
    theta = _cached_frequencies(rope).to(pos.device)
    angles = pos.to(torch.float64)[..., None] * theta
    return torch.remainder(angles + math.pi, TWO_PI) - math.pi


def rope_cos_sin(positions: torch.Tensor | int, rope: RopeConfig, dtype: torch.dtype = torch.float32):
    """``cos`` and ``sin`` of :func:`rope_angles`, each ``[..., F]`` in ``dtype``."""
    angles = rope_angles(positions, rope)
    return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)


# --------------------------------------------------------------------------- rotation


def _pairs(x: torch.Tensor, rope: RopeConfig):
    """Split the rotary channels into the two halves of each 2-D pair."""
    r = rope.rotary_dim
    rot = x[..., :r]
    if rope.style == "neox":
        return rot[..., : r // 2], rot[..., r // 2 :]
    return rot[..., 0::2], rot[..., 1::2]


def _join(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    if rope.style == "neox":
        rot = torch.cat([a, b], dim=-1)
    else:
        rot = torch.stack([a, b], dim=-1).flatten(-2)
    return torch.cat([rot, x[..., rope.rotary_dim :]], dim=-1)


def rotate(
    x: torch.Tensor,
    positions: torch.Tensor | int,
    rope: RopeConfig,
    conjugate: bool = False,
) -> torch.Tensor:
    """Rotate ``x`` by ``R(positions)`` (eq. 3); a pure rotation, no YaRN factor.

    The one rotation primitive of the project: the model's RoPE, the query shift
    ``R(p_q - δ)`` of deferred encoding and the re-rotation ``R(δ)`` of cached keys
    are all this function. Rotations compose (eq. 4):
    ``rotate(rotate(x, a), b) == rotate(x, a + b)`` and ``conjugate=True`` is
    ``rotate(x, -positions)``.

    Args:
        x: ``[T, H, D]`` (heads broadcast) or ``[T, D]``; any leading batch dims.
        positions: integers, ``[T]`` or a scalar, any sign.
        conjugate: rotate by ``-positions`` instead.

    Returns:
        ``x``'s shape and dtype. The arithmetic is float32 (float64 for float64 inputs).

    Examples:
        >>> rope = RopeConfig(head_dim=8)
        >>> x = torch.randn(5, 2, 8, dtype=torch.float64)           # [T, H, D]
        >>> pos = torch.arange(5)
        >>> y = rotate(rotate(x, pos, rope), pos, rope, conjugate=True)
        >>> bool(torch.allclose(x, y))
        True
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    pos = torch.as_tensor(positions, device=x.device)
    if conjugate:
        pos = -pos
    cos, sin = rope_cos_sin(pos, rope, compute)  # [..., T, F]
    if pos.dim() >= 1 and x.dim() >= pos.dim() + 2:
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    return rotate_by(x, cos, sin, rope)


def rotate_by(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Rotate ``x`` by the angles whose cosines and sines are given (eq. 3).

    :func:`rotate` is this with ``cos, sin = rope_cos_sin(positions)``; a caller that
    rotates many tensors by the same angles computes them once and calls this.

    Args:
        x: ``[..., D]``.
        cos: ``[..., F]`` in the compute dtype (float32, float64 for float64 ``x``),
            broadcastable against ``x``'s pairs.
        sin: as ``cos``.

    Returns:
        ``x``'s shape and dtype.
    """
    xc = x.to(cos.dtype)
    a, b = _pairs(xc, rope)
    out = _join(a * cos - b * sin, a * sin + b * cos, xc, rope)
    return out.to(x.dtype)


def apply_rope(x: torch.Tensor, positions: torch.Tensor | int, rope: RopeConfig) -> torch.Tensor:
    """The model's RoPE: :func:`rotate` times ``rope.attention_scaling`` on the rotary
    channels (eq. 5). Keys in the cache and queries before attention get this; a
    re-rotation of an already-encoded key is a pure :func:`rotate`.

    Args:
        x: ``[T, H, D]`` (or ``[..., T, H, D]``).
        positions: ``[T]`` integers.

    Returns:
        ``x``'s shape and dtype.
    """
    return with_attention_factor(rotate(x, positions, rope), rope)


def with_attention_factor(x: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """``x``'s rotary channels times ``rope.attention_scaling`` (YaRN's ``m``; 1 for the
    other scalings, and then ``x`` itself): what turns :func:`rotate` into the model's
    RoPE, :func:`apply_rope`."""
    m = rope.attention_scaling
    if m == 1.0:
        return x
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = x.to(compute)
    r = rope.rotary_dim
    out = torch.cat([out[..., :r] * m, out[..., r:]], dim=-1)
    return out.to(x.dtype)


def check_positions(start: int, length: int, what: str) -> None:
    """Raise ``ValueError`` unless ``[start, start + length)`` lies in ``[0, MAX_POSITION)``."""
    if not isinstance(start, int) or not isinstance(length, int):
        raise TypeError(f"{what}: start and length must be ints, got {type(start).__name__}, {type(length).__name__}")
    if start < 0:
        raise ValueError(f"{what}: negative position {start}")
    if length < 0:
        raise ValueError(f"{what}: negative length {length}")
    if start + length > MAX_POSITION:
        raise ValueError(
            f"{what}: positions [{start}, {start + length}) overflow the int32 position range "
            f"(must stay below {MAX_POSITION})"
        )
