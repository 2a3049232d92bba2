"""Many requests answered together equal each answered alone, token for token.

One forward per step for the whole batch (the tokens of every request as one sequence,
a multi-request layout) must give what the same request gives alone: greedy, float32,
documents shared by several requests of one batch at different offsets.
"""

import pytest
import torch
from hypothesis import example, given, note
from hypothesis import strategies as st

from lazyattention.integrations.transformers import LazyRAG, RAGRequest, Sampling
from lazyattention.integrations.transformers.pretrained import tiny_random

from .models import VOCAB, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

POOL = ((5, 6, 7, 8, 9, 10, 11), (12, 13, 14), (15, 16, 17, 18, 19, 20, 21, 22, 23), (24,))

# two requests reading the same two documents, in other orders and at other offsets
SHARED = [RAGRequest((POOL[0], POOL[1]), (0, 7), (1, 2), 10), RAGRequest((POOL[1], POOL[0]), (500, 3), (3,), 503)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny"), "llama")


@st.composite
def batches(draw):
    """Requests drawing documents from one small pool (so the batch shares them), each
    placed at its own starts, with own tokens of different lengths."""
    requests = []
    for _ in range(draw(st.integers(1, 4))):
        picks = draw(st.lists(st.sampled_from(range(len(POOL))), min_size=0, max_size=3))
        docs = tuple(POOL[i] for i in picks)
        starts = tuple(draw(st.integers(0, 70_000)) for _ in docs)
        own = tuple(draw(st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=5)))
        end = max((s + len(d) for s, d in zip(starts, docs, strict=True)), default=0)
        requests.append(RAGRequest(docs, starts, own, end + draw(st.integers(0, 9))))
    return requests, draw(st.sampled_from([1, 4, 16])), draw(st.integers(1, 5))


@given(drawn=batches())
@example(drawn=(SHARED, 4, 4))
def test_a_batch_answers_each_request_as_it_is_answered_alone(model, drawn):
    requests, block_size, max_new = drawn
    note(f"{len(requests)} requests, block size {block_size}, {max_new} new tokens")
    sampling = Sampling(max_new_tokens=max_new, ignore_eos=True)
    alone = LazyRAG(model, None, num_blocks=64, block_size=block_size)
    want = [alone.generate(r, sampling=sampling) for r in requests]
    batched = LazyRAG(model, None, num_blocks=64, block_size=block_size)
    got = batched.generate_batch(requests, sampling=sampling)
    assert [a.tokens for a in got] == [a.tokens for a in want]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.first_logits, b.first_logits, rtol=1e-4, atol=1e-4)
    assert batched.cache.pool.num_used == alone.cache.pool.num_used  # each distinct document cached once
    batched.cache.store.check_invariants()


def test_requests_of_a_batch_end_at_their_own_stop(model):
    """A request that stops early leaves the batch; the others decode on unchanged."""
    rag = LazyRAG(model, None, num_blocks=64, block_size=4)
    requests = [RAGRequest((POOL[0],), (0,), (1, 2), 7), RAGRequest((POOL[0], POOL[2]), (40, 0), (3,), 47)]
    free = rag.generate_batch(requests, sampling=Sampling(max_new_tokens=6, ignore_eos=True))
    stop = free[0].tokens[1]
    model.generation_config.eos_token_id = stop
    try:
        stopped = rag.generate_batch(requests, sampling=Sampling(max_new_tokens=6))
    finally:
        model.generation_config.eos_token_id = None
    for a, b in zip(stopped, free, strict=True):
        cut = b.tokens.index(stop) if stop in b.tokens else len(b.tokens)
        assert a.tokens == b.tokens[:cut]
        assert a.finish_reason == ("stop_token" if stop in b.tokens else "length")


def test_answer_batch_shares_documents_across_the_batch(tmp_path):
    docs = ["The lab is in Oslo .", "Ada Lind runs the lab .", "The bakery opens at six ."]
    questions = ["Who runs the lab ?", "Where is the lab ?", "When does the bakery open ?"]
    model, tokenizer = tiny_random(tmp_path, docs + questions)
    sampling = Sampling(max_new_tokens=5, ignore_eos=True)
    lists, offsets = [docs[:2], docs[1::-1], [docs[2], docs[0]]], [0, 900, 70_000]
    rag = LazyRAG(model, tokenizer, num_blocks=64, block_size=4)
    got = rag.answer_batch(questions, lists, offsets, sampling=sampling)
    assert sum(a.stats.cache_misses for a in got) == 3  # each document prefilled once for the batch
    assert sum(a.stats.cache_hits for a in got) == 3
    alone = LazyRAG(model, tokenizer, num_blocks=64, block_size=4)
    for answer, q, d, off in zip(got, questions, lists, offsets, strict=True):
        want = alone.answer(q, d, offset=off, sampling=sampling)
        assert (answer.tokens, answer.text) == (want.tokens, want.text)


def test_answer_batch_refuses_mismatched_lists(model):
    rag = LazyRAG(model, None, num_blocks=16, block_size=4)
    with pytest.raises(ValueError, match="one entry per question: 2 questions, 1 document lists, 2 offsets"):
        rag.answer_batch(["a", "b"], [["x"]])
    with pytest.raises(TypeError, match="use answer\\(\\) for a single question"):
        rag.answer_batch("a question", [["x"]])
