"""The user API: documents and a question in, text out, documents cached once.

:class:`LazyRAG` wraps a stock ``LlamaForCausalLM`` / ``MistralForCausalLM`` /
``Qwen2ForCausalLM`` and its tokenizer. Each document is prefilled alone at positions
``0..L−1`` into a :class:`~lazyattention.integrations.transformers.cache.PagedCache`
(content-hashed: a document seen before is a hit and costs nothing); a request places
its documents at any starts and decodes with the registered attention implementation,
which runs the backend's ``lazy_prefill``/``lazy_decode`` over the paged cache.

The loop is the integration's own, because ``model.generate`` derives positions from
the cache length (contiguous only) and would rotate ``q`` at them; here every forward
runs at ``position_ids = 0`` and the positions live in the step's layout (the reason is
in :mod:`lazyattention.integrations.transformers.attention`). Contiguous full attention
— the ordinary way to run the model — is :func:`~lazyattention.integrations.transformers.baselines.full_attention`,
a layer over ``model.generate``.

Example:
    >>> rag = LazyRAG(model, tokenizer, backend="reference")          # doctest: +SKIP
    >>> out = rag.answer("Where is the lab?", ["The lab is in Oslo.", "Ada runs it."])  # doctest: +SKIP
    >>> out.text, out.stats.cache_hits, out.stats.bytes_copied         # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lazyattention.reference import Layout, Placement, RequestLayout

from .attention import ATTENTION_NAME, STEP_KWARG, Step, attention_implementation, register
from .cache import PagedCache
from .support import ModelSupport, check_model

__all__ = [
    "STRATEGIES",
    "INSTRUCTION",
    "Sampling",
    "RequestStats",
    "Answer",
    "Request",
    "LazyRAG",
    "chat_parts",
    "eos_token_ids",
]

#: ``"lazy"``: zero copy, the query turned by ``−δ`` per block. ``"block"``: Block-Attention,
#: each document's K/V copied and re-rotated by ``δ`` per request, then attended at shift 0.
#: ``"no_shift"``: the negative control, wrong on purpose — the cached keys used as if every
#: document sat where it was stored (at 0), which is what a cache without shifts computes.
STRATEGIES = ("lazy", "block", "no_shift")


@dataclass(frozen=True)
class Sampling:
    """``generate()``-style decoding options.

    Args:
        max_new_tokens: tokens to generate at most.
        do_sample: sample instead of greedy argmax.
        temperature: softmax temperature when sampling.
        top_k: keep the ``k`` most likely tokens (0: all).
        top_p: nucleus sampling mass (1.0: all).
        seed: seed of the sampling generator (``None``: 0).
        stop_token_ids: generation ends at any of these (the model's EOS by default).
    """

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(0 if self.seed is None else self.seed)

    def pick(self, logits: torch.Tensor, generator: torch.Generator) -> int:
        """The next token from ``logits [V]``."""
        if not self.do_sample:
            return int(torch.argmax(logits))
        scores = logits.float().cpu() / self.temperature
        if self.top_k:
            kth = torch.topk(scores, min(self.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            cum = torch.softmax(sorted_scores, -1).cumsum(-1)
            drop = cum - torch.softmax(sorted_scores, -1) > self.top_p  # keep the first token past the mass
            scores[order[drop]] = float("-inf")
        return int(torch.multinomial(torch.softmax(scores, -1), 1, generator=generator))


@dataclass(frozen=True)
class RequestStats:
    """What one request cost the cache.

    Args:
        cache_hits: segments found cached (each use counted, duplicates included).
        cache_misses: segments prefilled alone by this request.
        prefilled_tokens: tokens of those prefills.
        bytes_copied: K/V bytes copied for the request (0 for ``"lazy"``).
        blocks_in_use: blocks the pool held at the request's peak (cached segments included).
    """

    cache_hits: int
    cache_misses: int
    prefilled_tokens: int
    bytes_copied: int
    blocks_in_use: int


@dataclass(frozen=True)
class Answer:
    """A generated answer.

    Args:
        text: the decoded new tokens (stop token excluded).
        tokens: the new token ids (stop token excluded).
        first_logits: ``[V]`` float32 logits that chose the first token.
        stats: the request's :class:`RequestStats`.
    """

    text: str
    tokens: list[int]
    first_logits: torch.Tensor
    stats: RequestStats


@dataclass(frozen=True)
class Request:
    """A request in token ids: segments placed at starts, then its own tokens.

    Args:
        segments: token ids of each segment (document, system prompt …).
        starts: logical start of each segment (any order, gaps and overlaps allowed).
        own: the request's own token ids (the question), at least one.
        own_start: logical position of the first own token.
    """

    segments: tuple[tuple[int, ...], ...]
    starts: tuple[int, ...]
    own: tuple[int, ...]
    own_start: int

    @classmethod
    def packed(cls, segments, own, offset: int = 0, starts=None) -> Request:
        """Segments back to back from ``offset`` (or at ``starts``), own tokens after the furthest end."""
        segments = tuple(tuple(int(t) for t in s) for s in segments if len(s))
        if starts is None:
            starts, pos = [], offset
            for s in segments:
                starts.append(pos)
                pos += len(s)
        starts = tuple(int(s) for s in starts)
        if len(starts) != len(segments):
            raise ValueError(f"starts has {len(starts)} entries for {len(segments)} non-empty segments")
        end = max((s + len(seg) for s, seg in zip(starts, segments, strict=True)), default=offset)
        return cls(segments, starts, tuple(int(t) for t in own), end)

    def __post_init__(self):
        if not self.own:
            raise ValueError("a request needs at least one own token")
        if any(s < 0 for s in self.starts) or self.own_start < 0:
            raise ValueError(f"positions must be non-negative, got starts {self.starts}, own_start {self.own_start}")

    def tokens_and_positions(self) -> tuple[list[int], list[int]]:
        """All tokens in order and their logical positions (segments, then own tokens)."""
        tokens, positions = [], []
        for seg, start in zip(self.segments, self.starts, strict=True):
            tokens += seg
            positions += range(start, start + len(seg))
        tokens += self.own
        positions += range(self.own_start, self.own_start + len(self.own))
        return tokens, positions


#: The instruction after the documents (a small model answers more directly with it).
INSTRUCTION = "Answer the question in a few words, using the documents above."


def chat_parts(
    tokenizer, question: str, instruction: str = INSTRUCTION, marker: str = "\x00DOCS\x00"
) -> tuple[str, str]:
    """The chat template around the documents: ``(head, tail)`` text.

    The user turn is ``<documents><instruction>\nQuestion: …``; ``head`` is everything
    before the documents (a cacheable segment, like a system prompt), ``tail`` the
    instruction, the question and the assistant header. Without a chat template:
    ``("", "<instruction>\nQuestion: …\nAnswer:")``.
    """
    content = f"{marker}{instruction}\nQuestion: {question}"
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        head, tail = text.split(marker)
        return head, tail
    return "", f"{instruction}\nQuestion: {question}\nAnswer:"


class LazyRAG:
    """Documents plus a question into text, with each document's KV cached once.

    Args:
        model: a ``LlamaForCausalLM``, ``MistralForCausalLM`` or ``Qwen2ForCausalLM``
            (any dtype and device); during each request its attention implementation is
            :data:`~lazyattention.integrations.transformers.attention.ATTENTION_NAME`,
            afterwards the one it had.
        tokenizer: its transformers tokenizer, or ``None`` to work in token ids only
            (:meth:`generate` with a :class:`Request`; answers then have empty text).
        backend: ``"reference"`` or ``"fast"``, explicit; ``"fast"`` raises when Triton
            or a GPU is missing, never falls back.
        num_blocks: physical blocks of the paged cache.
        block_size: tokens per block.

    Raises:
        UnsupportedModel: the architecture or its RoPE cannot be served (see
            :func:`~lazyattention.integrations.transformers.support.check_model`).
    """

    def __init__(self, model, tokenizer, backend: str = "reference", num_blocks: int = 1024, block_size: int = 16):
        from lazyattention.serving.model import attention_backend

        self.support: ModelSupport = check_model(model)
        self.ops = attention_backend(backend)
        self.backend = backend
        self.model = model
        self.tokenizer = tokenizer
        self.cache = PagedCache.for_model(model, num_blocks, block_size)
        register()

    # ------------------------------------------------------------------ text API

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no special tokens added."""
        if self.tokenizer is None:
            raise ValueError("this LazyRAG has no tokenizer: pass token ids in a Request to generate()")
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def request(self, question: str, documents, offset: int = 0, starts=None) -> Request:
        """The token-level :class:`Request` of :meth:`answer` (the chat head is segment 0)."""
        head, tail = chat_parts(self.tokenizer, question)
        segments = [self.encode(head)] if head else []
        segments += [self.encode(doc + "\n\n") for doc in documents]
        if starts is not None and head:
            starts = [offset, *starts]
        return Request.packed(segments, self.encode(tail), offset=offset, starts=starts)

    def answer(
        self,
        question: str,
        documents,
        offset: int = 0,
        starts=None,
        strategy: str = "lazy",
        sampling: Sampling | None = None,
    ) -> Answer:
        """Answer ``question`` from ``documents``.

        Args:
            question: the question text.
            documents: document texts, in the order they are placed.
            offset: logical position of the first segment (the chat head).
            starts: logical start of each document (default: back to back after the head).
            strategy: ``"lazy"`` (zero copy), ``"block"`` (Block-Attention: copy + re-rotate)
                or ``"no_shift"`` (the negative control; see :data:`STRATEGIES`).
            sampling: decoding options (greedy, 32 new tokens by default).
        """
        return self.generate(self.request(question, documents, offset, starts), strategy, sampling)

    # ------------------------------------------------------------------ token API

    def generate(self, request: Request, strategy: str = "lazy", sampling: Sampling | None = None) -> Answer:
        """Decode ``request``: cache its segments (hits reused), prefill its own tokens, decode."""
        return self._run(request, strategy, sampling or Sampling(), keep_own_logits=False)[0]

    def own_logits(self, request: Request, strategy: str = "lazy") -> torch.Tensor:
        """``[P, V]`` float32 logits of every own token of ``request`` (for equivalence checks)."""
        return self._run(request, strategy, Sampling(max_new_tokens=1, stop_token_ids=()), keep_own_logits=True)[1]

    def _run(self, request: Request, strategy: str, sampling: Sampling, keep_own_logits: bool):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        stop = set(sampling.stop_token_ids if sampling.stop_token_ids is not None else self.eos_token_ids())
        first = min((*request.starts, request.own_start))
        self.support.check_span(first, request.own_start + len(request.own) + sampling.max_new_tokens - 2)
        cache, store = self.cache, self.cache.store
        held, copies, own_blocks = [], [], []
        hits = misses = prefilled = copied = 0
        with attention_implementation(self.model, ATTENTION_NAME):
            try:
                placements = []
                for tokens, start in zip(request.segments, request.starts, strict=True):
                    seg, hit = store.acquire(tokens=torch.tensor(tokens))
                    held.append(seg)
                    if not hit:
                        self._prefill_segment(seg, tokens)
                        store.seal(seg)
                        prefilled += len(tokens)
                    hits, misses = hits + hit, misses + (not hit)
                    placement, nbytes = self._place(seg, start, strategy, copies)
                    placements.append(placement)
                    copied += nbytes
                own_blocks = store.allocate(store.blocks_needed(len(request.own) + sampling.max_new_tokens))
                tokens, logits0, own_logits = self._decode(
                    request, tuple(placements), own_blocks, sampling, stop, keep_own_logits
                )
                peak = cache.pool.num_used
            finally:
                for seg in held:
                    store.release(seg)
                for blocks in copies:
                    cache.pool.release(blocks)
                if own_blocks:
                    cache.pool.release(own_blocks)
        stats = RequestStats(hits, misses, prefilled, copied, peak)
        return Answer(self.decode(tokens), tokens, logits0, stats), own_logits

    def _place(self, seg, start: int, strategy: str, copies: list) -> tuple[Placement, int]:
        """The segment at logical ``start`` as ``strategy`` reads it (eq. 6), and the bytes copied."""
        if strategy == "lazy":  # keys stay as stored at 0..L−1: shift δ = start
            return Placement(seg.blocks, seg.length, start), 0
        if strategy == "no_shift":  # the control: the stored keys taken as if they sat at start
            return Placement(seg.blocks, seg.length, start, stored_start=start), 0
        blocks, nbytes = self.cache.copy_rerotated(seg, start, self.support.rotation)  # Block-Attention
        copies.append(blocks)
        return Placement(tuple(blocks), seg.length, start, stored_start=start), nbytes

    def eos_token_ids(self) -> tuple[int, ...]:
        """The model's end-of-sequence ids."""
        return eos_token_ids(self.model, self.tokenizer)

    def decode(self, tokens) -> str:
        """Text of ``tokens`` (empty without a tokenizer)."""
        return "" if self.tokenizer is None else self.tokenizer.decode(tokens)

    # ------------------------------------------------------------------ steps

    def _forward(self, token_ids, step: Step, all_logits: bool = False) -> torch.Tensor:
        """One forward pass at ``position_ids = 0``; logits ``[T, V]`` (or ``[1, V]``)."""
        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.model.device)
        out = self.model(
            input_ids=ids,
            position_ids=torch.zeros_like(ids),
            cache=self.cache,
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,
            **{STEP_KWARG: step},
        )
        return out.logits[0]

    def _step(self, segments, own: Placement, num_queries: int, slots, positions) -> Step:
        layout = Layout([RequestLayout(segments, own, num_queries)], self.cache.block_size)
        return Step(layout, slots, positions.to(slots.device), self.support.rotation, self.ops)

    def _prefill_segment(self, seg, tokens) -> None:
        """A segment alone, at stored positions ``0..L−1`` (its canonical form, eq. 6)."""
        n = len(tokens)
        own = Placement(seg.blocks, n, 0)
        step = self._step((), own, n, self.cache.slots(seg.blocks, 0, n), torch.arange(n))
        with torch.no_grad():
            self._forward(tokens, step)

    def _decode(self, request: Request, placements, own_blocks, sampling: Sampling, stop, keep_own_logits: bool):
        """Prefill the own tokens, then decode one token per step.

        Returns the new tokens, the first token's logits ``[V]`` and (if asked) the own
        tokens' logits ``[P, V]``, float32.
        """
        p, start, bs = len(request.own), request.own_start, self.cache.block_size

        def own(length):
            return Placement(tuple(own_blocks[: -(-length // bs)]), length, start, stored_start=start)

        gen = sampling.generator()
        with torch.no_grad():
            step = self._step(placements, own(p), p, self.cache.slots(own_blocks, 0, p), torch.arange(p) + start)
            logits = self._forward(request.own, step, all_logits=keep_own_logits)
            own_logits = _widen(logits) if keep_own_logits else None
            first = _widen(logits[-1])
            tokens = []
            for i in range(sampling.max_new_tokens):
                token = sampling.pick(logits[-1], gen)
                if token in stop:
                    break
                tokens.append(token)
                if i == sampling.max_new_tokens - 1:
                    break
                n = p + i + 1
                slots = self.cache.slots(own_blocks, n - 1, n)
                step = self._step(placements, own(n), 1, slots, torch.tensor([start + n - 1]))
                logits = self._forward([token], step)
        return tokens, first, own_logits


def _widen(logits: torch.Tensor) -> torch.Tensor:
    """float64 stays float64, everything else becomes float32."""
    return logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)


def eos_token_ids(model, tokenizer) -> tuple[int, ...]:
    """End-of-sequence ids: the model's generation config, else the tokenizer's, else none."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
