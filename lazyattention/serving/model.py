"""A Llama-family decoder whose attention reads a paged, shared KV cache.

The model is the textbook Llama block (RMSNorm → GQA attention with RoPE → residual,
RMSNorm → SwiGLU MLP → residual); Qwen2 (bias on q/k/v) and Mistral are the same shape
and load from the same code. What is particular here is only the attention layer:

* it computes **pre-RoPE** ``q, k, v`` for every new token of a step;
* it writes ``k, v`` into the paged cache with :func:`write_kv` at the tokens'
  *stored* positions (a document's ``0..L-1`` when it is prefilled alone, eq. 6);
* it attends through the chosen backend's ``lazy_prefill``/``lazy_decode`` (or
  ``raw_prefill``/``raw_decode`` for the unrotated raw cache), which rotate the
  query by ``p − δ`` per block shift (eq. 8) and never touch a cached key; a decode
  step that carries a sharing plan (``StepInputs.sharing``) goes through the backend's
  shared-segment decode instead (:class:`~lazyattention.backends.SharedDecode`), which
  reads each segment several requests share once for all of them.

So the model never knows where a document sits in a request: the
:class:`~lazyattention.reference.Layout` of the step says it.

The backend is a :class:`~lazyattention.backends.Backend`, chosen by name through
:func:`~lazyattention.backends.get_backend`: ``"fast"`` imports Triton when — and
only when — it is chosen, and raises naming the problem when Triton or a GPU is
missing. There is no fallback.

Shape alphabet: ``T`` new tokens of a step, ``H`` query heads, ``Hkv`` KV heads,
``D`` head dim, ``E`` hidden size, ``V`` vocabulary, ``N`` physical blocks, ``S`` block
size, ``C`` copied tokens.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from lazyattention.backends import Backend, get_backend
from lazyattention.reference.cache import PagedKVCache
from lazyattention.reference.layout import Layout, Placement, RequestLayout
from lazyattention.reference.rope import RopeConfig

if TYPE_CHECKING:
    from lazyattention.backends import SharingPlan

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "ModelConfig",
    "StepInputs",
    "Model",
    "load_model",
    "load_tokenizer",
    "MODEL_SHAPES",
    "random_model",
]

#: ``model_type`` values of ``config.json`` this loader understands.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")

# --------------------------------------------------------------------------- config


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


# --------------------------------------------------------------------------- step inputs


@dataclass
class StepInputs:
    """Everything one forward step needs besides the token ids.

    The new tokens of a step are the query tokens of ``prefill`` (in layout order)
    followed by one token per request of ``decode``. Each is written to the cache
    before any attention of its layer, so a step may prefill a document and, in the
    same step, a request that reads it.

    Args:
        slots: ``[T]`` cache slots of the new tokens.
        positions: ``[T]`` stored positions of the new tokens (their keys are rotated
            there; ignored by the raw cache, which stores keys unrotated).
        prefill: layout of the prefill part (``None`` when there is none).
        decode: layout of the decode part, one query per request (or ``None``).
        raw: the raw-cache variant: unrotated keys, ``raw_*`` attention (eq. 10).
        copy_src: ``[C]`` slots whose K/V is copied (Block-Attention re-encoding).
        copy_dst: ``[C]`` destination slots, request-owned.
        copy_shift: ``[C]`` re-rotation ``δ`` of each copied key (eq. 9).
        logit_rows: rows of ``T`` whose logits are wanted (``None``: all).
        sharing: a plan of ``decode``'s shared segments
            (the backend's :class:`~lazyattention.backends.SharedDecode`): the decode
            attention then runs its ``shared_decode``.
        validate: check the values of ``slots`` and ``positions`` in every layer's
            ``write_kv`` (``validate=`` there). On a GPU that reads them back, a host
            synchronisation per layer; the :class:`~lazyattention.serving.runner.ModelRunner`
            checks them once per step on the host instead and turns this off.
    """

    slots: torch.Tensor
    positions: torch.Tensor
    prefill: Layout | None = None
    decode: Layout | None = None
    raw: bool = False
    copy_src: torch.Tensor | None = None
    copy_dst: torch.Tensor | None = None
    copy_shift: torch.Tensor | None = None
    logit_rows: torch.Tensor | None = None
    sharing: SharingPlan | None = None
    validate: bool = True
    num_prefill: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.num_prefill = self.prefill.num_queries if self.prefill is not None else 0
        num_decode = self.decode.batch_size if self.decode is not None else 0
        if self.slots.shape != (self.num_prefill + num_decode,) or self.positions.shape != self.slots.shape:
            raise ValueError(
                f"slots {tuple(self.slots.shape)} and positions {tuple(self.positions.shape)} must both be "
                f"[{self.num_prefill + num_decode}] (prefill queries + decode requests)"
            )
        if self.sharing is not None and (self.decode is None or self.sharing.layout is not self.decode or self.raw):
            raise ValueError("sharing must be planned for this step's decode layout, and the cache not raw")

    def to(self, device: torch.device | str) -> StepInputs:
        """The same step with every tensor on ``device`` (layouts are device-free)."""

        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        return StepInputs(
            slots=move(self.slots),
            positions=move(self.positions),
            prefill=self.prefill,
            decode=self.decode,
            raw=self.raw,
            copy_src=move(self.copy_src),
            copy_dst=move(self.copy_dst),
            copy_shift=move(self.copy_shift),
            logit_rows=move(self.logit_rows),
            sharing=self.sharing,
            validate=self.validate,
        )


# --------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """``x / rms(x) · w``, the statistics in float32 (float64 for float64 weights)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        xc = x.to(compute)
        xc = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xc.to(x.dtype)


class Attention(nn.Module):
    """GQA self-attention over the paged cache (see the module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x, k_cache, v_cache, step: StepInputs, rope: RopeConfig, backend: Backend) -> torch.Tensor:
        """``x [T, E]`` → ``[T, E]``; writes the step's K/V into ``k_cache, v_cache [N, S, Hkv, D]``."""
        ops = backend.ops
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)  # pre-RoPE: the kernel rotates it
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        ops.write_kv(
            k, v, k_cache, v_cache, step.slots, step.positions, None if step.raw else rope, validate=step.validate
        )
        if step.copy_src is not None and step.copy_src.numel():
            _copy_rerotated(k_cache, v_cache, step, rope, ops)
        out = torch.empty_like(q)
        p = step.num_prefill
        if step.prefill is not None:
            prefill = ops.raw_prefill if step.raw else ops.lazy_prefill
            out[:p] = prefill(q[:p], k_cache, v_cache, step.prefill, rope)
        if step.sharing is not None:
            shared_decode = backend.shared().shared_decode
            out[p:] = shared_decode(q[p:], k_cache, v_cache, step.decode, rope, sharing=step.sharing)
        elif step.decode is not None:
            decode = ops.raw_decode if step.raw else ops.lazy_decode
            out[p:] = decode(q[p:], k_cache, v_cache, step.decode, rope)
        return self.o_proj(out.reshape(t, -1))


