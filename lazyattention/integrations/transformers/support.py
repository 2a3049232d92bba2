"""What the integration can serve, decided once per model, with the reason when not.

Deferred encoding needs every cached key to be valid at every offset (DESIGN §1): RoPE
whose frequencies do not depend on the sequence length, and full attention over the
request. A model that breaks either is refused here, naming the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lazyattention.reference import RopeConfig, YarnScaling

__all__ = ["SUPPORTED_MODEL_TYPES", "UnsupportedModel", "ModelSupport", "check_model"]

#: ``config.model_type`` values whose attention is the Llama shape this integration hooks.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class UnsupportedModel(ValueError):
    """The model (or a request on it) cannot be served with deferred RoPE; the message says why."""


@dataclass(frozen=True)
class ModelSupport:
    """The facts the integration needs about a supported model.

    Args:
        rope: the model's RoPE (with YaRN's attention factor, if any).
        rotation: the same as a pure rotation (attention factor 1): what the kernels apply,
            since transformers has already multiplied ``q`` and ``k`` by the factor.
        sliding_window: the attention window in tokens, or ``None`` for full attention.
    """

    rope: RopeConfig
    rotation: RopeConfig
    sliding_window: int | None

    def check_span(self, first: int, last: int) -> None:
        """Refuse a request whose positions ``first..last`` a sliding window would cut."""
        if self.sliding_window is not None and last - first >= self.sliding_window:
            raise UnsupportedModel(
                f"the request spans positions {first}..{last} ({last - first + 1} tokens) but the model attends "
                f"through a sliding window of {self.sliding_window}: keys outside it would be seen by deferred "
                "attention and not by the model; place the documents closer together"
            )


def check_model(model) -> ModelSupport:
    """Check that ``model`` is a supported architecture with expressible RoPE.

    Raises:
        UnsupportedModel: an architecture other than Llama, Mistral or Qwen2; RoPE the
            project cannot express (dynamic NTK, LongRoPE, unknown types: the reason of
            :meth:`RopeConfig.from_hf`); or interleaved layer types it does not know.
    """
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModel(
            f"unsupported architecture {model_type!r} ({type(model).__name__}); "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    try:
        rope = RopeConfig.from_hf(config.to_dict(), head_dim=head_dim)
    except ValueError as exc:
        raise UnsupportedModel(f"{model_type} checkpoint with RoPE the project cannot express: {exc}") from exc
    rotation = rope
    if isinstance(rope.scaling, YarnScaling):
        rotation = replace(rope, scaling=replace(rope.scaling, attention_factor=1.0))
    return ModelSupport(rope=rope, rotation=rotation, sliding_window=_sliding_window(config, model_type))


def _sliding_window(config, model_type: str) -> int | None:
    layer_types = list(getattr(config, "layer_types", None) or [])
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise UnsupportedModel(f"{model_type} layers of types {unknown} are not supported (only full and sliding)")
    window = getattr(config, "sliding_window", None)
    if model_type == "mistral" or "sliding_attention" in layer_types:
        return window
    return None
