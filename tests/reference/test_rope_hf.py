"""An independent check of our RoPE against Hugging Face ``transformers``.

``inverse_frequencies`` + ``attention_scaling`` + ``apply_rope`` must equal
``ROPE_INIT_FUNCTIONS`` / ``LlamaRotaryEmbedding`` + ``apply_rotary_pos_emb`` (NeoX
style) and GPT-J's sinusoids + ``apply_rotary_pos_emb`` (interleaved style), for the
default, linear, Llama-3 and YaRN configurations, partial rotary included; and
``RopeConfig.from_hf`` must read the same ``config.json`` dictionaries.

Tolerances. Hugging Face computes frequencies and angles in float32, we in float64.
Its frequencies are ``base ** (arange / R)`` in float32: a relative error of a few
float32 ulps, under ``2^-20``. Its angle ``p·θ`` is then a float32 product, off by up
to ``p·θ·2^-20`` in all, and its cos/sin add a few ``2^-24``. A rotated pair of norm
``n``, times the attention factor ``m``, is therefore off by at most
``m·n·(P·θ_max·2^-20 + 2^-21)`` for positions up to ``P``. We assert that bound,
computed per test, with positions up to 4096 so that it is still small (~4e-3 for
unit pairs): a real difference of formula (a wrong ramp, a missing factor) is
orders of magnitude larger, and the frequencies alone are compared much more tightly.
"""

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb as gptj_apply_rotary
from transformers.models.gptj.modeling_gptj import create_sinusoidal_positions
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from lazyattention.reference import RopeConfig, apply_rope, inverse_frequencies

HEAD_DIM = 64
MAX_POS = 4096

#: ``rope_parameters`` as transformers 5 writes them in ``config.json``.
CONFIGS = {
    "default": {"rope_type": "default", "rope_theta": 10_000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10_000.0, "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500_000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 512,
    },
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 10_000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 1024,
    },
    "yarn_mscale": {
        "rope_type": "yarn",
        "rope_theta": 10_000.0,
        "factor": 8.0,
        "original_max_position_embeddings": 1024,
        "mscale": 1.0,
        "mscale_all_dim": 0.5,
        "beta_fast": 16.0,
    },
}


def llama_config(params: dict, partial: float = 1.0) -> LlamaConfig:
    params = dict(params)
    if partial != 1.0:
        params["partial_rotary_factor"] = partial
    return LlamaConfig(
        hidden_size=2 * HEAD_DIM,
        num_attention_heads=2,
        head_dim=HEAD_DIM,
        max_position_embeddings=8192,
        rope_parameters=params,
    )


def hf_frequencies(config: LlamaConfig) -> tuple[torch.Tensor, float]:
    if config.rope_parameters["rope_type"] == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[config.rope_parameters["rope_type"]](config)


def bound(theta: torch.Tensor, m: float, pair_norm: float) -> float:
    """The float32-versus-float64 budget of the module docstring."""
    return m * pair_norm * (MAX_POS * float(theta.max()) * 2.0**-20 + 2.0**-21)


def pair_norm(x: torch.Tensor, rotary: int) -> float:
    a, b = x[..., : rotary // 2], x[..., rotary // 2 : rotary]
    return float((a.square() + b.square()).sqrt().max())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_from_hf_frequencies_and_factor_match_transformers(name):
    config = llama_config(CONFIGS[name])
    rope = RopeConfig.from_hf(config.to_dict())
    assert (rope.head_dim, rope.rotary_dim, rope.style) == (HEAD_DIM, HEAD_DIM, "neox")
    hf_theta, hf_m = hf_frequencies(config)
    theta = inverse_frequencies(rope)
    assert hf_theta.dtype == torch.float32 and theta.dtype == torch.float64
    # A few float32 ulps apart (float32 pow against float64 pow).
    assert ((hf_theta.double() - theta).abs() <= theta * 2.0**-20).all()
    assert rope.attention_scaling == pytest.approx(hf_m, rel=1e-6)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_apply_rope_matches_llama_rotary_embedding(name):
    config = llama_config(CONFIGS[name])
    rope = RopeConfig.from_hf(config.to_dict())
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 5, HEAD_DIM, generator=gen)  # HF layout [batch, heads, T, D]
    k = torch.randn(1, 2, 5, HEAD_DIM, generator=gen)
    pos = torch.tensor([[0, 1, 17, 1000, MAX_POS]])
    cos, sin = LlamaRotaryEmbedding(config)(q, pos)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, cos, sin)
    ours_q = apply_rope(q[0].transpose(0, 1).double(), pos[0], rope).transpose(0, 1)[None]
    ours_k = apply_rope(k[0].transpose(0, 1).double(), pos[0], rope).transpose(0, 1)[None]
    tol = bound(inverse_frequencies(rope), rope.attention_scaling, max(pair_norm(q, HEAD_DIM), pair_norm(k, HEAD_DIM)))
    assert (hf_q.double() - ours_q).abs().max() <= tol
    assert (hf_k.double() - ours_k).abs().max() <= tol
    # The bound is sharp enough to see a change of formula: one position off is far out.
    off_by_one = apply_rope(q[0].transpose(0, 1).double(), pos[0] + 1, rope).transpose(0, 1)[None]
    assert (off_by_one - hf_q).abs().max() > 10 * tol


