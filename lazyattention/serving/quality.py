"""Lazy against Block-Attention against full attention, on the same requests.

Lazy and Block-Attention compute one function (documents encoded apart, read at their
logical positions); they differ only by rounding. Full attention (``recompute``) is
another function: the gap to it is the cost of encoding documents apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from .engine import Engine
from .model import Model

__all__ = ["QualityReport", "quality_check"]


@dataclass
class QualityReport:
    """Lazy vs Block-Attention vs full attention on the same requests, one dtype.

    ``*_logits`` are the largest absolute first-token logit differences over the
    requests; ``*_agreement`` the fraction of greedy tokens equal at the same index.
    """

    dtype: str
    requests: int
    lazy_vs_block_logits: float
    lazy_vs_full_logits: float
    block_vs_full_logits: float
    lazy_vs_block_agreement: float
    lazy_vs_full_agreement: float
    block_vs_full_agreement: float


def quality_check(model: Model, requests, max_new_tokens: int = 8, block_size: int = 16) -> QualityReport:
    """Run each ``(query, documents)`` alone under ``lazy``, ``block_attention`` and
    ``recompute`` (full causal attention over the concatenated sequence) and compare.

    Documents are first prefilled in an earlier request at another offset, so the
    ``lazy`` and ``block_attention`` runs really reuse cached K/V at a new position.
    """
    runs = {}
    filler = [0] * 3
    tokens = sum(len(q) + sum(len(d) for d in docs) + len(docs) * block_size for q, docs in requests)
    budget = 3 * (tokens // block_size + len(requests) * 2) + 8  # room for everything: no eviction
    for strategy in ("lazy", "block_attention", "recompute"):
        engine = Engine(model, strategy, num_blocks=budget, block_size=block_size, keep_logits=True)
        outs = []
        for query, docs in requests:
            engine.generate(query, [filler, *reversed(docs)], 1)  # cache the documents at other offsets
            req = engine.add_request(query, docs, max_new_tokens)
            engine.run_until_done()
            outs.append(req)
        runs[strategy] = outs

    def logit_diff(a, b):
        return max(float((x.first_logits - y.first_logits).abs().max()) for x, y in zip(runs[a], runs[b], strict=True))

    def agreement(a, b):
        same = sum(
            sum(p == q for p, q in zip(x.output, y.output, strict=True)) for x, y in zip(runs[a], runs[b], strict=True)
        )
        return same / sum(len(x.output) for x in runs[a])

    return QualityReport(
        dtype=str(model.dtype).removeprefix("torch."),
        requests=len(requests),
        lazy_vs_block_logits=logit_diff("lazy", "block_attention"),
        lazy_vs_full_logits=logit_diff("lazy", "recompute"),
        block_vs_full_logits=logit_diff("block_attention", "recompute"),
        lazy_vs_block_agreement=agreement("lazy", "block_attention"),
        lazy_vs_full_agreement=agreement("lazy", "recompute"),
        block_vs_full_agreement=agreement("block_attention", "recompute"),
    )
