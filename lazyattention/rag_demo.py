"""The demo in real text: SmolLM2 answers questions from documents cached once.

A handful of short documents is cached once each (prefilled alone at ``0..L−1``).
Every question then places its documents in a new order at a new offset — from 0 up
to positions past 2^16 and 2^20 — and is answered three ways, printed side by side:

* **lazy**: the cached keys as they are, the query turned by ``−δ`` per document
  (zero copy);
* **Block-Attention**: each document's K/V copied and re-rotated to its offset for
  the request, then ordinary attention;
* **full attention**: the whole prompt through ``model.generate``, documents seeing
  each other (what the model was trained for; the documents at ``0..T−1``).

Lazy and Block-Attention compute one function, so in float32 their greedy tokens must
agree token for token: the demo raises if they do not. Full attention is a different
function (documents see each other), so its answers may differ in wording.
"""

from __future__ import annotations

import time

import torch

__all__ = ["DOCUMENTS", "QUESTIONS", "run_rag_demo"]

#: Short documents; the answers are in them and nowhere else.
DOCUMENTS = (
    "The Harbor Museum in Lisbon opened in 1987. Its director is Marta Silva, "
    "and its largest exhibit is a wooden fishing boat called the Gaivota.",
    "The Vienna Observatory was founded in 1902 by the astronomer Karl Weber. "
    "Its main telescope has a mirror 68 centimetres wide.",
    "Nordlys is the oldest bakery in Oslo. It opens at six in the morning and is famous for its cardamom buns.",
    "The Green Line tram in Porto runs every twelve minutes between the river "
    "and the university, and a single ticket costs two euros.",
)

#: ``(question, indices of its documents in order, offset of the first segment)``.
QUESTIONS = (
    ("Who is the director of the Harbor Museum?", (0, 1, 2), 0),
    ("What is Nordlys famous for?", (3, 2, 0), 70_000),
    ("How often does the Green Line tram run?", (1, 3), 1_100_000),
    ("Who founded the Vienna Observatory?", (2, 1, 3, 0), 1_048_600),
)

_MAX_NEW_TOKENS = 12


def _row(label: str, text: str, width: int = 64) -> str:
    text = " ".join(text.split())
    return f"  {label:<16} {text[:width]}{'…' if len(text) > width else ''}"


def run_rag_demo(backend: str, device: str, seed: int = 0) -> int:
    """Answer :data:`QUESTIONS` from :data:`DOCUMENTS` with SmolLM2-135M-Instruct.

    Args:
        backend: ``"reference"`` or ``"fast"`` (the lazy and Block-Attention runs).
        device: where the model runs (``"cpu"``, ``"cuda"``).
        seed: seeds torch (the answers are greedy; the seed fixes nothing else).

    Returns:
        0. Raises ``RuntimeError`` if lazy and Block-Attention disagree on a token, and
        ``ModuleNotFoundError`` (naming the pip command) if the model package is missing.
    """
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    # One thread for the run, restored after: decoding one token of a 135M model is a
    # chain of small matmuls that threads do not speed up, and on a shared machine
    # their spin-waits cost more than the arithmetic (measured: 55 s with one thread,
    # no answer after 8 min with two, on 2 busy cores).
    torch.set_num_threads(1)
    try:
        return _run(backend, device)
    finally:
        torch.set_num_threads(threads)


def _run(backend: str, device: str) -> int:
    from lazyattention.integrations.transformers import LazyRAG, Sampling, full_attention
    from lazyattention.integrations.transformers.pretrained import load_pretrained

    began = time.perf_counter()
    model, tokenizer = load_pretrained(dtype=torch.float32, device=device)
    rag = LazyRAG(model, tokenizer, backend=backend, num_blocks=256, block_size=16)
    sampling = Sampling(max_new_tokens=_MAX_NEW_TOKENS)
    loaded = time.perf_counter() - began
    print(f"SmolLM2-135M-Instruct on {device}, backend={backend}, float32 (loaded in {loaded:.1f} s)")
    print(f"{len(DOCUMENTS)} documents, each cached once; every question reuses them in a new order and offset.\n")
    mismatches = 0
    for question, picks, offset in QUESTIONS:
        docs = [DOCUMENTS[i] for i in picks]
        lazy = rag.answer(question, docs, offset=offset, sampling=sampling)
        block = rag.answer(question, docs, offset=offset, strategy="block", sampling=sampling)
        full = full_attention(model, tokenizer, rag.request(question, docs), sampling)
        same = lazy.tokens == block.tokens
        mismatches += not same
        agree_full = sum(a == b for a, b in zip(lazy.tokens, full.tokens, strict=False))
        print(f"Q: {question}")
        print(f"   documents {list(picks)} at positions {offset:,}…; cache hits {lazy.stats.cache_hits}")
        print(_row("lazy", lazy.text))
        print(_row("Block-Attention", block.text))
        print(_row("full attention", full.text))
        print(
            f"   lazy = Block-Attention: {'yes' if same else 'NO'} ({len(lazy.tokens)} tokens); "
            f"bytes copied: lazy {lazy.stats.bytes_copied:,}, Block-Attention {block.stats.bytes_copied:,}; "
            f"lazy vs full attention: {agree_full}/{max(len(lazy.tokens), len(full.tokens))} tokens agree\n"
        )
    elapsed = time.perf_counter() - began
    print(f"done in {elapsed:.1f} s; blocks in use {rag.cache.pool.num_used} of {rag.cache.pool.num_blocks}")
    if mismatches:
        raise RuntimeError(f"lazy and Block-Attention disagreed on {mismatches} of {len(QUESTIONS)} answers in float32")
    print("lazy = Block-Attention, token for token, on every question.")
    return 0
