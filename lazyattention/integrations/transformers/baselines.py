"""The comparisons, run by transformers itself with its own attention.

* :func:`full_attention`: the request as one contiguous prompt, every token seeing every
  earlier one — the ordinary way to run the model, a layer over ``model.generate``.
* :func:`block_diagonal`: "recompute" — every document encoded *at its logical position*
  by transformers' own RoPE, seeing only itself; the own tokens see every document and
  themselves causally. One eager forward with a 4-D mask, then decoding with a
  ``DynamicCache`` at explicit positions. This is the function lazy and Block-Attention
  compute (eq. 7 and 9), evaluated the slow, position-bound way.

Both switch the model to ``attn_implementation`` for the call and back afterwards.
"""

from __future__ import annotations

import time

import torch

from .attention import attention_implementation
from .rag import Answer, RAGRequest, RequestStats, Sampling, _widen, cut_at_stop, eos_token_ids

__all__ = ["block_diagonal_mask", "block_diagonal", "full_attention"]


def block_diagonal_mask(request: RAGRequest, dtype: torch.dtype, device) -> torch.Tensor:
    """``[1, 1, T, T]`` additive mask: each segment causal within itself only, the own
    tokens seeing every segment token and themselves causally (eq. 7)."""
    lengths = [len(s) for s in request.segments]
    n_seg, n_own = sum(lengths), len(request.own)
    t = n_seg + n_own
    visible = torch.zeros(t, t, dtype=torch.bool)
    pos = 0
    for n in lengths:
        visible[pos : pos + n, pos : pos + n] = torch.ones(n, n, dtype=torch.bool).tril()
        pos += n
    visible[n_seg:, :n_seg] = True
    visible[n_seg:, n_seg:] = torch.ones(n_own, n_own, dtype=torch.bool).tril()
    mask = torch.zeros(t, t, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
    return mask[None, None].to(device)


def _pick_loop(model, tokenizer, logits, sampling: Sampling, first_position: int, cache, stop):
    """Decode from ``logits [V]`` with explicit positions; ``cache`` holds the prompt.

    Returns the new tokens, the first logits and the finish reason (as ``LazyRAG``'s).
    """
    began = time.perf_counter()
    gen = sampling.generator()
    first = _widen(logits)
    tokens, position = [], first_position
    while True:
        token = sampling.pick(logits, gen)
        if token in stop:
            return tokens, first, "stop_token"
        tokens.append(token)
        if sampling.stop and cut_at_stop(_text(tokenizer, tokens), sampling.stop)[1]:
            return tokens, first, "stop_string"
        if len(tokens) == sampling.max_new_tokens:
            return tokens, first, "length"
        if sampling.max_time is not None and time.perf_counter() - began >= sampling.max_time:
            return tokens, first, "time"
        ids = torch.tensor([[token]], device=model.device)
        total = cache.get_seq_length() + 1
        mask = torch.zeros(1, 1, 1, total, dtype=model.dtype, device=model.device)
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=torch.tensor([[position]], device=model.device),
            cache=cache,
            use_cache=True,
        )
        logits = out.logits[0, -1]
        position += 1


def _text(tokenizer, tokens) -> str:
    return "" if tokenizer is None else tokenizer.decode(tokens)


def _answer(tokenizer, tokens, first, stats, reason, sampling: Sampling) -> Answer:
    return Answer(cut_at_stop(_text(tokenizer, tokens), sampling.stop)[0], tokens, first, stats, reason)


def block_diagonal(
    model,
    tokenizer,
    request: RAGRequest,
    sampling: Sampling | None = None,
    attn_implementation: str = "eager",
    keep_own_logits: bool = False,
):
    """Recompute: documents at their logical positions, encoded apart, by transformers.

    Returns:
        an :class:`~lazyattention.integrations.transformers.rag.Answer` (its stats count
        no cache: every segment is recomputed), and with ``keep_own_logits`` also the own
        tokens' logits ``[P, V]``.
    """
    from transformers import DynamicCache

    sampling = sampling or Sampling()
    stop = sampling.stop_ids(eos_token_ids(model, tokenizer))
    tokens, positions = request.tokens_and_positions()
    with attention_implementation(model, attn_implementation), torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = model(
            input_ids=torch.tensor([tokens], device=model.device),
            attention_mask=block_diagonal_mask(request, model.dtype, model.device),
            position_ids=torch.tensor([positions], device=model.device),
            cache=cache,
            use_cache=True,
        )
        logits = out.logits[0]
        own_logits = _widen(logits[-len(request.own) :]) if keep_own_logits else None
        new, first, reason = _pick_loop(model, tokenizer, logits[-1], sampling, positions[-1] + 1, cache, stop)
    stats = RequestStats(0, len(request.segments), sum(len(s) for s in request.segments), 0, 0)
    answer = _answer(tokenizer, new, first, stats, reason, sampling)
    return (answer, own_logits) if keep_own_logits else answer


def full_attention(
    model, tokenizer, request: RAGRequest, sampling: Sampling | None = None, attn_implementation: str = "sdpa"
) -> Answer:
    """The request's tokens as one contiguous prompt at ``0..T−1`` through ``model.generate``
    (full causal attention: documents see each other; the starts are ignored).

    ``sampling`` maps to ``generate``'s options: EOS and ``stop_token_ids`` as
    ``eos_token_id``, ``stop`` as ``stop_strings``, ``max_time``.
    """
    sampling = sampling or Sampling()
    stop = sorted(sampling.stop_ids(eos_token_ids(model, tokenizer)))
    tokens, _ = request.tokens_and_positions()
    ids = torch.tensor([tokens], device=model.device)
    options = {"do_sample": sampling.do_sample, "max_new_tokens": sampling.max_new_tokens}
    if sampling.do_sample:
        options.update(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        torch.manual_seed(0 if sampling.seed is None else sampling.seed)
    else:
        options.update(temperature=None, top_k=None, top_p=None)
    if sampling.stop:
        if tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        options.update(stop_strings=list(sampling.stop), tokenizer=tokenizer)
    if sampling.max_time is not None:
        options.update(max_time=sampling.max_time)
    with attention_implementation(model, attn_implementation), torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            eos_token_id=stop or None,
            pad_token_id=(stop or [0])[0],
            output_logits=True,
            return_dict_in_generate=True,
            **options,
        )
    new = out.sequences[0, len(tokens) :].tolist()
    reason = "length"
    if new and new[-1] in stop:
        new, reason = new[:-1], "stop_token"
    elif sampling.stop and cut_at_stop(_text(tokenizer, new), sampling.stop)[1]:
        reason = "stop_string"
    elif sampling.max_time is not None and len(new) < sampling.max_new_tokens:
        reason = "time"
    stats = RequestStats(0, len(request.segments), len(tokens), 0, 0)
    return _answer(tokenizer, new, _widen(out.logits[0][0]), stats, reason, sampling)
