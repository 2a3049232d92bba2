"""Before and after: a base model and its block fine-tune, each read three ways.

On held-out questions (:func:`~lazyattention.integrations.transformers.qa.wiki_set`,
``split="heldout"``), placed from offsets 0, 70,000 and 1,100,000 in turn:

* ``full``: full attention, the prompt as one causal sequence at ``0..T−1``
  (:func:`~lazyattention.integrations.transformers.baselines.full_attention`'s function);
* ``lazy`` and ``block``: :class:`~lazyattention.integrations.transformers.rag.LazyRAG`
  with zero copy, and with Block-Attention's copy and re-rotation;
* ``recompute``: the function lazy and Block-Attention compute (documents encoded
  apart, eq. 7) evaluated by transformers itself with the block-diagonal mask, in
  padded batches.

Measured per model and strategy: subspan exact match and token F1 (SQuAD
normalisation). Between the strategies: whether lazy and Block-Attention give the same
tokens (float32: they must), the per-step KL(full ‖ lazy) over the reference answer's
tokens (teacher-forced), and the attention the question and answer pay to each
document's first two tokens, as a share of what they pay to the documents (the "lost in
block head" measure).
"""

from __future__ import annotations

import inspect
import time

import torch

from lazyattention.integrations.transformers.attention import attention_implementation
from lazyattention.integrations.transformers.qa import subspan_em, token_f1
from lazyattention.integrations.transformers.rag import LazyRAG, Sampling

from .examples import Example, Placement, block_example, collate, full_example
from .recipe import answer_logits

__all__ = [
    "OFFSETS",
    "placement_of",
    "prompts",
    "greedy",
    "answer_kl",
    "head_attention",
    "lazy_answers",
    "score",
    "targets",
]

#: The offsets held-out questions are placed from, in turn.
OFFSETS = (0, 70_000, 1_100_000)


def placement_of(index: int) -> Placement:
    """The held-out question ``index``'s placement: back to back from ``OFFSETS[index % 3]``."""
    return Placement(OFFSETS[index % len(OFFSETS)], None)


def prompts(rag: LazyRAG, items, strategy: str) -> list[Example]:
    """The prompts of ``items`` as ``strategy`` reads them: ``"full"`` (one causal sequence
    at ``0..T−1``) or ``"recompute"`` (documents encoded apart at :func:`placement_of`)."""
    if strategy == "full":
        return [full_example(rag, it.question, it.documents) for it in items]
    if strategy == "recompute":
        return [block_example(rag, it.question, it.documents, placement_of(i)) for i, it in enumerate(items)]
    raise ValueError(f"strategy must be 'full' or 'recompute', got {strategy!r}")