def _copy_rerotated(k_cache, v_cache, step: StepInputs, rope: RopeConfig, ops) -> None:
    """Block-Attention's re-encoding: copy cached K/V to request-owned slots, keys
    re-rotated by ``δ`` (eq. 9: ``R(δ) k_stored`` is the key at its logical position).

    The re-rotation goes through the backend's own cache write (a fused rotate-and-
    scatter kernel on the fast path), so the baseline pays a gather and one kernel per
    layer, as an optimised Block-Attention would, not an unfused PyTorch rotation.
    """
    n, s, hkv, d = k_cache.shape
    k_src = k_cache.view(n * s, hkv, d)[step.copy_src]
    v_src = v_cache.view(n * s, hkv, d)[step.copy_src]
    ops.write_kv(
        k_src, v_src, k_cache, v_cache, step.copy_dst, step.copy_shift, _rotation_only(rope), validate=step.validate
    )


def _rotation_only(rope: RopeConfig) -> RopeConfig:
    """The same frequencies with attention factor 1: ``apply_rope`` with it is the pure
    rotation ``R(δ)`` (eq. 3), which is what re-rotating an encoded key needs (eq. 9)."""
    if rope.attention_scaling == 1.0:
        return rope
    return replace(rope, scaling=replace(rope.scaling, attention_factor=1.0))


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) · up(x))``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, k_cache, v_cache, step, rope, backend):
        x = x + self.self_attn(self.input_layernorm(x), k_cache, v_cache, step, rope, backend)
        return x + self.mlp(self.post_attention_layernorm(x))


