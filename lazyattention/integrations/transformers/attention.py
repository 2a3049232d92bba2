"""The registered attention implementation: one forward pass = one :class:`Step`.

transformers' Llama-family attention computes ``q, k, v``, applies RoPE at
``position_ids``, calls ``cache.update(k, v, layer_idx, kwargs=...)`` and then the
attention function registered under ``config._attn_implementation``. This module
registers :func:`paged_attention` under :data:`ATTENTION_NAME` (and a mask function
that builds nothing: the request's :class:`~lazyattention.reference.Layout` *is* the
mask, eq. 7), so a stock model runs the project's lazy attention over the paged cache.

**Where the query's rotation happens (the one choice of this integration).** The
project's ``lazy_prefill``/``lazy_decode`` take **pre-RoPE** queries and rotate them by
``p − δ`` per block (eq. 8) with float64-reduced angles. transformers rotates ``q`` and
``k`` before we see them. Three ways to compose the two were possible:

* un-rotate ``q`` by ``R(−p)``: inexact (``c² + s² ≠ 1`` once ``cos``/``sin`` are
  rounded to the model dtype, and transformers' float32 angles are off by ~0.06 rad
  near 2^20), and a second rotation for nothing;
* rotate by ``−δ`` ourselves and call the kernels with shift 0: a rotation per
  distinct shift outside the kernel, and the own tokens' causal mask would need the
  positions the kernel no longer sees;
* **run the model at** ``position_ids = 0``: transformers' RoPE at position 0 is
  ``x·cos(0)·m + rotate_half(x)·sin(0)·m = m·x`` *exactly* (``m`` is YaRN's attention
  factor, 1 for every other scaling), so ``q`` and ``k`` arrive pre-RoPE (times
  ``m``), and every rotation of the request is the project's own: ``write_kv`` rotates
  the keys at their stored positions, the kernel rotates the query by ``p − δ``. The
  true positions travel in the :class:`Step`'s layout; since ``m`` is already applied,
  the step's :class:`~lazyattention.reference.RopeConfig` is the model's with attention
  factor 1 (a pure rotation).

We take the third: exact, no extra work, and ``backend="fast"`` runs exactly the
project's Triton kernels (``write_kv``, ``lazy_prefill``, ``lazy_decode``) with the
same rotation inside. A document prefilled alone this way has its keys stored rotated
at ``0..L−1`` — the project's canonical stored form, which is also what transformers
itself would have stored.

Shape alphabet: ``T`` new tokens of the step, ``H`` query heads, ``Hkv`` KV heads,
``D`` head dim, ``N`` physical blocks, ``S`` block size.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from weakref import WeakKeyDictionary

import torch

from lazyattention.reference import Layout, RopeConfig

__all__ = [
    "ATTENTION_NAME",
    "STEP_KWARG",
    "Step",
    "paged_attention",
    "paged_attention_mask",
    "register",
    "attention_implementation",
]

#: The name under which the implementation is registered (``attn_implementation=``).
ATTENTION_NAME = "lazyattention"

#: The forward keyword that carries the :class:`Step` to the cache and the attention.
STEP_KWARG = "lazy_step"


@dataclass(frozen=True)
class Step:
    """Everything one forward pass needs besides the model's own inputs.

    Args:
        layout: the requests of the pass: each one's segments (placed, with shifts) and
            own tokens, whose last ``num_queries`` are this pass's tokens (requests
            concatenated in layout order).
        slots: ``[T]`` flat slots ``block * S + offset`` the new K/V go to.
        positions: ``[T]`` stored positions the new keys are rotated at (a document
            prefilled alone: ``0..L−1``; a request's own tokens: their logical positions).
        rope: the model's RoPE as a pure rotation (attention factor 1, see the module doc).
        ops: the backend module (``lazyattention.reference`` or ``lazyattention.fast``).
        validate: the first layer's ``write_kv`` checks the slots and positions on the
            device (a host synchronisation); ``False`` for a step checked on the host
            beforehand, as a CUDA graph's step is.
    """

    layout: Layout
    slots: torch.Tensor
    positions: torch.Tensor
    rope: RopeConfig
    ops: ModuleType
    validate: bool = True

    @property
    def decode(self) -> bool:
        """One query token per request: ``lazy_decode`` instead of ``lazy_prefill``."""
        return self.layout.num_queries == self.layout.batch_size


def step_of(kwargs: dict) -> Step:
    """The :class:`Step` of a forward pass, or a ``RuntimeError`` saying how to pass one."""
    step = kwargs.get(STEP_KWARG)
    if not isinstance(step, Step):
        raise RuntimeError(
            f"attn_implementation={ATTENTION_NAME!r} needs a lazyattention Step in the forward call "
            f"({STEP_KWARG}=...); run the model through lazyattention.LazyRAG"
        )
    return step


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Lazy attention of one step over the paged cache (eq. 8), zero copy.

    Args:
        module: the calling attention layer (unused: the step says everything).
        query: ``[1, H, T, D]`` queries of every request of the step, pre-RoPE (times YaRN's ``m``) since the model ran
            at ``position_ids = 0``.
        key: ``[N, S, Hkv, D]`` the layer's paged key cache, as ``PagedCache.update`` returned it.
        value: ``[N, S, Hkv, D]`` its value cache.
        attention_mask: ``None`` (:func:`paged_attention_mask` builds none).
        scaling: softmax scale.
        dropout: must be 0 (inference only).
        **kwargs: the forward's keywords; :data:`STEP_KWARG` holds the :class:`Step`.

    Returns:
        ``out [1, T, H, D]`` and ``None`` (no attention weights).
    """
    step = step_of(kwargs)
    if dropout != 0.0:
        raise ValueError(f"attn_implementation={ATTENTION_NAME!r} is for inference: dropout must be 0, got {dropout}")
    if query.shape[0] != 1:
        raise ValueError(f"the requests of a pass run as one sequence: query batch must be 1, got {query.shape[0]}")
    q = query[0].transpose(0, 1).contiguous()  # [T, H, D]
    attend = step.ops.lazy_decode if step.decode else step.ops.lazy_prefill
    out = attend(q, key, value, step.layout, step.rope, scale=scaling)
    return out.unsqueeze(0), None


def paged_attention_mask(*args, **kwargs) -> None:
    """The mask function registered beside :func:`paged_attention`: no tensor mask.

    The layout is the mask (eq. 7): a query sees every segment token and the own
    tokens at or before it; each segment saw only itself when it was prefilled.
    """
    return None


def register() -> str:
    """Register the attention implementation and its mask function; return the name.

    Idempotent. After it, ``from_pretrained(..., attn_implementation=ATTENTION_NAME)``
    or ``model.set_attn_implementation(ATTENTION_NAME)`` selects it.
    """
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, paged_attention_mask)
    return ATTENTION_NAME


