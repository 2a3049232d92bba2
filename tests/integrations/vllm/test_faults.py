"""Faults under a tight KV budget: preemption, aborts and eviction. Every request
completes with the tokens it gets when served alone, and the cache stays consistent:
no block leaks, and evicted documents are recomputed to the same answers."""

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


KV_BLOCKS = 14
DOCS = [random_tokens(200 + i, n) for i, n in enumerate((40, 50, 29, 70))]
REQUESTS = [  # (document indices, query seed)
    ((0, 1), 1),
    ((1, 0, 2), 2),
    ((2, 3), 3),
    ((3, 0), 4),
    ((1, 2), 5),
]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def tight(tiny_llama):
    return make_llm(tiny_llama, kv_tokens=KV_BLOCKS * BLOCK, max_model_len=(KV_BLOCKS - 1) * BLOCK, max_num_seqs=8)


def _params(docs):
    return documents_params([{"token_ids": DOCS[i]} for i in docs], max_tokens=MAX_TOKENS)


def _prompt(seed):
    return {"prompt_token_ids": random_tokens(seed, 10)}


def _free_blocks(engine) -> int:
    return scheduler_of(engine).kv_cache_manager.block_pool.get_num_free_blocks()


@pytest.fixture(scope="module")
def alone(tight):
    """Each request served alone, one after the other."""
    tokens = []
    for docs, seed in REQUESTS:
        (out,) = tight.generate([_prompt(seed)], _params(docs), use_tqdm=False)
        tokens.append(list(out.outputs[0].token_ids))
    return tokens


def test_preemption_keeps_every_answer(tight, alone):
    free_before = _free_blocks(tight)
    preempted = scheduler_of(tight).totals.preemptions
    outs = tight.generate([_prompt(s) for _, s in REQUESTS], [_params(d) for d, _ in REQUESTS], use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == alone
    assert scheduler_of(tight).totals.preemptions > preempted, "the budget was not tight enough to preempt"
    assert _free_blocks(tight) == free_before, "blocks leaked"


def test_aborts_leave_the_others_intact(tight, alone):
    engine = tight.llm_engine
    free_before = _free_blocks(tight)
    ids = [f"abort-{i}" for i in range(len(REQUESTS))]
    for request_id, (docs, seed) in zip(ids, REQUESTS, strict=True):
        engine.add_request(request_id, _prompt(seed), _params(docs))
    for _ in range(3):
        engine.step()
    aborted = {ids[1], ids[3]}
    engine.abort_request(sorted(aborted))
    done = {}
    for _ in range(2000):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
    for i, request_id in enumerate(ids):
        if request_id not in aborted:
            assert done[request_id] == alone[i], f"request {i} changed after the aborts"
    assert _free_blocks(tight) == free_before, "blocks leaked"


def test_eviction_recomputes_the_same_answer(tight, alone):
    docs, seed = REQUESTS[0]
    for k in range(6):  # other documents push the first ones out of the free-block queue
        filler = [{"token_ids": random_tokens(900 + k, 3 * BLOCK + 7)}]
        tight.generate([_prompt(k)], documents_params(filler, max_tokens=2), use_tqdm=False)
    (out,) = tight.generate([_prompt(seed)], _params(docs), use_tqdm=False)
    counts = out.kv_transfer_params["lazyattention"]
    assert counts["document_blocks_hit"] < counts["document_blocks"], "nothing was evicted"
    assert list(out.outputs[0].token_ids) == alone[0]
