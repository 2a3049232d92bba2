"""The demo in real text: SmolLM2 answers questions from documents cached once.

A handful of short documents is cached once each (computed alone, at positions
``0..L−1``). Every question then places its documents in a new order at a new offset —
from 0 up to positions past 2^16 and 2^20 — and is answered three ways:

* **full attention**: the whole prompt computed from scratch, the documents seeing each
  other (how the model was trained);
* **lazy**: each cached document reused as it is, wherever the question puts it (zero
  copy);
* **Block-Attention**: each cached document copied and re-rotated to its new place.

Lazy and Block-Attention compute one function (documents read apart), so in float32
their answers must agree token for token: the demo raises if they do not. A stock model
was never trained to read documents apart, so it can answer worse that way than with
full attention; the block fine-tuned SmolLM2 that ships with the package
(:mod:`lazyattention.training.adapter`) was, and answers beside it. Each answer is
marked right or wrong against the expected answer (it must appear in the reply), and a
short table ends the run.
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
    "Karl Weber grew up in Graz, the son of a clockmaker, and studied mathematics before he turned to the stars.",
)

#: ``(question, indices of its documents in order, offset of the first segment, expected answer)``.
QUESTIONS = (
    ("Who is the director of the Harbor Museum?", (0, 1, 2), 0, "Marta Silva"),
    ("What is Nordlys famous for?", (3, 2, 0), 70_000, "cardamom buns"),
    ("How often does the Green Line tram run?", (1, 3), 1_100_000, "twelve minutes"),
    ("Who founded the Vienna Observatory?", (2, 1, 3, 0), 1_048_600, "Karl Weber"),
    # two documents needed: the observatory's founder, then where he grew up
    ("Where did the founder of the Vienna Observatory grow up?", (4, 3, 1), 2_000_000, "Graz"),
)

#: The three ways of answering, in the order shown: (key, label).
WAYS = (
    ("full", "full attention"),
    ("lazy", "lazy"),
    ("block", "Block-Attention"),
)

_MAX_NEW_TOKENS = 12
_WIDTH = 60


def _clip(text: str, width: int, keep: str = "") -> str:
    """``text`` on one line in ``width`` characters; when cut, the part holding ``keep`` stays."""
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    at = text.lower().find(keep.lower()) if keep else -1
    if at < 0 or at + len(keep) <= width - 1:
        return text[: width - 1] + "…"
    start = max(0, at + len(keep) - (width - 2))
    return "…" + text[start : start + width - 2] + "…"


def run_rag_demo(backend: str, device: str, seed: int = 0) -> int:
    """Answer :data:`QUESTIONS` from :data:`DOCUMENTS` with SmolLM2-135M-Instruct, and with
    its block fine-tune when the package ships the adapter and ``peft`` is installed.

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


def _models(device: str) -> tuple[dict, object, str | None]:
    """``({label: model}, tokenizer, why the fine-tuned model is missing or None)``."""
    from lazyattention.integrations.transformers.pretrained import load_pretrained

    base, tokenizer = load_pretrained(dtype=torch.float32, device=device)
    models = {"base SmolLM2": base}
    try:
        from lazyattention.training.adapter import load_block_ft

        models["block fine-tuned"] = load_block_ft(dtype=torch.float32, device=device)[0]
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        return models, tokenizer, str(exc)
    return models, tokenizer, None


def _run(backend: str, device: str) -> int:
    from lazyattention.integrations.transformers import LazyRAG, Sampling, full_attention
    from lazyattention.integrations.transformers.qa import subspan_em

    began = time.perf_counter()
    models, tokenizer, missing = _models(device)
    rags = {name: LazyRAG(m, tokenizer, backend=backend, num_blocks=256, block_size=16) for name, m in models.items()}
    sampling = Sampling(max_new_tokens=_MAX_NEW_TOKENS)
    print(
        f"SmolLM2-135M-Instruct on {device}, float32, backend={backend} (loaded in {time.perf_counter() - began:.1f} s)"
    )
    if missing:
        print(f"The block fine-tuned model is not shown: {missing}")
    print(f"{len(DOCUMENTS)} documents, each cached once; every question reuses them in a new order and place.")
    print("  full attention:  the whole prompt computed at once, the documents seeing each other")
    print("  lazy:            each cached document read where the question places it, nothing copied")
    print("  Block-Attention: each cached document copied and re-rotated to its place, then read\n")
    correct = {(name, way): 0 for name in models for way, _ in WAYS}
    mismatches, turned = [], []
    for number, (question, picks, offset, expected) in enumerate(QUESTIONS, 1):
        docs = [DOCUMENTS[i] for i in picks]
        lazy_right = {}
        print(f"Q{number}  {question}   expected: {expected}")
        print(f"    its documents, placed from position {offset:,}:")
        for i in picks:
            print(f"      [{i}] {_clip(DOCUMENTS[i], 92)}")
        print(f"    {'model':<18}{'read with':<17}answer (✓ right, ✗ wrong)")
        for name, rag in rags.items():
            request = rag.request(question, docs, offset=offset)
            answers = {
                "full": full_attention(rag.model, tokenizer, request, sampling),
                "lazy": rag.generate(request, "lazy", sampling),
                "block": rag.generate(request, "block", sampling),
            }
            same = answers["lazy"].tokens == answers["block"].tokens
            if not same:
                mismatches.append(f"Q{number} ({name})")
            for k, (way, label) in enumerate(WAYS):
                answer = answers[way]
                right = subspan_em(answer.text, expected)
                correct[name, way] += right
                text = "the same tokens as lazy" if way == "block" and same else _clip(answer.text, _WIDTH, expected)
                print(f"    {name if k == 0 else '':<18}{label:<17}{'✓' if right else '✗'} {text}")
            lazy_right[name] = subspan_em(answers["lazy"].text, expected)
        if list(lazy_right.values()) == [False, True]:
            turned.append(number)
        print()
    _summary(models, correct, turned)
    print(f"done in {time.perf_counter() - began:.1f} s")
    if mismatches:
        raise RuntimeError(f"lazy and Block-Attention disagreed in float32 on {', '.join(mismatches)}")
    print("lazy = Block-Attention, token for token, on every question.\n")
    return 0


def _summary(models: dict, correct: dict, turned: list[int]) -> None:
    n = len(QUESTIONS)
    print(f"Right answers out of {n}:")
    print(f"    {'':<20}" + "".join(f"{label:>18}" for _, label in WAYS))
    for name in models:
        print(f"    {name:<20}" + "".join(f"{f'{correct[name, way]}/{n}':>18}" for way, _ in WAYS))
    if turned:
        which = ", ".join(f"Q{k}" for k in turned)
        print(
            f"On {which} the base model, reading the documents apart (lazy and Block-Attention), answers wrong, "
            "and the block fine-tuned model answers right."
        )
