"""The user API: documents and a question in, text out, documents cached once.

:class:`LazyRAG` wraps a stock ``LlamaForCausalLM`` / ``MistralForCausalLM`` /
``Qwen2ForCausalLM`` and its tokenizer. Each document is prefilled alone at positions
``0..L−1`` into a :class:`~lazyattention.integrations.transformers.cache.PagedCache`
(content-hashed: a document seen before is a hit and costs nothing); a request places
its documents at any starts and decodes with the registered attention implementation,
which runs the backend's ``lazy_prefill``/``lazy_decode`` over the paged cache.

Many requests run together (:meth:`LazyRAG.answer_batch`): transformers' model runs the
tokens of several requests as one sequence of batch 1 at ``position_ids = 0`` (its MLP
and norms act per token), and the step's multi-request layout says which cached blocks
each token attends to. A decode step of ``B`` requests is one forward of ``B`` tokens;
documents shared by several requests are read from their one cached copy.

The loop is the integration's own, because ``model.generate`` cannot run a lazy request
through transformers' supported hooks: it advances ``position_ids`` by one per step from
the last one given (the model must stay at position 0, the reason is in
:mod:`lazyattention.integrations.transformers.attention`), and it passes the forward's
keyword arguments unchanged to every step, while each step needs its own layout and
slots. :class:`Sampling` gives the loop ``generate``'s options: EOS and extra stop ids,
stop strings, ``max_time``, and a ``streamer`` with transformers' ``put``/``end``
interface (``TextStreamer``, ``TextIteratorStreamer``). Contiguous full attention — the
ordinary way to run the model — is
:func:`~lazyattention.integrations.transformers.baselines.full_attention`, a layer over
``model.generate``.

Example:
    >>> rag = LazyRAG(model, tokenizer)                                # doctest: +SKIP
    >>> out = rag.answer("Where is the lab?", ["The lab is in Oslo.", "Ada runs it."])  # doctest: +SKIP
    >>> out.text, out.stats.cache_hits, out.stats.bytes_copied         # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from lazyattention.backends import Backend, default_backend, get_backend
from lazyattention.reference import Layout, Placement, RequestLayout, ceil_div

from .attention import ATTENTION_NAME, STEP_KWARG, Step, attention_implementation, register
from .cache import PagedCache
from .graphs import StepGraphs, scratch_blocks
from .support import ModelSupport, check_model

__all__ = [
    "STRATEGIES",
    "FINISH_REASONS",
    "INSTRUCTION",
    "Sampling",
    "RequestStats",
    "Answer",
    "RAGRequest",
    "LazyRAG",
    "chat_parts",
    "eos_token_ids",
    "default_cpu_threads",
]

#: ``"lazy"``: zero copy, the query turned by ``−δ`` per block. ``"block"``: Block-Attention,
#: each document's K/V copied and re-rotated by ``δ`` per request, then attended at shift 0.
#: ``"no_shift"``: the negative control, wrong on purpose — the cached keys used as if every
#: document sat where it was stored (at 0), which is what a cache without shifts computes.
STRATEGIES = ("lazy", "block", "no_shift")

#: Tokens of cached segments prefilled in one forward at most (several segments missing
#: from the cache go through one forward, each seeing only itself).
PREFILL_TOKENS = 8192

#: Document texts whose token ids a :class:`LazyRAG` remembers (least recently used go first).
ENCODED_DOCUMENTS = 4096

#: Why an answer ended: a stop token (EOS or ``stop_token_ids``), a stop string,
#: ``max_new_tokens``, or ``max_time``.
FINISH_REASONS = ("stop_token", "stop_string", "length", "time")


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
        stop_token_ids: more ids that end generation, besides the model's EOS.
        ignore_eos: do not stop at the model's EOS (``stop_token_ids`` still stop).
        stop: stop strings: generation ends once the answer's text contains one, and the
            text is cut before it (the tokens keep the ones that spelled it, as
            ``generate`` keeps them).
        max_time: seconds a request may take, from the start of the call (prefills
            included); the answer ends after the token that crosses it.
    """

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    max_time: float | None = None

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.stop_token_ids is None or isinstance(self.stop_token_ids, int):
            raise TypeError(
                f"stop_token_ids must be a tuple of ints (added to EOS; ignore_eos=True turns EOS off), "
                f"got {self.stop_token_ids!r}"
            )
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise TypeError(f"stop must be a tuple of non-empty strings, got {self.stop!r}")
        if self.max_time is not None and not self.max_time > 0:
            raise ValueError(f"max_time must be a positive number of seconds, got {self.max_time!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "stop", tuple(self.stop))

    def stop_ids(self, eos: Sequence[int]) -> frozenset[int]:
        """The ids that end generation: ``eos`` (unless :attr:`ignore_eos`) and :attr:`stop_token_ids`."""
        return frozenset(() if self.ignore_eos else eos) | frozenset(self.stop_token_ids)

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


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string, and whether one was found."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(found)], True) if found else (text, False)


@dataclass(frozen=True)
class RequestStats:
    """What one request cost the cache.

    Args:
        cache_hits: segments found cached (each use counted, duplicates included).
        cache_misses: segments prefilled alone by this request.
        prefilled_tokens: tokens of those prefills.
        bytes_copied: K/V bytes copied for the request (0 for ``"lazy"``).
        blocks_in_use: blocks the pool held at the call's peak (cached segments and the
            other requests of a batch included).
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
        text: the decoded new tokens (stop token excluded, cut before a stop string).
        tokens: the new token ids (stop token excluded).
        first_logits: ``[V]`` float32 logits that chose the first token.
        stats: the request's :class:`RequestStats`.
        finish_reason: one of :data:`FINISH_REASONS`.
    """

    text: str
    tokens: list[int]
    first_logits: torch.Tensor
    stats: RequestStats
    finish_reason: str


@dataclass(frozen=True)
class RAGRequest:
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
    def packed(cls, segments, own, offset: int = 0, starts=None) -> RAGRequest:
        """Segments back to back from ``offset`` (or at ``starts``), own tokens after the furthest end.

        Empty segments are dropped (with their starts).
        """
        segments = [tuple(map(int, s)) for s in segments]
        if starts is None:
            starts, pos = [], offset
            for s in segments:
                starts.append(pos)
                pos += len(s)
        starts = [int(s) for s in starts]
        if len(starts) != len(segments):
            raise ValueError(f"starts has {len(starts)} entries for {len(segments)} segments")
        kept = [(seg, s) for seg, s in zip(segments, starts, strict=True) if seg]
        end = max((s + len(seg) for seg, s in kept), default=offset)
        return cls(tuple(seg for seg, _ in kept), tuple(s for _, s in kept), tuple(map(int, own)), end)

    def __post_init__(self):
        if not self.own:
            raise ValueError("a request needs at least one own token")
        if len(self.starts) != len(self.segments):
            raise ValueError(f"starts has {len(self.starts)} entries for {len(self.segments)} segments")
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
    tokenizer,
    question: str,
    instruction: str = INSTRUCTION,
    system: str | None = None,
    marker: str = "\x00DOCS\x00",
) -> tuple[str, str]:
    """The chat template around the documents: ``(head, tail)`` text.

    The user turn is ``<documents><instruction>\\nQuestion: …``; ``head`` is everything
    before the documents (a cacheable segment, like a system prompt: the system turn is
    in it), ``tail`` the instruction, the question and the assistant header. ``system``
    ``None`` keeps the template's default system turn. Without a chat template:
    ``("<system>\\n\\n" or "", "<instruction>\\nQuestion: …\\nAnswer:")``.
    """
    content = f"{marker}{instruction}\nQuestion: {question}"
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": content}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        head, tail = text.split(marker)
        return head, tail
    return (f"{system}\n\n" if system else ""), f"{instruction}\nQuestion: {question}\nAnswer:"