@pytest.mark.parametrize("name", ["linear", "llama3", "yarn"])
@pytest.mark.parametrize("partial", [0.5, 0.25])
def test_partial_rotary_matches_transformers(name, partial):
    """transformers' init functions honour ``partial_rotary_factor`` for these types;
    the rotary channels come first and the rest pass through, as in GPT-NeoX/Phi."""
    config = llama_config(CONFIGS[name], partial)
    rope = RopeConfig.from_hf(config.to_dict())
    rotary = int(HEAD_DIM * partial)
    assert rope.rotary_dim == rotary
    hf_theta, hf_m = hf_frequencies(config)
    theta = inverse_frequencies(rope)
    assert hf_theta.shape == theta.shape == (rotary // 2,)
    assert ((hf_theta.double() - theta).abs() <= theta * 2.0**-20).all()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 4, HEAD_DIM, generator=gen)
    pos = torch.tensor([[0, 3, 999, MAX_POS]])
    freqs = pos[..., None].float() * hf_theta  # HF's own float32 angles
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos() * hf_m, emb.sin() * hf_m
    hf_rot, _ = apply_rotary_pos_emb(x[..., :rotary], x[..., :rotary], cos, sin)
    hf = torch.cat([hf_rot, x[..., rotary:]], dim=-1)
    ours = apply_rope(x[0].transpose(0, 1).double(), pos[0], rope).transpose(0, 1)[None]
    assert (hf.double() - ours).abs().max() <= bound(theta, rope.attention_scaling, pair_norm(x, rotary))


@pytest.mark.parametrize("rotary", [64, 32])
def test_interleaved_style_matches_gptj(rotary):
    """GPT-J rotates pairs ``(2i, 2i + 1)`` of its first ``rotary_dim`` channels."""
    rope = RopeConfig(head_dim=HEAD_DIM, rotary_dim=rotary, style="interleaved")
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 2, HEAD_DIM, generator=gen)  # GPT-J layout [batch, T, heads, D]
    pos = torch.tensor([[0, 5, 2047, MAX_POS]])
    sincos = create_sinusoidal_positions(MAX_POS + 1, rotary)[pos]
    sin, cos = torch.split(sincos, rotary // 2, dim=-1)
    hf = torch.cat([gptj_apply_rotary(x[..., :rotary], sin, cos), x[..., rotary:]], dim=-1)
    ours = apply_rope(x[0].double(), pos[0], rope)[None]
    pairs = x[..., :rotary].unflatten(-1, (-1, 2)).norm(dim=-1).max()
    assert (hf.double() - ours).abs().max() <= bound(inverse_frequencies(rope), 1.0, float(pairs))


def test_from_hf_reads_legacy_rope_scaling_and_top_level_fields():
    """Older ``config.json``: ``rope_theta`` and ``partial_rotary_factor`` at the top,
    scaling under ``rope_scaling`` with ``type``."""
    config = {
        "hidden_size": 256,
        "num_attention_heads": 4,
        "rope_theta": 1e6,
        "partial_rotary_factor": 0.5,
        "rope_scaling": {"type": "linear", "factor": 2.0},
    }
    rope = RopeConfig.from_hf(config)
    assert (rope.head_dim, rope.rotary_dim, rope.base) == (64, 32, 1e6)
    assert rope.scaling.factor == 2.0


def test_from_hf_rejects_dynamic_ntk_with_the_reason():
    config = llama_config({"rope_type": "dynamic", "rope_theta": 10_000.0, "factor": 2.0}).to_dict()
    with pytest.raises(ValueError, match=r"dynamic NTK.*not valid at other offsets"):
        RopeConfig.from_hf(config)


def test_from_hf_rejects_unknown_types():
    config = {"hidden_size": 128, "num_attention_heads": 2, "rope_scaling": {"rope_type": "longrope"}}
    with pytest.raises(ValueError, match="unsupported RoPE type 'longrope'"):
        RopeConfig.from_hf(config)
