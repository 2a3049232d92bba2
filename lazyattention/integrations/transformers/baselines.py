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

import torch

from .attention import attention_implementation
from .rag import Answer, Request, RequestStats, Sampling, _widen, eos_token_ids

__all__ = ["block_diagonal_mask", "block_diagonal", "full_attention"]


def block_diagonal_mask(request: Request, dtype: torch.dtype, device) -> torch.Tensor:
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


def _pick_loop(model, logits, sampling: Sampling, first_position: int, cache, stop):
    """Decode from ``logits [V]`` with explicit positions; ``cache`` holds the prompt."""
    gen = sampling.generator()
    first = _widen(logits)
    tokens, position = [], first_position
    for i in range(sampling.max_new_tokens):
        token = sampling.pick(logits, gen)
        if token in stop:
            break
        tokens.append(token)
        if i == sampling.max_new_tokens - 1:
            break
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
    return tokens, first


def block_diagonal(
    model,
    tokenizer,
    request: Request,
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
    stop = set(sampling.stop_token_ids if sampling.stop_token_ids is not None else eos_token_ids(model, tokenizer))
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
        new, first = _pick_loop(model, logits[-1], sampling, positions[-1] + 1, cache, stop)
    stats = RequestStats(0, len(request.segments), sum(len(s) for s in request.segments), 0, 0)
    answer = Answer("" if tokenizer is None else tokenizer.decode(new), new, first, stats)
    return (answer, own_logits) if keep_own_logits else answer


def full_attention(
    model, tokenizer, request: Request, sampling: Sampling | None = None, attn_implementation: str = "sdpa"
) -> Answer:
    """The request's tokens as one contiguous prompt at ``0..T−1`` through ``model.generate``
    (full causal attention: documents see each other; the starts are ignored)."""
    sampling = sampling or Sampling()
    stop = list(sampling.stop_token_ids if sampling.stop_token_ids is not None else eos_token_ids(model, tokenizer))
    tokens, _ = request.tokens_and_positions()
    ids = torch.tensor([tokens], device=model.device)
    options = {"do_sample": sampling.do_sample, "max_new_tokens": sampling.max_new_tokens}
    if sampling.do_sample:
        options.update(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        torch.manual_seed(0 if sampling.seed is None else sampling.seed)
    else:
        options.update(temperature=None, top_k=None, top_p=None)
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
    while new and new[-1] in stop:
        new = new[:-1]
    stats = RequestStats(0, len(request.segments), len(tokens), 0, 0)
    return Answer("" if tokenizer is None else tokenizer.decode(new), new, _widen(out.logits[0][0]), stats)