@contextmanager
def attention_implementation(model, name: str):
    """Run the block with ``model``'s attention implementation set to ``name``, then
    restore the one it had (the model stays usable with ``generate`` outside).

    The first switch of a model to ``name`` goes through transformers'
    ``set_attn_implementation``, which checks ``name`` against every submodel; later
    ones set the same configs directly (the walk over every module cost about 0.5 ms a
    request on a small model).
    """
    state = _switches.get(model)
    if state is None:
        state = _switches[model] = _SwitchState(_configs(model))
    before = [c._attn_implementation_internal for c in state.configs]
    if name in state.checked:
        for c in state.configs:
            c._attn_implementation_internal = name
    else:
        model.set_attn_implementation(name)
        state.checked.add(name)
    try:
        yield model
    finally:
        for c, value in zip(state.configs, before, strict=True):
            c._attn_implementation_internal = value


@dataclass
class _SwitchState:
    configs: tuple  # the model's config and every submodel's, each once
    checked: set[str] = field(default_factory=set)  # names set_attn_implementation accepted


_switches: WeakKeyDictionary = WeakKeyDictionary()


def _configs(model) -> tuple:
    """The config of ``model`` and of each submodel, sub-configs included, each once."""
    from transformers import PreTrainedModel

    found = {}
    todo = [m.config for m in model.modules() if isinstance(m, PreTrainedModel)]
    while todo:
        config = todo.pop()
        if id(config) not in found:
            found[id(config)] = config
            todo += [c for key in config.sub_configs if (c := getattr(config, key, None)) is not None]
    return tuple(found.values())