def default_cpu_threads() -> int:
    """:class:`LazyRAG`'s intra-op threads on a CPU unless told: torch's current count,
    capped at half the CPU cores (1 to 8).

    Decoding a small model is a chain of small matmuls: more threads than that add
    hand-off and spin-wait cost, and on a machine other work shares, torch's default (every
    core) made a run 7.6x slower than one thread (836 s against 110 s on 2 busy cores). A
    lower count set with ``torch.set_num_threads`` is kept.
    """
    return max(1, min(torch.get_num_threads(), 8, (os.cpu_count() or 2) // 2))


@contextmanager
def torch_threads(count: int | None):
    """Run the block with ``count`` intra-op threads (``None``: as set), then restore them."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class _Live:
    """One request in flight: its placement in the cache and what it has generated."""

    request: RAGRequest
    sampling: Sampling
    stop: frozenset[int]
    streamer: object | None
    placements: tuple[Placement, ...] = ()
    own_blocks: list[int] = field(default_factory=list)
    hits: int = 0
    misses: int = 0
    prefilled: int = 0
    copied: int = 0
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    first: torch.Tensor | None = None
    own_logits: torch.Tensor | None = None
    finish: str | None = None

    @property
    def length(self) -> int:
        """Own tokens in the cache once the last generated token is fed back."""
        return len(self.request.own) + len(self.tokens)

    def layout(self, block_size: int, length: int, num_queries: int) -> RequestLayout:
        """The request with its first ``length`` own tokens written, the last ``num_queries`` queried."""
        start = self.request.own_start
        own = Placement(tuple(self.own_blocks[: ceil_div(length, block_size)]), length, start, stored_start=start)
        return RequestLayout(self.placements, own, num_queries)


class LazyRAG:
    """Documents plus a question into text, with each document's KV cached once.

    Args:
        model: a ``LlamaForCausalLM``, ``MistralForCausalLM`` or ``Qwen2ForCausalLM``
            (any dtype and device); during each request its attention implementation is
            :data:`~lazyattention.integrations.transformers.attention.ATTENTION_NAME`,
            afterwards the one it had.
        tokenizer: its transformers tokenizer, or ``None`` to work in token ids only
            (:meth:`generate` with a :class:`RAGRequest`; answers then have empty text).
        backend: a backend name of :data:`~lazyattention.backends.BACKENDS` (``"reference"``,
            ``"sdpa"``, ``"fast"``) or a :class:`~lazyattention.backends.Backend`; it raises
            when it cannot run here (``"fast"`` without Triton or a GPU), never falls back.
            ``None`` picks :func:`~lazyattention.backends.default_backend` for the model's
            device: ``"sdpa"`` on a CPU, ``"fast"`` on CUDA.
        num_blocks: physical blocks of the paged cache.
        block_size: tokens per block.
        num_threads: torch's intra-op threads while a request runs on a CPU model,
            restored afterwards (default: :func:`default_cpu_threads` at each call, torch's
            count capped at half the cores, 1 to 8); ignored for a model on a GPU.
        cuda_graphs: replay decode steps and prefills of up to 512 tokens from CUDA
            graphs (:mod:`~lazyattention.integrations.transformers.graphs`). ``None``
            (the default): wherever the backend captures on the model's device
            (``"fast"`` on CUDA). ``True`` raises where it does not; ``False`` runs every
            step eagerly.

    Raises:
        UnsupportedModel: the architecture or its RoPE cannot be served (see
            :func:`~lazyattention.integrations.transformers.support.check_model`).
    """

    def __init__(
        self,
        model,
        tokenizer,
        backend: str | Backend | None = None,
        num_blocks: int = 1024,
        block_size: int = 16,
        num_threads: int | None = None,
        cuda_graphs: bool | None = None,
    ):
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise ValueError(f"num_threads must be a positive int, got {num_threads!r}")
        self.support: ModelSupport = check_model(model)
        self.backend = default_backend(model.device) if backend is None else get_backend(backend)
        self.ops = self.backend.ops
        self.model = model
        self.tokenizer = tokenizer
        capturable = self.backend.captures_on(model.device)
        if cuda_graphs is None:
            cuda_graphs = capturable
        elif cuda_graphs and not capturable:
            raise ValueError(
                f"cuda_graphs=True needs a backend that captures on the model's device ({model.device}): "
                f'backend {self.backend.name!r} does not ("fast" on CUDA does)'
            )
        scratch = scratch_blocks(block_size) if self.backend.capabilities.cuda_graphs else 0
        self.cache = PagedCache.for_model(model, num_blocks, block_size, scratch)
        #: The CUDA graphs of decode steps and question prefills; ``None`` when steps run eagerly.
        self.graphs = (
            StepGraphs(self._run_model, self.cache, self.support.rotation, self.backend) if cuda_graphs else None
        )
        self._encoded: OrderedDict[str, list[int]] = OrderedDict()
        on_cpu = torch.device(model.device).type == "cpu"
        self.num_threads = num_threads if on_cpu else None
        self._on_cpu = on_cpu
        register()

    # ------------------------------------------------------------------ text API

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no special tokens added."""
        if self.tokenizer is None:
            raise ValueError("this LazyRAG has no tokenizer: pass token ids in a RAGRequest to generate()")
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _encode_document(self, text: str) -> list[int]:
        """Token ids of a document (with its trailing blank line), remembered for the
        last :data:`ENCODED_DOCUMENTS` texts: a cached document is not tokenized again."""
        ids = self._encoded.get(text)
        if ids is None:
            ids = self._encoded[text] = self.encode(text + "\n\n")
            if len(self._encoded) > ENCODED_DOCUMENTS:
                self._encoded.popitem(last=False)
        else:
            self._encoded.move_to_end(text)
        return ids

    def request(
        self,
        question: str,
        documents: Sequence[str],
        offset: int = 0,
        starts: Sequence[int] | None = None,
        system: str | None = None,
        instruction: str = INSTRUCTION,
    ) -> RAGRequest:
        """The token-level :class:`RAGRequest` of :meth:`answer` (the chat head is segment 0).

        Args: as :meth:`answer`'s.

        Raises:
            TypeError: ``documents`` is a string, or holds something other than strings.
            ValueError: ``starts`` does not give one start per document.
        """
        if isinstance(documents, str):
            raise TypeError("documents must be a list of texts, got one str: pass [text] for a single document")
        documents = list(documents)
        if not all(isinstance(d, str) for d in documents):
            bad = next(d for d in documents if not isinstance(d, str))
            raise TypeError(f"documents must be texts, got a {type(bad).__name__}")
        head, tail = chat_parts(self.tokenizer, question, instruction, system)
        head_ids = self.encode(head) if head else []
        docs = [self._encode_document(doc) for doc in documents]
        first = offset + len(head_ids)
        if starts is None:
            doc_starts = list(_running_starts(docs, first))
        else:
            starts = list(starts)
            if len(starts) != len(documents):
                raise ValueError(f"starts has {len(starts)} entries for {len(documents)} documents")
            doc_starts = [first + int(s) for s in starts]
        segments = [head_ids, *docs] if head_ids else docs
        seg_starts = [offset, *doc_starts] if head_ids else doc_starts
        return RAGRequest.packed(segments, self.encode(tail), offset=offset, starts=seg_starts)

    def answer(
        self,
        question: str,
        documents: Sequence[str],
        offset: int = 0,
        starts: Sequence[int] | None = None,
        strategy: str = "lazy",
        sampling: Sampling | None = None,
        system: str | None = None,
        instruction: str = INSTRUCTION,
        streamer=None,
    ) -> Answer:
        """Answer ``question`` from ``documents``.

        Args:
            question: the question text.
            documents: document texts, in the order they are placed (a list: one ``str``
                is refused, not split into characters).
            offset: logical position of the first segment (the chat head).
            starts: where each document starts, counted from the first position after
                the chat head (default: back to back, ``0, L_0, L_0 + L_1, …``); any
                order, gaps and overlaps.
            strategy: ``"lazy"`` (zero copy), ``"block"`` (Block-Attention: copy + re-rotate)
                or ``"no_shift"`` (the negative control; see :data:`STRATEGIES`).
            sampling: decoding options (greedy, 32 new tokens, stop at EOS by default).
            system: the system turn of the chat template (``None``: the template's default).
            instruction: the line between the documents and the question.
            streamer: receives the tokens as they come, as ``generate``'s ``streamer``
                does: ``put`` with the prompt's ids, then each new token, then ``end()``
                (a transformers ``TextStreamer`` or ``TextIteratorStreamer``).
        """
        request = self.request(question, documents, offset, starts, system, instruction)
        return self.generate(request, strategy, sampling, streamer)

    def answer_batch(
        self,
        questions: Sequence[str],
        documents: Sequence[Sequence[str]],
        offsets: Sequence[int] | None = None,
        strategy: str = "lazy",
        sampling: Sampling | None = None,
        system: str | None = None,
        instruction: str = INSTRUCTION,
    ) -> list[Answer]:
        """Answer many questions together, each from its own documents.

        Every answer equals what :meth:`answer` gives for that request alone (up to
        floating-point rounding of the batched matmuls); a document used by several
        requests is cached once and read by all of them.

        Args:
            questions: the questions.
            documents: one list of document texts per question.
            offsets: the logical position of each request's first segment (default: 0).
            strategy: as :meth:`answer`'s.
            sampling: the decoding options of every request.
            system: as :meth:`answer`'s.
            instruction: as :meth:`answer`'s.
        """
        if isinstance(questions, str):
            raise TypeError("questions must be a list of texts, got one str: use answer() for a single question")
        offsets = [0] * len(questions) if offsets is None else list(offsets)
        if not len(questions) == len(documents) == len(offsets):
            raise ValueError(
                f"one entry per question: {len(questions)} questions, {len(documents)} document lists, "
                f"{len(offsets)} offsets"
            )
        requests = [
            self.request(q, docs, off, system=system, instruction=instruction)
            for q, docs, off in zip(questions, documents, offsets, strict=True)
        ]
        return self.generate_batch(requests, strategy, sampling)

    # ------------------------------------------------------------------ token API

    def generate(
        self, request: RAGRequest, strategy: str = "lazy", sampling: Sampling | None = None, streamer=None
    ) -> Answer:
        """Decode ``request``: cache its segments (hits reused), prefill its own tokens, decode."""
        sampling = sampling or Sampling()
        return self._run([_Live(request, sampling, self._stop_ids(sampling), streamer)], strategy, False)[0][0]

    def generate_batch(
        self, requests: Sequence[RAGRequest], strategy: str = "lazy", sampling: Sampling | None = None
    ) -> list[Answer]:
        """Decode ``requests`` together: one forward per step for all of them (see :meth:`answer_batch`)."""
        sampling = sampling or Sampling()
        stop = self._stop_ids(sampling)
        return [answer for answer, _ in self._run([_Live(r, sampling, stop, None) for r in requests], strategy, False)]

    def own_logits(self, request: RAGRequest, strategy: str = "lazy") -> torch.Tensor:
        """``[P, V]`` float32 logits of every own token of ``request`` (for equivalence checks)."""
        one = Sampling(max_new_tokens=1, ignore_eos=True)
        return self._run([_Live(request, one, frozenset(), None)], strategy, True)[0][1]

    def eos_token_ids(self) -> tuple[int, ...]:
        """The model's end-of-sequence ids."""
        return eos_token_ids(self.model, self.tokenizer)

    def decode(self, tokens) -> str:
        """Text of ``tokens`` (empty without a tokenizer)."""
        return "" if self.tokenizer is None else self.tokenizer.decode(tokens)

    def _stop_ids(self, sampling: Sampling) -> frozenset[int]:
        if sampling.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: this LazyRAG has none")
        return sampling.stop_ids(self.eos_token_ids())

    # ------------------------------------------------------------------ one call

    def _run(self, live: list[_Live], strategy: str, keep_own_logits: bool):
        """Place every request's segments (prefilling misses), then generate; release all."""
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if not live:
            raise ValueError("no requests to run")
        for item in live:
            req = item.request
            first = min((*req.starts, req.own_start))
            self.support.check_span(first, req.own_start + len(req.own) + item.sampling.max_new_tokens - 2)
        began = time.perf_counter()
        store, held, copies = self.cache.store, [], []
        threads = (self.num_threads or default_cpu_threads()) if self._on_cpu else None
        with torch_threads(threads), attention_implementation(self.model, ATTENTION_NAME):
            try:
                missing, segments = [], []
                for item in live:
                    segments.append([])
                    for tokens in item.request.segments:
                        seg, hit = store.acquire(tokens=tokens)
                        held.append(seg)
                        segments[-1].append(seg)
                        if not hit:
                            missing.append((seg, tokens))
                            item.prefilled += len(tokens)
                        item.hits, item.misses = item.hits + hit, item.misses + (not hit)
                self._prefill_segments(missing)
                for seg, _ in missing:
                    store.seal(seg)
                for item, segs in zip(live, segments, strict=True):
                    placements = []
                    for seg, start in zip(segs, item.request.starts, strict=True):
                        placement, nbytes = self._place(seg, start, strategy, copies)
                        placements.append(placement)
                        item.copied += nbytes
                    item.placements = tuple(placements)
                for item in live:
                    need = len(item.request.own) + item.sampling.max_new_tokens
                    item.own_blocks = store.allocate(store.blocks_needed(need))
                peak = self.cache.pool.num_used
                self._generate(live, keep_own_logits, began)
            finally:
                for item in live:
                    if item.streamer is not None and item.finish is None:
                        item.streamer.end()
                for seg in held:
                    store.release(seg)
                for blocks in copies + [item.own_blocks for item in live if item.own_blocks]:
                    self.cache.pool.release(blocks)
        return [
            (
                Answer(
                    item.text,
                    item.tokens,
                    item.first,
                    RequestStats(item.hits, item.misses, item.prefilled, item.copied, peak),
                    item.finish,
                ),
                item.own_logits,
            )
            for item in live
        ]

    def _place(self, seg, start: int, strategy: str, copies: list) -> tuple[Placement, int]:
        """The segment at logical ``start`` as ``strategy`` reads it (eq. 6), and the bytes copied."""
        if strategy == "lazy":  # keys stay as stored at 0..L−1: shift δ = start
            return Placement(seg.blocks, seg.length, start), 0
        if strategy == "no_shift":  # the control: the stored keys taken as if they sat at start
            return Placement(seg.blocks, seg.length, start, stored_start=start), 0
        blocks, nbytes = self.cache.copy_rerotated(seg, start, self.support.rotation)  # Block-Attention
        copies.append(blocks)
        return Placement(tuple(blocks), seg.length, start, stored_start=start), nbytes

    # ------------------------------------------------------------------ steps

    def _forward(self, token_ids, requests: list[RequestLayout], slots: torch.Tensor, positions: torch.Tensor,
                 keep: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """One forward pass of the step whose layout is ``requests`` (``slots`` and
        ``positions``: host tensors of its new tokens); logits ``[T, V]`` of every token,
        or of the rows ``keep`` only. From a CUDA graph where one serves the step."""
        layout = Layout(requests, self.cache.block_size)
        ids = torch.tensor(list(token_ids), dtype=torch.long)
        if self.graphs is not None:
            key = self.graphs.bucket(layout, keep)
            if key is not None:
                return self.graphs.run(ids, layout, slots, positions, key)
        device = self.model.device
        step = Step(layout, slots.to(device), positions.to(device), self.support.rotation, self.ops)
        return self._run_model(ids.to(device).unsqueeze(0), step, None if keep is None else keep.to(device))

    def _run_model(self, ids: torch.Tensor, step: Step, keep: torch.Tensor | None) -> torch.Tensor:
        """The model at ``position_ids = 0`` on ``ids [1, T]``; logits ``[T, V]``, or of the rows ``keep``."""
        out = self.model(
            input_ids=ids,
            position_ids=torch.zeros_like(ids),
            cache=self.cache,
            use_cache=True,
            logits_to_keep=0 if keep is None else keep,
            **{STEP_KWARG: step},
        )
        return out.logits[0]

    def _prefill_segments(self, missing) -> None:
        """Each segment of ``missing`` (``(segment, tokens)`` pairs) alone, at stored
        positions ``0..L−1`` (its canonical form, eq. 6): as many per forward as
        :data:`PREFILL_TOKENS` holds, each one a request of the step's layout that sees
        only itself."""
        for group in _groups(missing, PREFILL_TOKENS):
            layouts = [RequestLayout((), Placement(seg.blocks, len(t), 0), len(t)) for seg, t in group]
            slots = torch.cat([self.cache.slots(seg.blocks, 0, len(t)) for seg, t in group])
            positions = torch.cat([torch.arange(len(t)) for _, t in group])
            last = torch.tensor(list(itertools.accumulate(len(t) for _, t in group))) - 1
            with torch.no_grad():
                self._forward([x for _, t in group for x in t], layouts, slots, positions, keep=last)

    def _generate(self, live: list[_Live], keep_own_logits: bool, began: float) -> None:
        """Prefill every request's own tokens (in one forward, or one per group of
        requests that a CUDA graph's prefill holds), then decode one token per request
        per forward until each one finishes."""
        bs = self.cache.block_size
        groups = [live] if keep_own_logits else self._own_groups(live)  # every row's logits: an eager forward
        with torch.no_grad():
            for item in live:
                item.generator = item.sampling.generator()
                if item.streamer is not None:
                    item.streamer.put(torch.tensor([item.request.tokens_and_positions()[0]]))
            logits = torch.cat([self._prefill_own(group, keep_own_logits) for group in groups])
            for item, row in zip(live, logits, strict=True):
                item.first = _widen(row)
            active = live
            while True:
                picks = self._pick(active, logits)
                active = [item for item, token in zip(active, picks, strict=True) if self._take(item, token, began)]
                if not active:
                    return
                lengths = [item.length for item in active]  # the fed token is the last own token
                slots = [_slot(item.own_blocks, k - 1, bs) for item, k in zip(active, lengths, strict=True)]
                logits = self._forward(
                    [item.tokens[-1] for item in active],
                    [item.layout(bs, k, 1) for item, k in zip(active, lengths, strict=True)],
                    torch.tensor(slots),
                    torch.tensor([item.request.own_start + k - 1 for item, k in zip(active, lengths, strict=True)]),
                )

    def _own_groups(self, live: list[_Live]) -> list[list[_Live]]:
        """``live`` in order, split where a group's own tokens would outgrow the CUDA
        graphs' widest prefill (each request sees only itself, so the split changes
        nothing); one group when steps run eagerly."""
        if self.graphs is None:
            return [live]
        groups, tokens = [[]], 0
        for item in live:
            n = len(item.request.own)
            if groups[-1] and not self.graphs.prefill_fits(tokens + n, len(groups[-1]) + 1):
                groups.append([])
                tokens = 0
            groups[-1].append(item)
            tokens += n
        return groups

    def _prefill_own(self, items: list[_Live], keep_own_logits: bool) -> torch.Tensor:
        """One forward over the own tokens of ``items``; ``[B, V]`` the logits of each
        one's last token (and, with ``keep_own_logits``, each one's ``own_logits``)."""
        bs = self.cache.block_size
        tokens, slots, positions, layouts, ends = [], [], [], [], []
        for item in items:
            req, p = item.request, len(item.request.own)
            tokens += req.own
            slots.append(self.cache.slots(item.own_blocks, 0, p))
            positions.append(torch.arange(p) + req.own_start)
            layouts.append(item.layout(bs, p, p))
            ends.append(len(tokens) - 1)
        keep = None if keep_own_logits else torch.tensor(ends)
        logits = self._forward(tokens, layouts, torch.cat(slots), torch.cat(positions), keep)
        if not keep_own_logits:
            return logits
        for item, end in zip(items, ends, strict=True):
            item.own_logits = _widen(logits[end + 1 - len(item.request.own) : end + 1])
        return logits[torch.tensor(ends)]

    @staticmethod
    def _pick(live: list[_Live], logits: torch.Tensor) -> list[int]:
        """The next token of each request from its row of ``logits [B, V]``: the greedy
        ones in one ``argmax`` (one device-to-host copy per step), the sampled ones each
        from its own generator."""
        picks = logits.argmax(-1).tolist()
        for i, item in enumerate(live):
            if item.sampling.do_sample:
                picks[i] = item.sampling.pick(logits[i], item.generator)
        return picks

    def _take(self, item: _Live, token: int, began: float) -> bool:
        """Give ``item`` its next token; whether it goes on decoding."""
        if token in item.stop:
            return self._finish(item, "stop_token")
        item.tokens.append(token)
        if item.streamer is not None:
            item.streamer.put(torch.tensor([token]))
        if item.sampling.stop and cut_at_stop(self.decode(item.tokens), item.sampling.stop)[1]:
            return self._finish(item, "stop_string")
        if len(item.tokens) == item.sampling.max_new_tokens:
            return self._finish(item, "length")
        limit = item.sampling.max_time
        if limit is not None and time.perf_counter() - began >= limit:
            return self._finish(item, "time")
        return True

    def _finish(self, item: _Live, reason: str) -> bool:
        """End ``item`` for ``reason``: its text, cut before a stop string; its streamer ended."""
        item.finish = reason
        item.text = cut_at_stop(self.decode(item.tokens), item.sampling.stop)[0]
        if item.streamer is not None:
            item.streamer.end()
        return False


def _groups(items, budget: int):
    """``(segment, tokens)`` pairs in order, grouped so that each group holds at most
    ``budget`` tokens (a longer segment forms a group of its own)."""
    group, size = [], 0
    for item in items:
        if group and size + len(item[1]) > budget:
            yield group
            group, size = [], 0
        group.append(item)
        size += len(item[1])
    if group:
        yield group


def _slot(blocks, j: int, block_size: int) -> int:
    """The flat cache slot of token ``j`` of a run in ``blocks``."""
    return blocks[j // block_size] * block_size + j % block_size


def _running_starts(segments, first: int):
    """Starts of ``segments`` placed back to back from ``first``."""
    pos = first
    for seg in segments:
        yield pos
        pos += len(seg)


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
