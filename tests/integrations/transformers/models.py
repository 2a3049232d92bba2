"""Tiny random Llama, Qwen2 and Mistral checkpoints, and the float64 oracle's ops.

Each model is built from a small config, saved with ``save_pretrained`` and loaded back
with ``from_pretrained``: the integration sees exactly what a user's checkpoint gives.

transformers computes RoPE angles, RMSNorm and (in eager) the softmax in float32 even
for a float64 model. :func:`float64_ops` replaces those two modules' ``forward`` on
one model instance with the same formulas in float64 (the frequencies from the
project's ``inverse_frequencies``, which ``tests/reference/test_rope_hf.py`` checks
against transformers'), and the oracle runs with ``attn_implementation="sdpa"``, which
computes in the input dtype. Nothing else of transformers is touched.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from lazyattention.reference import inverse_frequencies

VOCAB = 97

ROPES = {
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
    "yarn": {"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 4.0, "original_max_position_embeddings": 512},
}

CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}


def tiny_config(arch: str, rope: str = "default", **overrides):
    """Two layers, hidden 64, 4 query / 2 KV heads of dim 16."""
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        rope_parameters=dict(ROPES[rope]),
        tie_word_embeddings=False,
    )
    if arch == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    return CONFIGS[arch](**kwargs)


def tiny_model(tmp_path, arch: str = "llama", rope: str = "default", dtype=torch.float32, seed: int = 0, **overrides):
    """A random model saved to ``tmp_path`` and loaded back, in eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, rope, **overrides))
    with torch.no_grad():  # larger weights than the init's, so the logits are far from ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
    folder = tmp_path / f"{arch}-{rope}-{seed}"
    model.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager").eval()


def _rms_forward64(module):
    def forward(x):
        x64 = x.to(torch.float64)
        y = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
        return (module.weight.to(torch.float64) * y).to(x.dtype)

    return forward


def _rope_forward64(module, rope):
    theta = inverse_frequencies(rope).to(torch.float64)

    def forward(x, position_ids):
        freqs = position_ids[..., None].to(torch.float64) * theta.to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * module.attention_scaling).to(x.dtype), (emb.sin() * module.attention_scaling).to(x.dtype)

    return forward


def float64_ops(model, rope) -> None:
    """RoPE and RMSNorm of this float64 model instance computed in float64."""
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm"):
            module.forward = _rms_forward64(module)
        elif name.endswith("RotaryEmbedding"):
            module.forward = _rope_forward64(module, rope)
