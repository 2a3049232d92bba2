"""Which models the plugin serves, and their RoPE in the project's terms.

Deferred RoPE needs the model's rotation exactly: the attention backend un-rotates the
query vLLM's model rotated, and turns it by ``p − δ`` (eq. 8). The plugin serves the
Llama family (the attention of vLLM's ``LlamaAttention``: neox-style RoPE applied to q
and k just before attention), with every RoPE scaling the reference expresses.
"""

from __future__ import annotations

from lazyattention.reference import RopeConfig

__all__ = ["SUPPORTED_ARCHITECTURES", "UnsupportedModel", "model_rope"]

#: Architectures whose vLLM attention is ``LlamaAttention`` (neox RoPE before ``self.attn``).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class UnsupportedModel(ValueError):
    """The model's attention or RoPE cannot be expressed by deferred encoding."""


def model_rope(hf_config: dict) -> RopeConfig:
    """The model's :class:`~lazyattention.reference.RopeConfig`, or :class:`UnsupportedModel`.

    Args:
        hf_config: the model's ``config.json`` as a dictionary.
    """
    architectures = hf_config.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in architectures):
        raise UnsupportedModel(
            f"lazyattention's vLLM plugin serves {', '.join(SUPPORTED_ARCHITECTURES)}; "
            f"this model is {architectures or 'of no declared architecture'}"
        )
    if hf_config.get("sliding_window") and hf_config.get("use_sliding_window", True):
        raise UnsupportedModel(
            f"sliding-window attention (sliding_window={hf_config['sliding_window']}) is not supported: "
            "a window over logical positions would cut documents placed far back"
        )
    try:
        return RopeConfig.from_hf(hf_config)
    except ValueError as e:
        raise UnsupportedModel(f"the model's RoPE cannot be deferred: {e}") from None
