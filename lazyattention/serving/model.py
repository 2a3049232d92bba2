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
:class:`~lazyattention.reference.Layout` of the step says it. Its shape is a
:class:`~lazyattention.serving.config.ModelConfig`; checkpoints and seeded random
weights load through :mod:`lazyattention.serving.loading`.

The backend is a :class:`~lazyattention.backends.Backend`, chosen by name through
:func:`~lazyattention.backends.get_backend`: ``"fast"`` imports Triton when — and
only when — it is chosen, and raises naming the problem when Triton or a GPU is
missing. There is no fallback.

Shape alphabet: ``T`` new tokens of a step, ``H`` query heads, ``Hkv`` KV heads,
``D`` head dim, ``E`` hidden size, ``V`` vocabulary, ``N`` physical blocks, ``S`` block
size, ``C`` copied tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from lazyattention.backends import Backend, get_backend
from lazyattention.reference.cache import PagedKVCache
from lazyattention.reference.layout import Layout, Placement, RequestLayout
from lazyattention.reference.rope import RopeConfig

from .config import ModelConfig

if TYPE_CHECKING:
    from lazyattention.backends import SharingPlan

__all__ = ["StepInputs", "Model"]


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
    """``w · round(x / rms(x))``, as Llama computes it: the statistics and the
    normalisation in float32 (float64 for float64 inputs), rounded to ``x``'s dtype,
    then scaled by the weight in that dtype."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # PyTorch's rms_norm upcasts a half-precision input itself and rounds its result
        # back (one fused kernel on CUDA, no cast kernels around it); the weight is
        # applied after the rounding, as in Llama, not inside the kernel.
        return self.weight * nn.functional.rms_norm(x, x.shape[-1:], eps=self.eps)


class Attention(nn.Module):
    """GQA self-attention over the paged cache (see the module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.sizes = (cfg.num_heads * d, cfg.num_kv_heads * d, cfg.num_kv_heads * d)
        self.qkv_proj = nn.Linear(cfg.hidden_size, sum(self.sizes), bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, cfg.hidden_size, bias=cfg.o_bias)
        stack_in_state_dict(self, "qkv_proj", dict(zip(("q_proj", "k_proj", "v_proj"), self.sizes, strict=True)))

    def forward(self, x, k_cache, v_cache, step: StepInputs, rope: RopeConfig, backend: Backend) -> torch.Tensor:
        """``x [T, E]`` → ``[T, E]``; writes the step's K/V into ``k_cache, v_cache [N, S, Hkv, D]``."""
        ops = backend.ops
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)  # pre-RoPE: the kernel rotates it
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        ops.write_kv(
            k, v, k_cache, v_cache, step.slots, step.positions, None if step.raw else rope, validate=step.validate
        )
        if step.copy_src is not None and step.copy_src.numel():
            _copy_rerotated(k_cache, v_cache, step, rope, ops)
        p = step.num_prefill
        parts = []
        if step.prefill is not None:
            prefill = ops.raw_prefill if step.raw else ops.lazy_prefill
            parts.append(prefill(q[:p], k_cache, v_cache, step.prefill, rope))
        if step.sharing is not None:
            shared_decode = backend.shared().shared_decode
            parts.append(shared_decode(q[p:], k_cache, v_cache, step.decode, rope, sharing=step.sharing))
        elif step.decode is not None:
            decode = ops.raw_decode if step.raw else ops.lazy_decode
            parts.append(decode(q[p:], k_cache, v_cache, step.decode, rope))
        if len(parts) == 1:  # a prefill or a decode step: the attention's output as it is
            out = parts[0]
        else:
            out = torch.cat(parts) if parts else torch.empty_like(q)
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
        size = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(size, cfg.hidden_size, bias=cfg.mlp_bias)
        stack_in_state_dict(self, "gate_up_proj", {"gate_proj": size, "up_proj": size})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


def stack_in_state_dict(module: nn.Module, stacked: str, parts: dict[str, int]) -> None:
    """Keep Hugging Face's names in ``module``'s state dict for a linear layer that
    stacks several (``stacked``, whose output rows are ``parts``' in order, each of its
    size): the state dict splits its weight and bias into ``parts``, and loading stacks
    them again.

    One matrix product then computes them all, one launch reading one weight matrix:
    at a decode step's few rows each product is bound by its launch and its weight
    read, not by arithmetic.
    """

    def split(module, state_dict, prefix, local_metadata) -> None:
        for kind in ("weight", "bias"):
            whole = state_dict.pop(f"{prefix}{stacked}.{kind}", None)
            if whole is not None:
                for name, part in zip(parts, whole.split(tuple(parts.values())), strict=True):
                    state_dict[f"{prefix}{name}.{kind}"] = part

    def stack(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
        for kind in ("weight", "bias"):
            keys = [f"{prefix}{name}.{kind}" for name in parts]
            if all(k in state_dict for k in keys):
                state_dict[f"{prefix}{stacked}.{kind}"] = torch.cat([state_dict.pop(k) for k in keys])

    module.register_state_dict_post_hook(split)
    module.register_load_state_dict_pre_hook(stack)


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

    State-dict names follow Hugging Face's (without the leading ``model.``), so a
    checkpoint's state dict loads as is; each layer keeps ``q, k, v`` and the MLP's gate
    and up projections stacked, one matrix product each (:func:`stack_in_state_dict`).

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