class Model(nn.Module):
    """A Llama-family decoder over a paged KV cache.

    Parameter names follow Hugging Face's (without the leading ``model.``), so a
    checkpoint's state dict loads as is.

    Args:
        cfg: the shape.
        backend: a :class:`~lazyattention.backends.Backend` or its name (see
            :func:`~lazyattention.backends.get_backend`).

    Example:
        >>> model = Model(ModelConfig.tiny()).init_random(seed=0)
        >>> model.logits(torch.tensor([1, 2, 3])).shape
        torch.Size([3, 256])
    """

    def __init__(self, cfg: ModelConfig, backend: str | Backend = "reference"):
        super().__init__()
        self.cfg = cfg
        self.backend = get_backend(backend)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def ops(self):
        """The backend's attention functions (``backend.ops``)."""
        return self.backend.ops

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @torch.no_grad()
    def init_random(self, seed: int = 0, std: float = 0.02) -> Model:
        """Fill every weight from a seeded generator (normal ``std``; norms at 1)."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
        return self

    def new_cache(self, num_blocks: int, block_size: int, scratch_blocks: int = 1) -> PagedKVCache:
        """An empty paged cache shaped for this model, in its dtype and on its device.

        It holds ``num_blocks`` blocks for a :class:`~lazyattention.reference.BlockPool`
        of that size, plus ``scratch_blocks`` after them that no pool hands out: the
        padding rows of a CUDA-graph decode step write there
        (:class:`~lazyattention.serving.runner.ModelRunner`).
        """
        if not isinstance(scratch_blocks, int) or scratch_blocks < 0:
            raise ValueError(f"scratch_blocks must be an int >= 0, got {scratch_blocks!r}")
        cfg = self.cfg
        return PagedKVCache(
            cfg.num_layers,
            num_blocks + scratch_blocks,
            block_size,
            cfg.num_kv_heads,
            cfg.head_dim,
            self.dtype,
            self.device,
        )

    @torch.no_grad()
    def forward(self, token_ids: torch.Tensor, cache: PagedKVCache, step: StepInputs) -> torch.Tensor:
        """One step: embed ``token_ids [T]``, run every layer, return the logits of
        ``step.logit_rows`` as float32 ``[len(logit_rows), V]``."""
        x = self.embed_tokens(token_ids)
        for layer, k_cache, v_cache in zip(self.layers, cache.k, cache.v, strict=True):
            x = layer(x, k_cache, v_cache, step, self.cfg.rope, self.backend)
        if step.logit_rows is not None:
            x = x[step.logit_rows]
        return self.lm_head(self.norm(x)).float()

    @torch.no_grad()
    def logits(self, token_ids: torch.Tensor, block_size: int = 16) -> torch.Tensor:
        """Ordinary causal attention over ``token_ids [T]`` from position 0: ``[T, V]``.

        The full-attention baseline (no reuse, no segments), through the same
        attention functions, in a scratch cache.
        """
        token_ids = torch.as_tensor(token_ids, device=self.device).reshape(-1)
        t = token_ids.numel()
        if t == 0:
            raise ValueError("logits needs at least one token")
        blocks = -(-t // block_size)
        cache = self.new_cache(blocks, block_size, scratch_blocks=0)
        own = Placement(blocks=tuple(range(blocks)), length=t, start=0)
        layout = Layout([RequestLayout((), own, num_queries=t)], block_size)
        positions = torch.arange(t, device=self.device)
        return self.forward(token_ids, cache, StepInputs(slots=positions, positions=positions, prefill=layout))


#: The named random-weight shapes of the demo and the benchmarks.
MODEL_SHAPES = {"tiny": ModelConfig.tiny, "llama3-1b": ModelConfig.llama3_1b}


def random_model(name: str, backend: str | Backend, dtype: torch.dtype, device: str | torch.device, seed: int) -> Model:
    """A model of the named shape (:data:`MODEL_SHAPES`) with seeded random weights.

    The weights are drawn on the CPU, so every device gets the same model.
    """
    if name not in MODEL_SHAPES:
        raise ValueError(f"unknown model shape {name!r}; choose one of {', '.join(MODEL_SHAPES)}")
    return Model(MODEL_SHAPES[name](), backend=backend).init_random(seed).to(device=device, dtype=dtype).eval()


# --------------------------------------------------------------------------- loading


def load_model(
    path: str | os.PathLike,
    backend: str | Backend = "reference",
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> Model:
    """Load a Hugging Face ``config.json`` + safetensors checkpoint from a local folder.

    Args:
        path: folder holding ``config.json`` and ``*.safetensors`` (one file or shards).
        backend: a :class:`~lazyattention.backends.Backend` or its name.
        dtype: weights and cache dtype; ``None`` keeps the checkpoint's.
        device: where the model lives.

    Raises:
        FileNotFoundError: no ``config.json`` or no safetensors file in ``path``.
        ValueError: unsupported architecture or RoPE type; weights that do not match.
    """
    from safetensors.torch import load_file  # an optional dependency: only the loader needs it

    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    cfg = ModelConfig.from_hf(json.loads(config_file.read_text()))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    state = {k.removeprefix("model."): v for k, v in state.items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model = Model(cfg, backend=backend)
    expected = set(model.state_dict())
    if cfg.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint in {folder} does not match a {cfg.model_type} model: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict(state, strict=False)
    target = dtype or next(iter(state.values())).dtype
    return model.to(device=device, dtype=target).eval()


def load_tokenizer(path: str | os.PathLike):
    """The folder's ``tokenizer.json`` as a ``tokenizers.Tokenizer``, or ``None`` when
    the file is absent. Raises ``ImportError`` if the file exists but the optional
    ``tokenizers`` package is not installed (the model itself takes token ids)."""
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise ImportError(f"{file} needs the 'tokenizers' package: pip install tokenizers") from exc
    return Tokenizer.from_file(str(file))
