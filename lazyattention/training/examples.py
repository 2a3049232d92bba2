"""Training examples on the project's own semantics: what :class:`LazyRAG` serves, with an answer.

A block example is the request :meth:`LazyRAG.request
<lazyattention.integrations.transformers.rag.LazyRAG.request>` builds for a question and
its documents, placed as users place them (:func:`draw_placement`: any order, gaps,
offsets past 2^20), with the answer and the end-of-turn token appended to the request's
own tokens. Its mask is :func:`~lazyattention.integrations.transformers.baselines.block_diagonal_mask`
of that request: every document sees only itself, causally; the chat head, the question
and the answer see everything. The loss is on the answer tokens only.

A full example is the same prompt as one contiguous causal sequence at ``0..T−1``, the
way :func:`~lazyattention.integrations.transformers.baselines.full_attention` runs it, so
the model stays an ordinary model.

Positions enter the forward shifted so that the smallest is 0: RoPE scores depend only on
position differences (eq. 1), so the shift changes nothing in exact arithmetic, and it
keeps transformers' float32 angles exact where an offset past 2^20 would round them
(serving rotates by differences, which is exact at any offset).
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass

import torch

from lazyattention.integrations.transformers.baselines import block_diagonal_mask
from lazyattention.integrations.transformers.rag import RAGRequest

__all__ = [
    "IGNORE",
    "TOKENIZER_LOCK",
    "Placement",
    "Example",
    "draw_placement",
    "answer_ids",
    "block_example",
    "full_example",
    "collate",
]

#: The label of a token the loss ignores (PyTorch's cross-entropy default).
IGNORE = -100

#: Held while a tokenizer encodes: a fast tokenizer resets its truncation state on every
#: call and raises "Already borrowed" when two threads do so at once.
TOKENIZER_LOCK = threading.Lock()


@dataclass(frozen=True)
class Placement:
    """Where a request's documents sit.

    Args:
        offset: logical position of the first segment (the chat head).
        starts: each document's start, counted from the first position after the head
            (:meth:`LazyRAG.request`'s convention), or ``None`` for back to back.
    """

    offset: int
    starts: tuple[int, ...] | None


@dataclass(frozen=True)
class Example:
    """One sequence to train or score on.

    Args:
        tokens: token ids ``[T]``.
        positions: RoPE positions ``[T]`` (the smallest is 0).
        visible: ``[T, T]`` bool, ``visible[i, j]``: token ``i`` attends to token ``j``.
        labels: ``[T]`` the token each position is scored on (:data:`IGNORE` elsewhere);
            position ``i`` predicts ``labels[i + 1]``.
        mode: ``"block"`` or ``"full"``.
    """

    tokens: list[int]
    positions: list[int]
    visible: torch.Tensor
    labels: list[int]
    mode: str


def draw_placement(rng: random.Random, lengths: list[int]) -> Placement:
    """A placement of documents of ``lengths`` tokens as users make them.

    The offset is 0, below 2^16 or past 2^20 (a third each); the documents are packed in
    their order (40%), or laid out in another order (30%), or with gaps of up to 64
    tokens between them in another order (30%).
    """
    offset = rng.choice([0, rng.randrange(1, 1 << 16), (1 << 20) + rng.randrange(1 << 20)])
    kind = rng.random()
    if kind < 0.4:
        return Placement(offset, None)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    starts, pos = [0] * len(lengths), 0
    for d in order:
        pos += rng.randrange(65) if kind >= 0.7 else 0
        starts[d] = pos
        pos += lengths[d]
    return Placement(offset, tuple(starts))


def answer_ids(rag, answer: str) -> list[int]:
    """The answer's token ids and the end-of-turn token: what the model should generate."""
    eos = rag.eos_token_ids()
    if not eos:
        raise ValueError("the model has no end-of-sequence token: an answer could not end")
    return [*rag.encode(answer), eos[0]]


def _labels(length: int, target: list[int]) -> list[int]:
    return [IGNORE] * (length - len(target)) + list(target)


def block_example(rag, question: str, documents, placement: Placement, answer: str | None = None) -> Example:
    """The request ``rag`` serves for ``question`` over ``documents`` at ``placement``, with
    ``answer`` (if given) appended to its own tokens; documents encoded apart (eq. 7)."""
    with TOKENIZER_LOCK:
        request = rag.request(question, list(documents), offset=placement.offset, starts=placement.starts)
        target = answer_ids(rag, answer) if answer is not None else []
    whole = RAGRequest(request.segments, request.starts, request.own + tuple(target), request.own_start)
    tokens, positions = whole.tokens_and_positions()
    visible = block_diagonal_mask(whole, torch.float32, "cpu")[0, 0] == 0
    first = min(positions)
    return Example(tokens, [p - first for p in positions], visible, _labels(len(tokens), target), "block")


def full_example(rag, question: str, documents, answer: str | None = None) -> Example:
    """The same prompt as one causal sequence at ``0..T−1`` (:func:`full_attention`'s), with
    ``answer`` if given."""
    with TOKENIZER_LOCK:
        request = rag.request(question, list(documents))
        target = answer_ids(rag, answer) if answer is not None else []
    tokens = [t for seg in request.segments for t in seg] + list(request.own) + target
    visible = torch.ones(len(tokens), len(tokens), dtype=torch.bool).tril()
    return Example(tokens, list(range(len(tokens))), visible, _labels(len(tokens), target), "full")


def collate(examples: list[Example], dtype: torch.dtype, device, pad_id: int, left: bool = False) -> dict:
    """Pad ``examples`` into one batch: ``input_ids``, ``position_ids`` and ``labels``
    ``[B, L]``, and the additive ``attention_mask`` ``[B, 1, L, L]`` in ``dtype``.

    A padding row sees only itself (no row is all masked) and no real row sees padding.
    ``left`` pads on the left (for generation: every prompt ends at the last column).
    The width is a multiple of 16, the alignment SDPA's memory-efficient kernel wants
    of a mask.
    """
    width = -(-max(len(e.tokens) for e in examples) // 16) * 16
    b = len(examples)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    pos = torch.zeros(b, width, dtype=torch.long)
    labels = torch.full((b, width), IGNORE, dtype=torch.long)
    visible = torch.eye(width, dtype=torch.bool).repeat(b, 1, 1)
    for i, e in enumerate(examples):
        t = len(e.tokens)
        cols = slice(width - t, width) if left else slice(0, t)
        ids[i, cols] = torch.tensor(e.tokens)
        pos[i, cols] = torch.tensor(e.positions)
        labels[i, cols] = torch.tensor(e.labels)
        visible[i, cols, cols] = e.visible
    mask = torch.zeros(b, 1, width, width, dtype=dtype).masked_fill(~visible[:, None], torch.finfo(dtype).min)
    return {
        "input_ids": ids.to(device),
        "position_ids": pos.to(device),
        "labels": labels.to(device),
        "attention_mask": mask.to(device),
    }
