"""The shape of a Llama-family decoder, read from a Hugging Face ``config.json``.

:class:`ModelConfig` holds what the model needs to know of a checkpoint (sizes, GQA,
RoPE and its scaling, biases, tied embeddings); :meth:`ModelConfig.from_hf` reads it
from a ``config.json`` dictionary and refuses what the model does not implement.
:data:`MODEL_SHAPES` names the random-weight shapes of the demo and the benchmarks.

Shape alphabet: ``H`` query heads, ``Hkv`` key/value heads, ``D`` head dim, ``E``
hidden size, ``V`` vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

from lazyattention.reference.rope import RopeConfig

__all__ = ["SUPPORTED_ARCHITECTURES", "ModelConfig", "MODEL_SHAPES"]

#: ``model_type`` values of ``config.json`` this loader understands.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder.

    Args:
        vocab_size: ``V``.
        hidden_size: ``E``.
        intermediate_size: width of the SwiGLU MLP.
        num_layers: decoder layers.
        num_heads: ``H`` query heads.
        num_kv_heads: ``Hkv`` key/value heads (``H % Hkv == 0``; GQA when smaller).
        rope: the model's RoPE (its ``head_dim`` is ``D``).
        rms_norm_eps: RMSNorm epsilon.
        qkv_bias: bias on the q, k, v projections (Qwen2).
        o_bias: bias on the output projection (Llama's ``attention_bias``).
        mlp_bias: bias on the MLP projections.
        tie_word_embeddings: the output head reuses the embedding matrix.
        sliding_window: Mistral's window; sequences longer than it are refused
            (sliding-window attention is not implemented, and silently attending to
            everything would compute another function).
        model_type: ``"llama"``, ``"mistral"`` or ``"qwen2"``, for messages.

    Example:
        >>> cfg = ModelConfig.tiny()
        >>> cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
        (16, 2)
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rope: RopeConfig
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    model_type: str = "llama"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.rope.head_dim

    @classmethod
    def tiny(cls, vocab_size: int = 256, num_layers: int = 2, base: float = 10000.0) -> ModelConfig:
        """A small random-weight configuration for demos and tests (GQA ratio 2)."""
        return cls(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_layers=num_layers,
            num_heads=4,
            num_kv_heads=2,
            rope=RopeConfig(head_dim=16, base=base),
        )

    @classmethod
    def llama3_1b(cls) -> ModelConfig:
        """The shape of Llama-3.2-1B (random weights in benchmarks: shapes set the cost)."""
        return cls.from_hf(
            {
                "model_type": "llama",
                "vocab_size": 128256,
                "hidden_size": 2048,
                "intermediate_size": 8192,
                "num_hidden_layers": 16,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "head_dim": 64,
                "rms_norm_eps": 1e-5,
                "rope_theta": 500000.0,
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 32.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                },
                "tie_word_embeddings": True,
            }
        )

    @classmethod
    def from_hf(cls, config: dict) -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dictionary.

        Raises:
            ValueError: an architecture outside :data:`SUPPORTED_ARCHITECTURES`, an
                activation other than SiLU, or an unsupported RoPE type (dynamic NTK
                among them: :meth:`RopeConfig.from_hf` says why).
        """
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            archs = config.get("architectures")
            raise ValueError(
                f"unsupported architecture: model_type={model_type!r} (architectures={archs}); "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported activation {act!r}: the Llama-family MLP here is SwiGLU (silu)")
        num_heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // num_heads
        attention_bias = bool(config.get("attention_bias", False))
        # Qwen2 always has q/k/v bias and no o bias; Llama's attention_bias covers all four.
        qkv_bias = True if model_type == "qwen2" else attention_bias
        o_bias = False if model_type == "qwen2" else attention_bias
        window = None
        if model_type == "mistral" or config.get("use_sliding_window"):
            window = config.get("sliding_window")
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            rope=RopeConfig.from_hf(config, head_dim=head_dim),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(config.get("mlp_bias", False)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            sliding_window=window,
            model_type=model_type,
        )


#: The named random-weight shapes of the demo and the benchmarks.
MODEL_SHAPES = {"tiny": ModelConfig.tiny, "llama3-1b": ModelConfig.llama3_1b}
