"""Hit accounting: every document block is a hit after the document's first use, in any
order and at any offset, counted apart from the prompt's prefix hits; stock vLLM's
prefix cache, on the same prompts, hits only the first document."""

from __future__ import annotations

import pytest

from tests.integrations.vllm.conftest import (
    BLOCK,
    VLLM_MISSING,
    documents_params,
    make_llm,
    random_tokens,
    scheduler_of,
)

pytest.importorskip("vllm", reason=VLLM_MISSING)


# 40, 50 and 29 tokens: 2 + 2 + 1 blocks of 32, none whole.
DOCS = [random_tokens(100 + i, n) for i, n in enumerate((40, 50, 29))]
QUERY = random_tokens(7, 12)
ORDERS = [(0, 1, 2), (2, 0, 1), (1, 2, 0), (0, 2, 1)]
DOC_BLOCKS = sum(-(-len(d) // BLOCK) for d in DOCS)


def _serve(llm, order, query=QUERY):
    (out,) = llm.generate(
        [{"prompt_token_ids": query}], documents_params([{"token_ids": DOCS[i]} for i in order]), use_tqdm=False
    )
    return out


def test_document_blocks_hit_after_first_use(llm):
    first = _serve(llm, ORDERS[0]).kv_transfer_params["lazyattention"]
    assert first == {
        "document_blocks": DOC_BLOCKS,
        "document_blocks_hit": 0,
        "prefix_blocks_hit": 0,
        "bytes_copied": 0,
        "max_tokens_cut_to": None,
    }
    for order in ORDERS[1:]:
        out = _serve(llm, order)
        counts = out.kv_transfer_params["lazyattention"]
        assert counts["document_blocks_hit"] == DOC_BLOCKS, f"order {order}: {counts}"
        assert counts["bytes_copied"] == 0
        assert out.num_cached_tokens == 0  # vLLM's count is of the prompt's tokens: no whole block of it is cached


def test_prompt_prefix_hits_apart_from_document_hits(llm):
    """The same documents in the same places and a prompt sharing two blocks: the
    prompt's blocks hit as ordinary prefix caching would, counted apart."""
    long_query = random_tokens(8, 3 * BLOCK + 5)
    _serve(llm, ORDERS[0], long_query)
    out = _serve(llm, ORDERS[0], [*long_query[: 2 * BLOCK + 3], 1, 2, 3])
    counts = out.kv_transfer_params["lazyattention"]
    assert counts["document_blocks_hit"] == DOC_BLOCKS
    assert counts["prefix_blocks_hit"] == 2
    assert out.num_cached_tokens == 2 * BLOCK <= len(out.prompt_token_ids)  # cached_tokens: of the prompt only


def test_plain_requests_keep_prefix_caching(llm):
    prompt = random_tokens(9, 3 * BLOCK + 1)
    params = documents_params([{"token_ids": [1]}]).clone()
    params.extra_args = None
    llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    (out,) = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    assert out.num_cached_tokens == 3 * BLOCK
    assert out.kv_transfer_params["lazyattention"]["prefix_blocks_hit"] == 3


def test_stock_vllm_hits_only_the_first_document(tiny_llama):
    """vLLM's own scheduler on the documents concatenated into the prompt."""
    from vllm import SamplingParams

    stock = make_llm(tiny_llama, scheduler_cls=None, worker_cls="auto", logits_processors=None)
    params = SamplingParams(max_tokens=2, temperature=0.0)
    hits = []
    for order in ORDERS:
        prompt = [t for i in order for t in DOCS[i]] + QUERY
        (out,) = stock.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        hits.append(out.num_cached_tokens)
    # Orders 0 and 3 start with the same document: only its one whole block is found.
    assert hits == [0, 0, 0, BLOCK]


def test_scheduler_totals(llm):
    totals = scheduler_of(llm).totals
    assert totals.requests >= len(ORDERS)
    assert totals.document_blocks_hit >= (len(ORDERS) - 1) * DOC_BLOCKS
    assert totals.bytes_copied == 0
