"""Lazy attention inside a stock transformers model equals transformers' own forward.

The comparison is transformers' eager forward of the whole request with a
block-diagonal 4-D mask, every document at its logical position and seeing only
itself, the question seeing all of them (``baselines.block_diagonal``). Lazy (zero
copy) and Block-Attention (copy + re-rotate) must match it: float64 to ~1e-12, float32
within the project's tolerance rule, greedy tokens identical. The no-shift control —
the cached keys used as if their documents sat at 0 — must be far off, or the test
could not tell a shifted document from an unshifted one.
"""

import pytest
import torch
from hypothesis import example, given, note, target
from hypothesis import strategies as st

from lazyattention.integrations.transformers import LazyRAG, RAGRequest, Sampling, block_diagonal, check_model
from lazyattention.reference import assert_close

from .models import VOCAB, float64_ops, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GREEDY = Sampling(max_new_tokens=6, ignore_eos=True)
ONE = Sampling(max_new_tokens=1, ignore_eos=True)

# documents at a gap, out of order and overlapping, question after a gap
REQUEST = RAGRequest(
    segments=((5, 6, 7, 8, 9, 10, 11), (12, 13, 14), (15, 16, 17, 18, 19)),
    starts=(40, 3, 43),
    own=(20, 21, 22, 23),
    own_start=60,
)


def oracle(model, request):
    """transformers' block-diagonal forward: own-token logits ``[P, V]`` and greedy tokens."""
    answer, logits = block_diagonal(model, None, request, GREEDY, attn_implementation="sdpa", keep_own_logits=True)
    return logits, answer.tokens


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("rope", ["default", "linear", "llama3", "yarn"])
def test_float64_matches_transformers(folder, arch, rope):
    model = tiny_model(folder, arch, rope, dtype=torch.float64)
    float64_ops(model, check_model(model).rope)
    want, want_tokens = oracle(model, REQUEST)
    rag = LazyRAG(model, None, num_blocks=32, block_size=4)
    for strategy in ("lazy", "block"):
        got = rag.own_logits(REQUEST, strategy)
        err = (got - want).abs().max().item()
        assert err <= 1e-12, f"{arch}/{rope}/{strategy}: {err:.3e}"
        assert rag.generate(REQUEST, strategy, GREEDY).tokens == want_tokens
    control = (rag.own_logits(REQUEST, "no_shift") - want).abs().max().item()
    assert control > 1e-2, f"{arch}/{rope}: the no-shift control is only {control:.3e} off"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("rope", ["default", "yarn"])
def test_float32_within_the_tolerance_rule(folder, arch, rope):
    model64 = tiny_model(folder, arch, rope, dtype=torch.float64)
    float64_ops(model64, check_model(model64).rope)
    want, _ = oracle(model64, REQUEST)
    model = tiny_model(folder, arch, rope, dtype=torch.float32)
    reference = block_diagonal(model, None, REQUEST, GREEDY, keep_own_logits=True)  # transformers' eager, fp32
    rag = LazyRAG(model, None, num_blocks=32, block_size=4)
    for strategy in ("lazy", "block"):
        assert_close(rag.own_logits(REQUEST, strategy), want, reference[1], torch.float32, f"{arch}/{rope}/{strategy}")
        assert rag.generate(REQUEST, strategy, GREEDY).tokens == reference[0].tokens
    control = (rag.own_logits(REQUEST, "no_shift") - want).abs().max().item()
    assert control > 100 * (reference[1] - want).abs().max().item()


@st.composite
def requests(draw):
    """1–4 documents drawn from a pool (repeats allowed), any order, starts with gaps and
    overlaps, a question of 1–5 tokens after the furthest end (plus a gap)."""
    pool = draw(st.lists(st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=9), min_size=1, max_size=3))
    picks = draw(st.lists(st.integers(0, len(pool) - 1), min_size=1, max_size=4))
    docs = tuple(tuple(pool[i]) for i in picks)
    starts = tuple(draw(st.integers(0, 3000)) for _ in docs)
    end = max(s + len(d) for s, d in zip(starts, docs, strict=True))
    own = tuple(draw(st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=5)))
    return RAGRequest(docs, starts, own, end + draw(st.integers(0, 50))), draw(st.sampled_from([1, 3, 4, 16]))


@pytest.fixture(scope="module")
def llama64(folder):
    model = tiny_model(folder, "llama", "llama3", dtype=torch.float64, seed=1)
    float64_ops(model, check_model(model).rope)
    return model


@given(drawn=requests())
@example(drawn=(RAGRequest(((1,),), (0,), (2,), 1), 1))  # one token everywhere, offset 0
@example(drawn=(RAGRequest(((3, 4, 5), (3, 4, 5)), (7, 7), (6, 7), 10), 4))  # one document twice at one start
def test_any_layout_float64(llama64, drawn):
    request, block_size = drawn
    note(f"{request}, block_size={block_size}")
    want, want_tokens = oracle(llama64, request)
    rag = LazyRAG(llama64, None, num_blocks=64, block_size=block_size)
    got = rag.own_logits(request)
    err = (got - want).abs().max().item()
    target(err)
    assert err <= 1e-12
    assert rag.generate(request, "lazy", GREEDY).tokens == want_tokens
    rag.cache.store.check_invariants()