def _cache_keyword(model) -> str:
    """transformers 5.24 names the cache argument ``cache``; earlier 5.x releases ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _pad_id(rag: LazyRAG) -> int:
    pad = rag.tokenizer.pad_token_id if rag.tokenizer is not None else None
    return pad if pad is not None else rag.eos_token_ids()[0]


@torch.no_grad()
def greedy(rag: LazyRAG, prompts: list[Example], max_new_tokens: int, batch_size: int = 16) -> list[list[int]]:
    """Greedy tokens (stop token excluded) for each prompt under its own mask and positions.

    Prompts are left-padded into batches; each step feeds one token per row at the row's
    next position, padding masked out. ``rag.model`` runs with transformers' SDPA.
    """
    from transformers import DynamicCache

    model, stop, pad = rag.model, set(rag.eos_token_ids()), _pad_id(rag)
    keyword, dtype = _cache_keyword(model), model.dtype
    out_tokens: list[list[int]] = []
    with attention_implementation(model, "sdpa"):
        for first in range(0, len(prompts), batch_size):
            chunk = prompts[first : first + batch_size]
            batch = collate(chunk, dtype, model.device, pad, left=True)
            width = batch["input_ids"].shape[1]
            lengths = torch.tensor([len(e.tokens) for e in chunk], device=model.device)
            keys = torch.arange(width, device=model.device)[None] >= width - lengths[:, None]
            cache = DynamicCache(config=model.config)
            logits = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"],
                use_cache=True,
                logits_to_keep=1,
                **{keyword: cache},
            ).logits[:, -1]
            position = batch["position_ids"][:, -1] + 1
            rows = [[] for _ in chunk]
            done = torch.zeros(len(chunk), dtype=torch.bool, device=model.device)
            for step in range(max_new_tokens):
                token = logits.argmax(-1)
                for i, t in enumerate(token.tolist()):
                    if not done[i] and t not in stop:
                        rows[i].append(t)
                done |= torch.tensor([t in stop for t in token.tolist()], device=model.device)
                if bool(done.all()) or step == max_new_tokens - 1:
                    break
                keys = torch.cat([keys, torch.ones_like(keys[:, :1])], 1)
                mask = torch.zeros(len(chunk), 1, 1, keys.shape[1], dtype=dtype, device=model.device)
                mask = mask.masked_fill(~keys[:, None, None], torch.finfo(dtype).min)
                logits = model(
                    input_ids=token[:, None],
                    attention_mask=mask,
                    position_ids=position[:, None],
                    use_cache=True,
                    **{keyword: cache},
                ).logits[:, -1]
                position = position + 1
            out_tokens += rows
    return out_tokens


@torch.no_grad()
def answer_kl(rag: LazyRAG, items, batch_size: int = 8, first_index: int = 0) -> dict:
    """Per-step KL(full ‖ block-diagonal) over each reference answer's tokens (answer
    and end-of-turn, teacher-forced), and both runs' answer NLL; block-diagonal is
    lazy's function (the placement of :func:`placement_of`)."""
    model, pad = rag.model, _pad_id(rag)
    kls, nll_full, nll_block = [], [], []
    causal_lm = model
    with attention_implementation(model, "sdpa"):
        for first in range(0, len(items), batch_size):
            chunk = list(enumerate(items[first : first + batch_size], first_index + first))
            full = [full_example(rag, it.question, it.documents, it.answer) for _, it in chunk]
            block = [block_example(rag, it.question, it.documents, placement_of(i), it.answer) for i, it in chunk]
            lf, targets = answer_logits(causal_lm, collate(full, model.dtype, model.device, pad))
            lb, targets_b = answer_logits(causal_lm, collate(block, model.dtype, model.device, pad))
            if not torch.equal(targets, targets_b):
                raise RuntimeError("the full and block examples score different answer tokens")
            pf, pb = torch.log_softmax(lf, -1), torch.log_softmax(lb, -1)
            kls += (pf.exp() * (pf - pb)).sum(-1).tolist()
            nll_full += (-pf.gather(1, targets[:, None])[:, 0]).tolist()
            nll_block += (-pb.gather(1, targets[:, None])[:, 0]).tolist()
    return {
        "steps": len(kls),
        "kl_mean": sum(kls) / len(kls),
        "kl_median": sorted(kls)[len(kls) // 2],
        "kl_max": max(kls),
        "nll_full": sum(nll_full) / len(nll_full),
        "nll_block": sum(nll_block) / len(nll_block),
    }


@torch.no_grad()
def head_attention(rag: LazyRAG, items) -> dict:
    """The share of the attention the own tokens (question and answer) pay to documents
    that lands on each document's first two tokens, mean over layers, heads, own tokens
    and questions; under the block-diagonal mask and under full attention (eager runs)."""
    model, pad = rag.model, _pad_id(rag)
    shares = {"block": [], "full": []}
    captured: list[torch.Tensor] = []

    def hook(module, args, output):
        captured.append(output[1].float())

    layers = [m for name, m in model.named_modules() if name.endswith("self_attn")]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with attention_implementation(model, "eager"):
            for i, it in enumerate(items):
                request = rag.request(it.question, list(it.documents))
                head = len(request.segments) - len(it.documents)  # the chat head, if any
                lengths = [len(s) for s in request.segments]
                starts = [sum(lengths[:k]) for k in range(len(lengths))]
                doc_cols = torch.zeros(sum(lengths), dtype=torch.bool)
                first_two = torch.zeros_like(doc_cols)
                for k in range(head, len(lengths)):
                    doc_cols[starts[k] : starts[k] + lengths[k]] = True
                    first_two[starts[k] : starts[k] + min(2, lengths[k])] = True
                for mode, example in (
                    ("block", block_example(rag, it.question, it.documents, placement_of(i), it.answer)),
                    ("full", full_example(rag, it.question, it.documents, it.answer)),
                ):
                    captured.clear()
                    batch = collate([example], model.dtype, model.device, pad)
                    model.model(
                        input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"],
                        position_ids=batch["position_ids"],
                    )
                    n = sum(lengths)
                    per_layer = []
                    for w in captured:  # [1, H, T, T]
                        own = w[0, :, n : len(example.tokens), :n].cpu()  # own tokens' rows, segment columns
                        on_docs = own[..., doc_cols].sum(-1)
                        per_layer.append((own[..., first_two].sum(-1) / on_docs).mean())
                    shares[mode].append(float(torch.stack(per_layer).mean()))
    finally:
        for h in handles:
            h.remove()
    return {mode: sum(v) / len(v) for mode, v in shares.items()} | {"questions": len(items)}


def lazy_answers(
    rag: LazyRAG, items, strategy: str, max_new_tokens: int, batch_size: int, deadline=None, first_index: int = 0
) -> list:
    """Greedy answers of ``rag`` under ``strategy`` for ``items`` (question ``first_index + k``
    at :func:`placement_of` of that index), through ``generate_batch`` for ``batch_size > 1``;
    stops before a batch once ``deadline`` (a ``time.perf_counter()`` value) has passed,
    leaving the rest ``None``."""
    sampling = Sampling(max_new_tokens=max_new_tokens)
    out: list = [None] * len(items)
    for first in range(0, len(items), batch_size):
        if deadline is not None and time.perf_counter() > deadline:
            break
        idx = range(first, min(len(items), first + batch_size))
        requests = [
            rag.request(items[i].question, list(items[i].documents), offset=placement_of(first_index + i).offset)
            for i in idx
        ]
        if batch_size == 1:
            answers = [rag.generate(requests[0], strategy, sampling)]
        else:
            answers = rag.generate_batch(requests, strategy, sampling)
        for i, a in zip(idx, answers, strict=True):
            out[i] = a
    return out


def score(replies: list[str | None], items) -> dict:
    """Subspan EM and token F1 over the replies given (``None``: not run), overall and by hops."""
    pairs = [(r, it) for r, it in zip(replies, items, strict=True) if r is not None]
    result = {"questions": len(pairs)}
    for name, picked in (("all", pairs), ("single", [p for p in pairs if p[1].hops == 1])):
        result[f"em_{name}"] = _mean([subspan_em(r, it.answer) for r, it in picked])
        result[f"f1_{name}"] = _mean([token_f1(r, it.answer) for r, it in picked])
    bridge = [p for p in pairs if p[1].hops == 2]
    result["em_bridge"] = _mean([subspan_em(r, it.answer) for r, it in bridge])
    result["f1_bridge"] = _mean([token_f1(r, it.answer) for r, it in bridge])
    return result


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def targets(result: dict) -> list[dict]:
    """Issue targets, PASS/MISS, from an evaluation result (EM in points, on the
    questions both strategies of a comparison answered)."""

    def em(model, strategy, on=None):
        rows = result["answers"]
        keep = [r for r in rows if r.get(f"{model}/{strategy}") is not None and (on is None or on(r))]
        return _mean([subspan_em(r[f"{model}/{strategy}"], r["answer"]) for r in keep]), keep

    def both(model_a, strat_a, model_b, strat_b):
        def on(r):
            return r.get(f"{model_a}/{strat_a}") is not None and r.get(f"{model_b}/{strat_b}") is not None

        a, keep = em(model_a, strat_a, on)
        b, _ = em(model_b, strat_b, on)
        return (None if a is None else 100 * a), (None if b is None else 100 * b), len(keep)

    out = []
    for name, (ma, sa, mb, sb, slack) in {
        "block-FT lazy EM >= block-FT full attention EM - 3": ("block_ft", "lazy", "block_ft", "full", -3),
        "block-FT lazy EM >= base full attention EM": ("block_ft", "lazy", "base", "full", 0),
        "block-FT full attention EM >= base full attention EM - 2": ("block_ft", "full", "base", "full", -2),
    }.items():
        a, b, n = both(ma, sa, mb, sb)
        ok = a is not None and b is not None and a >= b + slack
        out.append({"target": name, "pass": ok, "value": a, "bound": None if b is None else b + slack, "questions": n})
    for model in ("base", "block_ft"):
        same = result.get("identity", {}).get(model)
        if same:
            ok = same["compared"] == same["questions"] and same["lazy_equals_block"] == same["compared"]
            out.append(
                {
                    "target": f"{model}: lazy = Block-Attention token for token in float32 on every held-out question",
                    "pass": ok,
                    "value": same["lazy_equals_block"],
                    "bound": same["questions"],
                    "questions": same["compared"],
                }
            )
    return out
